"""Word-level tokenisation and the vocabulary of the RNN captioners."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-case words and numbers; punctuation is dropped (as the Karpathy splits do)."""
    return _WORD.findall(text.lower())


class Vocabulary:
    """Index <-> word mapping; the special tokens come first so their ids are fixed."""

    PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
    SPECIALS = (PAD, BOS, EOS, UNK)

    def __init__(self, words: Sequence[str]):
        if tuple(words[: len(self.SPECIALS)]) != self.SPECIALS:
            raise ValueError(f"a vocabulary must start with {self.SPECIALS}, got {list(words[:4])}")
        self.words = list(words)
        self.index = {word: i for i, word in enumerate(self.words)}
        self.pad, self.bos, self.eos, self.unk = (self.index[s] for s in self.SPECIALS)

    @classmethod
    def build(cls, captions: Iterable[Sequence[str]], min_count: int = 1) -> Vocabulary:
        """Words seen at least `min_count` times, most frequent first (ties alphabetical)."""
        counts = Counter(word for tokens in captions for word in tokens)
        kept = sorted(
            (w for w, c in counts.items() if c >= min_count and w not in cls.SPECIALS), key=lambda w: (-counts[w], w)
        )
        return cls([*cls.SPECIALS, *kept])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, tokens: Sequence[str], max_len: int) -> list[int]:
        """<bos> words <eos>, with at most `max_len` words (longer captions are truncated)."""
        ids = [self.index.get(word, self.unk) for word in tokens[:max_len]]
        return [self.bos, *ids, self.eos]

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first <eos>, without special tokens."""
        words = []
        for i in ids:
            if i == self.eos:
                break
            if i >= len(self.SPECIALS):
                words.append(self.words[i])
        return " ".join(words)
