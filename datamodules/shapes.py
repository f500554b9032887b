"""Embedded synthetic image-captioning data set ("shapes").

Every image shows one or two flat shapes on a near-uniform, low-saturation grey
background.  A shape is one of 4 kinds (circle, square, triangle, diamond), one
of 5 saturated colours (red, green, blue, yellow, purple) and one of 2 sizes
(small, large).  Two shapes never overlap, differ in colour or kind, and stand
in an unambiguous spatial relation: clearly side by side ("left of" / "right
of") or clearly one over the other ("above" / "below").

Each image gets several captions drawn from a small pool of templates that all
use the same content words, e.g. "a large red circle", "there is a large red
circle", or for two shapes "a small blue square to the left of a large red
circle" / "a large red circle to the right of a small blue square".  Captions
are thus a deterministic function of the image, which lets a small CNN+LSTM
captioner learn them within minutes on a CPU.

The data set is generated deterministically from a seed (only
``numpy.random.default_rng(seed)`` is used) the first time it is asked for and
written in the Karpathy split format::

    root/<name>/images/000000.png ...
    root/<name>/dataset_shapes.json

The first ``num_train`` images form the train split, then ``num_val`` val and
``num_test`` test images.  Besides the usual Karpathy fields, every image entry
lists its ``objects`` (shape, colour, size and pixel box ``[x0, y0, x1, y1]``).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Annotated

import cv2
import numpy as np
from tqdm import tqdm

from framework.files import writable_dir
from framework.schema import NonNegativeInt, Range, Seed

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 70, 225),
    "yellow": (240, 215, 20),
    "purple": (145, 40, 190),
}
SIZES = {"small": 0.11, "large": 0.20}  # half-extent as a fraction of image_size
SIZE_JITTER = 0.01

# relation of A to B -> (phrase after a noun, phrase after "is", inverse relation)
RELATIONS = {
    "left": ("to the left of", "left of", "right"),
    "right": ("to the right of", "right of", "left"),
    "above": ("above", "above", "below"),
    "below": ("below", "below", "above"),
}
SINGLE_TEMPLATES = (
    "a {a}",
    "there is a {a}",
    "a {a} in the picture",
    "the image shows a {a}",
    "one {a}",
    "a picture of a {a}",
)
PAIR_TEMPLATES = (
    "a {a} {rel} a {b}",
    "there is a {a} {rel} a {b}",
    "the image shows a {a} {rel} a {b}",
    "a {a} is {rel_is} a {b}",
)
MAX_CAPTIONS = min(len(SINGLE_TEMPLATES), 2 * len(PAIR_TEMPLATES))
PLACEMENT_CANDIDATES = 64


# The generator's settings, as the data modules that generate the set declare them (defaults: conf/data/_shapes.yaml).
ImageSize = Annotated[int, Range(min=32)]  # pixels; smaller images leave no room to place two shapes apart
CaptionsPerImage = Annotated[int, Range(min=1, max=MAX_CAPTIONS)]  # distinct captions an image has


@dataclass(frozen=True)
class ShapesSet:
    """The settings of one generated set (the data modules that generate one take them; defaults:
    conf/data/_shapes.yaml; ranges: these annotations, which the config check applies)."""

    seed: Seed
    num_train: NonNegativeInt
    num_val: NonNegativeInt
    num_test: NonNegativeInt
    image_size: ImageSize
    captions_per_image: CaptionsPerImage

    def folder(self, root: str | os.PathLike) -> pathlib.Path:
        """The folder the set is generated into (root/<name>), whether it exists yet or not."""
        name = (
            f"shapes_s{self.seed}_{self.num_train}-{self.num_val}-{self.num_test}_{self.image_size}px_"
            f"{self.captions_per_image}c"
        )
        return pathlib.Path(root).expanduser() / name


def generate_shapes(root: str | os.PathLike, shapes: ShapesSet) -> pathlib.Path:
    """Make the data set under root/<name> unless it is already complete there.

    Returns the path of its Karpathy JSON file.
    """
    final = shapes.folder(root)
    root, name = final.parent, final.name
    json_path = final / "dataset_shapes.json"
    if json_path.exists():
        return json_path

    writable_dir(root, "paths.data_dir (data.root)")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        os.chmod(tmp, 0o755)
        counts = (shapes.num_train, shapes.num_val, shapes.num_test)
        _build(tmp, shapes.seed, counts, shapes.image_size, shapes.captions_per_image)
        try:
            os.rename(tmp, final)
        except OSError:
            if not json_path.exists():  # not a lost race: something else is in the way
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return json_path


def _build(out: pathlib.Path, seed: int, counts: tuple[int, int, int], size: int, n_captions: int) -> None:
    rng = np.random.default_rng(seed)
    (out / "images").mkdir()
    splits = [split for split, n in zip(("train", "val", "test"), counts) for _ in range(n)]
    images = []
    for imgid, split in enumerate(tqdm(splits, desc="generating shapes", unit="img")):
        objects, relation = _sample_scene(rng, size)
        filename = f"{imgid:06d}.png"
        if not cv2.imwrite(
            str(out / "images" / filename), cv2.cvtColor(_render(rng, objects, size), cv2.COLOR_RGB2BGR)
        ):
            raise OSError(f"could not write {out / 'images' / filename}")
        sentences = []
        for raw in _captions(rng, objects, relation, n_captions):
            sentid = imgid * n_captions + len(sentences)
            sentences.append(
                {"raw": raw, "tokens": re.findall(r"[a-z]+", raw.lower()), "imgid": imgid, "sentid": sentid}
            )
        images.append(
            {
                "filepath": "images",
                "filename": filename,
                "imgid": imgid,
                "cocoid": imgid,
                "split": split,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
                "objects": [{k: o[k] for k in ("shape", "colour", "size", "box")} for o in objects],
            }
        )
    with open(out / "dataset_shapes.json", "w", encoding="utf-8") as f:
        json.dump({"dataset": "shapes", "images": images}, f)


def _sample_object(rng: np.random.Generator, size: int) -> dict:
    label = str(rng.choice(list(SIZES)))
    frac = SIZES[label] + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
    return {
        "shape": str(rng.choice(SHAPES)),
        "colour": str(rng.choice(list(COLOURS))),
        "size": label,
        "extent": int(round(frac * size)),
    }


def _set_centre(obj: dict, cx: int, cy: int) -> None:
    e = obj["extent"]
    obj["centre"] = (cx, cy)
    obj["box"] = [cx - e, cy - e, cx + e, cy + e]


def _sample_scene(rng: np.random.Generator, size: int) -> tuple[list[dict], str | None]:
    """Return the objects and, for two objects, the relation of the first to the second."""
    if rng.random() < 0.5:
        a = _sample_object(rng, size)
        cx, cy = rng.integers(a["extent"], size - a["extent"], size=2)
        _set_centre(a, int(cx), int(cy))
        return [a], None

    gap = max(2, round(0.05 * size))
    while True:  # rarely more than one round; a failed round resamples both objects
        a, b = _sample_object(rng, size), _sample_object(rng, size)
        while (b["shape"], b["colour"]) == (a["shape"], a["colour"]):
            b = _sample_object(rng, size)
        horizontal = rng.random() < 0.5
        ea, eb = a["extent"], b["extent"]
        # candidate centres, columns: ax, ay, bx, by
        low = np.array([ea, ea, eb, eb])
        cand = rng.integers(low, size - low, size=(PLACEMENT_CANDIDATES, 4))
        dx, dy = cand[:, 2] - cand[:, 0], cand[:, 3] - cand[:, 1]
        main, other = (dx, dy) if horizontal else (dy, dx)
        ok = (np.abs(main) >= ea + eb + gap) & (2 * np.abs(other) <= np.abs(main))
        if ok.any():
            ax, ay, bx, by = (int(v) for v in cand[np.argmax(ok)])
            break
    _set_centre(a, ax, ay)
    _set_centre(b, bx, by)
    if horizontal:
        relation = "left" if ax < bx else "right"
    else:
        relation = "above" if ay < by else "below"
    return [a, b], relation


def _render(rng: np.random.Generator, objects: list[dict], size: int) -> np.ndarray:
    grey = rng.integers(60, 196) + rng.integers(-6, 7, size=3)
    img = np.empty((size, size, 3), np.float32)
    img[:] = grey
    img += rng.normal(0.0, 3.0, img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for obj in objects:
        (cx, cy), e, colour = obj["centre"], obj["extent"], COLOURS[obj["colour"]]
        if obj["shape"] == "circle":
            cv2.circle(img, (cx, cy), e, colour, -1, cv2.LINE_AA)
            continue
        if obj["shape"] == "square":
            pts = [(cx - e, cy - e), (cx + e, cy - e), (cx + e, cy + e), (cx - e, cy + e)]
        elif obj["shape"] == "triangle":
            pts = [(cx, cy - e), (cx + e, cy + e), (cx - e, cy + e)]
        else:  # diamond
            pts = [(cx, cy - e), (cx + e, cy), (cx, cy + e), (cx - e, cy)]
        cv2.fillPoly(img, [np.array(pts, np.int32)], colour, cv2.LINE_AA)
    return img


def _describe(obj: dict) -> str:
    return f"{obj['size']} {obj['colour']} {obj['shape']}"


def _captions(rng: np.random.Generator, objects: list[dict], relation: str | None, n: int) -> list[str]:
    if relation is None:
        pool = [t.format(a=_describe(objects[0])) for t in SINGLE_TEMPLATES]
    else:
        a, b = objects
        pool = []
        for first, rel, second in ((a, relation, b), (b, RELATIONS[relation][2], a)):
            rel_phrase, rel_is, _ = RELATIONS[rel]
            pool += [
                t.format(a=_describe(first), rel=rel_phrase, rel_is=rel_is, b=_describe(second)) for t in PAIR_TEMPLATES
            ]
    return [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]
