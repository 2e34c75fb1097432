"""Change detection and the per-source update order for incremental re-indexing.

The runner asks a :class:`ChangeTracker` before reading and before parsing each listed source,
and tells it when a source's chunks are about to be written, were written, or failed. The order
that keeps the index consistent across crashes is:

1. record ``pending`` (a crash from here on makes the next run redo the source);
2. upsert the new chunks, then delete the source's stale chunks (the runner does both);
3. record ``indexed`` LAST, so an ``indexed`` record always describes chunks that exist.

At the end of a ``full`` cleanup run, sources no longer listed are removed (chunks first, then
the record), but only within a source scope whose listing completed: a listing that failed half
way must not look like a mass deletion.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from pipeline.component import Component
from pipeline.types import ChunkedDocument, SourceDocument, SourceRef
from stores.base import Store
from stores.records import RecordStore, SourceRecord, chunk_digest

log = logging.getLogger("rag_pipeline")

Cleanup = Literal["none", "incremental", "full"]


def stage_fingerprint(stages: Sequence[Component | None]) -> str:
    """One hash over the output-relevant settings of the stages that make a source's chunks."""
    settings = [{"class": f"{type(s).__module__}:{type(s).__qualname__}", "settings": s.fingerprint_settings()} for s in stages if s is not None]
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass
class ChangeCounts:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0


@dataclass
class _Scope:
    """What one source root listed in this run, and what the record knew about it before."""

    known: dict[str, SourceRecord]
    listed: set[str] = field(default_factory=set)
    listing_failed: bool = False


class ChangeTracker:
    """Decides what a run skips and keeps the record; ``skip_unchanged=False`` (a plain ingest)
    processes every listed source but still records it, so a later reindex starts from there."""

    def __init__(self, records: RecordStore, store: Store, fingerprint: str, cleanup: Cleanup = "full", *, skip_unchanged: bool = True):
        self.records = records
        self.store = store
        self.fingerprint = fingerprint
        self.cleanup = cleanup
        self.skip_unchanged = skip_unchanged
        self.counts = ChangeCounts()
        self._scopes: dict[str, _Scope] = {}
        self._scope_of: dict[str, str] = {}  # listed source id -> its scope
        self._signals: dict[str, str] = {}  # listed source id -> its change signal in this run
        self._lock = threading.Lock()  # listing runs in the parser pool's feeder thread, writes in the main thread

    # -- listing and reading (feeder thread) ---------------------------------------------------

    def begin_listing(self, scope: str) -> None:
        with self._lock:
            if scope not in self._scopes:
                self._scopes[scope] = _Scope({r.source_id: r for r in self.records.in_scope(scope)})

    def listing_failed(self, scope: str) -> None:
        with self._lock:
            self._scopes[scope].listing_failed = True

    def should_read(self, ref: SourceRef, scope: str) -> bool:
        """False for a source whose cheap change signal says nothing changed since it was indexed."""
        with self._lock:
            entry = self._scopes[scope]
            entry.listed.add(ref.source_id)
            self._scope_of[ref.source_id] = scope
            self._signals[ref.source_id] = ref.change_signal
            record = entry.known.get(ref.source_id)
            if self.skip_unchanged and self._current(record) and record.change_signal == ref.change_signal:
                self.counts.unchanged += 1
                return False
            return True

    def should_process(self, document: SourceDocument) -> bool:
        """False when the bytes are the same as indexed (only the change signal moved, e.g. a touch)."""
        with self._lock:
            record = self._record(document.source_id)
            if not (self.skip_unchanged and self._current(record) and record.content_hash == document.content_hash):
                return True
            record.change_signal = self._signals.get(document.source_id, "")
            self.counts.unchanged += 1
        self.records.put([record])
        return False

    # -- writing (main thread) -------------------------------------------------------------------

    def writing(self, documents: Sequence[ChunkedDocument]) -> None:
        """Mark the sources pending before their chunks change: a crash now means 'redo next run'."""
        pending = []
        with self._lock:
            for d in documents:
                record = self._record(d.document.source_id) or SourceRecord(d.document.source_id, self._scope_of.get(d.document.source_id, ""))
                record.status = "pending"
                pending.append(record)
        self.records.put(pending)

    def written(self, documents: Sequence[ChunkedDocument]) -> None:
        indexed = []
        with self._lock:
            for d in documents:
                source_id = d.document.source_id
                previous = self._record(source_id)
                if previous is not None and previous.chunk_digest:
                    self.counts.updated += 1
                else:
                    self.counts.added += 1
                record = SourceRecord(
                    source_id=source_id,
                    scope=self._scope_of.get(source_id, ""),
                    content_hash=d.document.content_hash,
                    change_signal=self._signals.get(source_id, ""),
                    fingerprint=self.fingerprint,
                    chunk_count=len(d.chunks),
                    chunk_digest=chunk_digest(c.id for c in d.chunks),
                    status="indexed",
                )
                self._remember(record)
                indexed.append(record)
        self.records.put(indexed)

    def failed(self, source_id: str, stage: str, reason: str) -> None:
        """Dead-letter the source; its previous chunks (if any) stay searchable, the next run retries it."""
        with self._lock:
            scope = self._scope_of.get(source_id)
            if scope is None:  # not a listed source (e.g. a listing failure named after its scope)
                return
            record = self._record(source_id) or SourceRecord(source_id, scope)
            record.status, record.stage, record.reason = "failed", stage, reason
            record.attempts += 1
            self._remember(record)
        self.records.put([record])

    # -- end of run -----------------------------------------------------------------------------

    def remove_unlisted(self) -> None:
        """Under ``full`` cleanup, delete the sources a completed listing no longer yields."""
        if self.cleanup == "full":
            for scope, entry in self._scopes.items():
                if entry.listing_failed:
                    log.warning("the listing of %r did not complete; sources missing from it are kept", scope)
                    continue
                gone = sorted(set(entry.known) - entry.listed)
                if gone:
                    # Chunks first, record last: a crash in between leaves a record whose source is
                    # still unlisted, so the next run deletes it again.
                    self.store.delete_sources(gone)
                    self.records.delete(gone)
                    self.counts.deleted += len(gone)

    def save_run(self, run_summary: dict) -> None:
        self.records.put_run(run_summary)

    # -- helpers ----------------------------------------------------------------------------------

    def _current(self, record: SourceRecord | None) -> bool:
        return record is not None and record.status == "indexed" and record.fingerprint == self.fingerprint

    def _record(self, source_id: str) -> SourceRecord | None:
        scope = self._scope_of.get(source_id)
        return self._scopes[scope].known.get(source_id) if scope is not None else None

    def _remember(self, record: SourceRecord) -> None:
        scope = self._scope_of.get(record.source_id)
        if scope is not None:
            self._scopes[scope].known[record.source_id] = record
