"""The re-index lock's claims: one per run that claims a collection's lock.

The protocol that turns claims into a lock (who wins, when a claim is dead, fencing) is
:mod:`pipeline.lease`; a :class:`ClaimStore` only keeps claims, reads them all back with
read-your-writes consistency, and deletes them by owner. Each run writes and deletes only its own
claim (and claims it has judged dead), so no write ever overwrites another run's claim.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any


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
    def from_json(cls, text: str) -> LockClaim:
        data = json.loads(text)
        return cls(**{name: data.get(name, default) for name, default in _CLAIM_DEFAULTS.items()})


_CLAIM_DEFAULTS: dict[str, Any] = {
    "owner": "",
    "host": "",
    "machine": "",
    "pid": 0,
    "process_started": "",
    "acquired_at": 0.0,
    "expires_at": 0.0,
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
