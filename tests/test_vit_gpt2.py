"""ViT-GPT2 through the real config and runner: a tiny VisionEncoderDecoderModel with a byte-level BPE (GPT-2)
tokenizer made locally, saved with save_pretrained and loaded by model.pretrained=DIR."""

import csv

import pytest
from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

from framework.runner import run
from lightning_modules.captioning.hf import HFCaptioner
from tests.helpers.captioning import OVERFIT, TEST_KEYS, check_module_captions
from tests.helpers.captioning import OVERFIT_EPOCHS as EPOCHS
from tests.helpers.config import compose_config, read_metrics
from tests.helpers.tiny_models import save_tiny_parts

# vit_gpt2_run (tests/conftest.py): the tiny ViT-GPT2 trained on four images for EPOCHS epochs.


@pytest.mark.slow
def test_training_lowers_the_loss_and_logs_every_metric(vit_gpt2_run):
    with open(vit_gpt2_run / "csv" / "metrics.csv") as f:
        losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert len(losses) == 2 * EPOCHS and max(losses[-4:]) < 0.2 * min(losses[:4]), losses
    assert TEST_KEYS | {"val/CIDEr"} <= set(read_metrics(vit_gpt2_run))


@pytest.mark.slow
def test_overfitted_captions_equal_the_training_captions_in_module_and_export(vit_gpt2_run, data_dir):
    images, captions = check_module_captions(HFCaptioner, vit_gpt2_run, data_dir)
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
