"""CIDEr-D (Vedantam et al. 2015) with document frequencies from a fixed corpus: the SCST reward.

pycocoevalcap's Cider (coco-caption's CIDEr-D) scores a whole test set at once and takes n-gram
document frequencies from the references it is given; self-critical training scores a few sampled
captions per step, so the frequencies must come from the training references instead (as in
Rennie et al. 2017). The formula is the same: tf-idf n-gram vectors (n = 1..4), clipped matches,
a Gaussian length penalty (sigma 6), averaged over references and scaled by 10.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache

Tokens = Sequence[str]


def ngrams(tokens: Tokens, n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


class CiderD:
    def __init__(self, corpus: Iterable[Sequence[Tokens]], n: int = 4, sigma: float = 6.0):
        """`corpus`: the reference captions of each training image (document frequency is per image)."""
        self.n, self.sigma = n, sigma
        self.document_frequency: Counter = Counter()
        images = 0
        for references in corpus:
            images += 1
            self.document_frequency.update(
                {gram for ref in references for k in range(1, n + 1) for gram in ngrams(ref, k)}
            )
        self.log_images = math.log(max(images, 1))
        # References recur at every step and epoch: keep their vectors (candidates are new each time).
        self._reference_vector = lru_cache(maxsize=200_000)(self._vector)

    def _vector(self, tokens: Tokens) -> tuple[list[dict], list[float]]:
        vectors, norms = [], []
        for k in range(1, self.n + 1):
            vector = {
                gram: count * (self.log_images - math.log(max(1.0, self.document_frequency[gram])))
                for gram, count in ngrams(tokens, k).items()
            }
            vectors.append(vector)
            norms.append(math.sqrt(sum(v * v for v in vector.values())))
        return vectors, norms

    def _similarity(self, candidate, reference, length_delta: int) -> float:
        (hyp, hyp_norms), (ref, ref_norms) = candidate, reference
        total = 0.0
        for k in range(self.n):
            value = sum(min(weight, ref[k].get(gram, 0.0)) * ref[k].get(gram, 0.0) for gram, weight in hyp[k].items())
            if hyp_norms[k] and ref_norms[k]:
                value /= hyp_norms[k] * ref_norms[k]
            total += value * math.exp(-(length_delta**2) / (2 * self.sigma**2))
        return total / self.n

    def score(self, candidate: Tokens, references: Sequence[Tokens]) -> float:
        """CIDEr-D of one tokenised caption against its tokenised references."""
        if not references:
            raise ValueError("CIDEr-D needs at least one reference")
        vector = self._vector(candidate)
        total = sum(
            self._similarity(vector, self._reference_vector(tuple(ref)), len(candidate) - len(ref))
            for ref in references
        )
        return 10.0 * total / len(references)
