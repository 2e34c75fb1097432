"""The record of what is indexed: one row per source, beside the chunks it describes.

The runner consults it to skip unchanged sources and to find sources that disappeared, and
writes it LAST for each source (after the chunks were upserted and the stale ones deleted), so a
record that says ``indexed`` always describes chunks that are really there. The Milvus
implementation keeps it in a companion collection ``<collection>_records`` on the same endpoint
as the chunks, so every machine sharing the index shares the record too.
"""

from __future__ import annotations

import hashlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

from stores import filters

if TYPE_CHECKING:
    from stores.milvus import MilvusStore

Status = Literal["pending", "indexed", "failed"]

# A source's row is keyed by a digest of its id, never the id itself: source ids can hold quotes
# and control characters that some engines mishandle in primary keys (Milvus Lite 2.5 fails an
# upsert whose key holds a quote). The run and lock rows take ids no digest key can.
RECORDS_SUFFIX = "_records"
RUN_ROW_ID = "run"
LOCK_ROW_ID = "lock"


def source_row_id(source_id: str) -> str:
    return "source:" + hashlib.sha256(source_id.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class LockHolder:
    """Who holds the collection's re-index lock, and until when (a heartbeat pushes it forward)."""

    owner: str  # unique per run: host, pid and a random token
    host: str
    pid: int
    expires_at: float

    @property
    def expired(self) -> bool:
        return self.expires_at <= time.time()


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
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SourceRecord":
        data = json.loads(text)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class RecordStore(ABC):
    """Where source records and the last run summary live."""

    @abstractmethod
    def get(self, source_ids: Sequence[str]) -> dict[str, SourceRecord]:
        """The records of the given source ids that exist."""

    @abstractmethod
    def in_scope(self, scope: str) -> list[SourceRecord]:
        """Every record whose scope is ``scope``."""

    @abstractmethod
    def put(self, records: Sequence[SourceRecord]) -> None: ...

    @abstractmethod
    def delete(self, source_ids: Sequence[str]) -> None: ...

    @abstractmethod
    def all(self) -> list[SourceRecord]: ...

    @abstractmethod
    def put_run(self, summary: dict[str, Any]) -> None: ...

    @abstractmethod
    def last_run(self) -> dict[str, Any] | None: ...

    @abstractmethod
    def lock_holder(self) -> LockHolder | None:
        """The lock row as stored (possibly expired), or None."""

    @abstractmethod
    def write_lock(self, holder: LockHolder | None) -> None:
        """Store (or with None, remove) the lock row."""

    def try_lock(self, holder: LockHolder, settle_s: float = 0.0) -> LockHolder | None:
        """Take the lock for ``holder``; return the other live holder instead if there is one.

        Milvus has no compare-and-set, so the claim is written, then read back after ``settle_s``:
        of two runs claiming at once, the one whose write landed last sees its own row and wins,
        the other sees a foreign row and backs off.
        """
        current = self.lock_holder()
        if current is not None and current.owner != holder.owner and not current.expired:
            return current
        self.write_lock(holder)
        if settle_s:
            time.sleep(settle_s)
        current = self.lock_holder()
        return None if current is not None and current.owner == holder.owner else current

    def release_lock(self, owner: str) -> None:
        current = self.lock_holder()
        if current is not None and current.owner == owner:
            self.write_lock(None)


class MemoryRecords(RecordStore):
    """Records in a dict: for tests and for stores without a place to keep them."""

    def __init__(self) -> None:
        self.records: dict[str, SourceRecord] = {}
        self.run: dict[str, Any] | None = None
        self.lock: LockHolder | None = None

    def get(self, source_ids: Sequence[str]) -> dict[str, SourceRecord]:
        return {s: SourceRecord(**asdict(self.records[s])) for s in source_ids if s in self.records}

    def in_scope(self, scope: str) -> list[SourceRecord]:
        return [SourceRecord(**asdict(r)) for r in self.records.values() if r.scope == scope]

    def put(self, records: Sequence[SourceRecord]) -> None:
        for record in records:
            self.records[record.source_id] = SourceRecord(**asdict(record))

    def delete(self, source_ids: Sequence[str]) -> None:
        for source_id in source_ids:
            self.records.pop(source_id, None)

    def all(self) -> list[SourceRecord]:
        return [SourceRecord(**asdict(r)) for r in self.records.values()]

    def put_run(self, summary: dict[str, Any]) -> None:
        self.run = dict(summary)

    def last_run(self) -> dict[str, Any] | None:
        return self.run

    def lock_holder(self) -> LockHolder | None:
        return self.lock

    def write_lock(self, holder: LockHolder | None) -> None:
        self.lock = holder


class MilvusRecords(RecordStore):
    """Records in the companion collection ``<collection>_records``, through the chunk store's client.

    A Milvus collection needs a vector field, so each row carries a constant 2-d dummy vector;
    the record itself is a JSON document in a VARCHAR field, with scope and kind as scalar fields
    for filtering.
    """

    _DUMMY = [0.0, 1.0]
    _BODY_MAX = 8192
    _QUERY_PAGE = 1000

    def __init__(self, store: "MilvusStore"):
        self.store = store
        # The record of the collection the store serves now (behind an alias after a full rebuild,
        # the record follows the chunks); fixed here, so a rebuild's switch cannot move it mid-run.
        self.name = f"{store.serving_collection() or store.config.collection}{RECORDS_SUFFIX}"
        self._ready = False
        self._dropped = False

    def drop(self) -> None:
        """Drop the record with the collection it describes (after a full rebuild replaced both).
        A lock held in it is gone with it: later lock writes and releases do nothing."""
        client = self.store._connect()
        if self.store._call("has_collection", client.has_collection, self.name, timeout=self.store.config.timeout_s):
            self.store._call("drop records collection", client.drop_collection, self.name, timeout=self.store.config.timeout_s)
        self._dropped = True

    def release_lock(self, owner: str) -> None:
        if not self._dropped:
            super().release_lock(owner)

    def _client(self) -> Any:
        if self._dropped:
            raise RuntimeError(f"the index record {self.name!r} was dropped by a full rebuild")
        client = self.store._connect()
        if not self._ready:
            self._create_if_missing(client)
            self._ready = True
        return client

    def _create_if_missing(self, client: Any) -> None:
        from pymilvus import DataType, MilvusClient

        store, timeout = self.store, self.store.config.timeout_s
        if not store._call("has_collection", client.has_collection, self.name, timeout=timeout):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=2048)
            schema.add_field("kind", DataType.VARCHAR, max_length=16)
            schema.add_field("scope", DataType.VARCHAR, max_length=2048)
            schema.add_field("body", DataType.VARCHAR, max_length=self._BODY_MAX)
            schema.add_field("dummy", DataType.FLOAT_VECTOR, dim=2)
            index = client.prepare_index_params()
            index.add_index(field_name="dummy", index_type="FLAT", metric_type="L2")
            store._call("create records collection", client.create_collection, self.name, schema=schema, index_params=index,
                        consistency_level="Strong", timeout=timeout)  # the lock and skip decisions read their own writes
        store._call("load records collection", client.load_collection, self.name, timeout=timeout)

    def _query(self, expression: str) -> list[dict[str, Any]]:
        client, rows, offset = self._client(), [], 0
        while True:
            page = self.store._call(
                "query records", client.query, self.name, filter=expression, output_fields=["id", "body"],
                limit=self._QUERY_PAGE, offset=offset, timeout=self.store.config.timeout_s,
            )
            rows.extend(page)
            if len(page) < self._QUERY_PAGE:
                return rows
            offset += self._QUERY_PAGE

    def get(self, source_ids: Sequence[str]) -> dict[str, SourceRecord]:
        found: dict[str, SourceRecord] = {}
        for start in range(0, len(source_ids), 200):
            ids = [source_row_id(source_id) for source_id in source_ids[start:start + 200]]
            for row in self._query(filters.all_of(filters.eq("kind", "source"), filters.in_list("id", ids))):
                record = SourceRecord.from_json(row["body"])
                found[record.source_id] = record
        return found

    def in_scope(self, scope: str) -> list[SourceRecord]:
        rows = self._query(filters.all_of(filters.eq("kind", "source"), filters.eq("scope", scope)))
        return [SourceRecord.from_json(r["body"]) for r in rows]

    def all(self) -> list[SourceRecord]:
        return [SourceRecord.from_json(r["body"]) for r in self._query(filters.eq("kind", "source"))]

    def put(self, records: Sequence[SourceRecord]) -> None:
        if records:
            rows = [{"id": source_row_id(r.source_id), "kind": "source", "scope": r.scope, "body": r.to_json(), "dummy": self._DUMMY} for r in records]
            self._upsert(rows)

    def delete(self, source_ids: Sequence[str]) -> None:
        if source_ids:
            self._delete_rows([source_row_id(source_id) for source_id in source_ids])

    def _delete_rows(self, row_ids: list[str]) -> None:
        client = self._client()
        self.store._call("delete records", client.delete, self.name, ids=row_ids, timeout=self.store.config.timeout_s)

    def put_run(self, summary: dict[str, Any]) -> None:
        body = json.dumps(summary, sort_keys=True, default=str)  # a compact summary: counts, no failure list
        self._upsert([{"id": RUN_ROW_ID, "kind": "run", "scope": "", "body": body, "dummy": self._DUMMY}])

    def last_run(self) -> dict[str, Any] | None:
        rows = self._query(filters.eq("kind", "run"))
        return json.loads(rows[0]["body"]) if rows else None

    def lock_holder(self) -> LockHolder | None:
        rows = self._query(filters.eq("kind", "lock"))
        return LockHolder(**json.loads(rows[0]["body"])) if rows else None

    def write_lock(self, holder: LockHolder | None) -> None:
        if self._dropped:  # a heartbeat after a full rebuild dropped this record
            return
        if holder is None:
            self._delete_rows([LOCK_ROW_ID])
        else:
            self._upsert([{"id": LOCK_ROW_ID, "kind": "lock", "scope": "", "body": json.dumps(asdict(holder)), "dummy": self._DUMMY}])

    def _upsert(self, rows: list[dict[str, Any]]) -> None:
        client = self._client()
        self.store._call("upsert records", client.upsert, self.name, rows, timeout=self.store.config.timeout_s)


def records_for(store: Any) -> RecordStore:
    """The record that belongs beside ``store``'s chunks (Milvus: the companion collection)."""
    from stores.milvus import MilvusStore

    if isinstance(store, MilvusStore):
        return MilvusRecords(store)
    raise TypeError(f"{type(store).__name__} keeps no index record; pass a RecordStore to reindex()")
