"""The scheduled re-index job: one exclusive run per collection, on demand or on a cron expression.

The lock lives in the index record (``<collection>_records``), so it holds across machines that
share the index; a heartbeat keeps it alive while a run lasts and a killed run's lock expires.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

from pipeline.component import require
from stores.records import LockHolder, RecordStore

log = logging.getLogger("rag_pipeline")


class LockHeldError(RuntimeError):
    """Another live run holds the collection's re-index lock."""


# Milvus Lite's own refusal of a second process on the same database means the same thing.
LITE_IN_USE = "in use by another process"


def is_lock_conflict(exc: BaseException) -> bool:
    return isinstance(exc, LockHeldError) or LITE_IN_USE in str(exc)


@contextmanager
def index_lock(records: RecordStore, ttl_s: float = 300.0, settle_s: float = 0.5) -> Iterator[LockHolder]:
    """Hold the collection's lock for the block; raise LockHeldError if another live run has it."""
    host, pid = socket.gethostname(), os.getpid()
    owner = f"{host}:{pid}:{secrets.token_hex(4)}"

    def claim() -> LockHolder:
        return LockHolder(owner, host, pid, time.time() + ttl_s)

    other = records.try_lock(claim(), settle_s=settle_s)
    if other is not None:
        until = datetime.fromtimestamp(other.expires_at, timezone.utc).isoformat(timespec="seconds")
        raise LockHeldError(f"the re-index lock is held by pid {other.pid} on {other.host} (expires {until} unless refreshed)")
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(ttl_s / 3):
            try:
                records.write_lock(claim())
            except Exception:  # a missed beat is survivable; the lock lasts ttl_s
                log.warning("could not refresh the re-index lock", exc_info=True)

    beat = threading.Thread(target=heartbeat, name="reindex-lock-heartbeat", daemon=True)
    beat.start()
    try:
        yield claim()
    finally:
        stop.set()
        beat.join()
        records.release_lock(owner)


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


def format_status(records: RecordStore, max_failures: int = 20) -> str:
    """The record as an operator reads it: counts by status, the last run, the dead-letter list."""
    all_records = records.all()
    counts = Counter(r.status for r in all_records)
    lines = [
        f"sources: {len(all_records)} ({', '.join(f'{counts[s]} {s}' for s in ('indexed', 'pending', 'failed'))})",
        f"chunks: {sum(r.chunk_count for r in all_records if r.status == 'indexed')} in indexed sources",
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
    holder = records.lock_holder()
    if holder is not None and not holder.expired:
        lines.append(f"running now: pid {holder.pid} on {holder.host}")
    failed = sorted((r for r in all_records if r.status == "failed"), key=lambda r: r.source_id)
    if failed:
        lines.append("failures (retried on the next run):")
        lines += [f"  {r.source_id}: {r.stage}: {r.reason} ({r.attempts} attempts)" for r in failed[:max_failures]]
        if len(failed) > max_failures:
            lines.append(f"  ... and {len(failed) - max_failures} more")
    return "\n".join(lines)
