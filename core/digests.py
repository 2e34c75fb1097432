"""Compact, per-source bookkeeping for runs over millions of sources.

A run must remember a little about every listed source (was it seen already in this run? what
did the record say about it?) without holding Python objects per source: a ``SourceRecord`` is
about a kilobyte, a set of strings a hundred bytes per entry. These structures keep 64-bit digests
in NumPy arrays instead, about 16 to 32 bytes per source. Two different ids share a digest with
probability about n^2 / 2^65 (3e-8 for a million sources); the consequence is a spurious
collision report, never lost data, because nothing is deleted on a digest alone.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable

import numpy as np


def digest64(text: str) -> int:
    """A 64-bit digest of ``text``, never 0 (0 marks an empty slot in :class:`DigestSet`)."""
    value = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return value or 1


class DigestSet:
    """A set of 64-bit digests: open addressing in one uint64 array, 16 to 32 bytes per entry."""

    _EMPTY = 0

    def __init__(self, capacity: int = 1024):
        size = 1 << max(4, (2 * capacity - 1).bit_length())
        self._slots = np.zeros(size, dtype=np.uint64)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        return int(self._slots.nbytes)

    def add(self, digest: int) -> bool:
        """Add ``digest``; False when it was there already."""
        if 2 * (self._count + 1) > len(self._slots):
            self._grow()
        if not self._insert(self._slots, digest):
            return False
        self._count += 1
        return True

    def __contains__(self, digest: int) -> bool:
        slots, mask = self._slots, len(self._slots) - 1
        position = digest & mask
        while True:
            held = int(slots[position])
            if held == digest:
                return True
            if held == self._EMPTY:
                return False
            position = (position + 1) & mask

    @classmethod
    def _insert(cls, slots: np.ndarray, digest: int) -> bool:
        mask = len(slots) - 1
        position = digest & mask
        while True:
            held = int(slots[position])
            if held == digest:
                return False
            if held == cls._EMPTY:
                slots[position] = digest
                return True
            position = (position + 1) & mask

    def _grow(self) -> None:
        old = self._slots[self._slots != self._EMPTY]
        self._slots = np.zeros(2 * len(self._slots), dtype=np.uint64)
        for digest in old.tolist():
            self._insert(self._slots, digest)


class KnownSources:
    """What the record said about one scope's sources when the run began, in 26 bytes per source.

    Sorted digests of the source ids, with digests of each one's change signal and content hash,
    flag bits, and whether this run has listed it yet. The full records stay in the store; a run
    fetches one only when it has to rewrite it.
    """

    CURRENT = 1  # indexed, by the stage settings of this run
    HAS_CHUNKS = 2  # indexed once with chunks: a redo counts as an update, not an addition

    def __init__(self, ids: np.ndarray, signals: np.ndarray, contents: np.ndarray, flags: np.ndarray):
        order = np.argsort(ids, kind="stable")
        self.ids, self.signals, self.contents, self.flags = ids[order], signals[order], contents[order], flags[order]
        self.listed = np.zeros(len(ids), dtype=bool)

    @classmethod
    def build(cls, entries: Iterable[tuple[str, str, str, int]]) -> KnownSources:
        """From ``(source id, change signal, content hash, flags)``, streamed (array() grows in C, not in objects)."""
        ids, signals, contents, flags = array("Q"), array("Q"), array("Q"), array("B")
        for source_id, signal, content, flag in entries:
            ids.append(digest64(source_id))
            signals.append(digest64(signal))
            contents.append(digest64(content))
            flags.append(flag)

        def as_numpy(values: array[int], dtype: type) -> np.ndarray:
            return np.frombuffer(values, dtype=dtype).copy() if len(values) else np.zeros(0, dtype=dtype)

        return cls(
            as_numpy(ids, np.uint64),
            as_numpy(signals, np.uint64),
            as_numpy(contents, np.uint64),
            as_numpy(flags, np.uint8),
        )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        return int(
            self.ids.nbytes + self.signals.nbytes + self.contents.nbytes + self.flags.nbytes + self.listed.nbytes
        )

    def find(self, source_id: str) -> int | None:
        """The position of ``source_id``, or None when the record did not know it."""
        digest = np.uint64(digest64(source_id))
        position = int(np.searchsorted(self.ids, digest))
        return position if position < len(self.ids) and self.ids[position] == digest else None

    def unlisted(self) -> np.ndarray:
        """Sorted digests of the known sources this run has not listed."""
        return self.ids[~self.listed]


def sorted_contains(digests: np.ndarray, digest: int) -> bool:
    """Whether sorted ``digests`` holds ``digest``."""
    value = np.uint64(digest)
    position = int(np.searchsorted(digests, value))
    return position < len(digests) and digests[position] == value
