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

from dataclasses import dataclass, field

from core.digests import DigestSet, digest64
from core.records import RecordStore, SourceRecord, chunk_digest
from stores.base import Store

# Indexed records compared with their chunks at a time: a few MB, and few store queries (each one
# scans the collection, so the store asks for thousands of sources per query).
_SOURCES_PER_COMPARE = 4096
_LISTED = 20  # source ids a report names per kind of drift


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
        lines.append(
            f"orphan chunks ({verb}): {self.orphan_chunks} of {len(self.orphan_sources)} sources without a record"
        )
        lines += [f"  {source_id}" for source_id in sorted(self.orphan_sources)[:_LISTED]]
        verb = "marked for redo" if self.repaired else "to redo"
        lines.append(f"records that do not match their chunks ({verb}): {len(self.drifted_sources)}")
        lines += [f"  {source_id}" for source_id in sorted(self.drifted_sources)[:_LISTED]]
        return "\n".join(lines)


def reconcile(records: RecordStore, store: Store, *, repair: bool = True) -> ReconcileReport:
    """Compare ``records`` with ``store``'s chunks; with ``repair``, delete orphans and mark drift.

    Both sides are streamed: the record once (indexed records are compared with their chunks a
    few thousand at a time), then the chunks' source ids once (against digests of the recorded
    ids), so memory does not grow with the index, only with the drift found.
    """
    report = ReconcileReport(repaired=repair)
    recorded = DigestSet()
    indexed: list[SourceRecord] = []
    for record in records.all():
        report.sources_recorded += 1
        recorded.add(digest64(record.source_id))
        if record.status == "indexed":  # pending and failed sources are redone by the next run anyway
            indexed.append(record)
            if len(indexed) >= _SOURCES_PER_COMPARE:
                _compare(indexed, records, store, report)
                indexed = []
    _compare(indexed, records, store, report)
    report.drifted_sources.sort()

    with_chunks = DigestSet()
    orphans: dict[str, int] = {}
    for row in store.rows(["source_id"]):
        source_id = row["source_id"]
        digest = digest64(source_id)
        report.sources_with_chunks += with_chunks.add(digest)
        if digest not in recorded:
            orphans[source_id] = orphans.get(source_id, 0) + 1
    report.orphan_sources = sorted(orphans)
    report.orphan_chunks = sum(orphans.values())
    if repair and report.orphan_sources:
        store.delete_sources(report.orphan_sources)
    return report


def _compare(indexed: list[SourceRecord], records: RecordStore, store: Store, report: ReconcileReport) -> None:
    """Find the indexed records whose chunk ids differ from the chunks present; mark them for redo."""
    if not indexed:
        return
    present = store.chunk_ids_of([record.source_id for record in indexed])
    drifted = []
    for record in indexed:
        ids = present.get(record.source_id, [])
        if len(ids) != record.chunk_count or chunk_digest(ids) != record.chunk_digest:
            drifted.append(record)
    report.drifted_sources += [record.source_id for record in drifted]
    if report.repaired and drifted:
        for record in drifted:
            record.status = "pending"
        records.put(drifted)
