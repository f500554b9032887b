"""Stable Diffusion XL parts: loading them from a pipeline (hub id or local folder), without downloading;
prompt encoding with both CLIP text encoders; micro-conditioning time ids; peft LoRA adapters switched
on and off; LoRA state dicts in the diffusers and Kohya layouts."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft.tuners.lycoris_utils import LycorisLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from framework.errors import UserError
from framework.pretrained import load_offline

COMPONENTS = {
    "unet": UNet2DConditionModel,
    "vae": AutoencoderKL,
    "text_encoder": CLIPTextModel,
    "text_encoder_2": CLIPTextModelWithProjection,
    "tokenizer": AutoTokenizer,
    "tokenizer_2": AutoTokenizer,
    "scheduler": DDPMScheduler,
}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def load_component(cls, pretrained: str, subfolder: str):
    """One component of an SDXL pipeline (a folder or a hub id in the local cache)."""
    local = Path(pretrained).expanduser()
    if local.is_dir() and not (local / subfolder).is_dir():
        raise UserError(
            f"the pipeline folder {pretrained} (model.pretrained) has no '{subfolder}' component: an SDXL pipeline "
            f"folder needs {', '.join(COMPONENTS)} (as StableDiffusionXLPipeline.save_pretrained writes)"
        )
    return load_offline(cls.from_pretrained, pretrained, "model.pretrained", subfolder=subfolder)


def load_sdxl(pretrained: str, vae: str | None = None) -> dict:
    """The SDXL components by name; `vae` replaces the pipeline's VAE (e.g. an fp16-fixed one)."""
    parts = {
        name: load_component(cls, pretrained, name) for name, cls in COMPONENTS.items() if not (name == "vae" and vae)
    }
    if vae:
        parts["vae"] = load_offline(AutoencoderKL.from_pretrained, vae, "model.vae")
    return parts


def encode_prompts(
    tokenizers: list, text_encoders: list[torch.nn.Module], prompts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL text conditioning: the penultimate hidden states of both encoders side by side [B, 77, d1 + d2],
    and the pooled, projected output of the second [B, p]."""
    hidden = []
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(encoder.device)
        output = encoder(ids, output_hidden_states=True)
        hidden.append(output.hidden_states[-2])
    return torch.cat(hidden, dim=-1), output.text_embeds


def time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor) -> torch.Tensor:
    """SDXL micro-conditioning per image: (original h, w, crop top, left, target h, w) [B, 6], from [B, 2] each."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1)


def set_lora_enabled(module: torch.nn.Module, enabled: bool) -> None:
    """Switch every peft adapter layer in `module` on or off (a no-op without adapters). At peft level, not with
    the models' enable_adapters/disable_adapters: transformers' check the peft version (5.24: peft >= 0.22)."""
    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.enable_adapters(enabled)


def lora_layers(modules: dict[str, torch.nn.Module], weights: dict[str, dict] | None = None) -> dict:
    """save_lora_weights arguments for the components with a trained ("default") peft adapter; `weights`: state
    dicts replacing some modules' own (gathered from a sharded module)."""
    layers = {}
    for name, module in modules.items():
        if "default" in (getattr(module, "peft_config", None) or {}):
            state_dict = get_peft_model_state_dict(module, state_dict=(weights or {}).get(name))
            layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(state_dict)
            layers[f"{name}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    return layers


KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"


def kohya_path(component: str, path: str) -> str:
    """A module path of `component` as the Kohya names spell it: transformers 5's CLIP text models have no
    `text_model` wrapper, the Kohya names keep it."""
    return f"text_model.{path}" if component in TEXT_ENCODERS and not path.startswith("text_model.") else path


def kohya_state_dict(
    modules: dict[str, torch.nn.Module], alpha: float, weights: dict[str, dict] | None = None
) -> dict[str, torch.Tensor]:
    """The trained ("default") peft adapters in the Kohya layout that AUTOMATIC1111, ComfyUI and diffusers' loader
    for non-diffusers LoRAs map for SDXL: `lora_unet_<diffusers module path>`, `lora_te1_` / `lora_te2_` +
    `text_model_<CLIP module path>`, each with `.lora_down.weight`, `.lora_up.weight` and `.alpha`; `weights` as for
    `lora_layers`."""
    peft_layout = {}
    for name, module in modules.items():
        if "default" not in (getattr(module, "peft_config", None) or {}):
            continue
        for key, value in get_peft_model_state_dict(module, state_dict=(weights or {}).get(name)).items():
            if key.endswith("lora_magnitude_vector"):
                raise UserError(
                    "model.kohya=true with model.lora.use_dora=true: diffusers' loader for Kohya LoRAs drops DoRA "
                    "magnitudes (dora_scale), so the Kohya file would not give the trained model; "
                    "pytorch_lora_weights.safetensors holds the DoRA exactly. Set model.kohya=false"
                )
            peft_layout[f"{name}.{kohya_path(name, key)}"] = value.detach().float().cpu().contiguous()
    # diffusers names the weights, and writes alpha = rank: the adapters were trained with lora_alpha.
    kohya = convert_state_dict_to_kohya(peft_layout)
    return {key: torch.tensor(float(alpha)) if key.endswith(".alpha") else value for key, value in kohya.items()}


KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def lycoris_state_dict(modules: dict[str, torch.nn.Module], weights: dict[str, dict] | None = None) -> dict:
    """The trained ("default") peft LoHa / LoKr adapters in the LyCORIS layout that ComfyUI, AUTOMATIC1111 / Forge and
    kohya's scripts read: the Kohya names (`lora_unet_<module path>`, `lora_te1_text_model_...`) with peft's (and
    LyCORIS') factor names (hada_w1_a ..., lokr_w1 ...) and each layer's `.alpha`. Those readers scale a LoKr layer
    whose two factors are both whole matrices by 1, not alpha / rank as peft does: there the scale goes into lokr_w2.
    `weights` as for `lora_layers`."""
    lycoris = {}
    for name, module in modules.items():
        if "default" not in (getattr(module, "peft_config", None) or {}):
            continue
        layers = {path: layer for path, layer in module.named_modules() if isinstance(layer, LycorisLayer)}
        factors = get_peft_model_state_dict(module, state_dict=(weights or {}).get(name))
        for key, value in factors.items():
            path, factor = key.rsplit(".", 1)
            layer = layers[path]
            if factor == "lokr_w2" and "default" in layer.lokr_w1:
                value = value * layer.scaling["default"]
            prefix = KOHYA_PREFIXES[name] + kohya_path(name, path).replace(".", "_")
            lycoris[f"{prefix}.{factor}"] = value.detach().float().cpu().contiguous()
            lycoris[f"{prefix}.alpha"] = torch.tensor(float(layer.alpha["default"]))
    return lycoris


def save_lora(
    directory: Path,
    modules: dict[str, torch.nn.Module],
    kohya_alpha: float | None = None,
    weights: dict[str, dict] | None = None,
) -> None:
    """pytorch_lora_weights.safetensors (diffusers layout, what StableDiffusionXLPipeline.load_lora_weights
    reads); with `kohya_alpha`, also pytorch_lora_weights_kohya.safetensors (`kohya_state_dict`); `weights` as for
    `lora_layers`. LoHa / LoKr adapters: pytorch_lora_weights_kohya.safetensors alone, in the LyCORIS layout
    (`lycoris_state_dict`), which diffusers' SDXL loader does not read."""
    from safetensors.torch import save_file

    if any(isinstance(layer, LycorisLayer) for module in modules.values() for layer in module.modules()):
        save_file(lycoris_state_dict(modules, weights), str(directory / KOHYA_FILE))
        return
    kohya = kohya_state_dict(modules, kohya_alpha, weights) if kohya_alpha is not None else None  # refused first
    StableDiffusionXLPipeline.save_lora_weights(directory, **lora_layers(modules, weights))
    if kohya is not None:
        save_file(kohya, str(directory / KOHYA_FILE))
