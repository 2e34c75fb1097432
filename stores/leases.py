"""Where the re-index lock's claims live: one row per run that claims the lock.

The protocol that turns these rows into a lock (who wins, when a claim is dead, fencing) is
:mod:`pipeline.lease`; a store only keeps claims, reads them all back with read-your-writes
consistency, and deletes them by owner. Each run writes and deletes only its own row (and rows
it has judged dead), so no write ever overwrites another run's claim.

Milvus keeps the claims in ``<collection>_lock``, named after the configured collection name (an
alias after a full rebuild), never after the collection it serves: a rebuild's switch drops the
old collection and its record, but not the lock that the rebuilding run holds.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stores.milvus import MilvusStore

LOCK_SUFFIX = "_lock"


@dataclass(frozen=True)
class LockClaim:
    """One run's claim on a collection's re-index lock."""

    owner: str  # unique per run: host, pid and a random token
    host: str
    machine: str  # host, boot id and PID namespace: equal only for processes that can see each other's pids
    pid: int
    process_started: str  # the holder's start time (from /proc), so a reused pid is not taken for the holder
    acquired_at: float
    expires_at: float  # wall clock of the holder; a heartbeat pushes it forward

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LockClaim":
        data = json.loads(text)
        return cls(**{name: data.get(name, default) for name, default in _CLAIM_DEFAULTS.items()})


_CLAIM_DEFAULTS: dict[str, Any] = {
    "owner": "", "host": "", "machine": "", "pid": 0, "process_started": "", "acquired_at": 0.0, "expires_at": 0.0,
}


class ClaimStore(ABC):
    """The lock claims of one collection."""

    @abstractmethod
    def claims(self) -> list[LockClaim]:
        """Every claim, as stored (live or not); sees every write acknowledged before the call."""

    @abstractmethod
    def put(self, claim: LockClaim) -> None:
        """Write (or refresh) the row of ``claim.owner``."""

    @abstractmethod
    def delete(self, owner: str) -> None: ...


class MemoryClaims(ClaimStore):
    """Claims in a dict: for tests and for stores without a shared place to keep them."""

    def __init__(self) -> None:
        self.rows: dict[str, LockClaim] = {}

    def claims(self) -> list[LockClaim]:
        return list(self.rows.values())

    def put(self, claim: LockClaim) -> None:
        self.rows[claim.owner] = claim

    def delete(self, owner: str) -> None:
        self.rows.pop(owner, None)


class MilvusClaims(ClaimStore):
    """Claims in ``<collection>_lock``: one row per owner, a JSON body and a dummy vector."""

    _DUMMY = [0.0, 1.0]
    _MAX_ROWS = 1000  # live claims are one or two; dead ones are deleted by the next claimant

    def __init__(self, store: "MilvusStore"):
        self.store = store
        self.name = f"{store.config.collection}{LOCK_SUFFIX}"
        self._ready = False

    def _client(self) -> Any:
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
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=128)
            schema.add_field("body", DataType.VARCHAR, max_length=4096)
            schema.add_field("dummy", DataType.FLOAT_VECTOR, dim=2)
            index = client.prepare_index_params()
            index.add_index(field_name="dummy", index_type="FLAT", metric_type="L2")
            # Strong: a claimant must see every claim acknowledged before its read (pipeline.lease).
            store._call("create lock collection", client.create_collection, self.name, schema=schema, index_params=index,
                        consistency_level="Strong", timeout=timeout)
        store._call("load lock collection", client.load_collection, self.name, timeout=timeout)

    def claims(self) -> list[LockClaim]:
        rows = self.store._call(
            "read lock claims", self._client().query, self.name, filter="", output_fields=["body"],
            limit=self._MAX_ROWS, consistency_level="Strong", timeout=self.store.config.timeout_s,
        )
        return [LockClaim.from_json(row["body"]) for row in rows]

    def put(self, claim: LockClaim) -> None:
        row = {"id": _row_id(claim.owner), "body": claim.to_json(), "dummy": self._DUMMY}
        self.store._call("write lock claim", self._client().upsert, self.name, [row], timeout=self.store.config.timeout_s)

    def delete(self, owner: str) -> None:
        client, timeout = self.store._connect(), self.store.config.timeout_s
        # Gone with its database file when a Milvus Lite 2.5 rebuild moved the new file in: nothing to delete.
        if self.store._call("has_collection", client.has_collection, self.name, timeout=timeout):
            self.store._call("delete lock claim", client.delete, self.name, ids=[_row_id(owner)], timeout=timeout)


def _row_id(owner: str) -> str:
    # A digest: the owner holds the host name, which is not ours to trust inside a primary key.
    return "claim:" + hashlib.sha256(owner.encode("utf-8", "surrogatepass")).hexdigest()


def claims_for(store: Any) -> ClaimStore:
    """Where ``store``'s collection keeps its lock claims (Milvus: ``<collection>_lock``)."""
    from stores.milvus import MilvusStore

    if isinstance(store, MilvusStore):
        return MilvusClaims(store)
    raise TypeError(f"{type(store).__name__} keeps no lock; pass a ClaimStore")
