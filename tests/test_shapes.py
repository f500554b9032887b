import json
import re

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from datamodules.shapes import COLOURS, SHAPES, SIZES, ShapesSet, generate_shapes
from framework.checks import check_config
from framework.config import compose
from framework.errors import UserError
from tests.helpers.config import CONF

# The generator's settings as conf/data/_shapes.yaml gives them (seed 0, 64 px, 5 captions), with fewer images.
DEFAULTS = OmegaConf.to_container(OmegaConf.load(CONF / "data" / "_shapes.yaml"))
SMALL = {**{k: v for k, v in DEFAULTS.items() if k != "root"}, "num_train": 20, "num_val": 5, "num_test": 5}
RELATION_WORDS = {"left", "right", "above", "below"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    path = generate_shapes(root, ShapesSet(**SMALL))
    return root, path, json.loads(path.read_text())


def test_name_layout_and_no_temp_dirs(dataset):
    root, path, _ = dataset
    assert path == root / "shapes_s0_20-5-5_64px_5c" / "dataset_shapes.json"
    assert [p.name for p in root.iterdir()] == ["shapes_s0_20-5-5_64px_5c"]


def test_splits_and_counts(dataset):
    _, _, data = dataset
    assert data["dataset"] == "shapes"
    images = data["images"]
    assert [im["split"] for im in images] == ["train"] * 20 + ["val"] * 5 + ["test"] * 5
    assert [im["imgid"] for im in images] == list(range(30))
    sentids = [sid for im in images for sid in im["sentids"]]
    assert len(sentids) == len(set(sentids)) == 30 * 5
    for im in images:
        assert im["cocoid"] == im["imgid"]
        assert [s["sentid"] for s in im["sentences"]] == im["sentids"]
        assert len({s["raw"] for s in im["sentences"]}) == 5
        for s in im["sentences"]:
            assert s["imgid"] == im["imgid"]
            assert s["tokens"] == re.findall(r"[a-z]+", s["raw"].lower())
            assert 1 <= len(s["tokens"]) <= 16


def test_images_exist_with_right_size_and_mode(dataset):
    _, path, data = dataset
    for im in data["images"]:
        with Image.open(path.parent / im["filepath"] / im["filename"]) as img:
            assert img.format == "PNG"
            assert img.mode == "RGB"
            assert img.size == (64, 64)


def test_objects_are_valid_and_separated(dataset):
    _, _, data = dataset
    counts = {len(im["objects"]) for im in data["images"]}
    assert counts == {1, 2}
    for im in data["images"]:
        objs = im["objects"]
        for o in objs:
            assert o["shape"] in SHAPES and o["colour"] in COLOURS and o["size"] in SIZES
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= 63 and 0 <= y0 < y1 <= 63
        if len(objs) == 2:
            a, b = objs
            assert (a["shape"], a["colour"]) != (b["shape"], b["colour"])
            ax0, ay0, ax1, ay1 = a["box"]
            bx0, by0, bx1, by1 = b["box"]
            assert ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0, "boxes overlap"


def test_captions_mention_objects(dataset):
    _, _, data = dataset
    for im in data["images"]:
        for s in im["sentences"]:
            for o in im["objects"]:
                assert f"{o['size']} {o['colour']} {o['shape']}" in s["raw"]
            if len(im["objects"]) == 1:
                assert not RELATION_WORDS & set(s["tokens"])


def _centre(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def test_relations_agree_with_boxes(dataset):
    _, _, data = dataset
    checked = 0
    for im in data["images"]:
        if len(im["objects"]) != 2:
            continue
        by_phrase = {f"{o['size']} {o['colour']} {o['shape']}": _centre(o["box"]) for o in im["objects"]}
        for s in im["sentences"]:
            m = re.search(
                r"\ba (\w+ \w+ \w+) (?:is )?(?:to the )?(left|right|above|below)(?: of)? a (\w+ \w+ \w+)$", s["raw"]
            )
            assert m, s["raw"]
            (fx, fy), rel, (sx, sy) = by_phrase[m[1]], m[2], by_phrase[m[3]]
            dx, dy = sx - fx, sy - fy  # second object relative to the first
            main, other = (dx, dy) if rel in ("left", "right") else (dy, dx)
            assert abs(main) > abs(other), s["raw"]
            assert (main > 0) == (rel in ("left", "above")), s["raw"]
            checked += 1
    assert checked > 0


def test_deterministic(tmp_path):
    p1 = generate_shapes(tmp_path / "a", ShapesSet(**{**SMALL, "seed": 3}))
    p2 = generate_shapes(tmp_path / "b", ShapesSet(**{**SMALL, "seed": 3}))
    assert p1.read_bytes() == p2.read_bytes()
    for name in ("000000.png", "000007.png", "000029.png"):
        assert (p1.parent / "images" / name).read_bytes() == (p2.parent / "images" / name).read_bytes()


def test_different_seed_differs(tmp_path):
    p1 = generate_shapes(tmp_path, ShapesSet(**{**SMALL, "seed": 0}))
    p2 = generate_shapes(tmp_path, ShapesSet(**{**SMALL, "seed": 1}))
    assert p1.parent != p2.parent
    assert json.loads(p1.read_text()) != json.loads(p2.read_text())
    assert (p1.parent / "images" / "000000.png").read_bytes() != (p2.parent / "images" / "000000.png").read_bytes()


def test_different_parameters_do_not_collide(tmp_path):
    p1 = generate_shapes(tmp_path, ShapesSet(**SMALL))
    p2 = generate_shapes(tmp_path, ShapesSet(**{**SMALL, "image_size": 48, "captions_per_image": 3}))
    assert p2.parent.name == "shapes_s0_20-5-5_48px_3c"
    assert p1.parent != p2.parent
    data = json.loads(p2.read_text())
    assert all(len(im["sentences"]) == 3 for im in data["images"])
    with Image.open(p2.parent / "images" / "000000.png") as img:
        assert img.size == (48, 48)


def test_second_call_does_not_regenerate(tmp_path):
    path = generate_shapes(tmp_path, ShapesSet(**SMALL))
    png = path.parent / "images" / "000000.png"
    stamps = (path.stat().st_mtime_ns, png.stat().st_mtime_ns)
    assert generate_shapes(tmp_path, ShapesSet(**SMALL)) == path
    assert (path.stat().st_mtime_ns, png.stat().st_mtime_ns) == stamps
    assert [p.name for p in tmp_path.iterdir()] == [path.parent.name]


def test_lost_race_uses_existing(tmp_path, monkeypatch):
    """If another process finishes first, the temp dir is dropped and the winner's data is used."""
    import datamodules.shapes as shapes

    path = generate_shapes(tmp_path, ShapesSet(**SMALL))
    marker = path.read_bytes()
    real_exists = type(path).exists
    calls = []

    def exists_once_false(p):  # pretend the first completeness check missed the winner's JSON
        if p == path and not calls:
            calls.append(p)
            return False
        return real_exists(p)

    monkeypatch.setattr(type(path), "exists", exists_once_false)
    assert shapes.generate_shapes(tmp_path, ShapesSet(**SMALL)) == path
    assert calls and path.read_bytes() == marker
    assert [p.name for p in tmp_path.iterdir()] == [path.parent.name]


def test_failure_leaves_nothing(tmp_path, monkeypatch):
    import datamodules.shapes as shapes

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(shapes, "_captions", boom)
    with pytest.raises(RuntimeError):
        shapes.generate_shapes(tmp_path, ShapesSet(**SMALL))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("data.captions_per_image=0", "data.captions_per_image=0: takes a whole number >= 1 and <= 6"),
        ("data.captions_per_image=99", "data.captions_per_image=99: takes a whole number >= 1 and <= 6"),
        ("data.image_size=16", "data.image_size=16: takes a whole number >= 32"),
        ("data.num_val=-1", "data.num_val=-1: takes a whole number >= 0"),
    ],
)
def test_rejects_bad_arguments(override, line, tmp_path):
    """The generator's ranges are its settings' annotations: the config check names the key before anything runs."""
    with pytest.raises(UserError) as error:
        check_config(compose([f"paths.data_dir={tmp_path}", override]))
    assert str(error.value).splitlines() == [line]


def test_the_data_module_names_the_generated_set_for_the_manifest(tmp_path):
    data = instantiate(
        compose([f"paths.data_dir={tmp_path}", "data.num_train=4", "data.num_val=2", "data.num_test=2"]).data
    )
    assert data.data_paths() == []  # not generated yet
    data.prepare_data()
    assert data.data_paths() == [str(tmp_path / "shapes_s0_4-2-2_64px_5c")]
