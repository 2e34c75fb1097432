"""The index-record contract: one record per source, describing the chunks indexed for it.

The runner consults the record to skip unchanged sources and to find sources that disappeared,
and writes it LAST for each source (after the chunks were upserted and the stale ones deleted),
so a record that says ``indexed`` always describes chunks that are really there. Stores keep it
where they keep chunks (``stores.milvus.records.MilvusRecords``); :class:`MemoryRecords` keeps it in a
dict. Reads that may return every source (:meth:`RecordStore.in_scope`, :meth:`RecordStore.all`)
are streams, so a source of a million documents is never held in memory at once.
"""

from __future__ import annotations

import hashlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from core.secrets import scrub

Status = Literal["pending", "indexed", "failed"]

# A failure reason longer than this is cut: the record says what failed, the failures file has it all.
REASON_MAX_CHARS = 2000


class RecordTooLarge(ValueError):
    """A source's record cannot be stored (its id or scope exceeds the record's field sizes)."""


def chunk_digest(chunk_ids: Iterable[str]) -> str:
    """A short digest of a source's chunk ids (the ids themselves can exceed a field's size)."""
    return hashlib.sha256("\n".join(sorted(chunk_ids)).encode()).hexdigest()


@dataclass
class SourceRecord:
    source_id: str
    scope: str  # the listing source's root prefix: cleanup never crosses scopes
    content_hash: str = ""
    change_signal: str = ""
    fingerprint: str = ""  # hash of the stage settings that produced the chunks
    chunk_count: int = 0
    chunk_digest: str = ""
    status: Status = "pending"
    stage: str = ""  # for failed records: where and why (the dead-letter list)
    reason: str = ""
    attempts: int = 0
    updated_at: float = field(default_factory=time.time)

    def to_json(self) -> str:
        # ensure_ascii=False: an emoji is 4 bytes of UTF-8 but 12 characters as \\u escapes, and
        # the body's limit is in bytes.
        # The reason quotes servers and libraries, which may echo a credential; scrubbed before the
        # cut, so the cut cannot leave a piece of a secret too short to be recognised.
        data = {**asdict(self), "reason": scrub(self.reason)}
        if len(data["reason"]) > REASON_MAX_CHARS:
            data["reason"] = data["reason"][:REASON_MAX_CHARS] + " ... (cut; the failures file has it all)"
        return json.dumps(data, sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> SourceRecord:
        data = json.loads(text)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class RecordStore(ABC):
    """Where source records and the last run summary live."""

    @abstractmethod
    def get(self, source_ids: Sequence[str]) -> dict[str, SourceRecord]:
        """The records of the given source ids that exist."""

    @abstractmethod
    def in_scope(self, scope: str) -> Iterator[SourceRecord]:
        """Every record whose scope is ``scope``, streamed."""

    @abstractmethod
    def put(self, records: Sequence[SourceRecord]) -> None:
        """Store records; raises :class:`RecordTooLarge` (writing none) when one cannot be stored."""

    @abstractmethod
    def delete(self, source_ids: Sequence[str]) -> None: ...

    @abstractmethod
    def all(self) -> Iterator[SourceRecord]:
        """Every source record, streamed."""

    @abstractmethod
    def put_run(self, summary: dict[str, Any]) -> None: ...

    @abstractmethod
    def last_run(self) -> dict[str, Any] | None: ...


class MemoryRecords(RecordStore):
    """Records in a dict: for tests and for stores without a place to keep them."""

    def __init__(self) -> None:
        self.records: dict[str, SourceRecord] = {}
        self.run: dict[str, Any] | None = None

    def get(self, source_ids: Sequence[str]) -> dict[str, SourceRecord]:
        return {s: SourceRecord(**asdict(self.records[s])) for s in source_ids if s in self.records}

    def in_scope(self, scope: str) -> Iterator[SourceRecord]:
        return iter([SourceRecord(**asdict(r)) for r in self.records.values() if r.scope == scope])

    def put(self, records: Sequence[SourceRecord]) -> None:
        for record in records:
            self.records[record.source_id] = SourceRecord(**asdict(record))

    def delete(self, source_ids: Sequence[str]) -> None:
        for source_id in source_ids:
            self.records.pop(source_id, None)

    def all(self) -> Iterator[SourceRecord]:
        return iter([SourceRecord(**asdict(r)) for r in self.records.values()])

    def put_run(self, summary: dict[str, Any]) -> None:
        self.run = dict(summary)

    def last_run(self) -> dict[str, Any] | None:
        return self.run
