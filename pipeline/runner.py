"""The local runner: streams documents through read -> parse -> chunk -> embed -> write.

Domain logic lives in the stage classes and :mod:`pipeline.stages`; this module owns execution on
one machine. Three things run at once, joined by bounded queues:

* the parser pool (a feeder thread listing and reading sources, worker processes parsing them);
* the main thread, chunking and embedding one batch at a time (the model-bound part);
* a writer thread, writing the previous batches to the store while the next one is embedded.

Invariants it keeps:

* memory is bounded by the batch size, the slice size and the queue depths, never by the corpus
  size: a document with more chunks than ``runner.slice_chunks`` is embedded and written a slice
  at a time (:class:`pipeline.stages.DocumentSlice`);
* a failure in one document is recorded (source, stage, reason) and never stops the run;
* a document's new chunks are written before its stale chunks are deleted, and the record says
  ``indexed`` only after both (:class:`pipeline.stages.BatchWriter`; for a sliced document, after
  its last slice: :class:`pipeline.stages.SliceWriter`);
* the end-of-run steps (removing unlisted sources, saving the run) wait for every write.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Protocol, TypeVar

from chunkers.base import Chunker, ChunkPlan
from connectors.base import Parser, Source
from core.language import detect_language
from core.types import ChunkedDocument, SourceDocument
from embedders.base import Embedder
from embedders.sparse import SparseEncoder
from pipeline.incremental import ChangeTracker
from pipeline.parse_pool import ParseOutcome, ParserPool
from pipeline.report import Failure, FailureLog, Progress, RunSummary
from pipeline.spec import RunnerConfig
from pipeline.stages import (
    BatchWriter,
    ChunkAndEmbed,
    DocumentFailure,
    DocumentSlice,
    SliceWriter,
    SourceIdGuard,
    StageResult,
    collision_reason,
    describe_error,
)
from pipeline.telemetry import RunTelemetry
from stores.base import IndexSchema, Store

log = logging.getLogger("rag_pipeline")

T = TypeVar("T")


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def outcome_batches(
    outcomes: Iterable[ParseOutcome], max_documents: int, max_chars: int
) -> Iterator[list[ParseOutcome]]:
    """Batches of at most ``max_documents`` parse outcomes, closed early once their parsed text
    reaches ``max_chars`` (a batch holds at least one document, however long)."""
    batch: list[ParseOutcome] = []
    chars = 0
    for outcome in outcomes:
        batch.append(outcome)
        chars += outcome.chars
        if len(batch) >= max_documents or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class StageBook(Protocol):
    """Where a step's time and failures go: the run's :class:`RunBook`, or a batch's ledger kept on
    a remote worker and replayed into the run's book by the driver (:mod:`pipeline.ray_runner`)."""

    def time(self, stage: str, seconds: float) -> None: ...

    def fail(self, failure: DocumentFailure) -> None: ...

    def language(self, language: str, documents: int = 1) -> None: ...

    def step(self, stage: str, action: Callable[[], StageResult]) -> StageResult: ...


class RunBook:
    """The run's summary and failure log, updated from several threads, and what it records told to
    the run's telemetry (metrics and spans; nothing without them)."""

    def __init__(
        self, summary: RunSummary, failures: FailureLog, tracker: ChangeTracker | None, telemetry: RunTelemetry
    ):
        self.summary = summary
        self.failures = failures
        self.tracker = tracker
        self.telemetry = telemetry
        self._lock = threading.Lock()

    def seen(self, documents: int) -> None:
        """Documents that reached the runner's main loop: parsed, or failed on the way."""
        with self._lock:
            self.summary.documents_seen += documents
        self.telemetry.seen(documents)

    def time(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.summary.add_time(stage, seconds)
        self.telemetry.stage_time(stage, seconds)

    def fail(self, failure: DocumentFailure) -> None:
        with self._lock:
            self.summary.documents_failed += 1
            self.failures.record(
                Failure(source_id=failure.source_id, stage=failure.stage, reason=failure.reason, uri=failure.uri)
            )
        self.telemetry.failed(failure.stage, failure.reason)
        if self.tracker is not None:
            self.tracker.failed(failure.source_id, failure.stage, failure.reason)

    def language(self, language: str, documents: int = 1) -> None:
        """Count parsed documents in ``language`` (a :mod:`core.language` code)."""
        with self._lock:
            self.summary.languages[language] = self.summary.languages.get(language, 0) + documents

    def step(self, stage: str, action: Callable[[], StageResult]) -> StageResult:
        """Run one stage's work in its span, time it, record its failures; returns what it did (the
        documents that go on)."""
        with self.telemetry.step(stage) as span:
            started = time.monotonic()
            result = action()
            self.time(stage, time.monotonic() - started)
            if self.telemetry.tracing:
                span.set_attributes(step_attributes(result))
        for failure in result.failures:
            self.fail(failure)
        return result

    def indexed(self, documents: Sequence[ChunkedDocument]) -> None:
        chunks = sum(len(d.chunks) for d in documents)
        with self._lock:
            self.summary.documents_indexed += len(documents)
            self.summary.documents_empty += sum(1 for d in documents if not d.chunks)
            self.summary.chunks_written += chunks
        self.telemetry.indexed(len(documents), chunks)

    def slice_written(self, part: DocumentSlice) -> None:
        """A large document's slice is in the store; the document counts as indexed with its last slice."""
        with self._lock:
            self.summary.chunks_written += len(part.chunks)
            self.summary.documents_indexed += part.last
        self.telemetry.indexed(int(part.last), len(part.chunks))


# What the store writer takes: a batch of whole documents, or one slice of a large document.
WriteUnit = list[ChunkedDocument] | DocumentSlice


class StoreWrites:
    """Writes units in the writer thread: batches through :class:`BatchWriter`, slices through
    :class:`SliceWriter`, every step timed and its failures recorded in the run's book."""

    def __init__(self, writer: BatchWriter, book: RunBook):
        self.batches = writer
        self.slices = SliceWriter(writer)
        self.book = book

    def write(self, unit: WriteUnit) -> None:
        if isinstance(unit, DocumentSlice):
            if self.book.step("write", lambda: self.slices.write(unit)).documents:
                self.book.slice_written(unit)
        else:
            self.book.indexed(self.book.step("write", lambda: self.batches.write(unit)).documents)

    def abandoned(self, source_id: str) -> bool:
        return self.slices.abandoned(source_id)


class WriteBehind:
    """A writer thread fed through a bounded queue, so writes overlap with embedding the next batch.

    ``submit`` blocks while ``depth`` batches are already waiting (memory stays bounded); an
    unexpected error in the writer (per-document errors are recorded, not raised) is raised again
    in the submitting thread at the next ``submit`` or at ``close``.
    """

    _DONE = object()

    def __init__(self, write: Callable[[WriteUnit], None], depth: int):
        self._write = write
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)  # WriteUnits, then _DONE
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="store-writer", daemon=True)
        self._thread.start()

    def submit(self, unit: WriteUnit) -> None:
        self._raise_if_failed()
        self._queue.put(unit)

    def depth(self) -> int:
        """Units waiting for the writer (the one being written not counted)."""
        return self._queue.qsize()

    def close(self) -> None:
        """Wait until every submitted batch is written."""
        self._queue.put(self._DONE)
        self._thread.join()
        self._raise_if_failed()

    def _loop(self) -> None:
        while (unit := self._queue.get()) is not self._DONE:
            if self._error is not None:
                continue  # drain, so the submitting thread never blocks on a dead writer
            try:
                self._write(unit)
            except BaseException as exc:
                self._error = exc
            del unit  # written: free it before waiting for the next one

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the store writer stopped: {describe_error(self._error)}") from self._error


@dataclass(frozen=True)
class RunPlan:
    """What a run is given, whichever runner runs it: the stages, the store, the runner settings,
    where failures are written and the change tracker (incremental runs; None for a plain run)."""

    sources: Sequence[Source]
    parser: Parser
    chunker: Chunker
    embedder: Embedder
    store: Store
    config: RunnerConfig
    failures_path: Path | None = None
    sparse: SparseEncoder | None = None
    tracker: ChangeTracker | None = None  # skips unchanged sources and keeps the record (pipeline.incremental)
    telemetry: RunTelemetry = field(default_factory=RunTelemetry.off)  # the run's metrics and spans

    def summary(self) -> RunSummary:
        return RunSummary(failures_file=str(self.failures_path) if self.failures_path else None)


class LocalRunner:
    """Runs the stages in this process, with parser worker processes (:class:`ParserPool`)."""

    def __init__(self, plan: RunPlan):
        self.plan = plan
        config = plan.config
        self.models = ChunkAndEmbed(plan.chunker, plan.embedder, plan.sparse, slice_chunks=config.slice_chunks)
        self.writer = BatchWriter(plan.store, config.cleanup, plan.tracker)

    def run(self, progress: Progress | None = None) -> RunSummary:
        config = self.plan.config
        summary = self.plan.summary()
        failures = FailureLog(self.plan.failures_path)
        book = RunBook(summary, failures, self.plan.tracker, self.plan.telemetry)
        telemetry = self.plan.telemetry
        progress = progress or Progress(config.progress)
        embedder = self.models.embedder
        started = time.monotonic()
        embedder.begin_run()
        truncated_before = embedder.texts_truncated() or 0  # the embedder outlives runs: count this run's only
        try:
            prepare_store(self.plan.store, embedder, self.models.sparse)
            pool = ParserPool(
                self.plan.parser,
                workers=config.parse_workers,
                timeout_s=config.parse_timeout_s,
                memory_mb=config.parse_memory_mb,
                max_pending=max(2 * config.batch_size, 8),
                max_pending_chars=config.max_batch_chars,
            )
            # Model loading overlaps with the parser workers' start-up and the first batch.
            warm_up = threading.Thread(target=self._warm_up, name="embedder-warm-up", daemon=True)
            warm_up.start()
            writes = StoreWrites(self.writer, book)
            writer = WriteBehind(writes.write, config.write_queue_depth)
            try:
                waited = time.monotonic()
                batches = outcome_batches(
                    pool.imap(read_sources(self.plan.sources, self.plan.tracker, book, self.writer.guard)),
                    config.batch_size,
                    config.max_batch_chars,
                )
                for number, batch in enumerate(batches, 1):
                    book.time("parse wait", time.monotonic() - waited)
                    book.seen(len(batch))
                    with telemetry.batch(number, len(batch), parse_attributes(batch) if telemetry.tracing else None):
                        for unit in embedded_units(self.models, batch, book, writes.abandoned):
                            waited = time.monotonic()
                            writer.submit(unit)
                            book.time("write wait", time.monotonic() - waited)
                    telemetry.queue_depth("parse", pool.pending())
                    telemetry.queue_depth("write", writer.depth())
                    progress.update(summary, len(batch))
                    waited = time.monotonic()
            finally:
                writer.close()
            if self.plan.tracker is not None:
                record_run(self.plan.tracker, summary, started)
        finally:
            finish_run(summary, progress, failures, started)
        summary.notes.extend(embedder.run_notes())
        truncated = embedder.texts_truncated()
        summary.chunks_truncated = None if truncated is None else truncated - truncated_before
        return summary

    def _warm_up(self) -> None:
        try:
            self.models.embedder.warm_up()
        except Exception:  # the first embed call reports the same problem, per document
            log.debug("embedder warm-up failed", exc_info=True)


def step_attributes(result: StageResult) -> dict[str, Any]:
    """A step's figures for its span: the documents that go on, with their chunks, and those that failed."""
    return {
        "rag.documents": len(result.documents),
        "rag.documents.failed": len(result.failures),
        "rag.documents.large": len(result.large),
        "rag.chunks": sum(len(d.chunks) for d in result.documents),
    }


def parse_attributes(outcomes: Sequence[ParseOutcome]) -> dict[str, Any]:
    """A batch's parse figures for its span (taken before the chunk step takes the parsed documents out)."""
    return {
        "rag.documents.parse_failed": sum(1 for o in outcomes if o.parsed is None),
        "rag.parse.seconds": sum(o.seconds for o in outcomes),
    }


def embedded_units(
    models: ChunkAndEmbed, outcomes: Sequence[ParseOutcome], book: StageBook, abandoned: Callable[[str], bool]
) -> Iterator[WriteUnit]:
    """What a batch gives the store writer: the documents that fit one slice, embedded together,
    then each larger document slice by slice."""
    documents, large = chunk_and_embed(models, outcomes, book)
    if documents:
        yield documents
    del documents  # the writer's now
    yield from slices_of(models, large, book.time, abandoned)


def chunk_and_embed(
    models: ChunkAndEmbed, outcomes: Sequence[ParseOutcome], book: StageBook
) -> tuple[list[ChunkedDocument], list[ChunkPlan]]:
    """Record the batch's parse failures, times and the language of each parsed document, then chunk
    the rest, and embed and sparse-embed the documents that fit one slice; returns those, and the
    larger ones as plans for :func:`slices_of`.

    Each parsed document is taken out of its outcome (``parsed`` becomes None), so only the steps
    working on it hold it: a large document is freed after its last slice, however long the batch,
    its queues or generators keep the outcome.
    """
    parsed = []
    for outcome in outcomes:
        if outcome.parsed is None:
            book.fail(DocumentFailure(outcome.source_id, outcome.uri, outcome.stage, outcome.error or "unknown error"))
        else:
            book.time("parse", outcome.seconds)
            book.language(detect_language(outcome.parsed.text).language)  # its first characters: ~0.1 ms
            parsed.append(outcome.parsed)
            outcome.parsed = None
    chunked = book.step("chunk", lambda: models.chunk(parsed))
    documents = book.step("embed", lambda: models.embed(chunked.documents)).documents
    if models.sparse is not None:
        documents = book.step("sparse embed", lambda: models.sparse_embed(documents)).documents
    return documents, chunked.large


def slices_of(
    models: ChunkAndEmbed,
    large: list[ChunkPlan],
    time_stage: Callable[[str, float], None],
    abandoned: Callable[[str], bool],
) -> Iterator[DocumentSlice]:
    """The slices of each large document in turn (:meth:`ChunkAndEmbed.slices`), emptying ``large``
    as it goes so each document is freed once its last slice is out."""
    while large:
        plan = large.pop(0)
        source_id = plan.document.source_id
        yield from models.slices(plan, time_stage, partial(abandoned, source_id))


def read_sources(
    sources: Sequence[Source], tracker: ChangeTracker | None, book: RunBook, guard: SourceIdGuard
) -> Iterator[SourceDocument | ParseOutcome]:
    """List and read lazily (in the runner's feeder thread), skipping what the tracker calls unchanged;
    failures as outcomes.

    A source id listed twice in the run fails (see :class:`pipeline.stages.SourceIdGuard`)."""
    for source in sources:
        if tracker is not None:
            tracker.begin_listing(source.scope)
        listing = iter(source.list())
        while True:
            started = time.monotonic()
            try:
                ref = next(listing)
            except StopIteration:
                break
            except Exception as exc:  # a listing error ends this source, not the run
                if tracker is not None:
                    tracker.listing_failed(source.scope)
                yield ParseOutcome(
                    source.scope or type(source).__name__, "", None, describe_error(exc), 0.0, stage="list"
                )
                break
            if not guard.claim(ref.source_id):
                yield ParseOutcome(ref.source_id, ref.uri, None, collision_reason(ref.source_id), 0.0, stage="list")
                continue
            if tracker is not None and not tracker.should_read(ref, source.scope):
                continue
            try:
                document = source.load(ref)
            except Exception as exc:
                yield ParseOutcome(ref.source_id, ref.uri, None, describe_error(exc), 0.0, stage="read")
                continue
            finally:
                book.time("read", time.monotonic() - started)
            if tracker is None or tracker.should_process(document):
                # Yielded out of a list so this generator, suspended while the document is parsed,
                # keeps no reference to it: a large file's bytes go once a parser process has them.
                handed_over = [document]
                del document
                yield handed_over.pop()


def finish_run(summary: RunSummary, progress: Progress, failures: FailureLog, started: float) -> None:
    """However a run ends: close its progress line and failures file, and keep its failures and time."""
    progress.close()
    failures.close()
    summary.failures = failures.failures
    summary.seconds = time.monotonic() - started


def record_run(tracker: ChangeTracker, summary: RunSummary, started: float) -> None:
    """End of a tracked run, after every write: remove unlisted sources, then keep the run's summary in the record."""
    summary.changes = tracker.counts
    tracker.remove_unlisted()
    summary.seconds = time.monotonic() - started
    tracker.save_run(summary.run_record())


def index_schema(embedder: Embedder, sparse: SparseEncoder | None) -> IndexSchema:
    """What the store must keep for these stages: the dense model's vectors, and the sparse encoder's."""
    if sparse is None:
        return IndexSchema(embedder.dimension, embedder.model_id, vector_field=embedder.vector_field)
    return IndexSchema(
        embedder.dimension,
        embedder.model_id,
        sparse.model_id,
        vector_field=embedder.vector_field,
        sparse_field=sparse.vector_field,
    )


def prepare_store(store: Store, embedder: Embedder, sparse: SparseEncoder | None) -> None:
    """Create or check the index for these stages (the store refuses fields it cannot keep)."""
    store.prepare(index_schema(embedder, sparse))
