"""What the Hugging Face captioners (BLIP, ViT-GPT2) share.

- loading from `model.pretrained`: a local `save_pretrained` directory or a hub id already in the Hugging Face
  cache; nothing is downloaded at run time (scripts/download_models.py fetches weights where a network is);
- images prepared by the model's own image processor (`image_transform`, which the runner hands the data), so training,
  evaluation, the Captioner API and the exported model all see the same pixels;
- the loss: cross-entropy with label smoothing over the caption tokens (prompt and padding set to -100);
- generation settings (`generation`, `GenerationConfig` fields) written into the model's generation config, which
  every `generate` call is given and exports save (an export loaded without `generation` keeps its settings);
- self-contained checkpoints: config and processor files travel in the checkpoint's hyperparameters, so
  `load_from_checkpoint` rebuilds the model without `pretrained`;
- `export(directory)`: save_pretrained of model (safetensors) and processor, plus a model card;
- trainer=fsdp: the transformers model is sharded by its family's `fsdp_layers` (conf/model/sharding/,
  framework/fsdp.py), `generate` included.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import NotRequired, TypedDict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, PreTrainedModel

from datamodules.batches import CaptionBatch
from framework.config import to_plain
from framework.contracts import BuildsFromConfig, Exports, InferenceOverrides
from framework.distributed import global_token_mean
from framework.errors import UserError
from framework.files import atomic_dir
from framework.fsdp import ShardedByLayers, full_state_dict, is_sharded
from framework.pretrained import load_offline
from framework.schema import Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from lightning_modules.captioning.base import CaptioningModule

IGNORE = -100  # target id that cross-entropy skips (prompt, padding)
GENERATION_KEYS = ("num_beams", "max_length", "min_length")  # shown in the model card


class GenerationSettings(TypedDict):
    """model.generation: the fields of transformers' GenerationConfig that captioning uses (its meaning of each)."""

    num_beams: NotRequired[PositiveInt]
    max_length: NotRequired[PositiveInt]  # tokens, the prompt's included (BLIP)
    max_new_tokens: NotRequired[PositiveInt]
    min_length: NotRequired[NonNegativeInt]
    min_new_tokens: NotRequired[NonNegativeInt]
    early_stopping: NotRequired[bool]
    do_sample: NotRequired[bool]
    temperature: NotRequired[PositiveFloat]
    top_k: NotRequired[NonNegativeInt]
    top_p: NotRequired[Fraction]
    repetition_penalty: NotRequired[PositiveFloat]
    length_penalty: NotRequired[float]
    no_repeat_ngram_size: NotRequired[NonNegativeInt]
    num_beam_groups: NotRequired[PositiveInt]
    diversity_penalty: NotRequired[NonNegativeFloat]


class ImageProcessorTransform:
    """PIL image -> pixel tensor [3, H, W], exactly as the model's Hugging Face image processor prepares it."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.image_processor.to_json_string()})"


class HFCaptioner(ShardedByLayers, CaptioningModule, BuildsFromConfig, InferenceOverrides, Exports):
    """A transformers image-to-text model as a captioner. Subclasses set `model_class` and implement
    `logits_and_targets`, `generate_ids`, `vision_tower`, and for task=caption_explain `decoder_inputs` and
    `decoder_logits`. A subclass is one file plus its conf/model/<name>.yaml (and conf/model/sharding/<name>.yaml):
    checkpoints name their class, exports are recognised by their config.json's model_type (`export_model_type`),
    and scripts/download_models.py lists the hub ids the YAMLs name."""

    inference_hparams = ("generation", "spice")
    model_class: type[PreTrainedModel]
    usage = ""  # model-card snippet; {prompt} is filled in
    fsdp_methods = ("generate",)

    def __init__(
        self,
        pretrained: str | None,
        optimizer: dict,
        scheduler: dict | None,
        generation: GenerationSettings | None,
        label_smoothing: Fraction,
        max_caption_tokens: PositiveInt,
        freeze_vision: bool,
        gradient_checkpointing: bool,
        spice: bool,
        architecture: dict[str, str] | None = None,
    ):
        """`pretrained`: a hub id in the Hugging Face cache or a save_pretrained folder; `generation`: generate()'s
        settings (null: the checkpoint's own); `max_caption_tokens`: training text is truncated to it; `architecture`:
        the model's config and processor files, which only checkpoints set (load_from_checkpoint)."""
        super().__init__(spice=spice)
        self.save_hyperparameters(logger=False, ignore=["architecture"])
        for key in ("optimizer", "scheduler", "generation"):
            self.hparams[key] = to_plain(self.hparams[key])
        if architecture:  # load_from_checkpoint: the architecture from the checkpoint, its weights from the state dict
            self.model, self.image_processor, self.tokenizer = self.build_from_files(architecture)
        else:
            self.model, self.image_processor, self.tokenizer = self.load_pretrained_parts()
        self.model.train()  # from_pretrained returns it in eval mode; Lightning switches modes from here on
        self.prepare_special_tokens()
        # Decoding settings live in the model's generation config: used by every generate call, saved with exports.
        self.model.generation_config.update(**(self.hparams.generation or {}))
        if freeze_vision:
            self.vision_tower().requires_grad_(False)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @classmethod
    def export_model_type(cls) -> str:
        """The `model_type` in the config.json of this class's exports (e.g. "blip"): how the Captioner API knows
        them."""
        return cls.model_class.config_class.model_type

    # -- what subclasses provide -------------------------------------------------------------------------------
    def load_pretrained_parts(self) -> tuple[PreTrainedModel, object, object]:
        """(model, image processor, tokenizer) from the pretrained weights the hparams name."""
        return self.load_dir(self.hparams.pretrained)

    def logits_and_targets(self, batch: CaptionBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits [B, T, V] and the aligned targets [B, T] (IGNORE where no loss) of the batch's captions."""
        raise NotImplementedError

    def generate_ids(self, images: torch.Tensor, generation_config=None) -> torch.Tensor:
        """Generated token ids [B, T] of the captions only (no prompt), with the model's generation config or
        `generation_config`."""
        raise NotImplementedError

    def decoder_inputs(self, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The token ids the text decoder reads to score captions `ids` (from generate_ids) teacher-forced, and
        where the captions start in them (task=caption_explain)."""
        raise NotImplementedError

    def decoder_logits(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, T, V] of the text decoder reading `ids` [B, T] (position t predicts token t + 1)."""
        raise NotImplementedError

    def vision_tower(self) -> torch.nn.Module:
        raise NotImplementedError

    def prepare_special_tokens(self) -> None:
        """Make the model's special token ids agree with the tokenizer (where the checkpoint leaves them unset)."""

    def save_processor(self, directory: Path) -> None:
        self.image_processor.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    # -- loading and saving --------------------------------------------------------------------------------------
    def load_dir(self, source: str | None) -> tuple[PreTrainedModel, object, object]:
        """Model, image processor and tokenizer of one directory or cached hub id (`model.pretrained`)."""
        if not source:
            raise UserError(
                "model.pretrained is not set: give a hub id in the Hugging Face cache or a local "
                "save_pretrained directory"
            )
        loaders = (self.model_class.from_pretrained, AutoImageProcessor.from_pretrained, AutoTokenizer.from_pretrained)
        return tuple(load_offline(load, source, "model.pretrained") for load in loaders)

    def architecture_files(self) -> dict[str, str]:
        """The model config and processor files (text), without weights."""
        with tempfile.TemporaryDirectory() as folder:
            self.model.config.save_pretrained(folder)
            self.model.generation_config.save_pretrained(folder)
            self.save_processor(Path(folder))
            return {path.name: path.read_text(encoding="utf-8") for path in sorted(Path(folder).iterdir())}

    def build_from_files(self, files: dict[str, str]) -> tuple[PreTrainedModel, object, object]:
        with tempfile.TemporaryDirectory() as folder:
            for name, text in files.items():
                Path(folder, name).write_text(text, encoding="utf-8")
            model = self.model_class._from_config(AutoConfig.from_pretrained(folder))
            model.generation_config = model.generation_config.from_pretrained(folder)
            return model, AutoImageProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["hyper_parameters"]["architecture"] = self.architecture_files()

    def fsdp_root(self) -> torch.nn.Module:
        return self.model

    def export(self, directory: str | os.PathLike) -> Path:
        """A Hugging Face directory: model (safetensors) with its generation config, processor, README.md.
        A sharded model is gathered first, so every rank calls this; rank 0 writes."""
        sharded = is_sharded(self.model)
        state_dict = full_state_dict(self.model) if sharded else None
        if sharded and dist.get_rank() != 0:
            return Path(directory)
        if sharded:  # tied weights were gathered apart: keep the one name save_pretrained keeps of each
            names = {name for name, _ in (*self.model.named_parameters(), *self.model.named_buffers())}
            state_dict = {name: tensor for name, tensor in state_dict.items() if name in names}
        with atomic_dir(directory) as folder:
            self.model.save_pretrained(folder, state_dict=state_dict)
            self.save_processor(folder)
            (folder / "README.md").write_text(self.model_card(), encoding="utf-8")
        return Path(directory)

    def model_card(self) -> str:
        logged = self.trainer.callback_metrics if self._trainer is not None else {}  # after training: test metrics
        metrics = {name: float(value) for name, value in sorted(logged.items()) if name.startswith("test/")}
        settings = ", ".join(f"{k}={getattr(self.model.generation_config, k)!r}" for k in GENERATION_KEYS)
        lines = [
            "---",
            "library_name: transformers",
            "pipeline_tag: image-text-to-text",
            "tags: [image-captioning]",
            "---",
            f"# {type(self).__name__}",
            "",
            f"A `{self.model_class.__name__}` image captioner fine-tuned with vlx "
            f"(`lightning_modules/captioning/{type(self).__module__.rsplit('.', 1)[-1]}.py`) from "
            f"`{self.hparams.pretrained or 'its encoder and decoder checkpoints'}`.",
            "",
            f"Generation settings (generation_config.json): `{settings}`.",
            "",
            "```python",
            self.usage.strip().format(prompt=self.hparams.get("prompt")),
            "```",
        ]
        if metrics:
            lines += ["", "Test metrics of the run that produced it:", "", "| metric | value |", "| --- | --- |"]
            lines += [f"| {name} | {value:.4f} |" for name, value in metrics.items()]
        return "\n".join(lines) + "\n"

    # -- the captioning module ---------------------------------------------------------------------------------
    def image_transform(self) -> ImageProcessorTransform:
        return ImageProcessorTransform(self.image_processor)

    def loss(self, batch: CaptionBatch) -> torch.Tensor:
        """Mean cross-entropy over the caption tokens of the global batch (see global_token_mean)."""
        logits, targets = self.logits_and_targets(batch)
        token_losses = F.cross_entropy(
            logits.flatten(0, 1).float(),
            targets.flatten(),
            ignore_index=IGNORE,
            label_smoothing=self.hparams.label_smoothing,
            reduction="sum",
        )
        return global_token_mean(token_losses, (targets != IGNORE).sum())

    def caption_texts(self, batch: CaptionBatch) -> list[str]:
        """The training caption of each item: its words as the data's tokenizer gives them (lower case, no
        punctuation), as BLIP's `pre_caption` and the Karpathy splits prepare captions."""
        return [" ".join(tokens) for tokens in batch.tokens]

    @torch.no_grad()
    def caption_batch(self, batch: CaptionBatch) -> list[str]:
        ids = self.generate_ids(batch.images)
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
