"""A captioner seen word by word, for captum: pixels in [0, 1] -> the log-probability of one word of a caption.

`CaptionWordScorer` is what the explaining code sees, whatever the captioner: like a classifier (`PixelClassifier`)
it normalises inside, has `layer(name)` for Grad-CAM and `net` and `parameterised_layers()` for the cascading
randomisation check. Its forward takes, besides the pixels, the caption (token ids) and where the word is in it
(its tokens [start, end)), one of each per row: a batch of rows is every (image, word) pair of a batch of images.
It returns two columns, log p(word) and log p(any other word), so that the word is captum's target 0 and the
softmax of a row is the word's probability (deletion / insertion curves). A word's log-probability, teacher-forced
on the caption, is the sum of its tokens' (a transformers tokenizer may split a word).

One subclass per kind of captioner (`word_scorer` picks it) provides the rest: `logits` (the decoder read
teacher-forced), `generate` (the greedy caption, its words and their tokens), the layers, and `attention` where the
decoder has one.

- `CNNRNNScorer`: CNN-RNN captioners (a word is a token); Grad-CAM on the encoder's grid; the decoder's attention.
- `HFScorer`: Hugging Face captioners (lightning_modules/captioning/hf.py: BLIP, ViT-GPT2, GIT, BLIP-2, Qwen2-VL,
  Idefics3, ...); words as the tokenizer decodes the caption; Grad-CAM on a layer of the vision transformer, its
  patch tokens as a grid (a CLS token left out; Qwen2-VL's merge blocks put back in place); no attention.

`ground_words` finds, on data whose images list their objects (the shapes data), the object each word of a caption
speaks of (pointing game), with the words the data gives for its objects' attributes (`object_words`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from framework.errors import UserError
from framework.images import IMAGENET_MEAN, IMAGENET_STD
from lightning_modules.captioning.cnn_rnn import CNNRNNCaptioner
from lightning_modules.captioning.decoding import greedy_decode
from lightning_modules.captioning.hf import HFCaptioner, grid_of_merge_order, merge_order


@dataclass
class Generated:
    """Greedy captions of a batch of images."""

    tokens: torch.Tensor  # [B, T] what the decoder reads teacher-forced: its start (<bos>, a prompt), caption, end
    words: list[list[str]]  # the words of each caption
    spans: list[list[tuple[int, int]]]  # each word's tokens: tokens[b, start:end]


class CaptionWordScorer(nn.Module):
    """log p(word | image, the caption's words before it), teacher-forced; subclasses adapt one kind of captioner."""

    image_size: int | None = None  # the size of the images the captioner takes (None: any)
    attention_missing: str | None = None  # why method 'attention' is not available (None: it is)

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def has_attention(self) -> bool:
        return self.attention_missing is None

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std

    def forward(
        self, pixels: torch.Tensor, tokens: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor
    ) -> torch.Tensor:
        """[N, 2]: log p(word n), log p(not word n), where word n is tokens[n, starts[n]:ends[n]] of caption
        `tokens[n]`, given the image and the tokens before it."""
        steps = int(ends.max())  # no need to read past the last token scored
        logits = self.logits(pixels, tokens[:, : steps - 1]).float()  # logits[:, t] predicts token t + 1
        token_log_probs = logits.log_softmax(-1).gather(2, tokens[:, 1:steps, None])[..., 0]
        index = torch.arange(1, steps, device=tokens.device)
        inside = (index >= starts[:, None]) & (index < ends[:, None])
        word = torch.where(inside, token_log_probs, 0.0).sum(1)
        # log(1 - p), stable; no gradient (captum's target is column 0; at p = 1 it is -inf)
        with torch.no_grad():
            other = torch.where(word > -math.log(2), torch.log(-torch.expm1(word)), torch.log1p(-torch.exp(word)))
        return torch.stack([word, other], 1)

    # -- what subclasses provide -------------------------------------------------------------------------------
    def logits(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits [N, T, V] of the decoder reading `tokens` [N, T] teacher-forced (t predicts t + 1)."""
        raise NotImplementedError

    def generate(self, pixels: torch.Tensor) -> Generated:
        """The greedy captions of pixels in [0, 1]."""
        raise NotImplementedError

    def attention(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The decoder's attention while reading `tokens` [B, T]: [B, T - 1, h, w] (the map at t: predicting
        token t + 1)."""
        raise NotImplementedError

    def layer(self, name: str, key: str = "model.gradcam_layer") -> nn.Module:
        """The module whose output [N, C, h, w] Grad-CAM reads; a UserError naming `key` for an unknown name."""
        raise NotImplementedError

    def parameterised_layers(self) -> list[str]:
        """Submodules of `net`, from the input to the output, for the cascading randomisation."""
        raise NotImplementedError


class CNNRNNScorer(CaptionWordScorer):
    """A CNN-RNN captioner: a word is one token (<bos> words <eos>: word t is token t + 1)."""

    def __init__(self, captioner: CNNRNNCaptioner):
        super().__init__(IMAGENET_MEAN, IMAGENET_STD)
        self.vocab, self.max_len = captioner.vocab, captioner.hparams.max_len
        self.image_size = captioner.hparams.image_size
        self.net = nn.ModuleDict({"encoder": captioner.encoder, "decoder": captioner.decoder})
        if self.net.decoder.attention is None:
            self.attention_missing = (
                "the captioner's decoder has no attention (model.decoder.attention=false when it was trained)"
            )

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Encoder features [B, h*w, C] of pixels in [0, 1], and the grid (h, w)."""
        grid = self.net.encoder(self.normalise(pixels))
        return grid.flatten(2).transpose(1, 2), tuple(grid.shape[-2:])

    def logits(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.net.decoder(self.features(pixels)[0], tokens)[0]

    @torch.no_grad()
    def generate(self, pixels: torch.Tensor) -> Generated:
        tokens = greedy_decode(
            self.net.decoder, self.features(pixels)[0], self.vocab.bos, self.vocab.eos, self.max_len
        )[0]
        # Word t is token t + 1 (after <bos>); every token up to <eos> counts, <unk> too, to keep them aligned.
        eos = self.vocab.eos
        words = [
            [self.vocab.words[i] for i in row[: row.index(eos) if eos in row else len(row)]] for row in tokens.tolist()
        ]
        bos = torch.full_like(tokens[:, :1], self.vocab.bos)
        return Generated(torch.cat([bos, tokens], 1), words, [[(t + 1, t + 2) for t in range(len(w))] for w in words])

    @torch.no_grad()
    def attention(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        features, grid = self.features(pixels)
        _, alphas = self.net.decoder(features, tokens[:, :-1])
        return alphas.float().unflatten(-1, grid)

    def layer(self, name: str, key: str = "model.gradcam_layer") -> nn.Module:
        """The submodule called `name` (a dotted path: encoder, encoder.body.2, ...)."""
        try:
            return self.net.get_submodule(name)
        except AttributeError:
            layers = ", ".join(["encoder", *(f"encoder.body.{n}" for n, _ in self.net.encoder.body.named_children())])
            raise UserError(
                f"the captioner has no layer '{name}' ({key}); its image encoder's layers are: {layers}"
            ) from None

    def parameterised_layers(self) -> list[str]:
        """From the input to the output: the encoder's top-level blocks, then the decoder as one unit."""
        blocks = [
            f"encoder.body.{name}"
            for name, block in self.net.encoder.body.named_children()
            if any(True for _ in block.parameters())
        ]
        return [*blocks, "decoder"]


class PatchGrid(nn.Module):
    """Hooked onto a vision transformer layer: the layer's patch tokens pass through this module's forward as a
    grid [B, C, h, w] (an identity), so that Grad-CAM reads them as it reads a CNN's feature map. Tokens [B, T, C]
    are a square grid, after a CLS token where T is one more than a square (the CLS token goes round the grid);
    rows [B * side * side, C] (Qwen2-VL's vision blocks) are in `merge_order`, `merge` patches a side per block;
    feature maps [B, C, h, w] (Florence-2's DaViT stages) are the grid."""

    def __init__(self, side: int | None = None, merge: int | None = None):
        super().__init__()
        self.side, self.merge = side, merge

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return grid

    def hook(self, module: nn.Module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.dim() == 4:  # a feature map already (Florence-2's DaViT)
            hidden = self(hidden)
        elif hidden.dim() == 2:
            hidden = merge_order(self(grid_of_merge_order(hidden, self.side, self.merge)), self.merge)
        else:
            side = math.isqrt(hidden.shape[1])
            cls = hidden.shape[1] - side * side  # 0 (SigLIP) or 1 (ViT, CLIP)
            patches = self(hidden[:, cls:].transpose(1, 2).unflatten(2, (side, side)))
            hidden = torch.cat([hidden[:, :cls], patches.flatten(2).transpose(1, 2)], 1)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class HFScorer(CaptionWordScorer):
    """A Hugging Face captioner (lightning_modules/captioning/hf.py): the words are those of the caption as its
    tokenizer decodes it, a word's tokens those that add it. Pixels reach the model laid out as its processor lays
    them out (`HFCaptioner.lay_out_pixels`: one image, one tile, or Qwen2-VL's patch sequences); processors that
    split images into tiles (SmolVLM) are explained on the whole image as one tile. Grad-CAM layers: `encoder` (the
    vision transformer's last layer) or any of its layers by name (`layer_names`), their patches as a grid."""

    attention_missing = "Hugging Face captioners have no attention method here (their attention is not explained)"

    def __init__(self, captioner: HFCaptioner):
        processor = captioner.image_processor
        if getattr(processor, "do_image_splitting", False):
            processor.do_image_splitting = False  # the whole image as one tile: a map per image, not per tile
        side = captioner.image_transform().side
        blank = torch.zeros(1, 3, side, side)
        captioner.model_inputs(blank, pixel_values=blank)  # one UserError now for a layout it cannot map back
        if getattr(captioner.vision_tower().config, "fullatt_block_indexes", None):  # Qwen2.5-VL's windows
            raise UserError(
                f"model.captioner: the {captioner.hparams.family} vision tower reorders its patches into windows; "
                "task=caption_explain maps patches in the processor's order only (Qwen2-VL)"
            )
        normalised = getattr(processor, "do_normalize", True)
        super().__init__(
            processor.image_mean if normalised else [0.0] * 3, processor.image_std if normalised else [1.0] * 3
        )
        self.captioner = captioner  # its model, tokenizer and prompt; copied with it by the randomisation check
        self.image_size = side
        tower = captioner.vision_tower()
        self.net = nn.ModuleDict({"encoder": tower, "decoder": nn.ModuleList(modules_beside(captioner.model, tower))})
        path, layers = next(
            (name, module) for name, module in tower.named_modules() if isinstance(module, nn.ModuleList)
        )
        self.layers_path = path
        self.layer_names = [f"encoder.{path}.{i}" for i in range(len(layers))]
        patch, merge = getattr(processor, "patch_size", None), getattr(processor, "merge_size", None)
        self.grids = nn.ModuleList(PatchGrid(side // patch if merge else None, merge) for _ in layers)
        for layer, grid in zip(layers, self.grids):
            layer.register_forward_hook(grid.hook)  # a bound method: deep copies hook their own grid
        settings = copy.deepcopy(captioner.model.generation_config)
        settings.num_beams, settings.do_sample = 1, False  # greedy, as for the CNN-RNN
        self.generation_config = settings

    def logits(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.captioner.decoder_logits(self.normalise(pixels), tokens)

    @torch.no_grad()
    def generate(self, pixels: torch.Tensor) -> Generated:
        ids = self.captioner.generate_ids(pixels, self.generation_config, pixel_values=self.normalise(pixels))
        tokens, start = self.captioner.decoder_inputs(ids)
        ends = self.captioner.end_token_ids()
        words, spans = [], []
        for row in tokens[:, start:].tolist():
            caption = row[: next((i for i, t in enumerate(row) if t in ends), len(row))]
            row_words, row_spans = split_words(self.captioner.tokenizer, caption)
            words.append(row_words)
            spans.append([(start + a, start + b) for a, b in row_spans])
        return Generated(tokens, words, spans)

    def layer(self, name: str, key: str = "model.gradcam_layer") -> nn.Module:
        names = {"encoder": len(self.grids) - 1, **{n: i for i, n in enumerate(self.layer_names)}}
        if name not in names:
            raise UserError(
                f"the captioner has no layer '{name}' ({key}); its vision transformer's layers are: "
                f"encoder (the last), {', '.join(self.layer_names)}"
            )
        return self.grids[names[name]]

    def parameterised_layers(self) -> list[str]:
        """The vision transformer's embeddings, each of its layers, its final norm, then the decoder as one unit."""
        container = self.layers_path.split(".")[0]
        names = []
        for name, child in self.net.encoder.named_children():
            if name == container:
                names += self.layer_names
            elif name != "pooler" and any(True for _ in child.parameters()):  # the pooler: unused by the decoder
                names.append(f"encoder.{name}")
        return [*names, "decoder"]


def modules_beside(model: nn.Module, part: nn.Module) -> list[nn.Module]:
    """The submodules that make up `model` with `part` left out: its children, those that hold `part` (GIT's `git`
    holds its image encoder) replaced by theirs, recursively."""
    beside = []
    for child in model.children():
        if child is part:
            continue
        if any(module is part for module in child.modules()):
            beside += modules_beside(child, part)
        else:
            beside.append(child)
    return beside


def split_words(tokenizer, ids: list[int]) -> tuple[list[str], list[tuple[int, int]]]:
    """The words of a caption's token ids, as the tokenizer decodes them, and each word's tokens [start, end): a
    token starts a word when decoding up to it gives one word more. Tokens that decode to nothing (special ones)
    join the word before them (before the first word: none)."""
    spans, count = [], 0
    for i in range(len(ids)):
        now = len(tokenizer.decode(ids[: i + 1], skip_special_tokens=True).split())
        if now > count:
            spans.append([i, i + 1])
        elif spans:
            spans[-1][1] = i + 1
        count = max(count, now)
    words = tokenizer.decode(ids, skip_special_tokens=True).split()
    if len(words) != len(spans):  # a token that decodes to several words: they count as one
        words = [tokenizer.decode(ids[a:b], skip_special_tokens=True).strip() for a, b in spans]
    return words, [(a, b) for a, b in spans]


def word_scorer(captioner) -> CaptionWordScorer:
    """The scorer of a captioner that caption_explain explains; a UserError naming model.captioner otherwise."""
    if isinstance(captioner, CNNRNNCaptioner):
        return CNNRNNScorer(captioner)
    if isinstance(captioner, HFCaptioner):
        return HFScorer(captioner)
    raise UserError(
        f"model.captioner: task=caption_explain explains CNN-RNN and Hugging Face captioners; this one is a "
        f"{type(captioner).__name__}"
    )


def ground_words(words: list[str], objects: list[dict], object_words: dict[str, list[str]]) -> list[int | None]:
    """For each word of a caption, the index of the object of `objects` it speaks of (None: none).

    `object_words`: for each attribute of the objects (a key of their dicts, e.g. shape, colour, size) the words that
    name its values; the first attribute is the noun (the shapes data: {"shape": [circle, ...], "colour": [red, ...],
    "size": [small, large]}). A caption names its objects in noun phrases that end at a noun ("a small blue square to
    the left of a large red circle"); a phrase speaks of the object that matches most of its attribute words. Words
    after the last noun belong to the last phrase. An attribute word speaks of its phrase's object only if it is true
    of it (a wrong word names no object); any other word speaks of its phrase's object.
    """
    attribute = {word: name for name, named in object_words.items() for word in named}
    nouns = set(next(iter(object_words.values()), ()))
    phrases, phrase = [], 0
    for word in words:
        phrases.append(phrase)
        phrase += word in nouns
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
