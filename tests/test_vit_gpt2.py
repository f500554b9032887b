"""ViT-GPT2 through the real config and runner: a tiny VisionEncoderDecoderModel with a byte-level BPE (GPT-2)
tokenizer made locally, saved with save_pretrained and loaded by model.pretrained=DIR."""

import csv
from pathlib import Path

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from framework.runner import run
from lightning_modules.captioning.vit_gpt2 import ViTGPT2Captioner
from tests.conftest import compose_config, read_metrics
from tests.test_blip import IMAGE_SIZE, OVERFIT, TEST_KEYS, check_module_captions, overfit, shapes_words

EPOCHS = 40
TOWER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
GPT2_SIZE = {
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 2,
    "n_positions": 64,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}


def gpt2_tokenizer() -> GPT2TokenizerFast:
    """GPT-2's kind of tokenizer (byte-level BPE, <|endoftext|> as BOS, EOS and UNK), trained on the shapes words."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [" ".join(shapes_words())],
        vocab_size=400,
        min_frequency=1,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    return GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def tiny_configs(tokenizer: GPT2TokenizerFast) -> tuple[ViTConfig, GPT2Config]:
    """A 2-layer ViT at 32 px and a 2-layer GPT-2 over the tokenizer's vocabulary."""
    return (
        ViTConfig(**TOWER, image_size=IMAGE_SIZE, patch_size=8),
        GPT2Config(
            vocab_size=len(tokenizer),
            **GPT2_SIZE,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
    )


def save_tiny_parts(directory: Path) -> tuple[Path, Path]:
    """A tiny ViT (with its image processor) and a tiny GPT-2 (with its tokenizer), saved apart."""
    tokenizer = gpt2_tokenizer()
    vit, gpt2 = tiny_configs(tokenizer)
    torch.manual_seed(0)
    encoder, decoder = directory / "vit", directory / "gpt2"
    ViTModel(vit, add_pooling_layer=False).save_pretrained(encoder)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(encoder)
    GPT2LMHeadModel(gpt2).save_pretrained(decoder)
    tokenizer.save_pretrained(decoder)
    return encoder, decoder


def save_tiny_vit_gpt2(directory: Path) -> Path:
    """One VisionEncoderDecoderModel directory (the tiny ViT and GPT-2 with cross-attention), processor, tokenizer."""
    tokenizer = gpt2_tokenizer()
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(*tiny_configs(tokenizer))
    torch.manual_seed(0)
    VisionEncoderDecoderModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(directory)
    return directory


def vit_gpt2_run_dir(data_dir: Path) -> Path:
    """Train the tiny ViT-GPT2 on four images until it knows their captions; test and export the last weights.

    Shared with test_captioner_api as in test_blip: reused once finished next to the session's data folder."""
    run_dir = data_dir.parent / "vit_gpt2_run"
    if (run_dir / "metrics.json").is_file():
        return run_dir
    model = save_tiny_vit_gpt2(data_dir.parent / "tiny_vit_gpt2")
    return overfit(
        ["task=vit_gpt2_shapes", f"model.pretrained={model}", "data.batch_size=2", "logger=csv"],
        EPOCHS,
        run_dir,
        data_dir,
    )


@pytest.fixture(scope="session")
def vit_gpt2_run(data_dir) -> Path:
    return vit_gpt2_run_dir(data_dir)


def test_training_lowers_the_loss_and_logs_every_metric(vit_gpt2_run):
    with open(vit_gpt2_run / "csv" / "metrics.csv") as f:
        losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert len(losses) == 2 * EPOCHS and max(losses[-4:]) < 0.2 * min(losses[:4]), losses
    assert TEST_KEYS | {"val/CIDEr"} <= set(read_metrics(vit_gpt2_run))


def test_overfitted_captions_equal_the_training_captions_in_module_and_export(vit_gpt2_run, data_dir):
    images, captions = check_module_captions(ViTGPT2Captioner, vit_gpt2_run, data_dir)
    export = vit_gpt2_run / "export"
    model = VisionEncoderDecoderModel.from_pretrained(export)
    processor, tokenizer = AutoImageProcessor.from_pretrained(export), AutoTokenizer.from_pretrained(export)
    assert model.generation_config.num_beams == 4  # the run's generation settings travel in the export
    assert model.config.pad_token_id == tokenizer.eos_token_id == model.config.decoder_start_token_id
    ids = model.generate(pixel_values=processor(images=images, return_tensors="pt").pixel_values)
    assert [c.strip() for c in tokenizer.batch_decode(ids, skip_special_tokens=True)] == captions


def test_assembled_from_an_encoder_and_a_decoder(tmp_path, data_dir):
    encoder, decoder = save_tiny_parts(tmp_path / "parts")
    run(
        compose_config(
            [
                "task=vit_gpt2_shapes",
                "model.pretrained=null",
                f"model.encoder_pretrained={encoder}",
                f"model.decoder_pretrained={decoder}",
                *OVERFIT,
                "trainer.fast_dev_run=true",
            ],
            tmp_path / "run",
            data_dir,
        )
    )
    model = VisionEncoderDecoderModel.from_pretrained(tmp_path / "run" / "export")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "export")
    assert model.config.decoder.add_cross_attention and model.config.decoder.is_decoder
    assert model.config.decoder_start_token_id == tokenizer.bos_token_id and tokenizer.pad_token == "<|endoftext|>"
