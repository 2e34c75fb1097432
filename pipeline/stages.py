"""The per-batch work every runner shares: chunk, embed, sparse-embed and write a batch of documents.

Runners (the local threaded one, the Ray one) own execution: where each step runs, queues,
timing, the failure log. This module owns what the steps do and one rule for all of them: a step
runs on the whole batch, and when it fails it runs again document by document, so one bad
document fails alone, at the stage that broke it, and the rest of the batch goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from chunkers.base import Chunker
from embedders.base import Embedder
from embedders.sparse import SparseEncoder
from pipeline.incremental import ChangeTracker
from pipeline.types import Chunk, ChunkedDocument, ParsedDocument
from stores.base import Store

log = logging.getLogger("rag_pipeline")


def describe_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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


def isolate(stage: str, documents: Sequence[ChunkedDocument], action: Callable[[Sequence[ChunkedDocument]], None]) -> StageResult:
    """Run ``action`` on the whole batch; if it fails, once per document to find the bad ones."""
    if not documents:
        return StageResult([], [])
    try:
        action(documents)
        return StageResult(list(documents), [])
    except Exception as exc:
        if len(documents) == 1:
            return StageResult([], [_failure(documents[0].document, stage, exc)])
        log.info("%s failed for a batch of %d documents (%s); retrying one by one", stage, len(documents), describe_error(exc))
    result = StageResult([], [])
    for document in documents:
        try:
            action([document])
            result.documents.append(document)
        except Exception as exc:
            result.failures.append(_failure(document.document, stage, exc))
    return result


def _failure(document: ParsedDocument, stage: str, exc: BaseException) -> DocumentFailure:
    return DocumentFailure(document.source_id, document.uri, stage, describe_error(exc))


class ChunkAndEmbed:
    """Parsed documents in, documents with chunks and vectors out: the model-bound half of a run."""

    def __init__(self, chunker: Chunker, embedder: Embedder, sparse: SparseEncoder | None = None):
        self.chunker = chunker
        self.embedder = embedder
        self.sparse = sparse  # optional learned sparse encoder, run right after the dense embedder

    def chunk(self, parsed: Sequence[ParsedDocument]) -> StageResult:
        try:  # one call for the batch: a model-driven chunker runs its model over documents together
            chunk_lists: list[list[Chunk] | Exception] = list(self.chunker.chunk_batch(list(parsed)))
        except Exception:  # then document by document, to fail only the one that breaks it
            chunk_lists = [self._chunk_one(document) for document in parsed]
        result = StageResult([], [])
        for document, chunks in zip(parsed, chunk_lists, strict=True):
            if isinstance(chunks, Exception):
                result.failures.append(_failure(document, "chunk", chunks))
            elif not chunks:
                result.failures.append(DocumentFailure(document.source_id, document.uri, "chunk", "no chunks: the document has no indexable text"))
            else:
                result.documents.append(ChunkedDocument(document, chunks))
        return result

    def embed(self, documents: Sequence[ChunkedDocument]) -> StageResult:
        return isolate("embed", documents, self.embedder.embed)

    def sparse_embed(self, documents: Sequence[ChunkedDocument]) -> StageResult:
        if self.sparse is None:
            return StageResult(list(documents), [])
        return isolate("sparse embed", documents, self.sparse.embed)

    def _chunk_one(self, document: ParsedDocument) -> list[Chunk] | Exception:
        try:
            return self.chunker.chunk(document)
        except Exception as exc:
            return exc


class BatchWriter:
    """Writes embedded documents to the store in the order that keeps the index consistent.

    New chunks are upserted before a document's stale chunks are deleted, so a failure between the
    two leaves the old version searchable rather than nothing; the record (when there is one) says
    ``pending`` before the write and ``indexed`` only after it.
    """

    def __init__(self, store: Store, cleanup: str, tracker: ChangeTracker | None = None):
        self.store = store
        self.cleanup = cleanup
        self.tracker = tracker

    def write(self, documents: Sequence[ChunkedDocument]) -> StageResult:
        return isolate("write", documents, self._write)

    def _write(self, documents: Sequence[ChunkedDocument]) -> None:
        if self.tracker is not None:
            self.tracker.writing(documents)
        self.store.upsert([c for d in documents for c in d.chunks])
        if self.cleanup != "none":
            self.store.delete_stale({d.document.source_id: [c.id for c in d.chunks] for d in documents})
        if self.tracker is not None:
            self.tracker.written(documents)  # the record goes last: 'indexed' means the chunks are there
