"""LoRA exports that load everywhere: the Kohya file (model.kohya=true) through diffusers' loader for non-diffusers
LoRAs, every weight matched and the same images as the diffusers-format file; LoRAs that cannot be exported faithfully
are refused before anything is written."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from peft.utils import get_peft_model_state_dict

from framework.errors import UserError
from lightning_modules.generation.dreambooth_lora import DreamBoothLoRA
from lightning_modules.generation.sdxl import KOHYA_FILE
from tests.test_dreambooth import RESOLUTION, generate, lora_keys, sdxl_lora, tiny_sdxl  # noqa: F401 (fixture)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def trained_stand_in(pipeline, **settings) -> DreamBoothLoRA:
    """A model whose adapter weights all moved, as training moves them."""
    model = sdxl_lora(pipeline, **settings)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in (p for p in model.parameters() if p.requires_grad):
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def loaded(pipeline, folder, weight_name: str | None = None) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(pipeline, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(folder, **({"weight_name": weight_name} if weight_name else {}))
    return pipe


def test_kohya_export_loads_in_diffusers_with_every_weight_and_draws_the_same_images(tiny_sdxl, tmp_path):
    # alpha 8 with rank 4: a LoRA scale of 2 that the Kohya file must carry in its .alpha entries
    model = trained_stand_in(tiny_sdxl, lora={"alpha": 8}, train_text_encoder=True, kohya=True)
    model.export(tmp_path / "export")
    keys = lora_keys(tmp_path / "export" / KOHYA_FILE)
    # the names AUTOMATIC1111 and ComfyUI map for SDXL: diffusers' module paths for the UNet, CLIP's (text_model_...)
    assert {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"}
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys), keys[:5]
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight" in keys
    assert len(keys) == 3 / 2 * len(lora_keys(tmp_path / "export" / "pytorch_lora_weights.safetensors"))

    kohya = loaded(tiny_sdxl, tmp_path / "export", KOHYA_FILE)
    for name in COMPONENTS:  # every adapter weight arrived where it was trained, none left over
        ours = get_peft_model_state_dict(getattr(model, name))
        module = getattr(kohya, name)
        theirs = get_peft_model_state_dict(module, adapter_name=next(iter(module.peft_config)))
        assert theirs.keys() == ours.keys(), name
        for key, value in ours.items():
            torch.testing.assert_close(theirs[key], value, msg=key)

    diffusers_format = generate(loaded(tiny_sdxl, tmp_path / "export"))
    assert np.abs(generate(kohya) - diffusers_format).mean() < 1e-3
    np.testing.assert_allclose(diffusers_format, generate(model.pipeline()), atol=1e-5)  # both: the trained model
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    base.set_progress_bar_config(disable=True)
    assert np.abs(generate(base) - diffusers_format).mean() > 1e-3  # and the LoRA matters


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lora": {"use_dora": True}, "kohya": True}, r"drops DoRA magnitudes.*Set model.kohya=false"),
        ({"lora": {"use_dora": True}, "train_text_encoder": True}, r"not exported: .*Nothing was written"),
    ],
    ids=["kohya-dora", "text-encoder-dora"],
)
def test_loras_that_cannot_be_exported_faithfully_are_refused(tiny_sdxl, tmp_path, settings, message):
    model = sdxl_lora(tiny_sdxl, **settings)
    with pytest.raises(UserError, match=message):
        model.export(tmp_path / "export")
    assert not any(tmp_path.iterdir())  # no file, no partial folder
