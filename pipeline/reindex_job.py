"""The scheduled re-index job: one exclusive run per collection (the lease in :mod:`pipeline.lease`),
on demand or on a cron expression, and the status report an operator reads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone

from core.component import require
from core.language import LanguageTally
from core.leases import ClaimStore
from core.records import RecordStore, SourceRecord
from pipeline.lease import describe_claim, live_holders

log = logging.getLogger("rag_pipeline")


def run_on_schedule(expression: str, job: Callable[[], int], *, stop: threading.Event | None = None) -> int:
    """Run ``job`` at each time of the cron ``expression`` until ``stop`` is set; returns the last exit code."""
    croniter = require("croniter", purpose="reindex --schedule").croniter
    if not croniter.is_valid(expression):
        raise ValueError(f"not a cron expression: {expression!r}")
    stop = stop or threading.Event()
    schedule = croniter(expression, datetime.now(timezone.utc))
    code = 0
    while True:
        due = schedule.get_next(datetime)
        log.info("next re-index at %s", due.isoformat(timespec="seconds"))
        if stop.wait(max(0.0, due.timestamp() - time.time())):
            return code
        code = job()
        # A run longer than the interval skips the missed times instead of starting back to back.
        schedule = croniter(expression, datetime.now(timezone.utc))


def format_status(records: RecordStore, claims: ClaimStore | None = None, max_failures: int = 20) -> str:
    """The record as an operator reads it: counts by status, the last run, the dead-letter list.

    The record is streamed: memory holds the counts and the first ``max_failures`` failures only.
    """
    counts: Counter[str] = Counter()
    chunks = 0
    failed: list[SourceRecord] = []
    for record in records.all():
        counts[record.status] += 1
        if record.status == "indexed":
            chunks += record.chunk_count
        elif record.status == "failed":
            failed.append(record)
            if len(failed) > 2 * max_failures:  # keep the first ones by id, in bounded memory
                failed = sorted(failed, key=lambda r: r.source_id)[:max_failures]
    total = sum(counts.values())
    lines = [
        f"sources: {total} ({', '.join(f'{counts[s]} {s}' for s in ('indexed', 'pending', 'failed'))})",
        f"chunks: {chunks} in indexed sources",
    ]
    last = records.last_run()
    if last is None:
        lines.append("last run: none recorded")
    else:
        finished = datetime.fromtimestamp(last["finished_at"], timezone.utc).isoformat(timespec="seconds")
        changes = last.get("changes") or {}
        lines.append(
            f"last run: finished {finished} in {last['seconds']:.1f} s; {changes.get('added', 0)} added, "
            f"{changes.get('updated', 0)} updated, {changes.get('unchanged', 0)} unchanged, "
            f"{changes.get('deleted', 0)} deleted, {last['documents_failed']} failed"
        )
        if last.get("languages"):  # records of older versions have none
            lines.append(f"languages of the documents it parsed: {LanguageTally(last['languages']).describe()}")
    for holder in live_holders(claims) if claims is not None else []:
        lines.append(f"running now: {describe_claim(holder)}")
    if failed:
        lines.append("failures (retried on the next run):")
        shown = sorted(failed, key=lambda r: r.source_id)[:max_failures]
        lines += [f"  {r.source_id}: {r.stage}: {r.reason} ({r.attempts} attempts)" for r in shown]
        if counts["failed"] > max_failures:
            lines.append(f"  ... and {counts['failed'] - max_failures} more")
    return "\n".join(lines)
