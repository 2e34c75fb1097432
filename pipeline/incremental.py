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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from core.component import Component
from core.digests import KnownSources, digest64, sorted_contains
from core.records import RecordStore, SourceRecord, chunk_digest
from core.types import ChunkedDocument, SourceDocument, SourceRef
from stores.base import Store

log = logging.getLogger("rag_pipeline")

Cleanup = Literal["none", "incremental", "full"]
_DELETE_BATCH = 1000  # unlisted sources deleted per request at the end of a run


def stage_fingerprint(stages: Sequence[Component | None]) -> str:
    """One hash over the output-relevant settings of the stages that make a source's chunks."""
    settings = [
        {"class": f"{type(s).__module__}:{type(s).__qualname__}", "settings": s.fingerprint_settings()}
        for s in stages
        if s is not None
    ]
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass
class ChangeCounts:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0


@dataclass
class _Scope:
    """What the record knew about one source root when the run began, and whether its listing completed."""

    known: KnownSources
    listing_failed: bool = False


@dataclass(frozen=True)
class _InFlight:
    """A listed source that is being read, parsed, embedded or written (forgotten once it is done)."""

    scope: str
    change_signal: str
    known: int | None  # its position in the scope's KnownSources, None for a source new to the record


class ChangeTracker:
    """Decides what a run skips and keeps the record; ``skip_unchanged=False`` (a plain ingest)
    processes every listed source but still records it, so a later reindex starts from there.

    Memory per source is bounded: the record is streamed into :class:`KnownSources` (26 bytes per
    source), and only sources in flight are held as objects. A record is fetched from the store when
    it must be rewritten (a touched file, a redo, a failure). ``fence`` is called before every write
    (the re-index lock's :meth:`pipeline.lease.Lease.ensure_held`), so a run that lost its lock stops.
    """

    def __init__(
        self,
        records: RecordStore,
        store: Store,
        fingerprint: str,
        cleanup: Cleanup = "full",
        *,
        skip_unchanged: bool = True,
        fence: Callable[[], None] | None = None,
    ):
        self.records = records
        self.store = store
        self.fingerprint = fingerprint
        self.cleanup = cleanup
        self.skip_unchanged = skip_unchanged
        self.fence = fence or (lambda: None)
        self.counts = ChangeCounts()
        self._scopes: dict[str, _Scope] = {}
        self._in_flight: dict[str, _InFlight] = {}
        self._lock = threading.Lock()  # listing runs in the parser pool's feeder thread, writes in the main thread

    # -- listing and reading (feeder thread) ---------------------------------------------------

    def begin_listing(self, scope: str) -> None:
        if scope in self._scopes:
            return
        known = KnownSources.build(
            (r.source_id, r.change_signal, r.content_hash, self._flags(r)) for r in self.records.in_scope(scope)
        )
        with self._lock:
            self._scopes.setdefault(scope, _Scope(known))

    def listing_failed(self, scope: str) -> None:
        with self._lock:
            self._scopes[scope].listing_failed = True

    def should_read(self, ref: SourceRef, scope: str) -> bool:
        """False for a source whose cheap change signal says nothing changed since it was indexed."""
        with self._lock:
            known = self._scopes[scope].known
            position = known.find(ref.source_id)
            if position is not None:
                known.listed[position] = True
                if (
                    self.skip_unchanged
                    and known.flags[position] & KnownSources.CURRENT
                    and known.signals[position] == digest64(ref.change_signal)
                ):
                    self.counts.unchanged += 1
                    return False
            self._in_flight[ref.source_id] = _InFlight(scope, ref.change_signal, position)
            return True

    def should_process(self, document: SourceDocument) -> bool:
        """False when the bytes are the same as indexed (only the change signal moved, e.g. a touch)."""
        with self._lock:
            listed = self._in_flight.get(document.source_id)
            if listed is None or listed.known is None or not self.skip_unchanged:
                return True
            known = self._scopes[listed.scope].known
            if not (
                known.flags[listed.known] & KnownSources.CURRENT
                and known.contents[listed.known] == digest64(document.content_hash)
            ):
                return True
            del self._in_flight[document.source_id]
            self.counts.unchanged += 1
        try:  # keep the new signal, so the next run does not read the source again
            record = self.records.get([document.source_id]).get(document.source_id)
            if record is not None:
                record.change_signal = listed.change_signal
                self.records.put([record])
        except Exception:
            log.warning(
                "%s: could not record its new change signal; it is read again next run",
                document.source_id,
                exc_info=True,
            )
        return False

    # -- writing (main thread) -------------------------------------------------------------------

    def writing(self, documents: Sequence[ChunkedDocument]) -> None:
        """Mark the sources pending before their chunks change: a crash now means 'redo next run'."""
        self.fence()
        with self._lock:
            listed = {d.document.source_id: self._in_flight.get(d.document.source_id) for d in documents}
        known_ids = [source_id for source_id, entry in listed.items() if entry is None or entry.known is not None]
        previous = self.records.get(known_ids) if known_ids else {}
        pending = []
        for source_id, entry in listed.items():
            record = previous.get(source_id) or SourceRecord(source_id, entry.scope if entry else "")
            record.status = "pending"
            pending.append(record)
        self.records.put(pending)

    def written(self, documents: Sequence[ChunkedDocument]) -> None:
        indexed, added = [], 0
        with self._lock:
            for d in documents:
                source_id = d.document.source_id
                entry = self._in_flight.get(source_id)
                added += not self._had_chunks(entry)
                indexed.append(
                    SourceRecord(
                        source_id=source_id,
                        scope=entry.scope if entry else "",
                        content_hash=d.document.content_hash,
                        change_signal=entry.change_signal if entry else "",
                        fingerprint=self.fingerprint,
                        chunk_count=len(d.chunks),
                        chunk_digest=chunk_digest(c.id for c in d.chunks),
                        status="indexed",
                    )
                )
        self.records.put(indexed)
        with self._lock:  # forgotten only once recorded: a failed put is retried document by document
            for record in indexed:
                self._in_flight.pop(record.source_id, None)
            self.counts.added += added
            self.counts.updated += len(indexed) - added

    def failed(self, source_id: str, stage: str, reason: str) -> None:
        """Dead-letter the source; its previous chunks (if any) stay searchable, the next run retries it.

        Never raises: a failure that cannot be recorded (the record store down, an id too long for
        it) is logged, and the source is simply retried by the next run.
        """
        with self._lock:
            entry = self._in_flight.pop(source_id, None)
        try:
            self.fence()
            record = self.records.get([source_id]).get(source_id)
            if record is None:
                if entry is None:  # not a listed source (e.g. a listing failure named after its scope)
                    return
                record = SourceRecord(source_id, entry.scope)
            record.status, record.stage, record.reason = "failed", stage, reason
            record.attempts += 1
            self.records.put([record])
        except Exception as exc:
            log.error("%s: could not record its failure in the index record: %s", source_id, exc)

    # -- end of run -----------------------------------------------------------------------------

    def remove_unlisted(self) -> None:
        """Under ``full`` cleanup, delete the sources a completed listing no longer yields.

        The record is streamed again and matched against the digests of the unlisted sources,
        so this needs no per-source memory beyond :class:`KnownSources`.
        """
        if self.cleanup != "full":
            return
        for scope, entry in self._scopes.items():
            if entry.listing_failed:
                log.warning("the listing of %r did not complete; sources missing from it are kept", scope)
                continue
            gone = entry.known.unlisted()
            if not len(gone):
                continue
            batch: list[str] = []
            for record in self.records.in_scope(scope):
                if sorted_contains(gone, digest64(record.source_id)):
                    batch.append(record.source_id)
                    if len(batch) >= _DELETE_BATCH:
                        self._delete(batch)
                        batch = []
            self._delete(batch)

    def _delete(self, source_ids: list[str]) -> None:
        if not source_ids:
            return
        self.fence()
        # Chunks first, record last: a crash in between leaves a record whose source is still
        # unlisted, so the next run deletes it again.
        self.store.delete_sources(source_ids)
        self.records.delete(source_ids)
        self.counts.deleted += len(source_ids)

    def failed_listings(self) -> list[str]:
        """The scopes whose listing did not complete in this run."""
        return [scope for scope, entry in self._scopes.items() if entry.listing_failed]

    def save_run(self, run_summary: dict[str, Any]) -> None:
        self.records.put_run(run_summary)

    # -- helpers ----------------------------------------------------------------------------------

    def _flags(self, record: SourceRecord) -> int:
        flags = KnownSources.HAS_CHUNKS if record.chunk_digest else 0
        if record.status == "indexed" and record.fingerprint == self.fingerprint:
            flags |= KnownSources.CURRENT
        return flags

    def _had_chunks(self, entry: _InFlight | None) -> bool:
        if entry is None or entry.known is None:
            return False
        return bool(self._scopes[entry.scope].known.flags[entry.known] & KnownSources.HAS_CHUNKS)
