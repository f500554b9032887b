"""task=caption_explain: which pixels made a captioner say each word of its caption, and is that answer right?

Captioners: CNN-RNN and Hugging Face captioners (BLIP, ViT-GPT2, GIT, BLIP-2, Qwen2-VL, PaliGemma, ...; checkpoints or
export directories; caption_words.py adapts each kind).
For each image of a batch the captioner's greedy caption is generated; then every word of it (or the words at
`words`) is explained: the word's log-probability, teacher-forced on the generated caption (the sum over its
tokens), is attributed to the pixels by captum, for all (image, word) pairs of the batch at once (words as rows).
Methods (`methods`): those of task=saliency (Attributions: integrated_gradients, gradcam on the image encoder's
output grid - a vision transformer's patch tokens as a grid -, vanilla, smoothgrad) and `attention` (CNN-RNN),
the decoder's soft attention while it reads the caption, upsampled to the image.

Outputs, as task=saliency writes them (its overlays, .npy files and summary): caption_explain/input/<image>.png;
caption_explain/<method>/<image>.npy, the maps [words, H, W]; caption_explain/<image>.png, a sheet with a row per
method: the image, then one overlay per word with the word under it; contact_sheet.png (the first
`contact_sheet_images` sheets, also in TensorBoard); predictions.json: per image its caption and per word its
probability and measures; metrics.json: the measures averaged over content words and over function words.

Measured per word (the saliency task's measure functions, with the word's probability as the score):
deletion_auc / insertion_auc; pointing_game where the data has object boxes (the shapes data): a colour, shape or
size word should peak on the object it names, a function word is scored against its noun phrase's object
(caption_words.ground_words), chance is the share of the image that counts as a hit (pointing_game_chance);
spearman_<layer> (cascading randomisation of the captioner from the decoder down to <layer>, on
`randomisation_words` rows of each batch spread evenly over them: it costs a set of maps per layer); and for
integrated_gradients its completeness: gap = f(x) - f(black image) and delta = |sum of attributions - gap|.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from framework.checkpoints import read_checkpoint
from framework.contracts import SavesPredictions
from framework.errors import UserError
from framework.files import write_png
from framework.images import to_rgb
from framework.rendering import SMALL_TILE, attention_overlay, enlarge, grid, read_rgb, stack, with_caption
from framework.schema import (
    ExistingPath,
    Fraction,
    NonEmpty,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    Seed,
)
from lightning_modules.captioning.base import CaptioningModule
from lightning_modules.captioning.inference import Captioner
from lightning_modules.explain.attributions import Attributions, Method, to_maps
from lightning_modules.explain.base import ExplainBase, gradients, write_npy, write_summary
from lightning_modules.explain.caption_words import CaptionWordScorer, Generated, ground_words, word_scorer
from lightning_modules.explain.measures import (
    cascading_randomisations,
    deletion_insertion,
    pointing_chance,
    pointing_game,
    spearman,
)

CaptionMethod = Literal[Method, "attention"]  # model.methods: task=saliency's, and the decoder's attention
CAPTION_METHODS: tuple[str, ...] = get_args(CaptionMethod)
KINDS = ("content", "function")


@dataclass
class Words:
    """The (image, word) rows of a batch: which image, which word, and the inputs of the scorer for each."""

    images: torch.Tensor  # [R] index into the batch
    positions: torch.Tensor  # [R] the word's index in its caption
    pixels: torch.Tensor  # [R, 3, H, W]
    tokens: torch.Tensor  # [R, T] the image's caption as its decoder reads it (e.g. <bos> words <eos>)
    starts: torch.Tensor  # [R] the word's first token in `tokens`
    ends: torch.Tensor  # [R] one past its last token

    @property
    def targets(self) -> torch.Tensor:
        """The scorer's output column of the word (0; 1 is every other word)."""
        return torch.zeros_like(self.positions)

    @property
    def forward_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.tokens, self.starts, self.ends

    def rows(self, index: torch.Tensor) -> Words:
        return Words(*(getattr(self, field.name)[index] for field in fields(self)))


class CaptionExplainModule(ExplainBase, SavesPredictions):
    """Per-word attribution maps of a captioner (`captioner`: its checkpoint or export directory, model.captioner),
    measured. Settings: conf/model/caption_explain.yaml."""

    data_inputs = ("image_size", "object_words")  # from the data module, before the module is built
    weights_key = "model.captioner"  # the weights it uses: it has no checkpoints of its own

    def __init__(
        self,
        captioner: ExistingPath,
        methods: Annotated[list[CaptionMethod], NonEmpty()],
        words: list[NonNegativeInt] | None,
        function_words: list[str],
        gradcam_layer: str,
        smoothgrad_samples: PositiveInt,
        smoothgrad_noise: NonNegativeFloat,
        ig_steps: PositiveInt,
        internal_batch_size: PositiveInt,
        deletion_steps: PositiveInt,
        pointing_tolerance: Fraction,
        randomisation: bool,
        randomisation_words: PositiveInt | None,
        seed: Seed,
        contact_sheet_images: PositiveInt,
        image_size: PositiveInt | None,
        object_words: dict[str, list[str]] | None,
    ):
        """From the data module: `image_size`, the size its images are resized to (the captioner's own, checked here);
        `object_words`, for each attribute of the objects its images list (shape, colour, size) the words that name
        its values (caption_words.ground_words; None: the images list no objects)."""
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.methods, self.words, self.function_words = list(methods), words, set(function_words)
        self.object_words = object_words
        self.scorer: CaptionWordScorer = word_scorer(load_captioner(captioner)).requires_grad_(False)
        if "attention" in self.methods and not self.scorer.has_attention:
            others = ",".join(m for m in self.methods if m != "attention") or "integrated_gradients,gradcam"
            raise UserError(
                f"model.methods: {self.scorer.attention_missing}: leave 'attention' out (model.methods=[{others}])"
            )
        if image_size is not None and self.scorer.image_size not in (None, image_size):
            raise UserError(
                f"data.image_size={image_size}, but the captioner (model.captioner) takes {self.scorer.image_size} px "
                f"images: set data.image_size={self.scorer.image_size}"
            )
        settings = dict(
            gradcam_layer=gradcam_layer,
            smoothgrad_samples=smoothgrad_samples,
            smoothgrad_noise=smoothgrad_noise,
            ig_steps=ig_steps,
            internal_batch_size=internal_batch_size,
        )
        self.attributions = Attributions(self.scorer, **settings)
        randomised = cascading_randomisations(self.scorer, seed) if randomisation else []
        self.randomised_layers = [name for name, _ in randomised]
        self.randomised = nn.ModuleList(model for _, model in randomised)  # moved to the device with the module
        self.randomised_attributions = [Attributions(model, **settings) for model in self.randomised]

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        if not self.has_images(batch):
            return []
        with gradients():  # every tensor made here is a normal one, not an inference tensor of the predict loop
            pixels = batch["images"].clone()
            generated = self.scorer.generate(pixels)
            tokens, captions = generated.tokens, generated.words
            rows = [{"image": path, "caption": " ".join(words)} for path, words in zip(batch["paths"], captions)]
            words = self._words(pixels, generated, rows)
            records = [
                {"word": captions[i][t], "position": t} for i, t in zip(words.images.tolist(), words.positions.tolist())
            ]
            self._describe(records, words, captions, batch.get("objects"), pixels)
            maps = {
                method: self._measure(method, pixels, tokens, words, records)
                for method in (self.methods if records else ())
            }
        for i, row in enumerate(rows):
            mine = (words.images == i).nonzero()[:, 0]
            row["words"] = [records[r] for r in mine.tolist()]
            self._write(row, pixels[i], {method: m[mine] for method, m in maps.items()})
        return rows

    def _words(self, pixels: torch.Tensor, generated: Generated, rows) -> Words:
        """The rows to explain: every word of every caption, or the words at model.words."""
        pairs = []
        for i, caption in enumerate(generated.words):
            chosen = range(len(caption)) if self.words is None else self.words
            outside = [t for t in chosen if t >= len(caption)]
            if outside:
                raise UserError(
                    f"model.words={list(self.words)}: the caption of {rows[i]['image']} "
                    f"('{rows[i]['caption']}') has {len(caption)} words (indices 0..{len(caption) - 1}); "
                    "give smaller indices, or model.words=null for every word"
                )
            pairs += [(i, t, *generated.spans[i][t]) for t in chosen]
        images, positions, starts, ends = (
            (torch.tensor(column, dtype=torch.long, device=pixels.device).view(-1) for column in zip(*pairs))
            if pairs
            else (pixels.new_zeros(0, dtype=torch.long),) * 4
        )
        return Words(images, positions, pixels[images], generated.tokens[images], starts, ends)

    def _describe(
        self,
        records: list[dict],
        words: Words,
        captions: list[list[str]],
        objects: list[list[dict]] | None,
        pixels: torch.Tensor,
    ) -> None:
        """Each word's kind, its probability and, where the data has objects, the box it should point at."""
        with torch.no_grad():
            log_probs = self.scorer(words.pixels, *words.forward_args) if records else None
        for r, record in enumerate(records):
            record["kind"] = "function" if record["word"] in self.function_words else "content"
            record["probability"] = log_probs[r, words.targets[r]].exp().item()
        if objects is None or self.object_words is None:
            return
        grounded = [ground_words(caption, found, self.object_words) for caption, found in zip(captions, objects)]
        for record, i, t in zip(records, words.images.tolist(), words.positions.tolist()):
            record["box"] = None if grounded[i][t] is None else objects[i][grounded[i][t]]["box"]
        tolerance = self.hparams.pointing_tolerance * max(pixels.shape[-2:])
        boxed = [record for record in records if record["box"] is not None]
        if boxed:
            boxes = torch.tensor([record["box"] for record in boxed])
            for record, chance in zip(boxed, pointing_chance(boxes, *pixels.shape[-2:], tolerance).tolist()):
                record["pointing_game_chance"] = chance

    def _maps(
        self,
        method: str,
        scorer: CaptionWordScorer,
        attributions: Attributions,
        pixels: torch.Tensor,
        tokens: torch.Tensor,
        words: Words,
        records: list[dict] | None = None,
    ) -> torch.Tensor:
        """One map [H, W] per row; for integrated_gradients also each row's gap and completeness delta (into
        `records`)."""
        if method == "attention":  # a word's map: the mean over the steps predicting its tokens
            attention = scorer.attention(pixels, tokens)[words.images]  # [R, T - 1, h, w]
            steps = torch.arange(1, attention.shape[1] + 1, device=attention.device)
            inside = ((steps >= words.starts[:, None]) & (steps < words.ends[:, None])).to(attention)
            attention = (attention * inside[..., None, None]).sum(1) / inside.sum(1)[:, None, None]
            return F.interpolate(attention[:, None], size=pixels.shape[-2:], mode="bilinear")[:, 0]
        inputs = words.pixels.clone().requires_grad_()
        attributed = attributions.attribute(method, inputs, words.targets, words.forward_args)
        if method == "integrated_gradients" and records is not None:
            with torch.no_grad():
                gap = scorer(words.pixels, *words.forward_args) - scorer(
                    torch.zeros_like(words.pixels), *words.forward_args
                )
                gap = gap.gather(1, words.targets[:, None])[:, 0]
            delta = (attributed.detach().sum((1, 2, 3)) - gap).abs()
            for record, gap_, delta_ in zip(records, gap.tolist(), delta.tolist()):
                record.update({"integrated_gradients/gap": gap_, "integrated_gradients/delta": delta_})
        return to_maps(attributed)

    def _measure(
        self, method: str, pixels: torch.Tensor, tokens: torch.Tensor, words: Words, records: list[dict]
    ) -> torch.Tensor:
        maps = self._maps(method, self.scorer, self.attributions, pixels, tokens, words, records)
        score = lambda x: self.scorer(x, *words.forward_args)  # noqa: E731 (the word's log-probabilities)
        measured = dict(
            zip(
                ("deletion_auc", "insertion_auc"),
                deletion_insertion(score, words.pixels, maps, words.targets, self.hparams.deletion_steps),
            )
        )
        for r, record in enumerate(records):
            record.update({f"{method}/{key}": value[r].item() for key, value in measured.items()})
        sample = evenly_spaced(len(records), self.hparams.randomisation_words)
        for layer, model, attributions in zip(self.randomised_layers, self.randomised, self.randomised_attributions):
            randomised = self._maps(method, model, attributions, pixels, tokens, words.rows(sample))
            for r, value in zip(sample.tolist(), spearman(maps[sample], randomised).tolist()):
                records[r][f"{method}/spearman_{layer}"] = value
        boxed = [r for r, record in enumerate(records) if record.get("box") is not None]
        if boxed:
            tolerance = self.hparams.pointing_tolerance * max(pixels.shape[-2:])
            hits = pointing_game(maps[boxed], torch.tensor([records[r]["box"] for r in boxed]).to(maps), tolerance)
            for r, hit in zip(boxed, hits.tolist()):
                records[r][f"{method}/pointing_game"] = hit
        return maps

    def _write(self, row: dict, image: torch.Tensor, maps: dict[str, torch.Tensor]) -> None:
        """The image, each method's maps (.npy) and the image's sheet: a row per method, a panel per word."""
        name, folder = self.image_name(row["image"]), self.output_dir / "caption_explain"
        rgb = to_rgb(image)
        write_png(folder / "input" / f"{name}.png", rgb)
        big = enlarge(rgb, SMALL_TILE)
        lines = []
        for method, method_maps in maps.items():
            write_npy(folder / method / f"{name}.npy", method_maps.cpu().numpy())
            panels = [with_caption(big, method)]
            panels += [
                with_caption(attention_overlay(big, m.cpu().numpy()), w["word"])
                for m, w in zip(method_maps, row["words"])
            ]
            lines.append(grid(panels, len(panels)))
        if lines:
            write_png(folder / f"{name}.png", stack(lines))

    def save_predictions(self, rows: list[dict], output_dir) -> dict[str, float]:
        """predictions.json, metrics.json's measures (means per kind of word) and the contact sheet."""
        sheets = [output_dir / "caption_explain" / f"{self.image_name(row['image'])}.png" for row in rows]
        shown = [read_rgb(path) for path in sheets if path.is_file()][: self.hparams.contact_sheet_images]
        metrics = word_metrics(rows)
        write_summary(output_dir, rows, metrics, {"contact_sheet": stack(shown)} if shown else {})
        return metrics


def load_captioner(path: str) -> CaptioningModule:
    """The captioner at `path` (model.captioner): a checkpoint of ours or a BLIP / ViT-GPT2 export directory."""
    if not Path(path).is_dir():
        read_checkpoint(path, "model.captioner")  # a broken file: one error naming the key
    try:
        return Captioner.from_pretrained(path).module
    except UserError as error:
        raise UserError(f"model.captioner={path}: {error}") from None


def evenly_spaced(total: int, count: int | None) -> torch.Tensor:
    """`count` indices spread evenly over range(total) (all of them when count is None or not smaller)."""
    if count is None or count >= total:
        return torch.arange(total)
    return torch.linspace(0, total - 1, count).round().long()


def word_metrics(rows: list[dict], prefix: str = "predict") -> dict[str, float]:
    """The mean of every numeric measure over the content words and over the function words
    (`prefix/<measure>_content_words`, ..._function_words; words without the measure, e.g. without a box for the
    pointing game, are left out of its mean), Integrated Gradients' completeness, the numbers of images and words."""
    words = [word for row in rows for word in row["words"]]
    metrics = {f"{prefix}/images": float(len(rows)), f"{prefix}/words": float(len(words))}
    for kind in KINDS:
        group = [word for word in words if word["kind"] == kind]
        metrics[f"{prefix}/{kind}_words"] = float(len(group))
        keys = dict.fromkeys(
            key
            for word in group
            for key, value in word.items()
            if isinstance(value, (bool, int, float)) and key != "position"
        )
        for key in keys:
            values = [word[key] for word in group if word.get(key) is not None]
            metrics[f"{prefix}/{key}_{kind}_words"] = float(np.mean(values))
    errors = [completeness_error(word) for word in words if "integrated_gradients/delta" in word]
    if errors:  # the median and the share within 2%: a word with a gap near 0 has a huge relative error
        metrics[f"{prefix}/integrated_gradients/completeness_error_median"] = float(np.median(errors))
        metrics[f"{prefix}/integrated_gradients/completeness_within_2pct"] = float(np.mean(np.less(errors, 0.02)))
    return metrics


def completeness_error(word: dict) -> float:
    """Integrated Gradients' completeness error of a word: |sum of attributions - gap| / |gap|, where the gap is
    log p(word | image) - log p(word | black image)."""
    return word["integrated_gradients/delta"] / max(abs(word["integrated_gradients/gap"]), 1e-12)
