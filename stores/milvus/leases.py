"""Where Milvus keeps the re-index lock's claims (:mod:`core.leases`): ``<collection>_lock``.

The lock collection is named after the configured collection name (an alias after a full
rebuild), never after the collection it serves: a rebuild's switch drops the old collection and
its record, but not the lock that the rebuilding run holds.
"""

from __future__ import annotations

import hashlib

from core.leases import ClaimStore, LockClaim
from stores.milvus.companion import DUMMY_VECTOR, ChunkStoreAccess, CompanionCollection

LOCK_SUFFIX = "_lock"


class MilvusClaims(CompanionCollection, ClaimStore):
    """Claims in ``<collection>_lock``: one row per owner, a JSON body and a dummy vector."""

    what = "lock"
    text_fields = (("body", 4096),)
    _MAX_ROWS = 1000  # live claims are one or two; dead ones are deleted by the next claimant

    def __init__(self, store: ChunkStoreAccess):
        super().__init__(store)
        self._name = f"{store.config.collection}{LOCK_SUFFIX}"

    @property
    def name(self) -> str:
        return self._name

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
        row = {"id": _row_id(claim.owner), "body": claim.to_json(), "dummy": DUMMY_VECTOR}
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
