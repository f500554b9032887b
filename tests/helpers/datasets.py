"""Data set trees in the layouts the readers read: Flickr8k's release files (the fixture's text, stand-in images)
and COCO's caption annotations."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.helpers.images import write_noise

FLICKR8K = Path(__file__).resolve().parents[1] / "fixtures" / "flickr8k"
LISTS = {
    "train_list": "Flickr_8k.trainImages.txt",
    "val_list": "Flickr_8k.devImages.txt",
    "test_list": "Flickr_8k.testImages.txt",
}


def flickr8k_tree(tmp_path: Path) -> dict[str, str]:
    """The fixture's text files with stand-in images for every listed name: read_flickr8k's arguments."""
    root = tmp_path / "flickr8k"
    shutil.copytree(FLICKR8K, root)
    for list_file in LISTS.values():
        for i, name in enumerate((root / list_file).read_text().split()):
            write_noise(root / "Flicker8k_Dataset" / name, i)
    return {
        "token_file": str(root / "Flickr8k.token.txt"),
        "image_dir": str(root / "Flicker8k_Dataset"),
        **{key: str(root / name) for key, name in LISTS.items()},
    }


def coco_file(path: Path, ids: list[int], year: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [{"id": i, "file_name": f"COCO_{year}_{i:012d}.jpg", "height": 32, "width": 32} for i in ids]
    annotations = [
        {"id": 10 * i + n, "image_id": i, "caption": f" Image {i} caption {n}. "} for i in ids for n in range(2)
    ]
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    for i in ids:
        write_noise(path.parent.parent / year / f"COCO_{year}_{i:012d}.jpg", i)


def coco_tree(tmp_path: Path) -> dict[str, str]:
    """COCO 2014's caption files (train: 3 images, val: 5, 2 captions each) and images: read_coco's arguments."""
    coco_file(tmp_path / "annotations" / "captions_train2014.json", [9, 3, 5], "train2014")
    coco_file(tmp_path / "annotations" / "captions_val2014.json", [40, 10, 30, 20, 50], "val2014")
    return {
        "train": str(tmp_path / "annotations" / "captions_train2014.json"),
        "val": str(tmp_path / "annotations" / "captions_val2014.json"),
        "train_images": str(tmp_path / "train2014"),
        "val_images": str(tmp_path / "val2014"),
    }
