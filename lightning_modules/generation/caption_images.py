"""task=caption_images: captions for a folder of training images by any captioner of this project (a checkpoint, or a
BLIP / ViT-GPT2 export), written as the folder's metadata.jsonl, which `data=captioned_images` trains an SDXL LoRA
from. The trigger token goes first in each prompt; captions already in metadata.jsonl are kept unless
`overwrite`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch

from datamodules.batches import CaptionBatch
from framework.contracts import BuildsFromConfig, SavesPredictions
from framework.errors import UserError
from framework.files import atomic_write, write_json
from framework.schema import ExistingPath
from lightning_modules.explain.caption_explain import load_captioner

log = logging.getLogger(__name__)


class CaptionImages(L.LightningModule, BuildsFromConfig, SavesPredictions):
    """The captioner at `captioner` (model.captioner) in evaluation mode; settings: conf/model/caption_images.yaml."""

    data_inputs = ("images",)  # the folder whose metadata.jsonl is written
    weights_key = "model.captioner"  # the weights it uses: it has no checkpoints of its own

    def __init__(
        self, captioner: ExistingPath, trigger_token: str | None, overwrite: bool, prompt_column: str, images: str
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.captioner = load_captioner(captioner).eval().requires_grad_(False)

    def image_transform(self):
        """The captioner's own preprocessing, which the data module applies (framework/preparation.py)."""
        return self.captioner.image_transform()

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        images = batch["images"].to(self.captioner.device, self.captioner.dtype)
        captions = self.captioner.caption_batch(CaptionBatch(size=batch["size"], images=images))
        return [{"image": path, "caption": caption} for path, caption in zip(batch["paths"], captions)]

    def prompt(self, caption: str) -> str:
        """The training prompt of a caption: the trigger token first (data.trigger_token's job in training)."""
        trigger = self.hparams.trigger_token
        return f"{trigger}, {caption}" if trigger and not caption.startswith(trigger) else caption

    def save_predictions(self, rows: list[dict], output_dir: Path) -> dict[str, float]:
        """metadata.jsonl in the images' folder (one {"file_name", prompt_column} object per image, as a Hugging
        Face imagefolder has it), written whole; lines already there keep their caption unless `overwrite` (and lines
        of images not captioned now stay). The rows also go to the run dir's predictions.json."""
        folder = Path(self.hparams.images)
        metadata = folder / "metadata.jsonl"
        column = self.hparams.prompt_column
        lines = read_metadata(metadata)
        kept = 0
        for row in rows:
            name = Path(row["image"]).relative_to(folder).as_posix()
            row["prompt"] = self.prompt(row["caption"])
            if name in lines and column in lines[name] and not self.hparams.overwrite:
                kept += 1
                continue
            lines[name] = {**lines.get(name, {}), "file_name": name, column: row["prompt"]}
        atomic_write(
            metadata, lambda f: f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines.values())
        )
        write_json(output_dir / "predictions.json", rows)
        log.info("wrote %s: %d captions, %d kept from before (model.overwrite=false)", metadata, len(rows) - kept, kept)
        return {"predict/captioned": float(len(rows) - kept), "predict/kept": float(kept)}


def read_metadata(path: Path) -> dict[str, dict]:
    """The lines of an existing metadata.jsonl by file name ({} when there is none); a line that is not a JSON object
    with a file_name is one error naming the file and the line."""
    if not path.is_file():
        return {}
    lines = {}
    for number, text in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
            lines[line["file_name"]] = line
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise UserError(
                f"{path}, line {number}: expected a JSON object with 'file_name' ({error}); fix or remove the line, "
                "or move the file away to caption every image anew"
            ) from None
    return lines
