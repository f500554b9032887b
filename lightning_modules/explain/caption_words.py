"""A captioner seen word by word, for captum: pixels in [0, 1] -> the log-probabilities of one word of a caption.

`CaptionWordScorer` wraps a CNN-RNN captioner so that the explaining code treats it as it treats a classifier
(`PixelClassifier`): normalisation inside, `layer(name)` for Grad-CAM, `net` and `parameterised_layers()` for the
cascading randomisation check. Its forward takes, besides the pixels, the caption (token ids) and which word of it
to score, one of each per row: a batch of rows is every (image, word) pair of a batch of images.

`ground_words` finds, on the shapes data, the object each word of a caption speaks of (pointing game).
"""

from __future__ import annotations

import torch
from torch import nn

from datamodules.images import IMAGENET_MEAN, IMAGENET_STD
from datamodules.shapes import COLOURS, SHAPES, SIZES
from framework.errors import UserError
from lightning_modules.captioning.cnn_rnn import CNNRNNCaptioner
from lightning_modules.captioning.decoding import greedy_decode


class CaptionWordScorer(nn.Module):
    """log p(word | image, the caption's words before it), teacher-forced, of a CNN-RNN captioner."""

    def __init__(self, captioner: CNNRNNCaptioner):
        super().__init__()
        self.vocab, self.max_len = captioner.vocab, captioner.hparams.max_len
        self.image_size = captioner.hparams.image_size
        self.net = nn.ModuleDict({"encoder": captioner.encoder, "decoder": captioner.decoder})
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def has_attention(self) -> bool:
        return self.net.decoder.attention is not None

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Encoder features [B, h*w, C] of pixels in [0, 1], and the grid (h, w)."""
        grid = self.net.encoder((pixels - self.mean) / self.std)
        return grid.flatten(2).transpose(1, 2), tuple(grid.shape[-2:])

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the vocabulary [N, V] of word `positions[n]` (0: the first word) of caption
        `tokens[n]` (<bos> words <eos>), given the image and the words before it."""
        features, _ = self.features(pixels)
        steps = int(positions.max()) + 1  # no need to decode past the last word scored
        logits, _ = self.net.decoder(features, tokens[:, :steps])
        return logits[torch.arange(len(positions), device=logits.device), positions].float().log_softmax(-1)

    @torch.no_grad()
    def generate(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[list[str]]]:
        """Greedy captions: token ids [B, T] (<bos> words <eos>, padded) and the words of each."""
        tokens = greedy_decode(self.net.decoder, self.features(pixels)[0], self.vocab.bos, self.vocab.eos,
                               self.max_len)[0]
        # Word t is token t + 1 (after <bos>); every token up to <eos> counts, <unk> too, to keep them aligned.
        eos = self.vocab.eos
        words = [[self.vocab.words[i] for i in row[: row.index(eos) if eos in row else len(row)]]
                 for row in tokens.tolist()]
        bos = torch.full_like(tokens[:, :1], self.vocab.bos)
        return torch.cat([bos, tokens], 1), words

    @torch.no_grad()
    def attention(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The decoder's soft attention while reading caption `tokens` [B, T]: [B, T - 1, h, w] (word t's map at t)."""
        features, grid = self.features(pixels)
        _, alphas = self.net.decoder(features, tokens[:, :-1])
        return alphas.float().unflatten(-1, grid)

    def layer(self, name: str, key: str = "model.gradcam_layer") -> nn.Module:
        """The submodule called `name` (a dotted path: encoder, encoder.body.2, ...)."""
        try:
            return self.net.get_submodule(name)
        except AttributeError:
            layers = ", ".join(["encoder", *(f"encoder.body.{n}" for n, _ in self.net.encoder.body.named_children())])
            raise UserError(f"the captioner has no layer '{name}' ({key}); its image encoder's layers are: "
                            f"{layers}") from None

    def parameterised_layers(self) -> list[str]:
        """From the input to the output: the encoder's top-level blocks, then the decoder as one unit."""
        blocks = [f"encoder.body.{name}" for name, block in self.net.encoder.body.named_children()
                  if any(True for _ in block.parameters())]
        return [*blocks, "decoder"]


def ground_words(words: list[str], objects: list[dict]) -> list[int | None]:
    """For each word of a shapes caption, the index of the object it speaks of (None: none).

    A caption names its objects in noun phrases that end at a shape word ("a small blue square to the left of a
    large red circle"); a phrase speaks of the object that matches most of its size, colour and shape words.
    Words after the last shape word belong to the last phrase. A colour, shape or size word speaks of its phrase's
    object only if it is true of it (a wrong word names no object); any other word speaks of its phrase's object.
    """
    attribute = {**{s: "shape" for s in SHAPES}, **{c: "colour" for c in COLOURS}, **{s: "size" for s in SIZES}}
    phrases, phrase = [], 0
    for word in words:
        phrases.append(phrase)
        phrase += word in SHAPES
    phrases = [min(p, max(phrase - 1, 0)) for p in phrases]
    named = []
    for p in range(max(phrases, default=-1) + 1):
        said = [w for w, q in zip(words, phrases) if q == p and w in attribute]
        scores = [sum(obj[attribute[w]] == w for w in said) for obj in objects]
        named.append(max(range(len(objects)), key=scores.__getitem__) if objects and max(scores) > 0 else None)
    grounded = []
    for word, p in zip(words, phrases):
        obj = named[p]
        true = obj is not None and (word not in attribute or objects[obj][attribute[word]] == word)
        grounded.append(obj if true else None)
    return grounded


def check_captioner(module) -> CNNRNNCaptioner:
    """The captioner, if caption_explain explains its kind (CNN-RNN); a UserError naming ckpt_path otherwise."""
    if not isinstance(module, CNNRNNCaptioner):
        raise UserError(f"ckpt_path: task=caption_explain explains CNN-RNN captioners (task=shapes_captioning, "
                        f"cnn_rnn_coco, cnn_rnn_flickr8k checkpoints); this one is a {type(module).__name__}")
    return module

