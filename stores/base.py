"""Stores persist chunks with their vectors, idempotently (upsert by chunk id), and search them.

The orchestration uses a store only through :class:`Store`: prepare it for an :class:`IndexSchema`,
write and delete chunks, search with neutral requests (:mod:`core.search`) and filters passed as
data (:class:`core.filters.Filter`, which the store compiles for its engine).

A store may also keep, beside its chunks, the index record (:mod:`core.records`) that makes
re-indexing incremental and the claims of the re-index lock (:mod:`core.leases`); the
orchestration reaches both only through :meth:`Store.index_record` and :meth:`Store.lock_claims`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.component import Component
from core.filters import Filter
from core.leases import ClaimStore
from core.records import RecordStore
from core.search import Branch, Fusion, Hit, SearchRequest
from core.types import Chunk

HIT_FIELDS = ("source_id", "chunk_index", "text", "metadata")
"""What every :class:`Hit` of a store search carries in its ``fields``."""


@dataclass(frozen=True)
class IndexSchema:
    """What an index must hold: dense vectors of one model, and the learned sparse model if any.

    A store records the models when it creates the index and refuses another one later, since
    vectors of two models cannot be compared.
    """

    dimension: int
    model_id: str
    sparse_model_id: str | None = None
    vector_field: str = "dense"  # the field the embedder fills on each chunk
    sparse_field: str | None = None  # the field the sparse encoder fills, when there is one


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
    def prepare(self, schema: IndexSchema) -> None:
        """Create the index, or check that the existing one fits (raise StoreSchemaError); a
        ValueError when the store cannot keep the schema's vector fields."""

    @abstractmethod
    def check(self, schema: IndexSchema) -> list[str]:
        """Problems that ``prepare`` would raise for an existing index, without creating anything."""

    @abstractmethod
    def exists(self) -> bool:
        """Whether the index exists (something was prepared)."""

    @property
    def where(self) -> str:
        """The index in words, for messages: engine, location, name."""
        return f"{self.type_name} store {self.name}"

    @property
    def name(self) -> str:
        """The index's name (a Milvus collection's)."""
        return self.type_name

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

    @abstractmethod
    def chunk_ids_of(self, source_ids: Sequence[str]) -> dict[str, list[str]]:
        """The chunk ids of each of these sources that has chunks (to reconcile the record with)."""

    @abstractmethod
    def rows(self, output_fields: Sequence[str]) -> Iterator[dict[str, Any]]:
        """Every chunk with ``output_fields`` (``id``, :data:`HIT_FIELDS`), streamed in no particular order."""

    @abstractmethod
    def branches(self) -> tuple[Branch, ...]:
        """The retrieval branches this index can serve: ``dense`` always, ``bm25`` and ``sparse``
        when it holds their fields."""

    def bm25_analyzer(self) -> str | dict[str, Any] | None:
        """How the BM25 branch analyses text: an analyzer's name or Milvus-style analyzer parameters;
        None when the store has no BM25 branch or does not say."""
        return None

    @abstractmethod
    def search(
        self, request: SearchRequest, filters: Filter | None = None, *, search_params: Mapping[str, Any] | None = None
    ) -> list[Hit]:
        """The ``request.limit`` best chunks for one branch, best first, each passing ``filters``.

        Scores are higher-is-better whatever the metric; hits carry :data:`HIT_FIELDS`.
        ``search_params`` tune the engine's dense search (e.g. Milvus' ``ef``); others may ignore them.
        """

    @abstractmethod
    def hybrid_search(
        self, requests: Sequence[SearchRequest], fusion: Fusion, limit: int, filters: Filter | None = None
    ) -> list[Hit]:
        """Several branches fused into the ``limit`` best chunks; the filter applies to every branch."""

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
