import math
import subprocess
import warnings

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from lightning_modules.captioning import metrics as metrics_module
from lightning_modules.captioning.metrics import CaptionMetrics

REFERENCES = {
    1: ["A black dog runs across the grass.", "The dog's running on a lawn!", "A dog, running outside."],
    2: ["Two cats sleep on a red sofa.", "Cats sleeping on the couch."],
    3: [
        "A man rides a bicycle down the street.",
        "A cyclist on a city road.",
        "Man riding his bike.",
        "Someone cycles past parked cars.",
        "A person on a bike in traffic.",
    ],
    4: ["A plate of pasta with tomato sauce.", "Spaghetti on a white plate.", "A dish of noodles."],
    5: [
        "Children play football in a park.",
        "Kids kicking a ball on the field.",
        "A group of children playing soccer.",
        "Young boys chase a soccer ball.",
    ],
    "img-6": ["A red car parked by the sea.", "A car next to the ocean."],
}
PREDICTIONS = {
    1: "The Dog's running on the GRASS.",
    2: "two cats, sleeping on a sofa!",
    3: "A man riding a bike down the street...",
    4: "",  # empty prediction
    5: "Kids play soccer in the park.",
    "img-6": "?!",  # only punctuation: empty after tokenization
}
KEYS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
JAVA_FREE_KEYS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]


@pytest.fixture(scope="module")
def metrics():
    m = CaptionMetrics()
    yield m
    m.close()


def direct_pycocoevalcap(references, predictions):
    """COCOEvalCap.evaluate, step by step."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in predictions})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in predictions.items()})
    bleu, _ = Bleu(4).compute_score(gts, res)
    meteor = Meteor()
    try:
        meteor_score, _ = meteor.compute_score(gts, res)
    finally:
        del meteor
    return {
        **dict(zip(KEYS[:4], bleu)),
        "METEOR": meteor_score,
        "ROUGE-L": Rouge().compute_score(gts, res)[0],
        "CIDEr": Cider().compute_score(gts, res)[0],
    }


@pytest.mark.slow  # starts Java METEOR twice (ours and pycocoevalcap's): ~10 s each
def test_matches_pycocoevalcap_directly(metrics):
    scores = metrics(REFERENCES, PREDICTIONS)
    assert list(scores) == KEYS
    assert all(type(v) is float for v in scores.values())
    expected = direct_pycocoevalcap(REFERENCES, PREDICTIONS)
    assert scores == {k: float(v) for k, v in expected.items()}
    assert 0 < scores["BLEU-1"] < 1 and 0 < scores["METEOR"] < 1 and scores["CIDEr"] > 0


def test_same_instance_twice_reuses_meteor(metrics):
    first = metrics(REFERENCES, PREDICTIONS)
    meteor = metrics._meteor
    assert meteor is not None
    assert metrics(REFERENCES, PREDICTIONS) == first
    assert metrics._meteor is meteor


def test_perfect_beats_wrong(metrics):
    perfect = {i: refs[0] for i, refs in REFERENCES.items()}
    wrong = {i: "an airplane flying over snowy mountains" for i in REFERENCES}
    good, bad = metrics(REFERENCES, perfect), metrics(REFERENCES, wrong)
    assert good["CIDEr"] > bad["CIDEr"]
    assert good["BLEU-4"] > bad["BLEU-4"] and good["METEOR"] > bad["METEOR"]


def test_subset_of_ids_and_all_empty(metrics):
    scores = metrics(REFERENCES, {2: "", 5: ""})
    assert scores == {k: 0.0 for k in KEYS}


def test_missing_references_raise():
    m = CaptionMetrics()
    with pytest.raises(ValueError, match=r"\['nope', 7\]"):
        m(REFERENCES, {1: "a dog", "nope": "x", 7: "y"})
    with pytest.raises(ValueError, match="no references"):
        m({**REFERENCES, 1: []}, {1: "a dog"})
    with pytest.raises(ValueError, match="empty"):
        m(REFERENCES, {})
    assert m._meteor is None


@pytest.mark.slow  # starts a Java METEOR of its own
def test_close_stops_meteor():
    m = CaptionMetrics()
    m(REFERENCES, {2: "two cats on a sofa"})
    proc = m._meteor.meteor_p
    m.close()
    assert proc.poll() is not None and m._meteor is None
    m.close()  # idempotent


def test_without_java(monkeypatch):
    def no_subprocess(*args, **kwargs):
        raise AssertionError("a subprocess was started without Java")

    monkeypatch.setattr(metrics_module, "java_available", lambda: False)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = CaptionMetrics(spice=True)
        scores = m(REFERENCES, PREDICTIONS)
        assert m(REFERENCES, PREDICTIONS) == scores
        perfect = m(REFERENCES, {i: refs[0] for i, refs in REFERENCES.items()})
    assert len([w for w in caught if "Java was not found" in str(w.message)]) == 1
    assert list(scores) == JAVA_FREE_KEYS
    assert all(type(v) is float and math.isfinite(v) for v in scores.values())
    assert 0 < scores["BLEU-1"] < 1 and perfect["CIDEr"] > scores["CIDEr"]
    m.close()
