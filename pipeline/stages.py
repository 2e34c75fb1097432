"""The per-batch work every runner shares: chunk, embed, sparse-embed and write a batch of documents.

Runners (the local threaded one, the Ray one) own execution: where each step runs, queues,
timing, the failure log. This module owns what the steps do and one rule for all of them: a step
runs on the whole batch, and when it fails it runs again document by document, so one bad
document fails alone, at the stage that broke it, and the rest of the batch goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from chunkers.base import Chunker, ChunkPlan
from core.digests import DigestSet, digest64
from core.errors import LockLostError
from core.secrets import scrub
from core.types import Chunk, ChunkedDocument, ParsedDocument
from embedders.base import Embedder
from embedders.sparse import SparseEncoder
from pipeline.incremental import ChangeTracker
from stores.base import Store

log = logging.getLogger("rag_pipeline")


def describe_error(exc: BaseException) -> str:
    """``Type: message`` on one line, scrubbed: every stage's failure reason is built here, and
    messages quote servers and libraries that may echo a credential (:mod:`core.secrets`)."""
    text = " ".join(str(exc).split())
    return scrub(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


@dataclass(frozen=True)
class DocumentFailure:
    source_id: str
    uri: str
    stage: str
    reason: str


@dataclass
class StageResult:
    """What one step did to a batch: the documents that go on, and the ones that failed there."""

    documents: list[ChunkedDocument]
    failures: list[DocumentFailure]
    # The chunk step only: documents with more chunks than one slice, to embed and write slice by slice.
    large: list[ChunkPlan] = field(default_factory=list)


@dataclass
class DocumentSlice:
    """Consecutive chunks of a document with more than one slice of them, embedded (see :meth:`ChunkAndEmbed.slices`).

    A document's slices are written in order (:class:`SliceWriter`) and the last one completes it:
    only then are its stale chunks deleted and its record marked indexed. ``failure`` says that
    making this slice failed; the document fails there, in write order, after the slices before it.
    """

    document: ParsedDocument  # without its text and elements: writing and recording need only its identity
    chunks: list[Chunk]
    number: int  # 0-based
    count: int
    failure: DocumentFailure | None = None

    @property
    def last(self) -> bool:
        return self.number == self.count - 1


def isolate(
    stage: str, documents: Sequence[ChunkedDocument], action: Callable[[Sequence[ChunkedDocument]], None]
) -> StageResult:
    """Run ``action`` on the whole batch; if it fails, once per document to find the bad ones.

    A lost re-index lock is no document's fault: it stops the run (nothing more may be written).
    """
    if not documents:
        return StageResult([], [])
    try:
        action(documents)
        return StageResult(list(documents), [])
    except LockLostError:
        raise
    except Exception as exc:
        if len(documents) == 1:
            return StageResult([], [_failure(documents[0].document, stage, exc)])
        log.info(
            "%s failed for a batch of %d documents (%s); retrying one by one",
            stage,
            len(documents),
            describe_error(exc),
        )
    result = StageResult([], [])
    for document in documents:
        try:
            action([document])
            result.documents.append(document)
        except LockLostError:
            raise
        except Exception as exc:
            result.failures.append(_failure(document.document, stage, exc))
    return result


def _failure(document: ParsedDocument, stage: str, exc: BaseException) -> DocumentFailure:
    return DocumentFailure(document.source_id, document.uri, stage, describe_error(exc))


class ChunkAndEmbed:
    """Parsed documents in, documents with chunks and vectors out: the model-bound half of a run.

    A document with more than ``slice_chunks`` chunks (``runner.slice_chunks``) is not embedded
    with its batch: the chunk step hands it on as a plan, and :meth:`slices` builds, embeds and
    sparse-embeds its chunks a slice at a time, so memory follows the slice, not the document.
    """

    def __init__(self, chunker: Chunker, embedder: Embedder, sparse: SparseEncoder | None = None, *, slice_chunks: int):
        self.chunker = chunker
        self.embedder = embedder
        self.sparse = sparse  # optional learned sparse encoder, run right after the dense embedder
        self.slice_chunks = slice_chunks

    def chunk(self, parsed: Sequence[ParsedDocument]) -> StageResult:
        try:  # one call for the batch: a model-driven chunker runs its model over documents together
            plans: list[ChunkPlan | Exception] = list(self.chunker.plan_batch(list(parsed)))
        except Exception:  # then document by document, to fail only the one that breaks it
            plans = [self._plan_one(document) for document in parsed]
        result = StageResult([], [])
        for document, plan in zip(parsed, plans, strict=True):
            if isinstance(plan, Exception):
                result.failures.append(_failure(document, "chunk", plan))
            elif not plan and document.text.strip():  # an empty document goes on: its old chunks are deleted
                result.failures.append(
                    DocumentFailure(
                        document.source_id, document.uri, "chunk", "no chunks: the document has no indexable text"
                    )
                )
            elif len(plan) > self.slice_chunks and self._chunks_embed_alone():
                result.large.append(plan)
            else:
                result.documents.append(ChunkedDocument(document, plan.chunks()))
        return result

    def embed(self, documents: Sequence[ChunkedDocument]) -> StageResult:
        return isolate("embed", documents, self.embedder.embed)

    def sparse_embed(self, documents: Sequence[ChunkedDocument]) -> StageResult:
        if self.sparse is None:
            return StageResult(list(documents), [])
        return isolate("sparse embed", documents, self.sparse.embed)

    def slices(
        self, plan: ChunkPlan, time_stage: Callable[[str, float], None], abandoned: Callable[[], bool]
    ) -> Iterator[DocumentSlice]:
        """The plan's chunks built, embedded and sparse-embedded ``slice_chunks`` at a time, in order.

        ``time_stage`` gets each step's seconds. A slice that fails is the last one: it carries the
        failure for the writer to record after the slices before it. ``abandoned`` is asked before
        each slice; true (the writer gave the document up) ends the slices early.
        """
        document = plan.document
        identity = replace(document, text="", elements=())
        count = -(-len(plan) // self.slice_chunks)
        for number in range(count):
            if abandoned():
                return
            first, stop = number * self.slice_chunks, min((number + 1) * self.slice_chunks, len(plan))
            stage = "chunk"
            try:
                chunks = timed(time_stage, stage, plan.chunks, first, stop)
                for stage, encoder in (("embed", self.embedder), ("sparse embed", self.sparse)):
                    if encoder is not None:
                        timed(time_stage, stage, encoder.embed, [ChunkedDocument(document, chunks)])
            except Exception as exc:
                where = f"slice {number + 1} of {count}, chunks {first}-{stop - 1} of {len(plan)}"
                reason = f"{describe_error(exc)} ({where}; {KEPT})"
                yield DocumentSlice(
                    identity, [], number, count, DocumentFailure(document.source_id, document.uri, stage, reason)
                )
                return
            yield DocumentSlice(identity, chunks, number, count)

    def _chunks_embed_alone(self) -> bool:
        """Whether each chunk's vectors depend on its own text only, so slicing changes none of them.

        True for encoders that keep the base ``embed`` (one text per chunk); an encoder that
        overrides it, such as late chunking (every vector sees the whole document), gets the
        document's chunks in one call as before.
        """
        dense = type(self.embedder).embed is Embedder.embed
        return dense and (self.sparse is None or type(self.sparse).embed is SparseEncoder.embed)

    def _plan_one(self, document: ParsedDocument) -> ChunkPlan | Exception:
        try:
            return self.chunker.plan(document)
        except Exception as exc:
            return exc


T = TypeVar("T")
KEPT = "its previous version stays searchable"  # what a document that fails part-way keeps, for failure reasons


def timed(time_stage: Callable[[str, float], None], stage: str, action: Callable[..., T], *args: object) -> T:
    started = time.monotonic()
    try:
        return action(*args)
    finally:
        time_stage(stage, time.monotonic() - started)


class SourceIdCollision(ValueError):
    """Two documents of one run have the same source id: writing both would let one overwrite the other."""


class SourceIdGuard:
    """The source ids listed in a run (as 64-bit digests, about 16-32 bytes each).

    A second document listed under an id already seen fails at the list stage, and the first one
    is failed too (at write, or after it when it was written already): neither silently replaces
    the other's chunks. A collision comes from sources without distinct namespaces, which
    ``validate`` also reports.
    """

    def __init__(self) -> None:
        self._seen = DigestSet()
        self._collided: set[str] = set()
        self._lock = threading.Lock()  # listing runs in a feeder thread, writing in another

    def claim(self, source_id: str) -> bool:
        """Record ``source_id`` as listed; False when another document of this run had it."""
        with self._lock:
            if self._seen.add(digest64(source_id)):
                return True
            self._collided.add(source_id)
            return False

    def check(self, source_id: str) -> None:
        with self._lock:
            collided = source_id in self._collided
        if collided:
            raise SourceIdCollision(collision_reason(source_id))


def collision_reason(source_id: str) -> str:
    return (
        f"source id collision: more than one document listed in this run has the id {source_id!r}; none of them is "
        "written, so that none overwrites another. Give each source its own namespace (or id_prefix)"
    )


class BatchWriter:
    """Writes embedded documents to the store in the order that keeps the index consistent.

    New chunks are upserted before a document's stale chunks are deleted, so a failure between the
    two leaves the old version searchable rather than nothing; the record (when there is one) says
    ``pending`` before the write and ``indexed`` only after it. A document with no chunks (its
    source is empty now) is written as such: its old chunks are deleted and it is recorded with none.
    """

    def __init__(
        self, store: Store, cleanup: str, tracker: ChangeTracker | None = None, guard: SourceIdGuard | None = None
    ):
        self.store = store
        self.cleanup = cleanup
        self.tracker = tracker
        self.guard = guard or SourceIdGuard()

    def write(self, documents: Sequence[ChunkedDocument]) -> StageResult:
        return isolate("write", documents, self._write)

    def _write(self, documents: Sequence[ChunkedDocument]) -> None:
        self._check_collisions(documents)
        if self.tracker is not None:
            self.tracker.writing(documents)
        self.store.upsert([c for d in documents for c in d.chunks])
        if self.cleanup != "none":
            self.store.delete_stale({d.document.source_id: [c.id for c in d.chunks] for d in documents})
        if self.tracker is not None:
            self.tracker.written(documents)  # the record goes last: 'indexed' means the chunks are there
        # A twin listed while this batch was written: this one fails too (its chunks stay, the
        # record says failed), as if the collision had been seen first.
        self._check_collisions(documents)

    def _check_collisions(self, documents: Sequence[ChunkedDocument]) -> None:
        for document in documents:
            self.guard.check(document.document.source_id)


@dataclass
class _Progress:
    """A large document part-way through being written: the ids upserted so far and the slice expected next."""

    ids: list[str] = field(default_factory=list)
    next: int = 0


class SliceWriter:
    """Writes the slices of large documents (:class:`DocumentSlice`) in :class:`BatchWriter`'s order,
    applied to each document as a whole.

    The record says ``pending`` before the first slice is upserted; each slice is upserted in turn;
    only after the last one are the document's stale chunks deleted (those not among its slices'
    ids) and the record marked ``indexed``. A document that fails part-way (a slice could not be
    made or written) is recorded failed once and its later slices are dropped. Nothing of its
    previous version was deleted, so that stays searchable; the new chunks upserted before the
    failure stay beside it until the document is next written in full, whose stale-chunk deletion
    removes those that are not part of it.
    """

    def __init__(self, writer: BatchWriter):
        self.writer = writer
        self._progress: dict[str, _Progress] = {}
        self._abandoned: set[str] = set()

    def abandoned(self, source_id: str) -> bool:
        """Whether the document failed part-way, so its remaining slices need not be made."""
        return source_id in self._abandoned

    def write(self, part: DocumentSlice) -> StageResult:
        """Write one slice; the result holds the slice's chunks when they were written, else the document's failure."""
        source_id = part.document.source_id
        if source_id in self._abandoned:
            return StageResult([], [])
        failure = part.failure
        if failure is None:
            try:
                self._write(part)
                return StageResult([ChunkedDocument(part.document, part.chunks)], [])
            except LockLostError:
                raise
            except Exception as exc:
                reason = f"{describe_error(exc)} (writing slice {part.number + 1} of {part.count}; {KEPT})"
                failure = DocumentFailure(source_id, part.document.uri, "write", reason)
        self._progress.pop(source_id, None)
        self._abandoned.add(source_id)
        return StageResult([], [failure])

    def _write(self, part: DocumentSlice) -> None:
        writer, tracker = self.writer, self.writer.tracker
        source_id = part.document.source_id
        writer.guard.check(source_id)
        progress = self._progress.get(source_id)
        if part.number == 0:
            progress = self._progress[source_id] = _Progress()
            if tracker is not None:
                tracker.writing([ChunkedDocument(part.document, part.chunks)])
        elif progress is None or progress.next != part.number:
            expected = progress.next if progress is not None else 0
            raise RuntimeError(f"slice {part.number + 1} of {part.count} came before slice {expected + 1}")
        elif tracker is not None:
            tracker.fence()  # every write checks the re-index lock; tracker.writing does it for the first
        writer.store.upsert(part.chunks)
        progress.ids.extend(c.id for c in part.chunks)
        progress.next += 1
        if part.last:
            del self._progress[source_id]
            if writer.cleanup != "none":
                writer.store.delete_stale({source_id: progress.ids})
            if tracker is not None:
                tracker.written([as_recorded(part.document, progress.ids)])  # the record goes last
            writer.guard.check(source_id)  # a twin listed meanwhile fails this one too, as BatchWriter does


def as_recorded(document: ParsedDocument, ids: Sequence[str]) -> ChunkedDocument:
    """A written document as the change record takes it: the record keeps the chunks' count and
    ids, and by the last slice the texts and vectors of the earlier slices are gone."""
    return ChunkedDocument(
        document, [Chunk(chunk_id, document.source_id, index, "", 0, 0) for index, chunk_id in enumerate(ids)]
    )
