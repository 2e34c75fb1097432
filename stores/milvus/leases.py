"""Where Milvus keeps the re-index lock's claims (:mod:`core.leases`): ``<collection>_lock``.

The lock collection is named after the configured collection name (an alias after a full
rebuild), never after the collection it serves: a rebuild's switch drops the old collection and
its record, but not the lock that the rebuilding run holds.
"""

from __future__ import annotations

import hashlib
from typing import Any

from core.leases import ClaimStore, LockClaim

# The store is typed by what is used of it (client(), call(), config ...), not by MilvusStore:
# stores.milvus.store builds these objects, so importing it here, even for types, is a cycle.
MilvusStore = Any

LOCK_SUFFIX = "_lock"


class MilvusClaims(ClaimStore):
    """Claims in ``<collection>_lock``: one row per owner, a JSON body and a dummy vector."""

    _DUMMY = [0.0, 1.0]
    _MAX_ROWS = 1000  # live claims are one or two; dead ones are deleted by the next claimant

    def __init__(self, store: MilvusStore):
        self.store = store
        self.name = f"{store.config.collection}{LOCK_SUFFIX}"
        self._ready = False

    def _client(self) -> Any:
        client = self.store.client()
        if not self._ready:
            self._create_if_missing(client)
            self._ready = True
        return client

    def _create_if_missing(self, client: Any) -> None:
        from pymilvus import DataType, MilvusClient

        store, timeout = self.store, self.store.config.timeout_s
        if not store.call("has_collection", client.has_collection, self.name, timeout=timeout):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=128)
            schema.add_field("body", DataType.VARCHAR, max_length=4096)
            schema.add_field("dummy", DataType.FLOAT_VECTOR, dim=2)
            index = client.prepare_index_params()
            index.add_index(field_name="dummy", index_type="FLAT", metric_type="L2")
            # Strong: a claimant must see every claim acknowledged before its read (pipeline.lease).
            store.call(
                "create lock collection",
                client.create_collection,
                self.name,
                schema=schema,
                index_params=index,
                consistency_level="Strong",
                timeout=timeout,
            )
        store.call("load lock collection", client.load_collection, self.name, timeout=timeout)

    def claims(self) -> list[LockClaim]:
        rows = self.store.call(
            "read lock claims",
            self._client().query,
            self.name,
            filter="",
            output_fields=["body"],
            limit=self._MAX_ROWS,
            consistency_level="Strong",
            timeout=self.store.config.timeout_s,
        )
        return [LockClaim.from_json(row["body"]) for row in rows]

    def put(self, claim: LockClaim) -> None:
        row = {"id": _row_id(claim.owner), "body": claim.to_json(), "dummy": self._DUMMY}
        self.store.call(
            "write lock claim", self._client().upsert, self.name, [row], timeout=self.store.config.timeout_s
        )

    def delete(self, owner: str) -> None:
        client, timeout = self.store.client(), self.store.config.timeout_s
        # Gone with its database file when a Milvus Lite 2.5 rebuild moved the new file in: nothing to delete.
        if self.store.call("has_collection", client.has_collection, self.name, timeout=timeout):
            self.store.call("delete lock claim", client.delete, self.name, ids=[_row_id(owner)], timeout=timeout)


def _row_id(owner: str) -> str:
    # A digest: the owner holds the host name, which is not ours to trust inside a primary key.
    return "claim:" + hashlib.sha256(owner.encode("utf-8", "surrogatepass")).hexdigest()
