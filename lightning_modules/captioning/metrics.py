"""Standard COCO caption metrics, computed the way ``pycocoevalcap.eval.COCOEvalCap`` does."""

from __future__ import annotations

import re
import shutil
import warnings
from collections.abc import Hashable, Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice.spice import Spice
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

BLEU_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")
_WORD = re.compile(r"\w+")


def java_available() -> bool:
    """Whether a ``java`` executable is on PATH (needed by the PTB tokenizer, METEOR and SPICE)."""
    return shutil.which("java") is not None


def simple_tokenize(captions: Mapping[Hashable, list[dict[str, str]]]) -> dict[Hashable, list[str]]:
    """Java-free stand-in for ``PTBTokenizer.tokenize``: lowercase, keep runs of word characters."""
    return {k: [" ".join(_WORD.findall(c["caption"].lower())) for c in v] for k, v in captions.items()}


def _entry(caption: str) -> dict[str, str]:
    # The PTB tokenizer pairs captions with ids by output line; collapsing all whitespace
    # (\r, \u2028, ... included) keeps one caption per line without changing its tokens.
    return {"caption": " ".join(caption.split())}


class CaptionMetrics:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE when asked) through pycocoevalcap, with its PTB tokenizer.

    References and predictions are PTB-tokenized and scored exactly like ``COCOEvalCap.evaluate``,
    over the ids of ``predictions``. The METEOR Java process starts on the first call and is reused
    until :meth:`close`. Empty predictions are passed through as is: pycocoevalcap copes with an empty
    tokenized caption and scores it 0 (the same happens to punctuation-only captions after tokenization).

    SPICE needs a network download of Stanford CoreNLP on first use (into pycocoevalcap's package
    folder), so it only runs with ``spice=True``; it also needs ids that sort and serialize to JSON.

    Without Java, METEOR and SPICE are skipped, a lowercase word tokenizer (:func:`simple_tokenize`)
    replaces the PTB tokenizer, and a single warning says so; BLEU, ROUGE-L and CIDEr are still returned.
    """

    def __init__(self, spice: bool = False):
        self.spice = spice
        self.java = java_available()
        self._meteor: Meteor | None = None
        if not self.java:
            warnings.warn(
                "Java was not found: METEOR and SPICE are skipped and a simple lowercase "
                "whitespace/punctuation tokenizer replaces the PTB tokenizer.",
                RuntimeWarning,
                stacklevel=2,
            )

    def __call__(
        self, references: Mapping[Hashable, Sequence[str]], predictions: Mapping[Hashable, str]
    ) -> dict[str, float]:
        if not predictions:
            raise ValueError("CaptionMetrics: predictions is empty")
        missing = [i for i in predictions if not references.get(i)]
        if missing:
            raise ValueError(f"CaptionMetrics: no references for prediction ids {missing}")

        gts = {i: [_entry(c) for c in references[i]] for i in predictions}
        res = {i: [_entry(predictions[i])] for i in predictions}
        tokenize = PTBTokenizer().tokenize if self.java else simple_tokenize
        gts, res = tokenize(gts), tokenize(res)

        scores = dict(zip(BLEU_KEYS, Bleu(4).compute_score(gts, res, verbose=0)[0]))
        if self.java:
            if self._meteor is None:
                self._meteor = Meteor()
            scores["METEOR"] = self._meteor.compute_score(gts, res)[0]
        scores["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
        scores["CIDEr"] = Cider().compute_score(gts, res)[0]
        if self.spice and self.java:
            scores["SPICE"] = Spice().compute_score(gts, res)[0]
        return {k: float(v) for k, v in scores.items()}

    def close(self) -> None:
        """Stop the METEOR Java subprocess if it was started (a later call starts a new one)."""
        if self._meteor is not None:
            meteor, self._meteor = self._meteor, None
            with meteor.meteor_p as proc:  # closes its pipes and waits on exit
                proc.kill()
