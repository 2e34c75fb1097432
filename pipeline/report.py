"""What a run tells its user: failures as they happen, progress, and the final summary."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from core.language import LanguageTally
from core.secrets import scrub

if TYPE_CHECKING:
    from pipeline.incremental import ChangeCounts

log = logging.getLogger("rag_pipeline")

STAGE_ORDER = ("list", "read", "parse", "chunk", "embed", "write")


@dataclass(frozen=True)
class Failure:
    source_id: str
    stage: str
    reason: str
    uri: str = ""
    at: float = field(default_factory=time.time)


class FailureLog:
    """Appends each failure to a JSONL file as it happens, so a crashed run still leaves its record.

    The file describes the latest run only: a previous run's file is removed at the start, and a
    run without failures leaves none.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.failures: list[Failure] = []
        self._file: TextIO | None = None
        if path is not None:
            path.unlink(missing_ok=True)

    def record(self, failure: Failure) -> None:
        # Scrubbed once here, so the log line, the file and the run summary all carry the clean text;
        # the ids too, since a source's URI can hold a credential a connector did not recognise.
        failure = replace(
            failure, source_id=scrub(failure.source_id), reason=scrub(failure.reason), uri=scrub(failure.uri)
        )
        self.failures.append(failure)
        log.warning("%s: %s failed: %s", failure.source_id, failure.stage, failure.reason)
        if self.path is None:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w", encoding="utf-8")
        self._file.write(json.dumps(asdict(failure), ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class RunSummary:
    documents_seen: int = 0
    documents_indexed: int = 0
    documents_empty: int = 0  # indexed with no chunks: the source holds no text (its old chunks were deleted)
    documents_failed: int = 0
    chunks_written: int = 0
    chunks_truncated: int | None = None  # chunk texts the embedder cut to its token window; None: it keeps no count
    languages: dict[str, int] = field(default_factory=dict)  # parsed documents by language (core.language)
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # e.g. "12 chunks longer than the model's 256 tokens were truncated"
    failures: list[Failure] = field(default_factory=list)
    failures_file: str | None = None
    changes: ChangeCounts | None = None  # set by incremental runs: added / updated / unchanged / deleted

    @property
    def ok(self) -> bool:
        return self.documents_failed == 0

    def add_time(self, stage: str, seconds: float) -> None:
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds

    def to_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready data, every text scrubbed (the CLI prints it with ``--json``)."""
        out = asdict(self)
        out["failures"] = [asdict(f) for f in self.failures]
        scrubbed: dict[str, Any] = _scrubbed(out)
        return scrubbed

    def run_record(self) -> dict[str, Any]:
        """The compact summary kept as 'last run' in the index record (counts, not the failure list)."""
        return {
            "finished_at": time.time(),
            "seconds": round(self.seconds, 3),
            "documents_seen": self.documents_seen,
            "documents_indexed": self.documents_indexed,
            "documents_empty": self.documents_empty,
            "documents_failed": self.documents_failed,
            "chunks_written": self.chunks_written,
            "changes": asdict(self.changes) if self.changes is not None else None,
            "languages": dict(self.languages),
        }

    def failure_reasons(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for f in self.failures:
            key = f"{f.stage}: {f.reason}"
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    def format(self) -> str:
        rate = self.documents_seen / self.seconds if self.seconds else 0.0
        lines = [
            f"documents: {self.documents_seen} seen, {self.documents_indexed} indexed"
            + (f" ({self.documents_empty} empty, with no chunks)" if self.documents_empty else "")
            + f", {self.documents_failed} failed",
            f"chunks written: {self.chunks_written}",
        ]
        if self.languages:
            lines.append(f"languages: {LanguageTally(self.languages).describe()} (documents parsed)")
        if self.changes is not None:
            c = self.changes
            lines.append(
                f"sources: {c.added} added, {c.updated} updated, {c.unchanged} unchanged, {c.deleted} deleted, "
                f"{self.documents_failed} failed"
            )
        lines += [
            f"time: {self.seconds:.1f} s ({rate:.1f} documents/s)",
        ]
        stages = [s for s in STAGE_ORDER if s in self.stage_seconds] + [
            s for s in self.stage_seconds if s not in STAGE_ORDER
        ]
        if stages:
            lines.append("time per stage: " + ", ".join(f"{s} {self.stage_seconds[s]:.1f} s" for s in stages))
        lines += [f"note: {n}" for n in self.notes]
        if self.failures:
            lines.append("failures by reason:")
            for reason, count in list(self.failure_reasons().items())[:20]:
                lines.append(f"  {count:5d}  {reason}")
            if self.failures_file:
                lines.append(f"every failure is listed in {self.failures_file}")
        return scrub("\n".join(lines))


def _scrubbed(value: Any) -> Any:
    """``value`` with every string in it (at any depth of dicts and lists) scrubbed."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {key: _scrubbed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_scrubbed(item) for item in value]
    return value


class Progress:
    """A bar on a terminal; a log line every ``interval_s`` otherwise (cron logs, CI)."""

    def __init__(self, mode: str = "auto", interval_s: float = 10.0, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.enabled = mode != "never"
        self.use_bar = self.enabled and (mode == "always" or interactive)
        self.interval_s = interval_s
        self._last = time.monotonic()
        self._bar = None
        if self.use_bar:
            from tqdm import tqdm

            self._bar = tqdm(unit="doc", desc="ingest", file=self.stream, dynamic_ncols=True)

    def update(self, summary: RunSummary, documents: int) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(documents)
            self._bar.set_postfix(chunks=summary.chunks_written, failed=summary.documents_failed, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            log.info(
                "progress: %d documents (%d indexed, %d failed), %d chunks written",
                summary.documents_seen,
                summary.documents_indexed,
                summary.documents_failed,
                summary.chunks_written,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
