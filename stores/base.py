"""Stores persist chunks with their vectors, idempotently (upsert by chunk id).

A store may also keep, beside its chunks, the index record (:mod:`core.records`) that makes
re-indexing incremental and the claims of the re-index lock (:mod:`core.leases`); the
orchestration reaches both only through :meth:`Store.index_record` and :meth:`Store.lock_claims`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

from core.component import Component
from core.leases import ClaimStore
from core.records import RecordStore
from core.types import Chunk


class Rebuild(ABC):
    """A full rebuild under way: a store to build the whole index into, beside the served one,
    and the switch that makes it the served index at once (see :meth:`Store.start_rebuild`)."""

    store: Store  # where the build writes its chunks and its own index record
    name: str  # the name queries use, which the switch moves to the build
    serving: str | None  # what that name serves before the switch

    @abstractmethod
    def served_sources_with_chunks(self, source_ids: Sequence[str]) -> set[str]:
        """Those of ``source_ids`` that have chunks in the index served now."""

    @abstractmethod
    def switch(self) -> str:
        """Make the build the served index and drop the old one; returns a note for the run summary."""

    @abstractmethod
    def discard(self) -> None:
        """Drop the build, which is not switched in."""


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

    def index_record(self) -> RecordStore | None:
        """The record of what is indexed, kept beside the chunks and shared by every run on them;
        None when the store keeps none (then runs cannot skip unchanged sources by themselves)."""
        return None

    def lock_claims(self) -> ClaimStore | None:
        """Where the claims of the re-index lock live, shared by every run on this index; None
        when the store keeps none (then no lock is taken)."""
        return None

    def start_rebuild(self, serving_records: RecordStore, stamp: str) -> Rebuild | None:
        """Start a full rebuild beside the served index (``stamp`` names it); ``serving_records``
        is the record of what is served now, dropped with it at the switch. None when the store
        cannot build beside the served index and switch to it."""
        return None
