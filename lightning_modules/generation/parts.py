"""The SDXL parts a DreamBooth LoRA trains: the frozen base model with peft LoRA adapters on the UNet (and the text
encoders), the dtype each part runs in under mixed precision, the inference sampler, and a pipeline over the parts."""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Annotated, Literal, TypedDict

import diffusers
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionXLPipeline
from diffusers.training_utils import cast_training_params
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

from framework.errors import UserError
from framework.schema import NonEmpty, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Range
from lightning_modules.generation.sdxl import set_lora_enabled

log = logging.getLogger(__name__)

MIXED_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
TEXT_ENCODER_DORA = (
    "diffusers 0.42's load_lora_weights (with transformers 5) drops the text encoders' DoRA magnitudes, so the "
    "exported LoRA would draw other images than the trained model"
)

# The names of the layers an adapter goes on (peft's target_modules): at least one.
TargetModules = Annotated[list[str], NonEmpty()]


class LoraSettings(TypedDict):
    """model.lora: the adapters (on the UNet; with model.train_text_encoder on both text encoders too): LoRA, or
    LyCORIS' LoHa (Hadamard product of two low-rank products) or LoKr (Kronecker product), all through peft."""

    type: Literal["lora", "loha", "lokr"]
    rank: PositiveInt
    alpha: PositiveFloat | None  # null: the rank (scale 1)
    dropout: Annotated[float, Range(min=0, below=1)]  # LoHa / LoKr: peft's rank_dropout
    use_dora: bool
    target_modules: TargetModules  # of the UNet
    block_ranks: dict[str, PositiveInt] | None  # UNet blocks with another rank (null: none): block_ranks_pattern


class MultiresNoiseSettings(TypedDict):
    """model.multires_noise: training noise with low-frequency parts (kohya's multires noise); 0 iterations: off."""

    iterations: NonNegativeInt
    discount: Annotated[float, Range(above=0, max=1)]


def multires_noise(noise: torch.Tensor, iterations: int, discount: float, draw) -> torch.Tensor:
    """`noise` [B, C, H, W] plus `iterations` coarser Gaussian fields, field i of side H/r^i x W/r^i (r drawn
    from [2, 4) per field), upsampled (bilinear) and weighted discount^i, stopping once a side reaches 1 px; then
    each image rescaled to unit standard deviation, so an image's noise does not depend on the rest of its batch
    (the same on one process or several). `draw(shape)`: Gaussian rows for this rank (the module's rows_of_rank);
    r comes from the global RNG, alike on every rank."""
    height, width = noise.shape[-2:]
    for i in range(1, iterations + 1):
        r = 2 + 2 * float(torch.rand(()))
        size = (max(1, int(height / r**i)), max(1, int(width / r**i)))
        field = draw((*noise.shape[:2], *size)).to(noise.dtype)
        noise = noise + discount**i * F.interpolate(field, size=(height, width), mode="bilinear")
        if min(size) == 1:
            break
    return noise / noise.std(dim=(1, 2, 3), keepdim=True)


class EmaSettings(TypedDict):
    """model.ema: an exponential moving average of the trained weights (diffusers' EMAModel), which validation, test,
    predict and export use; decay null: off."""

    decay: Annotated[float, Range(above=0, below=1)] | None
    update_every: PositiveInt  # optimizer steps between two updates


def masked_mean(error: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each image's mean of `error` [B, C, h, w] weighted by its `mask` [B, 1, H, W] in [0, 1] (data.masks), the mask
    shrunk to h x w by averaging (area): the mean over the white part; 0 for an all-black mask (nothing to learn, no
    gradient)."""
    weights = F.interpolate(mask.to(error.dtype), size=error.shape[-2:], mode="area")
    return (error * weights).sum(dim=(1, 2, 3)) / (weights.sum(dim=(1, 2, 3)) * error.shape[1]).clamp(min=1e-8)


class TextEncoderSettings(TypedDict):
    """model.text_encoder: the text encoders' adapters (with model.train_text_encoder) and their optimizer group."""

    lr: PositiveFloat
    weight_decay: NonNegativeFloat
    target_modules: TargetModules


def block_ranks_pattern(block_ranks: dict[str, int]) -> dict[str, int]:
    """model.lora.block_ranks as peft's rank_pattern: a block's path ("down_blocks.2", "mid_block",
    "up_blocks.0.attentions.1") gives its layers' rank; peft matches the pattern after any dot of a layer's name, and
    the longest path is tried first, so a block inside another can have its own rank. Every layer keeps model.lora's
    alpha, so a block's scale is alpha / its rank, as kohya's block_dims without block_alphas (and the one alpha of a
    Kohya file)."""
    ordered = sorted(block_ranks.items(), key=lambda item: -len(item[0]))
    return {rf"{re.escape(path)}\..*": rank for path, rank in ordered}


def adapter_config(
    lora: LoraSettings, target_modules: list[str], block_ranks: dict[str, int] | None = None
) -> PeftConfig:
    """The peft config of model.lora's adapter type on `target_modules`; new adapters change nothing until trained."""
    kind = lora.get("type", "lora")  # checkpoints from before the key lack it
    ranks = block_ranks_pattern(block_ranks or {})
    alpha = lora["alpha"] or lora["rank"]
    if kind == "lora":
        return LoraConfig(
            r=lora["rank"],
            lora_alpha=alpha,
            rank_pattern=ranks,
            lora_dropout=lora["dropout"],
            use_dora=lora["use_dora"],
            init_lora_weights="gaussian",
            target_modules=target_modules,
        )
    if lora["use_dora"]:
        raise UserError(f"model.lora.use_dora=true is a kind of LoRA: with model.lora.type={kind} set it false")
    config = {"loha": LoHaConfig, "lokr": LoKrConfig}[kind]
    return config(
        r=lora["rank"], alpha=alpha, rank_pattern=ranks, rank_dropout=lora["dropout"], target_modules=target_modules
    )


# model.quantize_base: optimum-quanto's weight types (on the CPU and CUDA)
QUANTIZED_WEIGHTS = {"int8": "qint8", "fp8": "qfloat8", "int4": "qint4"}


def stored_bytes(module: torch.nn.Module, trained: set[str]) -> int:
    """Bytes of `module`'s state other than the `trained` entries: the frozen weights as they are held (a quantised
    layer's integer data and scales)."""
    return sum(t.numel() * t.element_size() for name, t in module.state_dict().items() if name not in trained)


def quantize_frozen(unet, kind: str) -> tuple[int, int]:
    """Every frozen layer of the UNet that optimum-quanto can quantise (linear and convolution weights, adapters'
    base layers included) with `kind`'s weights; the adapters stay in full precision and alone trainable. Returns
    the frozen weights' bytes before and after."""
    try:
        import optimum.quanto as quanto
    except ImportError:
        raise UserError(
            f"model.quantize_base={kind} needs optimum-quanto: pip install -e '.[dreambooth]' (or set it null)"
        ) from None
    trained = {name for name, p in unet.named_parameters() if p.requires_grad}
    before = stored_bytes(unet, trained)
    # LoRA's own layers (lora_A, lora_B, ...) stay as they are, their base layers are quantised (LoHa's and LoKr's
    # factors are parameters of their layer, which quanto leaves)
    quanto.quantize(unet, weights=getattr(quanto, QUANTIZED_WEIGHTS[kind]), exclude=["*.lora_*"])
    quanto.freeze(unet)
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_(name in trained)
    return before, stored_bytes(unet, trained)


def freeze(unet, vae, text_encoders: list[torch.nn.Module], train_text_encoder: bool) -> None:
    """Every base weight frozen. Lightning keeps each submodule's mode: the trained ones train (LoRA dropout), the
    rest stay in eval."""
    for module in (unet, vae, *text_encoders):
        module.requires_grad_(False)
    unet.train()
    for encoder in text_encoders:
        encoder.train(train_text_encoder)
    vae.eval()


def add_adapters(
    unet,
    text_encoders: list[torch.nn.Module],
    lora: LoraSettings,
    text_encoder: TextEncoderSettings,
    train_text_encoder: bool,
):
    """The trained LoRA adapters (adapter "default") on the UNet, and with `train_text_encoder` on both encoders."""
    block_ranks = lora.get("block_ranks") or {}  # checkpoints from before the key lack it
    unet.add_adapter(adapter_config(lora, lora["target_modules"], block_ranks))
    adapted = [name for name, module in unet.named_modules() if isinstance(module, BaseTunerLayer)]
    for path in block_ranks:
        if not any(re.match(rf"(.*\.)?{re.escape(path)}\.", name) for name in adapted):
            blocks = sorted(
                {
                    name.split(".")[0] if name.startswith("mid_block") else ".".join(name.split(".")[:2])
                    for name in adapted
                }
            )
            raise UserError(
                f"model.lora.block_ranks: '{path}' names no UNet layer with an adapter (model.lora.target_modules); "
                f"the adapted blocks: {', '.join(blocks)}"
            )
    if train_text_encoder:
        # With peft itself, as diffusers' add_adapter does for the UNet: transformers' add_adapter checks
        # the peft version (5.24: peft >= 0.22, newer than any peft release). Adapter "default", as there.
        for encoder in text_encoders:
            inject_adapter_in_model(adapter_config(lora, text_encoder["target_modules"]), encoder, "default")
        if lora["use_dora"]:
            log.warning(
                "model.lora.use_dora with model.train_text_encoder: the LoRA cannot be exported (%s); "
                "set export_after_train=false and use the checkpoints (ckpt_path) for predict/eval",
                TEXT_ENCODER_DORA,
            )


def enable_gradient_checkpointing(unet, text_encoders: list[torch.nn.Module], train_text_encoder: bool) -> None:
    unet.enable_gradient_checkpointing()
    if train_text_encoder:
        for encoder in text_encoders:
            # Non-reentrant: the frozen embeddings' output needs no requires_grad for the adapters' gradients
            # (transformers 4 defaults to reentrant and only fixes that for its own add_adapter).
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def inference_scheduler(noise_scheduler, pretrained: str, name: str | None):
    """The pipeline's own sampler (from pretrained/scheduler) or a diffusers scheduler class by name."""
    config = noise_scheduler.load_config(pretrained, subfolder="scheduler", local_files_only=True)
    name = name or config.get("_class_name", "EulerDiscreteScheduler")
    if not hasattr(diffusers, name):
        raise UserError(
            f"model.inference.scheduler={name} is not a diffusers scheduler class "
            "(e.g. EulerDiscreteScheduler, DPMSolverMultistepScheduler)"
        )
    return getattr(diffusers, name).from_config(config)


def pipeline(unet, vae, text_encoders: list[torch.nn.Module], tokenizers: list, scheduler) -> StableDiffusionXLPipeline:
    """A pipeline over these parts (shared, not copied): adapters included."""
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoders[0],
        text_encoder_2=text_encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def adapters_disabled(modules: list[torch.nn.Module]):
    """The base model: every LoRA adapter in `modules` switched off, and on again after."""
    for module in modules:
        set_lora_enabled(module, False)
    try:
        yield
    finally:
        for module in modules:
            set_lora_enabled(module, True)


def vae_dtype(vae, precision: str, vae_fp32: bool, vae_name: str) -> torch.dtype:
    """fp32, or with model.vae_fp32=false the 16-bit dtype of `precision`; fp16 only for a VAE that is safe in
    it (config force_upcast=false, as diffusers marks madebyollin/sdxl-vae-fp16-fix): SDXL's own VAE overflows
    to NaN (black images) in fp16."""
    dtype = MIXED_DTYPES.get(precision)
    if vae_fp32 or dtype is None:
        return torch.float32
    if dtype == torch.float16 and vae.config.get("force_upcast", True):
        raise UserError(
            f"trainer.precision=16-mixed with model.vae_fp32=false: the VAE {vae_name} is not made for fp16 (its "
            "config has force_upcast=true) and would give NaN, black images. Set model.vae_fp32=true, or "
            "model.vae=madebyollin/sdxl-vae-fp16-fix"
        )
    return dtype


def cast_frozen(modules: list[torch.nn.Module], precision: str) -> None:
    """Frozen weights in the autocast dtype of `precision`, adapters in fp32 (as the diffusers script)."""
    dtype = MIXED_DTYPES.get(precision)
    if dtype is None:
        return
    try:
        from optimum.quanto import QTensor
    except ImportError:
        QTensor = ()  # noqa: N806 - nothing is quantised without it
    for module in modules:
        # module.to(dtype), leaving quantised weights (model.quantize_base) as they are: quanto computes in the input's
        module._apply(lambda t: t.to(dtype) if t.is_floating_point() and not isinstance(t, QTensor) else t)
    cast_training_params(modules, torch.float32)
