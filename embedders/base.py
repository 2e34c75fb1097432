"""Embedders attach vectors to chunks and embed queries with the matching convention."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import numpy as np

from core.component import Component
from core.types import ChunkedDocument


class Embedder(Component):
    kind = "embedder"
    vector_field: str = "dense"

    @property
    @abstractmethod
    def dimension(self) -> int: ...

    @property
    @abstractmethod
    def model_id(self) -> str:
        """What produced the vectors (recorded in the store so a different model is refused)."""

    @abstractmethod
    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        """One float32 row per text, in input order."""

    @abstractmethod
    def embed_query(self, text: str) -> np.ndarray: ...

    def warm_up(self) -> None:
        """Load whatever the first ``embed`` call would load (the runner calls it in the background)."""

    def begin_run(self) -> None:
        """Called by the runner before a run; ``run_notes`` then covers that run only."""

    def run_notes(self) -> list[str]:
        """Things a run summary must say about how this run's vectors were made (truncation, fallbacks)."""
        return []

    def languages(self) -> frozenset[str] | None:
        """The languages the model was trained for, as :mod:`core.language` codes (``en``, ``zh``, ...,
        or ``multilingual`` for all); None when nothing is known, and then no language warning is given."""
        return None

    def texts_truncated(self) -> int | None:
        """Document texts cut to the model's token window since this embedder was made, as a number a
        run summary can carry; None where no count is kept (an API truncates where we cannot see)."""
        return None

    def embed(self, documents: Sequence[ChunkedDocument]) -> None:
        """Attach a vector to every chunk of every document (one call for the whole batch)."""
        chunks = [c for d in documents for c in d.chunks]
        if not chunks:
            return
        vectors = self.embed_documents([c.text for c in chunks])
        for chunk, vector in zip(chunks, vectors, strict=True):
            chunk.vectors[self.vector_field] = vector
