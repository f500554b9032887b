"""The data set readers on real Flickr8k text files and generated COCO / caption-folder trees, and every bad input."""

import json
import logging
from pathlib import Path

import hydra
import numpy as np
import pytest
from PIL import Image

from framework.errors import UserError
from framework.images import load_rgb
from framework.runner import run
from framework.text import Vocabulary
from tests.helpers.captioning import read
from tests.helpers.config import TINY_MODEL, compose_config
from tests.helpers.datasets import FLICKR8K, LISTS, coco_file, coco_tree, flickr8k_tree
from tests.helpers.images import write_noise


def test_flickr8k_release_files(tmp_path):
    splits = read("flickr8k", **flickr8k_tree(tmp_path))
    assert {split: len(images) for split, images in splits.items()} == {"train": 20, "val": 5, "test": 5}
    captions = {}
    for line in (FLICKR8K / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines():
        key, caption = line.split("\t")
        captions.setdefault(key.split("#")[0], []).append(caption.strip())
    for split, list_file in zip(splits, LISTS.values()):
        assert [image.image_id for image in splits[split]] == (FLICKR8K / list_file).read_text().split()
        for image in splits[split]:
            assert list(image.captions) == captions[image.image_id] and len(image.captions) == 5
            assert image.path.name == image.image_id


def test_flickr8k_unlisted_images_are_ignored_and_uncaptioned_ones_reported(tmp_path, caplog):
    paths = flickr8k_tree(tmp_path)
    with open(paths["token_file"], "a") as f:
        f.write("2258277193_586949ec62.jpg.1#0\tan image in no list\n")
    with open(paths["test_list"], "a") as f:
        f.write("nocaptions.jpg\n")
    with pytest.raises(UserError, match=r"1 listed images have no captions in .*token.txt \(e.g. nocaptions.jpg"):
        read("flickr8k", **paths)
    with caplog.at_level(logging.WARNING):
        splits = read("flickr8k", skip_bad_images=True, **paths)
    assert "skipping 1 listed images have no captions" in caplog.text
    assert sum(map(len, splits.values())) == 30


def test_missing_images_are_an_error_or_skipped_with_a_count(tmp_path, caplog):
    paths = flickr8k_tree(tmp_path)
    for name in (FLICKR8K / LISTS["val_list"]).read_text().split()[:2]:
        (Path(paths["image_dir"]) / name).unlink()
    with pytest.raises(UserError, match=r"2 images listed in .*Flickr_8k.devImages.txt are missing .*skip_bad_images"):
        read("flickr8k", **paths)
    with caplog.at_level(logging.WARNING):
        splits = read("flickr8k", skip_bad_images=True, **paths)
    assert "skipping 2 images listed in" in caplog.text
    assert len(splits["val"]) == 3


@pytest.mark.parametrize(
    "line, message",
    [
        ("caf\xe9 picture#0\ta caption".encode("latin-1"), "line 3: not UTF-8 text"),
        (b"1191338263_a4fa073154.jpg a caption without tab", r"line 3: expected '<image>.jpg#<n><TAB><caption>'"),
    ],
)
def test_bad_token_file_names_the_file_and_line(line, message, tmp_path):
    paths = flickr8k_tree(tmp_path)
    token_file = Path(paths["token_file"])
    lines = token_file.read_bytes().splitlines()
    token_file.write_bytes(b"\n".join([*lines[:2], line, *lines[2:]]))
    with pytest.raises(UserError, match=rf"{token_file}, {message}"):
        read("flickr8k", **paths)


BOM = "\ufeff".encode()  # what Windows editors write before UTF-8 text


def test_a_byte_order_mark_loses_no_caption(tmp_path, caplog):
    """A token file (or image list) saved with a byte-order mark: its first line is read whole (the mark once made
    the first image name unknown and its first caption silently lost)."""
    plain = read("flickr8k", **flickr8k_tree(tmp_path / "plain"))
    paths = flickr8k_tree(tmp_path / "bom")
    for key in ("token_file", "train_list"):
        Path(paths[key]).write_bytes(BOM + Path(paths[key]).read_bytes())
    with caplog.at_level(logging.WARNING):
        marked = read("flickr8k", **paths)
    assert "fewer than the usual" not in caplog.text
    assert [[(i.image_id, i.captions) for i in images] for images in marked.values()] == [
        [(i.image_id, i.captions) for i in images] for images in plain.values()
    ]


def test_json_and_metadata_files_with_a_byte_order_mark(tmp_path):
    image = tmp_path / "a.png"
    write_noise(image)
    karpathy = tmp_path / "dataset.json"
    entry = {"filename": "a.png", "split": "train", "sentences": [{"raw": "a cat"}]}
    karpathy.write_bytes(BOM + json.dumps({"images": [entry]}).encode())
    assert read("karpathy", annotations=str(karpathy), image_root=None)["train"][0].path == image
    (tmp_path / "metadata.jsonl").write_bytes(BOM + b'{"file_name": "a.png", "text": "a cat", "split": "val"}\n')
    assert read("caption_folder", folder=str(tmp_path))["val"][0].captions == ("a cat",)
    coco = tmp_path / "coco"
    paths = coco_tree(coco)
    Path(paths["train"]).write_bytes(BOM + Path(paths["train"]).read_bytes())
    assert len(read("coco", **paths)["train"]) == 3


def test_long_captions_are_read_whole_and_truncated_by_the_vocabulary(tmp_path):
    paths = flickr8k_tree(tmp_path)
    first = (FLICKR8K / LISTS["train_list"]).read_text().split()[0]
    with open(paths["token_file"], "a") as f:
        f.write(f"{first}#5\t{' '.join(['word'] * 100)}\n")
    image = read("flickr8k", **paths)["train"][0]
    assert len(image.tokens[-1]) == 100
    vocab = Vocabulary.build(image.tokens)
    assert len(vocab.encode(image.tokens[-1], max_len=16)) == 16 + 2


def test_coco_official_annotations_divide_val_into_val_and_test(tmp_path):
    splits = read("coco", **coco_tree(tmp_path))
    assert {split: [image.image_id for image in images] for split, images in splits.items()} == {
        "train": [3, 5, 9],
        "val": [10, 20],
        "test": [30, 40, 50],
    }
    image = splits["test"][0]
    assert image.captions == ("Image 30 caption 0.", "Image 30 caption 1.")
    assert image.tokens[0] == ("image", "30", "caption", "0")
    assert image.path == tmp_path / "val2014" / "COCO_val2014_000000000030.jpg"
    assert [len(images) for images in read("coco", **coco_tree(tmp_path), val_size=4).values()] == [3, 4, 1]


def test_coco_with_a_test_file(tmp_path):
    paths = coco_tree(tmp_path)
    coco_file(tmp_path / "annotations" / "captions_test.json", [60], "test")
    splits = read(
        "coco", **paths, test=str(tmp_path / "annotations" / "captions_test.json"), test_images=str(tmp_path / "test")
    )
    assert [len(images) for images in splits.values()] == [3, 5, 1]


def test_coco_file_without_annotations_names_the_file(tmp_path):
    paths = coco_tree(tmp_path)
    Path(paths["val"]).write_text(json.dumps({"images": []}))
    with pytest.raises(
        UserError,
        match=rf"{paths['val']} is not a COCO caption file \(KeyError: 'annotations'\)"
        r".*\(data.source.val\)",
    ):
        read("coco", **paths)


def test_a_caption_that_is_not_text_names_the_file(tmp_path):
    paths = coco_tree(tmp_path)
    data = json.loads(Path(paths["train"]).read_text())
    data["annotations"][0]["caption"] = None
    Path(paths["train"]).write_text(json.dumps(data))
    with pytest.raises(
        UserError, match=rf"{paths['train']}.*: a caption of COCO_train2014_000000000009.jpg is not text"
    ):
        read("coco", **paths)


def test_coco_karpathy_config_reads_the_split_json(tmp_path, data_dir):
    layout = [
        ("train2014", "train"),
        ("train2014", "train"),
        ("val2014", "restval"),
        ("val2014", "val"),
        ("val2014", "test"),
    ]
    images = [
        {
            "filepath": folder,
            "filename": f"COCO_{folder}_{i:012d}.jpg",
            "cocoid": i,
            "split": split,
            "sentences": [{"raw": f"a photo number {i}"}],
        }
        for i, (folder, split) in enumerate(layout)
    ]
    for image in images:
        write_noise(tmp_path / "coco" / image["filepath"] / image["filename"])
    (tmp_path / "coco" / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    cfg = compose_config(
        [
            "data=coco_karpathy",
            f"data.source.annotations={tmp_path}/coco/dataset_coco.json",
            f"data.source.image_root={tmp_path}/coco",
        ],
        tmp_path,
        data_dir,
    )
    splits = hydra.utils.instantiate(cfg.data).splits
    assert {split: [image.image_id for image in images] for split, images in splits.items()} == {
        "train": [0, 1, 2],
        "val": [3],
        "test": [4],
    }
    assert splits["train"][2].path == tmp_path / "coco" / "val2014" / "COCO_val2014_000000000002.jpg"


def metadata_file(path: Path, records: list[dict], images: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    for record in records if images else ():
        write_noise(path.parent / record["file_name"])


def test_caption_folder_split_by_a_stable_hash(tmp_path):
    records = [{"file_name": f"img{i:02d}.png", "text": f"picture {i}"} for i in range(20)]
    records += [
        {"file_name": "img01.png", "text": ["second caption", "third caption"]},
        {"file_name": "img00.png", "text": "moved", "split": "test"},
    ]
    metadata_file(tmp_path / "metadata.jsonl", records)
    splits = read("caption_folder", folder=str(tmp_path), val_fraction=0.2, test_fraction=0.2)
    # Fixed by sha256 of the file names: the same on every run and machine.
    assert [image.image_id for image in splits["val"]] == ["img07.png"]
    assert [image.image_id for image in splits["test"]] == ["img00.png", "img08.png", "img11.png"]
    assert len(splits["train"]) == 16
    assert splits["train"][0].captions == ("picture 1", "second caption", "third caption")
    assert splits["test"][0].captions == ("picture 0", "moved")


def test_caption_folder_with_split_subfolders(tmp_path):
    metadata_file(
        tmp_path / "train" / "metadata.jsonl",
        [{"file_name": f"images/{i}.jpg", "text": f"train picture {i}"} for i in range(3)],
    )
    metadata_file(tmp_path / "validation" / "metadata.jsonl", [{"file_name": "v.png", "text": ["a", "b"]}])
    splits = read("caption_folder", folder=str(tmp_path))
    assert [len(images) for images in splits.values()] == [3, 1, 0]
    assert splits["train"][2].path == tmp_path / "train" / "images" / "2.jpg"
    assert splits["val"][0].captions == ("a", "b")


def test_empty_captions_are_dropped_with_a_count(tmp_path, caplog):
    metadata_file(
        tmp_path / "metadata.jsonl",
        [
            {"file_name": "a.png", "text": ["", "  ", "a cat"], "split": "train"},
            {"file_name": "b.png", "text": " \t", "split": "train"},
        ],
    )
    with caplog.at_level(logging.WARNING):
        splits = read("caption_folder", folder=str(tmp_path))
    assert "dropped 3 empty captions" in caplog.text
    assert [image.captions for image in splits["train"]] == [("a cat",)]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"file_name": "b.png", "text": "unterminated}', r"line 2: expected a JSON object .*JSONDecodeError"),
        ('{"file_name": "b.png", "caption": "x"}', r"line 2: expected a JSON object .*KeyError: 'text'"),
        ('{"file_name": "b.png", "text": 3}', r'line 2: "text" must be a caption or a list of captions'),
        ('{"file_name": "b.png", "text": "x", "split": "dev"}', r'line 2: "split" must be one of'),
    ],
)
def test_bad_metadata_line_names_the_file_and_line(line, message, tmp_path):
    metadata = tmp_path / "metadata.jsonl"
    metadata.write_text('{"file_name": "a.png", "text": "fine"}\n' + line + "\n")
    with pytest.raises(UserError, match=rf"{metadata}, {message}"):
        read("caption_folder", folder=str(tmp_path))


def test_missing_metadata_says_what_to_add(tmp_path):
    with pytest.raises(UserError, match=r"metadata.jsonl does not exist \(data.source.metadata\): add one with lines"):
        read("caption_folder", folder=str(tmp_path))


@pytest.mark.parametrize(
    "mode, suffix", [("L", ".png"), ("CMYK", ".jpg"), ("RGBA", ".png"), ("I;16", ".png"), ("P", ".png")]
)
def test_images_are_read_as_8bit_rgb(mode, suffix, tmp_path):
    path = tmp_path / f"image{suffix}"
    if mode == "I;16":
        Image.fromarray(np.full((8, 6), 257 * 200, np.uint16)).save(path)
    else:
        Image.new(mode, (6, 8), 200 if mode in ("L", "P") else (200,) * len(mode)).save(path)
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (6, 8)
    if mode in ("L", "I;16"):
        assert np.asarray(image).tolist() == np.full((8, 6, 3), 200).tolist()


def test_truncated_jpeg_names_the_file(tmp_path):
    path = tmp_path / "truncated.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(UserError, match=rf"cannot read image {path}: .*data.skip_bad_images=true"):
        load_rgb(path)


def test_flickr8k_trains_end_to_end(tmp_path, data_dir):
    paths = flickr8k_tree(tmp_path)
    overrides = [
        *TINY_MODEL,
        "trainer.fast_dev_run=true",
        "data=flickr8k",
        "data.image_size=32",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.vocab_min_count=1",
        *(f"data.source.{key}={value}" for key, value in paths.items()),
    ]
    run(compose_config(overrides, tmp_path / "run", data_dir))
    assert "test/CIDEr" in json.loads((tmp_path / "run" / "metrics.json").read_text())
