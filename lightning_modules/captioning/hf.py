"""Any Hugging Face image-text-to-text model as a captioner: one module for every `AutoModelForImageTextToText`
architecture (BLIP, BLIP-2, GIT, ViT-GPT2 and other VisionEncoderDecoder models, Qwen2-VL, SmolVLM, ...).

What differs between model families lives in YAML, one file per family, conf/model/family/<model_type>.yaml, chosen
by the model folder's config.json `model_type` (`model.family` overrides): the prompt and whether it is a chat turn,
how the prompt's tokens are laid out, the vision tower, LoRA's target modules and FSDP's layer classes. The module:

- loads `model.pretrained` (a save_pretrained folder or a hub id already in the Hugging Face cache; nothing is
  downloaded at run time) with `AutoModelForImageTextToText` and `AutoProcessor`;
- gets images from the data as uint8 [3, S, S] tensors (`image_transform`: resized to `model.image_size`, the family's
  or the processor's size), and runs the model's own processor on each batch (a fast processor works on the tensors
  on their device), so training, evaluation, the Captioner API and the exported model see the same pixels and the
  same image tokens;
- learns the caption tokens only: cross-entropy with label smoothing over the caption and the text that ends it
  (prompt, image tokens and padding carry no loss); generates after the same prompt and returns the caption alone;
- trains all weights, or LoRA/DoRA adapters (peft) on the language model (`model.lora.vision`: the vision tower too);
  `model.quantize=4bit|8bit` loads the frozen base through bitsandbytes (CUDA, or the CPU: bitsandbytes >= 0.49);
- self-critical training (scst.py) by sampling with `generate` and scoring the samples teacher-forced;
- self-contained checkpoints: config and processor files travel in the hyperparameters (`architecture`);
- `export(directory)`: a transformers folder (adapters merged) with processor and model card, and with LoRA the
  adapter folder (`adapter/`, loads with peft);
- trainer=fsdp: sharded by the family's `fsdp_layers` (or the command line's), `generate` included.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import re
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Literal, NotRequired, TypedDict

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from PIL import Image
from torchvision.transforms import functional as TF
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    BatchFeature,
    PreTrainedModel,
    ProcessorMixin,
    VisionEncoderDecoderModel,
)

from datamodules.batches import CaptionBatch
from framework.config import CONF, to_plain
from framework.contracts import BuildsFromConfig, Exports, InferenceOverrides
from framework.distributed import global_token_mean
from framework.errors import UserError
from framework.files import atomic_dir
from framework.fsdp import ShardedByLayers, full_state_dict, is_sharded
from framework.pretrained import load_offline
from framework.schema import Checker, Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, SettingsOf
from framework.text import tokenize
from lightning_modules.captioning.base import CaptioningModule, CaptionMetricSettings
from lightning_modules.captioning.scst import Rollouts, SCSTSettings, SelfCritical

IGNORE = -100  # target id that cross-entropy skips (prompt, padding)
GENERATION_KEYS = ("num_beams", "max_length", "max_new_tokens", "min_length")  # shown in the model card
FAMILIES = CONF / "model" / "family"
ADAPTER_DIR = "adapter"  # export/adapter: the LoRA adapters alone (peft)


class Family(TypedDict):
    """conf/model/family/<name>.yaml: what differs between model families (each key explained in the YAMLs)."""

    architecture: Literal["decoder", "encoder_decoder"]
    prompt: str
    chat: bool
    bos_first: bool
    drop_prompt_end: bool
    generate_drops_prompt_end: bool
    caption_end: str | None
    caption_token_type: NonNegativeInt
    image_size: PositiveInt | None
    vision_tower: str
    unused: list[str]
    lora_targets: str
    lora_vision_targets: str
    fsdp_layers: list[str]


class GenerationSettings(TypedDict):
    """model.generation: the fields of transformers' GenerationConfig that captioning uses (its meaning of each)."""

    num_beams: NotRequired[PositiveInt]
    max_length: NotRequired[PositiveInt]  # tokens, the prompt's included in decoder-only models
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


class LoraSettings(TypedDict):
    """model.lora (conf/model/hf_captioner.yaml)."""

    rank: PositiveInt | None  # null: full fine-tuning
    alpha: PositiveFloat
    dropout: Fraction
    dora: bool
    vision: bool  # adapt the vision tower too


def model_type_of(source: str) -> str | None:
    """The `model_type` of a model folder's (or cached hub id's) config.json, without loading weights."""
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True).model_type
    except (OSError, ValueError):
        return None


def family_settings(name: str) -> Family:
    """conf/model/family/<name>.yaml, checked; one UserError naming model.family if there is none."""
    path = FAMILIES / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in FAMILIES.glob("*.yaml")))
        raise UserError(
            f"model.family: no conf/model/family/{name}.yaml (model_type '{name}'); families: {known}. Add one for "
            "this architecture (copy the nearest family's file), or set model.family to one whose layout it shares"
        )
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    checker = Checker(partial_paths=False)
    checker.check(values, Family, f"conf/model/family/{name}.yaml")
    if checker.problems:
        raise UserError("\n".join(checker.problems))
    return values


def per_token(inputs: dict[str, torch.Tensor]) -> list[str]:
    """The processor outputs laid out along the text, as input_ids (attention_mask, token type ids of any kind)."""
    shape = inputs["input_ids"].shape
    named = [key for key in inputs if key == "attention_mask" or key.endswith("_ids")]
    return [key for key in named if inputs[key].shape == shape]


class ImageTextProcessor:
    """An image processor and a tokenizer called as one processor (VisionEncoderDecoder folders have no processor
    class of their own)."""

    def __init__(self, image_processor, tokenizer):
        self.image_processor, self.tokenizer = image_processor, tokenizer

    def __call__(self, images=None, text=None, **kwargs) -> BatchFeature:
        features = {}
        if images is not None:
            features.update(self.image_processor(images=images, return_tensors=kwargs.get("return_tensors")))
        if text is not None:
            features.update(self.tokenizer(text, **kwargs))
        return BatchFeature(features)

    def save_pretrained(self, directory) -> None:
        self.image_processor.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)


def load_processor(source: str, key: str):
    """AutoProcessor of a folder, or its image processor and tokenizer as one (ImageTextProcessor)."""
    processor = load_offline(AutoProcessor.from_pretrained, source, key)
    if isinstance(processor, ProcessorMixin):
        return processor
    return ImageTextProcessor(
        load_offline(AutoImageProcessor.from_pretrained, source, key),
        load_offline(AutoTokenizer.from_pretrained, source, key),
    )


def processor_side(image_processor) -> int | None:
    """The square side a transformers image processor resizes (and crops) images to, if it has one."""
    crop = image_processor.crop_size if getattr(image_processor, "do_center_crop", False) else None
    for size in (crop, getattr(image_processor, "size", None)):
        size = dict(size or {})
        if "height" in size:
            return int(size["height"])
        if "shortest_edge" in size and "longest_edge" not in size:
            return int(size["shortest_edge"])
    return None


class SquareImage:
    """PIL image -> uint8 [3, side, side] (bicubic; unchanged at that size): what the processor then prepares."""

    def __init__(self, side: int):
        self.side = side

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.size != (self.side, self.side):
            image = image.resize((self.side, self.side), Image.Resampling.BICUBIC)
        return TF.pil_to_tensor(image.convert("RGB"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.side})"


def image_patches(images: torch.Tensor, patch: int, frames: int, merge: int) -> torch.Tensor:
    """Images [B, C, S, S] as Qwen2-VL's processor lays them out: rows [B * g * g, C * frames * patch * patch] (g = S
    / patch), one per patch, the image repeated as `frames` frames, the patches in `merge_order`."""
    batch, channels, side, _ = images.shape
    grid = side // patch
    frames_of = images.unsqueeze(2).expand(batch, channels, frames, side, side)
    patches = frames_of.reshape(batch, channels, frames, grid, patch, grid, patch).permute(0, 1, 2, 4, 6, 3, 5)
    return merge_order(patches.reshape(batch, channels * frames * patch * patch, grid, grid), merge)


def merge_order(grid: torch.Tensor, merge: int) -> torch.Tensor:
    """A grid [B, C, g, g] as rows [B * g * g, C] in Qwen2-VL's order: blocks of merge x merge patches (the ones its
    merger makes one token) in raster order, each block's patches in raster order."""
    batch, channels, side, _ = grid.shape
    blocks = grid.reshape(batch, channels, side // merge, merge, side // merge, merge).permute(0, 2, 4, 3, 5, 1)
    return blocks.reshape(-1, channels)


def grid_of_merge_order(rows: torch.Tensor, side: int, merge: int) -> torch.Tensor:
    """merge_order's inverse: rows [B * side * side, C] -> grid [B, C, side, side]."""
    blocks = rows.reshape(-1, side // merge, side // merge, merge, merge, rows.shape[-1])
    return blocks.permute(0, 5, 1, 3, 2, 4).reshape(-1, rows.shape[-1], side, side)


CUT_PROMPT_END = (  # the model card's line for families whose generate must not read the prompt's closing token
    'inputs["input_ids"], inputs["attention_mask"] = inputs.input_ids[:, :-1], inputs.attention_mask[:, :-1]'
)


class HFCaptioner(ShardedByLayers, CaptioningModule, BuildsFromConfig, InferenceOverrides, Exports):
    """An image-text-to-text model fine-tuned to caption (see the module's docstring)."""

    inference_hparams = ("generation", "spice", "metrics")
    fsdp_methods = ("generate",)
    layers_from_model = True  # trainer=fsdp: the family's fsdp_layers unless the command line names some

    def __init__(
        self,
        pretrained: str | None,
        encoder_pretrained: str | None,
        decoder_pretrained: str | None,
        family: str | None,
        prompt: str | None,
        image_size: PositiveInt | None,
        optimizer: dict,
        scheduler: dict | None,
        generation: GenerationSettings | None,
        label_smoothing: Fraction,
        max_caption_tokens: PositiveInt,
        freeze_vision: bool,
        gradient_checkpointing: bool,
        lora: LoraSettings,
        quantize: Literal["4bit", "8bit"] | None,
        scst: SettingsOf[SCSTSettings] | None,
        spice: bool,
        metrics: CaptionMetricSettings,
        architecture: dict[str, str] | None = None,
    ):
        """`pretrained`: a hub id in the Hugging Face cache or a save_pretrained folder (or null with
        `encoder_pretrained` and `decoder_pretrained`: a VisionEncoderDecoder assembled from an image encoder and a
        text decoder); `family`: conf/model/family/<family>.yaml (null: config.json's model_type); `prompt` and
        `image_size`: null for the family's; `generation`: generate()'s settings (null: the checkpoint's own);
        `max_caption_tokens`: training captions are truncated to it; `architecture`: the model's config and processor
        files, which only checkpoints set (load_from_checkpoint)."""
        super().__init__(spice=spice, metrics=to_plain(metrics))
        self.save_hyperparameters(logger=False, ignore=["architecture"])
        for key in ("optimizer", "scheduler", "generation", "lora", "scst", "metrics"):
            self.hparams[key] = to_plain(self.hparams[key])
        if quantize and not lora["rank"]:
            raise UserError(f"model.quantize={quantize} trains adapters on a quantised model: set model.lora.rank")
        # load_from_checkpoint: the architecture from the checkpoint, its weights from the state dict; a quantised
        # base is loaded from model.pretrained again (its checkpoints hold the adapters alone: on_save_checkpoint)
        if architecture and not quantize:
            self.model, self.processor = self.build_from_files(architecture)
        else:
            self.model, self.processor = self.load_pretrained_parts()
        self.strict_loading = not quantize
        self.hparams.family = family or self.model.config.model_type
        self.family = family_settings(self.hparams.family)
        self.model.train()  # from_pretrained returns it in eval mode; Lightning switches modes from here on
        self.prepare_special_tokens()
        # Decoding settings live in the model's generation config: used by every generate call, saved with exports.
        self.model.generation_config.update(**(self.hparams.generation or {}))
        for name in self.family["unused"]:  # DDP would wait for their gradients (a checkpoint may lack them)
            with contextlib.suppress(AttributeError):
                self.model.get_submodule(name).requires_grad_(False)
        if freeze_vision:
            self.vision_tower().requires_grad_(False)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora["rank"]:
            self.model = self.with_adapters(self.model)
        settings = SCSTSettings(**scst) if scst else None
        # The controller only where SCST may start: its guard keeps a CPU copy of the best weights.
        self.scst = SelfCritical(settings) if settings and settings.planned else None

    # -- loading -------------------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_processor(self):
        return self.processor.image_processor

    def load_pretrained_parts(self) -> tuple[PreTrainedModel, object]:
        pretrained, encoder, decoder = (
            self.hparams[k] for k in ("pretrained", "encoder_pretrained", "decoder_pretrained")
        )
        if pretrained:
            quantization = self.quantization_config()

            def load(source, **kwargs):
                if quantization:
                    kwargs["quantization_config"] = quantization
                return AutoModelForImageTextToText.from_pretrained(source, **kwargs)

            return load_offline(load, pretrained, "model.pretrained"), load_processor(pretrained, "model.pretrained")
        if encoder and decoder:
            return self.assemble(encoder, decoder)
        raise UserError(
            "model.pretrained is not set: give a hub id in the Hugging Face cache or a local save_pretrained folder "
            "(or, for a VisionEncoderDecoder, model.encoder_pretrained and model.decoder_pretrained)"
        )

    @staticmethod
    def assemble(encoder: str, decoder: str) -> tuple[PreTrainedModel, ImageTextProcessor]:
        """A VisionEncoderDecoderModel from an image encoder and a text decoder (its cross-attention new)."""

        def build(_, local_files_only):
            # transformers 5's GPT2Config has no is_decoder for from_encoder_decoder_pretrained to read: set here.
            decoder_config = AutoConfig.from_pretrained(decoder, local_files_only=local_files_only)
            decoder_config.is_decoder = decoder_config.add_cross_attention = True
            return VisionEncoderDecoderModel.from_encoder_decoder_pretrained(
                encoder,
                decoder,
                encoder_local_files_only=local_files_only,
                decoder_local_files_only=local_files_only,
                decoder_config=decoder_config,
            )

        # The processor and tokenizer first: a missing encoder or decoder is an error naming its own key.
        processor = ImageTextProcessor(
            load_offline(AutoImageProcessor.from_pretrained, encoder, "model.encoder_pretrained"),
            load_offline(AutoTokenizer.from_pretrained, decoder, "model.decoder_pretrained"),
        )
        model = load_offline(
            build,
            f"{encoder} + {decoder}",
            "model.encoder_pretrained/decoder_pretrained",
            download=f"{encoder} {decoder}",
        )
        return model, processor

    def quantization_config(self):
        """bitsandbytes' settings for model.quantize (4bit: NF4 with bf16 compute, as QLoRA), or None."""
        if not self.hparams.quantize:
            return None
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError(
                f"model.quantize={self.hparams.quantize} needs bitsandbytes: pip install bitsandbytes"
            ) from None
        from transformers import BitsAndBytesConfig

        if self.hparams.quantize == "8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )

    def with_adapters(self, model: PreTrainedModel):
        """The model with LoRA (or DoRA) adapters on the family's target modules, only they trainable."""
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        settings, family = self.hparams.lora, self.family
        targets = family["lora_targets"]
        if settings["vision"]:
            targets = f"(?:{targets})|(?:{family['lora_vision_targets']})"
        if not any(re.fullmatch(targets, name) for name, _ in model.named_modules()):
            raise UserError(
                f"model.lora: the family's lora_targets (conf/model/family/{self.hparams.family}.yaml) name no module "
                f"of this {type(model).__name__}: fix the pattern '{targets}'"
            )
        if self.hparams.quantize:
            model = prepare_model_for_kbit_training(model, self.hparams.gradient_checkpointing)
        config = LoraConfig(
            r=settings["rank"],
            lora_alpha=settings["alpha"],
            lora_dropout=settings["dropout"],
            use_dora=settings["dora"],
            target_modules=targets,
        )
        return get_peft_model(model, config)

    @staticmethod
    def dequantized(model):
        """A quantised model with adapters (peft) as the same adapters on its base dequantised to float32: merging
        into 4-bit weights would round the adapters' update away with them."""
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        adapters, config = get_peft_model_state_dict(model), model.peft_config["default"]
        base = model.unload()
        base.dequantize()
        adapted = get_peft_model(base.float(), config)
        set_peft_model_state_dict(adapted, adapters)
        return adapted

    @property
    def base_model(self) -> PreTrainedModel:
        """The transformers model (under LoRA: the one peft wraps)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def prepare_special_tokens(self) -> None:
        """Padding for tokenizers without it (GPT-2: its end-of-text), and the ids generation needs, where the
        checkpoint leaves them unset."""
        tokenizer, model = self.tokenizer, self.model
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        if isinstance(model, VisionEncoderDecoderModel):  # an assembled one knows none of them
            ids = {
                "pad_token_id": tokenizer.pad_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "decoder_start_token_id": getattr(model.config, "decoder_start_token_id", None)
                or tokenizer.bos_token_id,
                "bos_token_id": tokenizer.bos_token_id,
            }
            for config in (model.config, model.generation_config):
                for name, value in ids.items():
                    setattr(config, name, value)
        elif model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id

    def architecture_files(self) -> dict[str, str]:
        """The model config and processor files (text), without weights."""
        with tempfile.TemporaryDirectory() as folder:
            self.base_model.config.save_pretrained(folder)
            self.base_model.generation_config.save_pretrained(folder)
            self.processor.save_pretrained(folder)
            return {
                path.name: path.read_text(encoding="utf-8") for path in sorted(Path(folder).iterdir()) if path.is_file()
            }

    def build_from_files(self, files: dict[str, str]) -> tuple[PreTrainedModel, object]:
        with tempfile.TemporaryDirectory() as folder:
            for name, text in files.items():
                Path(folder, name).write_text(text, encoding="utf-8")
            model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(folder))
            model.generation_config = model.generation_config.from_pretrained(folder)
            return model, load_processor(folder, "checkpoint")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["hyper_parameters"]["architecture"] = self.architecture_files()
        if self.hparams.quantize:  # bitsandbytes' packed weights do not load back on every device; nor need they
            trained = {name for name, parameter in self.named_parameters() if parameter.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}

    def fsdp_root(self) -> torch.nn.Module:
        return self.model

    def fsdp_layers(self) -> list[str]:
        return self.family["fsdp_layers"]

    def vision_tower(self) -> torch.nn.Module:
        return self.base_model.get_submodule(self.family["vision_tower"])

    # -- export ----------------------------------------------------------------------------------------------------
    def export(self, directory: str | os.PathLike) -> Path:
        """A transformers folder: the model (safetensors; LoRA merged into it) with its generation config, the
        processor, README.md; with LoRA also `adapter/` (peft). A sharded model is gathered first, so every rank
        calls this; rank 0 writes."""
        sharded = is_sharded(self.model)
        state_dict = full_state_dict(self.model) if sharded else None
        if sharded and dist.get_rank() != 0:
            return Path(directory)
        if sharded:  # tied weights were gathered apart: keep the one name save_pretrained keeps of each
            names = {name for name, _ in (*self.model.named_parameters(), *self.model.named_buffers())}
            state_dict = {name: tensor for name, tensor in state_dict.items() if name in names}
        with atomic_dir(directory) as folder:
            if hasattr(self.model, "merge_and_unload"):
                self.model.save_pretrained(folder / ADAPTER_DIR, state_dict=state_dict)
                merged = copy.deepcopy(self.model)
                if state_dict is not None:
                    merged.load_state_dict(state_dict)
                if self.hparams.quantize:
                    merged = self.dequantized(merged)
                merged.merge_and_unload().save_pretrained(folder)
            else:
                self.model.save_pretrained(folder, state_dict=state_dict)
            self.processor.save_pretrained(folder)
            (folder / "README.md").write_text(self.model_card(), encoding="utf-8")
        return Path(directory)

    def model_card(self) -> str:
        logged = self.trainer.callback_metrics if self._trainer is not None else {}  # after training: test metrics
        metrics = {name: float(value) for name, value in sorted(logged.items()) if name.startswith("test/")}
        config = self.base_model.generation_config
        settings = ", ".join(f"{k}={getattr(config, k)!r}" for k in GENERATION_KEYS if getattr(config, k, None))
        lines = [
            "---",
            "library_name: transformers",
            "pipeline_tag: image-text-to-text",
            "tags: [image-captioning]",
            "---",
            f"# {self.hparams.family} captioner",
            "",
            f"A `{type(self.base_model).__name__}` image captioner fine-tuned with vlx "
            f"(`lightning_modules/captioning/hf.py`, family `conf/model/family/{self.hparams.family}.yaml`) from "
            f"`{self.hparams.pretrained or 'its encoder and decoder checkpoints'}`"
            + (
                f", LoRA rank {self.hparams.lora['rank']} merged (the adapters alone: `{ADAPTER_DIR}/`)"
                if self.hparams.lora["rank"]
                else ""
            )
            + ".",
            "",
            f"Generation settings (generation_config.json): `{settings}`.",
            "",
            "```python",
            self.usage(),
            "```",
        ]
        if metrics:
            lines += ["", "Test metrics of the run that produced it:", "", "| metric | value |", "| --- | --- |"]
            lines += [f"| {name} | {value:.4f} |" for name, value in metrics.items()]
        return "\n".join(lines) + "\n"

    def usage(self) -> str:
        """How transformers captions with the export (the model card's snippet)."""
        decoder = self.family["architecture"] == "decoder"
        if isinstance(self.processor, ImageTextProcessor):  # no processor class: its two parts
            load = (
                "image_processor = AutoImageProcessor.from_pretrained(DIR)\n"
                "tokenizer = AutoTokenizer.from_pretrained(DIR)"
            )
            call, decode = "image_processor(images=image", "tokenizer"
        else:
            load, call, decode = "processor = AutoProcessor.from_pretrained(DIR)", "processor(images=image", "processor"
        text = f", text={json.dumps(self.prompt_text())}" if decoder or self.prompt else ""
        # BLIP's generate drops the prompt's [SEP] and returns the rest of the prompt first
        prefix = "inputs.input_ids.shape[1]" + (" - 1" if self.family["generate_drops_prompt_end"] else "")
        return "\n".join(
            [
                "from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, "
                "AutoTokenizer",
                "model = AutoModelForImageTextToText.from_pretrained(DIR)",
                load,
                f'inputs = {call}{text}, return_tensors="pt")',
                *([CUT_PROMPT_END] if self.cuts_prompt_end() else []),
                "ids = model.generate(**inputs, generation_config=model.generation_config)[0]",
                *([f"ids = ids[{prefix}:]  # the caption after the prompt"] if decoder else []),
                f"caption = {decode}.decode(ids, skip_special_tokens=True).strip()",
            ]
        )

    # -- what the family lays out ----------------------------------------------------------------------------------
    @property
    def prompt(self) -> str:
        return self.family["prompt"] if self.hparams.prompt is None else self.hparams.prompt

    def prompt_text(self) -> str:
        """The text before the caption: the prompt, or a chat's user turn (the image and the prompt) and the start of
        the assistant's."""
        if not self.family["chat"]:
            return self.prompt
        content = [{"type": "image"}, *([{"type": "text", "text": self.prompt}] if self.prompt else [])]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    @cached_property
    def forward_keys(self) -> frozenset[str]:
        """What the model's forward takes (processors also return what some models do not read), less labels (the
        loss is ours; PaliGemma's processor returns some)."""
        return frozenset(inspect.signature(self.base_model.forward).parameters) - {"labels"}

    def model_inputs(self, images: torch.Tensor, pixel_values: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The processor's inputs for images (uint8 [B, 3, S, S]) and, in a decoder or where the family has one, the
        prompt, on the module's device, pixels in the model's dtype; `pixel_values`: images [B, 3, S, S] rescaled
        and normalised as the processor does, to use instead of the images' (task=caption_explain: gradients reach
        them through `lay_out_pixels`; `images` then only sets the batch size)."""
        text = None
        if self.family["architecture"] == "decoder" or self.prompt:
            text = [self.prompt_text()] * len(images)
        if pixel_values is not None:  # blank images of the pixels' size: the text as for real ones
            images = torch.zeros(len(images), 3, *pixel_values.shape[-2:], dtype=torch.uint8)
        # One list per sample: processors that place image tokens in a chat turn (SmolVLM) count images per sample.
        listed = [[image] for image in images] if isinstance(self.processor, ProcessorMixin) else list(images)
        features = self.processor(images=listed, text=text, return_tensors="pt", padding=True)
        if pixel_values is not None:
            features["pixel_values"] = self.lay_out_pixels(pixel_values, features["pixel_values"])
        inputs = {}
        for key, value in features.items():
            if key in self.forward_keys and isinstance(value, torch.Tensor):
                value = value.to(self.device)
                inputs[key] = value.to(self.dtype) if value.is_floating_point() else value
        return inputs

    def lay_out_pixels(self, pixels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Normalised images `pixels` [B, 3, S, S] laid out as the processor lays out `like`, its pixel values of
        images of that size: one image each [B, 3, S, S] (BLIP, GIT, ...), one tile each [B, 1, 3, S, S]
        (Idefics3, SmolVLM without image splitting), or patch sequences [B * g * g, 3 * t * p * p] (Qwen2-VL: p x p
        patches in blocks of merge x merge, an image being t equal frames; `image_patches`). A UserError naming
        model.captioner for any other layout."""
        processor = self.image_processor
        if like.dim() == 2 and hasattr(processor, "merge_size"):
            laid_out = image_patches(pixels, processor.patch_size, processor.temporal_patch_size, processor.merge_size)
        else:
            laid_out = pixels if like.dim() == 4 else pixels.unsqueeze(1)
        if laid_out.shape != like.shape:
            raise UserError(
                f"model.captioner: the {self.hparams.family} processor lays {tuple(pixels.shape[1:])} images out as "
                f"{tuple(like.shape)} pixel values, not as one image, one tile or Qwen2-VL's patch sequences: "
                "task=caption_explain cannot map its pixels back to the image"
            )
        return laid_out

    def prompt_layout(self, inputs: dict) -> dict:
        """The prompt as the model reads it before a caption in training: BLIP's first token made its decoder BOS,
        the tokenizer's closing token dropped where the family's generate drops it."""
        if self.family["architecture"] != "decoder":
            return inputs
        inputs = dict(inputs)
        if self.family["drop_prompt_end"]:
            inputs = {k: v[:, :-1] if k in per_token(inputs) else v for k, v in inputs.items()}
        if self.family["bos_first"]:
            inputs["input_ids"] = inputs["input_ids"].clone()
            inputs["input_ids"][:, 0] = self.base_model.config.text_config.bos_token_id
        return inputs

    @property
    def caption_end(self) -> str:
        """The text that ends a caption: the family's caption_end, else the tokenizer's end token."""
        tokenizer = self.tokenizer
        return self.family["caption_end"] or tokenizer.eos_token or tokenizer.sep_token

    def caption_ids(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, T] of the captions and the text that ends them (the family's caption_end, or the tokenizer's
        end token), right-padded, with their mask; an encoder-decoder family's with bos_first start with the
        tokenizer's BOS (BART: </s> <s> caption </s>, </s> being the decoder's start)."""
        family = self.family
        start = self.tokenizer.bos_token if family["architecture"] == "encoder_decoder" and family["bos_first"] else ""
        text = self.tokenizer(
            [start + caption + self.caption_end for caption in captions],
            add_special_tokens=False,
            padding="longest",
            truncation=True,
            max_length=self.hparams.max_caption_tokens,
            return_tensors="pt",
        ).to(self.device)
        return text.input_ids, text.attention_mask

    def caption_logits(self, inputs: dict, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] that predict each token of captions `ids` [B, T] (mask: its real tokens), read
        teacher-forced after the images and the prompt in `inputs` (model_inputs)."""
        if self.family["architecture"] == "encoder_decoder":
            start = torch.full_like(ids[:, :1], self.base_model.generation_config.decoder_start_token_id)
            decoder_ids = torch.cat([start, ids[:, :-1]], 1)
            return self.model(**inputs, decoder_input_ids=decoder_ids).logits
        prompt = self.prompt_layout(inputs)
        length = prompt["input_ids"].shape[1]
        full = dict(prompt)
        caption_type = torch.full_like(ids, self.family["caption_token_type"])  # PaliGemma's causal suffix: 1
        for key in per_token(prompt):  # the caption's tokens: real where the mask says, text (0) of other kinds
            after = {"input_ids": ids, "attention_mask": mask, "token_type_ids": caption_type}.get(
                key, torch.zeros_like(ids)
            )
            full[key] = torch.cat([prompt[key], after], 1)
        logits = self.model(**full).logits
        start = logits.shape[1] - full["input_ids"].shape[1] + length - 1  # GIT's logits cover its image tokens too
        return logits[:, start : start + ids.shape[1]]  # position t predicts token t + 1

    @torch.no_grad()
    def generate_ids(
        self, images: torch.Tensor, generation_config=None, pixel_values: torch.Tensor | None = None, **settings
    ) -> torch.Tensor:
        """Generated token ids [B, T] of the captions alone (no prompt), with the model's generation config or
        `generation_config`, `settings` replacing some of it (`pixel_values`: see model_inputs)."""
        inputs = self.model_inputs(images, pixel_values)
        architecture, prompt = self.family["architecture"], inputs.get("input_ids")
        if self.cuts_prompt_end():
            inputs = {k: v[:, :-1] if k in per_token(inputs) else v for k, v in inputs.items()}
        config = generation_config or self.base_model.generation_config
        ids = self.model.generate(**inputs, generation_config=config, **settings)
        if architecture == "encoder_decoder":
            return ids[:, 1:]  # after the decoder's start token
        return ids[:, prompt.shape[1] - int(self.family["drop_prompt_end"]) :]

    def cuts_prompt_end(self) -> bool:
        """Whether generate must be given the prompt without the tokenizer's closing token (GIT's [SEP])."""
        family = self.family
        return (
            family["architecture"] == "decoder"
            and family["drop_prompt_end"]
            and not family["generate_drops_prompt_end"]
        )

    def end_token_ids(self) -> set[int]:
        """The tokens that end a generated caption (generate's eos, the family's caption_end, padding)."""
        config, tokenizer = self.base_model.generation_config, self.tokenizer
        ends = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        return {*ends, tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids(self.caption_end)} - {None}

    # -- task=caption_explain: pixels in, logits out ---------------------------------------------------------------
    def decoder_inputs(self, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The tokens a scorer reads for captions `ids` (generate_ids), and where the captions start: one position
        that stands for the prompt (decoder_logits reads the real one there), then the captions."""
        return torch.cat([torch.full_like(ids[:, :1], self.tokenizer.pad_token_id), ids], 1), 1

    def decoder_logits(self, pixel_values: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] for normalised images `pixel_values` [B, 3, S, S] (see model_inputs) and `tokens` laid
        out by decoder_inputs: position t predicts token t + 1 (position 0: the prompt, which predicts the caption's
        first token)."""
        captions = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], self.tokenizer.pad_token_id)], 1)
        inputs = self.model_inputs(tokens, pixel_values)
        return self.caption_logits(inputs, captions, torch.ones_like(captions))  # the padding's logit is unused

    # -- the captioning module -------------------------------------------------------------------------------------
    def image_transform(self) -> SquareImage:
        """Images resized to a square of model.image_size, the family's or the processor's side; for processors
        that keep a pixel budget (Qwen2-VL's min_pixels and max_pixels), the side they then resize that square to
        (no second resize: the model reads what the data gives, and an export's own budget holds)."""
        side = self.hparams.image_size or self.family["image_size"] or processor_side(self.image_processor)
        if side is None:
            raise UserError(
                f"model.image_size: the {self.hparams.family} processor resizes to no one size: set model.image_size "
                "(the square side images are resized to before the processor)"
            )
        processed = self.image_processor(images=[torch.zeros(3, side, side, dtype=torch.uint8)], return_tensors="pt")
        if "image_grid_thw" in processed:  # patches of patch_size along each side
            side = int(processed["image_grid_thw"][0, 1]) * self.image_processor.patch_size
        return SquareImage(side)

    def caption_texts(self, batch: CaptionBatch) -> list[str]:
        """The training caption of each item: its words as the data's tokenizer gives them (lower case, no
        punctuation), as BLIP's `pre_caption` and the Karpathy splits prepare captions."""
        return [" ".join(tokens) for tokens in batch.tokens]

    def loss(self, batch: CaptionBatch) -> torch.Tensor:
        """Mean cross-entropy over the caption tokens of the global batch (see global_token_mean)."""
        ids, mask = self.caption_ids(self.caption_texts(batch))
        logits = self.caption_logits(self.model_inputs(batch.images), ids, mask)
        targets = ids.masked_fill(mask == 0, IGNORE)
        token_losses = F.cross_entropy(
            logits.flatten(0, 1).float(),
            targets.flatten(),
            ignore_index=IGNORE,
            label_smoothing=self.hparams.label_smoothing,
            reduction="sum",
        )
        return global_token_mean(token_losses, (targets != IGNORE).sum())

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    @torch.no_grad()
    def caption_batch(self, batch: CaptionBatch) -> list[str]:
        return self.decode(self.generate_ids(batch.images))

    # -- self-critical training --------------------------------------------------------------------------------------
    def rollouts(self, batch: CaptionBatch, num_samples: int, greedy: bool) -> Rollouts:
        """`num_samples` captions per image sampled by generate (temperature 1, no top-k), their log-probabilities
        recomputed teacher-forced with gradients; the greedy captions for the baseline."""
        was_training = self.model.training
        self.model.eval()  # sampling and the greedy caption without dropout, as at test time
        sampled = self.generate_ids(
            batch.images,
            do_sample=True,
            num_beams=1,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            num_return_sequences=num_samples,
        )
        reference = self.generate_ids(batch.images, num_beams=1, do_sample=False) if greedy else None
        self.model.train(was_training)
        mask = self.through_end(sampled)
        images = batch.images.repeat_interleave(num_samples, 0)
        logits = self.caption_logits(self.model_inputs(images), sampled, mask)
        log_probs = logits.float().log_softmax(-1).gather(2, sampled.unsqueeze(2)).squeeze(2)
        return Rollouts(
            samples=[tokenize(text) for text in self.decode(sampled)],
            log_probs=log_probs,
            mask=mask.to(log_probs.dtype),
            greedy=None if reference is None else [tokenize(text) for text in self.decode(reference)],
        )

    def through_end(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, T] mask: true up to and including each row's first end token."""
        ends = torch.tensor(sorted(self.end_token_ids()), device=ids.device)
        is_end = torch.isin(ids, ends).long()
        before = is_end.cumsum(1) - is_end  # end tokens strictly before each position
        return (before == 0).long()
