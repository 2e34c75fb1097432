"""The local runner: streams documents through read -> parse -> chunk -> embed -> write.

Domain logic lives in the stage classes; this module owns execution: batching, the parser worker
pool, per-document error isolation, timing and the summary. Invariants it keeps:

* memory is bounded by the batch size and the parser queue, never by the corpus size;
* a failure in one document is recorded (source, stage, reason) and never stops the run;
* a document's new chunks are written before its stale chunks are deleted, so a failure between
  the two leaves the old version searchable rather than nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import TypeVar

from chunkers.base import Chunker
from connectors.base import Parser, Source
from embedders.base import Embedder
from embedders.sparse import SparseEncoder
from pipeline.incremental import ChangeTracker
from pipeline.parse_pool import ParseOutcome, ParserPool
from pipeline.report import Failure, FailureLog, Progress, RunSummary
from pipeline.spec import RunnerConfig
from pipeline.types import Chunk, ChunkedDocument, ParsedDocument, SourceDocument
from stores.base import Store

log = logging.getLogger("rag_pipeline")

T = TypeVar("T")


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class LocalRunner:
    def __init__(
        self,
        sources: Sequence[Source],
        parser: Parser,
        chunker: Chunker,
        embedder: Embedder,
        store: Store,
        config: RunnerConfig,
        failures_path: Path | None = None,
        sparse: SparseEncoder | None = None,
        tracker: ChangeTracker | None = None,
    ):
        self.sources = sources
        self.parser = parser
        self.chunker = chunker
        self.embedder = embedder
        self.store = store
        self.config = config
        self.failures_path = failures_path
        self.sparse = sparse  # optional learned sparse encoder, run right after the dense embedder
        self.tracker = tracker  # incremental mode: skips unchanged sources, keeps the record (pipeline.incremental)

    def run(self, progress: Progress | None = None) -> RunSummary:
        config = self.config
        summary = RunSummary(failures_file=str(self.failures_path) if self.failures_path else None)
        failures = FailureLog(self.failures_path)
        progress = progress or Progress(config.progress)
        started = time.monotonic()
        self.embedder.begin_run()
        try:
            store_field = getattr(self.store.config, "vector_field", self.embedder.vector_field)
            if store_field != self.embedder.vector_field:
                raise ValueError(f"the store writes vector field {store_field!r} but the embedder fills {self.embedder.vector_field!r}")
            self._check_sparse_field()
            sparse_model = {"sparse_model_id": self.sparse.model_id} if self.sparse is not None else {}
            self.store.prepare(self.embedder.dimension, self.embedder.model_id, **sparse_model)
            pool = ParserPool(
                self.parser,
                workers=config.parse_workers,
                timeout_s=config.parse_timeout_s,
                memory_mb=config.parse_memory_mb,
                max_pending=max(2 * config.batch_size, 8),
            )
            # Model loading overlaps with the parser workers' start-up and the first batch.
            warm_up = threading.Thread(target=self._warm_up, name="embedder-warm-up", daemon=True)
            warm_up.start()
            outcomes = pool.imap(self._read_all(summary))
            waited = time.monotonic()
            for batch in batched(outcomes, config.batch_size):
                summary.add_time("parse wait", time.monotonic() - waited)
                self._process_batch(batch, summary, failures)
                progress.update(summary, len(batch))
                waited = time.monotonic()
            if self.tracker is not None:
                summary.changes = self.tracker.counts
                self.tracker.remove_unlisted()
                summary.seconds = time.monotonic() - started
                self.tracker.save_run(summary.run_record())
        finally:
            progress.close()
            failures.close()
            summary.failures = failures.failures
            summary.seconds = time.monotonic() - started
        summary.notes.extend(self.embedder.run_notes())
        return summary

    def _warm_up(self) -> None:
        try:
            self.embedder.warm_up()
        except Exception:  # the first embed call reports the same problem, per document
            log.debug("embedder warm-up failed", exc_info=True)

    # -- stages ------------------------------------------------------------------------------

    def _read_all(self, summary: RunSummary) -> Iterator[SourceDocument | ParseOutcome]:
        """Runs in the parser pool's feeder thread: list and read lazily, failures as outcomes."""
        tracker = self.tracker
        for source in self.sources:
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
                    yield ParseOutcome(source.scope or type(source).__name__, "", None, _reason(exc), 0.0, stage="list")
                    break
                if tracker is not None and not tracker.should_read(ref, source.scope):
                    continue
                try:
                    document = source.load(ref)
                except Exception as exc:
                    yield ParseOutcome(ref.source_id, ref.uri, None, _reason(exc), 0.0, stage="read")
                    continue
                finally:
                    summary.add_time("read", time.monotonic() - started)
                if tracker is None or tracker.should_process(document):
                    yield document

    def _process_batch(self, batch: list[ParseOutcome], summary: RunSummary, failures: FailureLog) -> None:
        summary.documents_seen += len(batch)
        chunked: list[ChunkedDocument] = []
        started = time.monotonic()
        parsed = []
        for outcome in batch:
            if outcome.parsed is None:
                self._fail(failures, summary, outcome.source_id, outcome.stage, outcome.error or "unknown error", outcome.uri)
                continue
            summary.add_time("parse", outcome.seconds)
            parsed.append(outcome)
        try:  # one call for the batch: a model-driven chunker runs its model over documents together
            chunk_lists: list[list[Chunk] | Exception] = list(self.chunker.chunk_batch([outcome.parsed for outcome in parsed]))
        except Exception:  # then document by document, to fail only the one that breaks it
            chunk_lists = [self._chunk_one(outcome.parsed) for outcome in parsed]
        for outcome, chunks in zip(parsed, chunk_lists, strict=True):
            if isinstance(chunks, Exception):
                self._fail(failures, summary, outcome.source_id, "chunk", _reason(chunks), outcome.uri)
                continue
            if not chunks:
                self._fail(failures, summary, outcome.source_id, "chunk", "no chunks: the document has no indexable text", outcome.uri)
                continue
            chunked.append(ChunkedDocument(outcome.parsed, chunks))
        summary.add_time("chunk", time.monotonic() - started)

        started = time.monotonic()
        chunked = self._isolate("embed", chunked, self.embedder.embed, summary, failures)
        summary.add_time("embed", time.monotonic() - started)

        if self.sparse is not None:
            started = time.monotonic()
            chunked = self._isolate("sparse embed", chunked, self.sparse.embed, summary, failures)
            summary.add_time("sparse embed", time.monotonic() - started)

        started = time.monotonic()
        written = self._isolate("write", chunked, self._write, summary, failures)
        summary.add_time("write", time.monotonic() - started)
        summary.documents_indexed += len(written)
        summary.chunks_written += sum(len(d.chunks) for d in written)

    def _chunk_one(self, document: ParsedDocument) -> list[Chunk] | Exception:
        try:
            return self.chunker.chunk(document)
        except Exception as exc:
            return exc

    def _check_sparse_field(self) -> None:
        """The sparse stage and the store's learned sparse field come together, under one name."""
        learned = getattr(self.store.config, "learned_sparse", None)
        store_field = getattr(learned, "field", None)
        if self.sparse is None and store_field is not None:
            raise ValueError(f"the store has a learned sparse field {store_field!r} but the spec has no sparse stage to fill it")
        if self.sparse is not None and store_field != self.sparse.vector_field:
            where = f"its learned_sparse field is {store_field!r}" if store_field else "it has no learned_sparse field"
            raise ValueError(f"the sparse stage fills {self.sparse.vector_field!r}, but the store cannot keep it: {where}")

    def _write(self, documents: Sequence[ChunkedDocument]) -> None:
        if self.tracker is not None:
            self.tracker.writing(documents)
        self.store.upsert([c for d in documents for c in d.chunks])
        # New chunks are in; only now remove what an earlier version of each document left behind.
        if self.config.cleanup != "none":
            self.store.delete_stale({d.document.source_id: [c.id for c in d.chunks] for d in documents})
        if self.tracker is not None:
            self.tracker.written(documents)  # the record goes last: 'indexed' means the chunks are there

    def _isolate(self, stage, documents, action, summary, failures) -> list[ChunkedDocument]:
        """Run ``action`` on the whole batch; if it fails, once per document to find the bad ones."""
        if not documents:
            return []
        try:
            action(documents)
            return list(documents)
        except Exception as exc:
            if len(documents) == 1:
                doc = documents[0].document
                self._fail(failures, summary, doc.source_id, stage, _reason(exc), doc.uri)
                return []
            log.info("%s failed for a batch of %d documents (%s); retrying one by one", stage, len(documents), _reason(exc))
        survivors = []
        for document in documents:
            try:
                action([document])
                survivors.append(document)
            except Exception as exc:
                self._fail(failures, summary, document.document.source_id, stage, _reason(exc), document.document.uri)
        return survivors

    def _fail(self, failures: FailureLog, summary: RunSummary, source_id: str, stage: str, reason: str, uri: str) -> None:
        summary.documents_failed += 1
        failures.record(Failure(source_id=source_id, stage=stage, reason=reason, uri=uri))
        if self.tracker is not None:
            self.tracker.failed(source_id, stage, reason)

