"""Reconcile the index record with the chunks actually in the collection, and repair the drift.

Drift comes from outside the pipeline's update order: rows deleted or written by hand or by
another tool, a collection restored from an older backup, a record copied from elsewhere. Two
kinds are repaired:

- orphan chunks: chunks of a source that has no record at all. Nothing would ever update or
  delete them, so they are deleted.
- records that do not match their chunks: an ``indexed`` record whose chunk ids (count and
  digest) differ from the chunks present, including chunks gone missing. The record is set back
  to ``pending``, which makes the next reindex redo the source (write its chunks, delete the
  stale ones, record it last), so the source converges through the normal path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from stores.records import RecordStore, SourceRecord, chunk_digest


class ChunkListing(Protocol):
    """What reconciling needs from a store (MilvusStore has it)."""

    def chunk_ids_by_source(self) -> dict[str, list[str]]: ...

    def delete_sources(self, source_ids: Sequence[str]) -> None: ...


@dataclass
class ReconcileReport:
    sources_recorded: int = 0
    sources_with_chunks: int = 0
    orphan_sources: list[str] = field(default_factory=list)  # chunks without a record: deleted
    orphan_chunks: int = 0
    drifted_sources: list[str] = field(default_factory=list)  # record != chunks: redone by the next reindex
    repaired: bool = False

    @property
    def clean(self) -> bool:
        return not self.orphan_sources and not self.drifted_sources

    def format(self) -> str:
        lines = [f"record: {self.sources_recorded} sources; collection: chunks of {self.sources_with_chunks} sources"]
        if self.clean:
            lines.append("no drift: every chunk has a record and every indexed record matches its chunks")
            return "\n".join(lines)
        verb = "deleted" if self.repaired else "to delete"
        lines.append(f"orphan chunks ({verb}): {self.orphan_chunks} of {len(self.orphan_sources)} sources without a record")
        lines += [f"  {source_id}" for source_id in self.orphan_sources[:20]]
        verb = "marked for redo" if self.repaired else "to redo"
        lines.append(f"records that do not match their chunks ({verb}): {len(self.drifted_sources)}")
        lines += [f"  {source_id}" for source_id in self.drifted_sources[:20]]
        return "\n".join(lines)


def reconcile(records: RecordStore, store: ChunkListing, *, repair: bool = True) -> ReconcileReport:
    """Compare ``records`` with ``store``'s chunks; with ``repair``, delete orphans and mark drift."""
    recorded = {record.source_id: record for record in records.all()}
    chunks = store.chunk_ids_by_source()
    report = ReconcileReport(sources_recorded=len(recorded), sources_with_chunks=len(chunks))
    report.orphan_sources = sorted(source_id for source_id in chunks if source_id not in recorded)
    report.orphan_chunks = sum(len(chunks[source_id]) for source_id in report.orphan_sources)
    drifted: list[SourceRecord] = []
    for source_id, record in sorted(recorded.items()):
        if record.status != "indexed":
            continue  # pending and failed sources are redone by the next run anyway
        present = chunks.get(source_id, [])
        if len(present) != record.chunk_count or chunk_digest(present) != record.chunk_digest:
            drifted.append(record)
    report.drifted_sources = [record.source_id for record in drifted]
    if repair:
        if report.orphan_sources:
            store.delete_sources(report.orphan_sources)
        for record in drifted:
            record.status = "pending"
        records.put(drifted)
        report.repaired = True
    return report

