"""Stores persist chunks with their vectors, idempotently (upsert by chunk id)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence

from pipeline.component import Component
from pipeline.types import Chunk


class Store(Component):
    kind = "store"

    @abstractmethod
    def prepare(self, dimension: int, model_id: str) -> None:
        """Create the collection, or check that the existing one fits (raise StoreSchemaError)."""

    @abstractmethod
    def check(self, dimension: int, model_id: str) -> list[str]:
        """Problems that ``prepare`` would raise for an existing collection, without creating anything."""

    @abstractmethod
    def upsert(self, chunks: Sequence[Chunk]) -> int:
        """Write chunks (insert or replace by id); return how many were written."""

    @abstractmethod
    def delete_stale(self, keep: Mapping[str, Sequence[str]]) -> None:
        """For each source id, delete its chunks whose ids are not in the given list.

        Called after the new chunks were upserted, so a document is never left without chunks.
        """

    @abstractmethod
    def delete_sources(self, source_ids: Sequence[str]) -> None: ...

    @abstractmethod
    def count(self) -> int: ...

    def close(self) -> None:
        return None
