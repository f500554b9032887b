"""Readers of the captioning data sets in their distributed formats: Karpathy split JSON, MS COCO, Flickr8k,
captioned folders.

The Karpathy format (``images[].filename/split/sentences[].raw/tokens``) is the one the shapes generator writes
and the one COCO and Flickr8k are distributed in for captioning research.

Each returns {"train", "val", "test"} lists of `CaptionedImage` through `collect_splits`, and is used as
the `_partial_` `data.source` of a `CaptionDataModule` (see conf/data/).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from datamodules.items import CaptionedImage
from framework.errors import UserError
from framework.schema import ExistingDir, ExistingFile, Fraction, NonNegativeInt
from framework.text import tokenize

log = logging.getLogger(__name__)
Splits = dict[str, list[CaptionedImage]]
SPLITS = ("train", "val", "test")
TEXT = "utf-8-sig"  # how text files are read: UTF-8, a byte-order mark (Windows editors write one) left out
_TOKEN_LINE = re.compile(r"(?P<image>[^\t#]+)#\d+\t(?P<caption>.*)")


def collect_splits(
    entries: Iterable[tuple[str, Path, int | str, Sequence[str]]],
    origin: str,
    skip_bad_images: bool,
    listed_in: dict[str, str] | None = None,
) -> Splits:
    """The images of each split from (split, image path, image id, raw captions) entries, as every reader yields them.

    Empty or whitespace-only captions are dropped (with a count), an image left without captions is
    dropped, and images that do not exist are an error naming the file that listed them (`listed_in[split]`,
    by default `origin`), or skipped with a count when `skip_bad_images` is set. Each split's images and
    captions are logged, and images with fewer captions than most are counted in one warning.
    """
    listed_in = listed_in or {}
    splits: dict[str, list[CaptionedImage]] = {split: [] for split in SPLITS}
    empty_captions, missing = 0, []
    for split, path, image_id, raws in entries:
        if not all(isinstance(raw, str) for raw in raws):
            raise UserError(f"{origin}: a caption of {path.name} is not text ({list(raws)!r})")
        captions = [(raw.strip(), tuple(tokenize(raw))) for raw in raws]
        kept = [(raw, tokens) for raw, tokens in captions if tokens]
        empty_captions += len(captions) - len(kept)
        if split not in splits or not kept:
            continue
        if not path.is_file():
            missing.append((path, listed_in.get(split, origin)))
            continue
        splits[split].append(CaptionedImage(image_id, path, tuple(r for r, _ in kept), tuple(t for _, t in kept)))
    if empty_captions:
        log.warning("%s: dropped %d empty captions", origin, empty_captions)
    if missing:
        sources = ", ".join(dict.fromkeys(source for _, source in missing))
        listed = ", ".join(str(path) for path, _ in missing[:3])
        if not skip_bad_images:
            raise UserError(
                f"{len(missing)} images listed in {sources} are missing (e.g. {listed}); "
                "fix the image folder or set data.skip_bad_images=true to skip them"
            )
        log.warning("skipping %d images listed in %s but missing (e.g. %s)", len(missing), sources, listed)
    for split, images in splits.items():
        log.info(
            "%s split: %d images, %d captions (%s)",
            split,
            len(images),
            sum(len(image.captions) for image in images),
            listed_in.get(split, origin),
        )
    _warn_few_captions(splits, origin)
    return splits


def _warn_few_captions(splits: dict[str, list[CaptionedImage]], origin: str) -> None:
    """Count, in one warning, the images with fewer captions than most images of the data set have.

    COCO and Flickr8k give (about) 5 captions an image, generated or own data sets any fixed number: the most
    common count is the norm, so no count is hard-coded. Fewer is worth knowing (lost or empty caption lines);
    more is not: some COCO images have 6 or 7 captions by design.
    """
    counts = Counter(len(image.captions) for images in splits.values() for image in images)
    if not counts:
        return
    usual = counts.most_common(1)[0][0]
    few = {split: [image for image in images if len(image.captions) < usual] for split, images in splits.items()}
    total = sum(len(images) for images in few.values())
    if total:
        per_split = ", ".join(f"{len(images)} {split}" for split, images in few.items() if images)
        example = next(image for images in few.values() for image in images)
        log.warning(
            "%s: %d images have fewer than the usual %d captions (%s; e.g. %s has %d)",
            origin,
            total,
            usual,
            per_split,
            example.path.name,
            len(example.captions),
        )


def read_karpathy(annotations: ExistingFile, image_root: ExistingDir | None, skip_bad_images: bool) -> Splits:
    """A Karpathy split JSON: "restval" counts as train; images live at image_root/filepath/filename (image_root null:
    the JSON's folder)."""
    annotations = Path(annotations)
    if not annotations.is_file():
        raise UserError(
            f"caption file {annotations} does not exist (data.source.annotations): "
            "point it at a Karpathy split JSON such as dataset_coco.json"
        )
    root = Path(image_root) if image_root is not None else annotations.parent
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist (data.source.image_root)")
    try:
        images = json.loads(annotations.read_text(encoding=TEXT))["images"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(
            f"{annotations} is not a Karpathy split JSON ({type(error).__name__}: {error}); "
            'expected {"images": [{"filename", "split", "sentences": [{"raw"}]}]}'
        ) from error

    def entries():
        for position, entry in enumerate(images):
            try:
                split = "train" if entry["split"] == "restval" else entry["split"]
                yield (
                    split,
                    root / entry.get("filepath", "") / entry["filename"],
                    entry.get("cocoid", entry.get("imgid", entry["filename"])),
                    [s["raw"] for s in entry["sentences"]],
                )
            except (KeyError, TypeError, AttributeError) as error:
                raise UserError(
                    f"{annotations}: images[{position}] lacks {error} "
                    "(each image needs filename, split and sentences[].raw)"
                ) from error

    return collect_splits(entries(), str(annotations), skip_bad_images)


def _existing_file(path: str | os.PathLike, key: str, what: str, hint: str | None = None) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist ({key}): {hint or f'set {key} to its path'}")
    return path


def _existing_dir(path: str | os.PathLike, key: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"image folder {path} does not exist ({key})")
    return path


def _lines(path: Path, key: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of the non-blank lines of a UTF-8 text file (a byte-order mark before the first is no part
    of it)."""
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode(TEXT if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            raise UserError(
                f"{path}, line {number}: not UTF-8 text ({error}); re-save the file as UTF-8 ({key})"
            ) from error
        if line.strip():
            yield number, line


# MS COCO ----------------------------------------------------------------------------------------------


def _coco_images(path: str, key: str) -> list[tuple[int, str, list[str]]]:
    """(id, file_name, captions) of an official COCO caption file, sorted by id."""
    path = _existing_file(path, key, "COCO caption file")
    try:
        data = json.loads(path.read_text(encoding=TEXT))
        images = {image["id"]: (image["file_name"], []) for image in data["images"]}
        annotations = data["annotations"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(
            f"{path} is not a COCO caption file ({type(error).__name__}: {error}); expected "
            '{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]} '
            f"such as captions_train2014.json ({key})"
        ) from error
    for position, annotation in enumerate(annotations):
        try:
            images[annotation["image_id"]][1].append(annotation["caption"])
        except (KeyError, TypeError) as error:
            raise UserError(
                f"{path}: annotations[{position}] has no image_id of the images list or no caption "
                f"({type(error).__name__}: {error}) ({key})"
            ) from error
    return [(image_id, name, captions) for image_id, (name, captions) in sorted(images.items())]


def read_coco(
    train: ExistingFile,
    val: ExistingFile,
    train_images: ExistingDir,
    val_images: ExistingDir,
    test: ExistingFile | None,
    test_images: ExistingDir | None,
    val_size: NonNegativeInt | None,
    skip_bad_images: bool,
) -> Splits:
    """The official MS COCO caption annotations (captions_{train,val}2014.json or 2017) and image folders.

    The official test images have no public captions, so without a `test` file the val file is divided:
    its images sorted by id, the first `val_size` (null: half) are val, the rest test. A `test` file's
    images are looked up in `test_images` (null: `val_images`). Image ids are the COCO ids.
    """
    train_root = _existing_dir(train_images, "data.source.train_images")
    val_root = _existing_dir(val_images, "data.source.val_images")
    listed_in = {"train": str(train), "val": str(val), "test": str(test or val)}
    entries = [
        ("train", train_root / name, image_id, captions)
        for image_id, name, captions in _coco_images(train, "data.source.train")
    ]
    val_entries = _coco_images(val, "data.source.val")
    if test is None:
        size = len(val_entries) // 2 if val_size is None else val_size
        if not 0 <= size <= len(val_entries):
            raise UserError(
                f"val_size={val_size} is not between 0 and the {len(val_entries)} images of {val} "
                "(data.source.val_size)"
            )
        entries += [
            ("val" if i < size else "test", val_root / name, image_id, captions)
            for i, (image_id, name, captions) in enumerate(val_entries)
        ]
    else:
        test_root = _existing_dir(test_images or val_images, "data.source.test_images")
        entries += [("val", val_root / name, image_id, captions) for image_id, name, captions in val_entries]
        entries += [
            ("test", test_root / name, image_id, captions)
            for image_id, name, captions in _coco_images(test, "data.source.test")
        ]
    return collect_splits(
        entries, f"the COCO caption files {train}, {val}" + (f", {test}" if test else ""), skip_bad_images, listed_in
    )


# Flickr8k ---------------------------------------------------------------------------------------------


def read_flickr8k(
    token_file: ExistingFile,
    image_dir: ExistingDir,
    train_list: ExistingFile,
    val_list: ExistingFile,
    test_list: ExistingFile,
    skip_bad_images: bool,
) -> Splits:
    """The Flickr8k text release: Flickr8k.token.txt (`<image>#<n><TAB><caption>`) and the three image lists.

    Images of the token file in no list are ignored; listed images without captions are an error, or
    skipped with a count when `skip_bad_images` is set. Image ids are the file names.
    """
    root = _existing_dir(image_dir, "data.source.image_dir")
    token_path = _existing_file(token_file, "data.source.token_file", "Flickr8k token file")
    captions: dict[str, list[str]] = {}
    for number, line in _lines(token_path, "data.source.token_file"):
        match = _TOKEN_LINE.fullmatch(line)
        if match is None:
            raise UserError(
                f"{token_path}, line {number}: expected '<image>.jpg#<n><TAB><caption>', got {line[:80]!r} "
                "(data.source.token_file should be Flickr8k.token.txt)"
            )
        captions.setdefault(match["image"].strip(), []).append(match["caption"])
    entries, uncaptioned, listed_in = [], [], {}
    for split, listing, key in (
        ("train", train_list, "train_list"),
        ("val", val_list, "val_list"),
        ("test", test_list, "test_list"),
    ):
        list_path = _existing_file(listing, f"data.source.{key}", "Flickr8k image list")
        listed_in[split] = str(list_path)
        for _, name in _lines(list_path, f"data.source.{key}"):
            name = name.strip()
            if name in captions:
                entries.append((split, root / name, name, captions[name]))
            else:
                uncaptioned.append(f"{name} ({list_path.name})")
    if uncaptioned:
        examples = ", ".join(uncaptioned[:3])
        message = f"{len(uncaptioned)} listed images have no captions in {token_path} (e.g. {examples})"
        if not skip_bad_images:
            raise UserError(f"{message}; fix the lists or set data.skip_bad_images=true to skip them")
        log.warning("skipping %s", message)
    return collect_splits(entries, str(token_path), skip_bad_images, listed_in)


# Captioned folders (Hugging Face imagefolder) -----------------------------------------------------------

_SPLIT_NAMES = {"train": "train", "validation": "val", "val": "val", "test": "test"}


def _read_metadata(path: Path) -> dict[str, tuple[str | None, list[str]]]:
    """file_name -> (split from the "split" key or None, captions), lines of the same file_name merged."""
    images: dict[str, tuple[str | None, list[str]]] = {}
    for number, line in _lines(path, "data.source.metadata"):
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
            name, text, split = record["file_name"], record["text"], record.get("split")
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise UserError(
                f'{where}: expected a JSON object with "file_name" and "text" ({type(error).__name__}: {error})'
            ) from error
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise UserError(f'{where}: "text" must be a caption or a list of captions, got {text!r}')
        if split is not None and split not in _SPLIT_NAMES:
            raise UserError(f'{where}: "split" must be one of {", ".join(_SPLIT_NAMES)}, got {split!r}')
        previous_split, captions = images.setdefault(name, (None, []))
        images[name] = (_SPLIT_NAMES[split] if split else previous_split, captions + texts)
    return images


def _hashed_split(file_name: str, val_fraction: float, test_fraction: float) -> str:
    # A digest of the name, not hash(): the same split on every run and machine (PYTHONHASHSEED).
    position = int.from_bytes(hashlib.sha256(file_name.encode("utf-8")).digest()[:8], "big") / 2**64
    return "val" if position < val_fraction else "test" if position < val_fraction + test_fraction else "train"


def read_caption_folder(
    folder: ExistingDir, metadata: str, val_fraction: Fraction, test_fraction: Fraction, skip_bad_images: bool
) -> Splits:
    """A folder of images with `metadata.jsonl` lines {"file_name": "a.jpg", "text": "caption" or [captions]}.

    With train/ and validation/ (or val/) and optionally test/ subfolders, each with its own metadata file,
    those are the splits. Otherwise the images are split by a hash of file_name (stable across runs and
    machines) into the given fractions, unless a line's "split" key names the split. Image ids are file names.
    """
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"caption folder {root} does not exist (data.source.folder)")
    validation = next((root / name for name in ("validation", "val") if (root / name).is_dir()), None)
    metadata_hint = 'add one with lines {"file_name": "a.jpg", "text": "a caption"}, or set data.source.metadata'
    if (root / "train").is_dir() and validation is not None:
        entries = []
        for split, base in (("train", root / "train"), ("val", validation), ("test", root / "test")):
            if base.is_dir():
                path = _existing_file(base / metadata, "data.source.metadata", "caption metadata file", metadata_hint)
                entries += [
                    (split, base / name, name, captions) for name, (_, captions) in _read_metadata(path).items()
                ]
    else:
        if val_fraction + test_fraction >= 1:  # each is a fraction (its annotation): their sum is checked here
            raise UserError(
                f"val_fraction={val_fraction} and test_fraction={test_fraction} must sum to less than 1 "
                "(data.source.val_fraction, data.source.test_fraction)"
            )
        path = _existing_file(root / metadata, "data.source.metadata", "caption metadata file", metadata_hint)
        entries = [
            (split or _hashed_split(name, val_fraction, test_fraction), root / name, name, captions)
            for name, (split, captions) in _read_metadata(path).items()
        ]
    return collect_splits(entries, f"the metadata of {root}", skip_bad_images)
