"""The re-index lock: at most one run writes to a collection at a time.

A lease over claim rows (:mod:`stores.milvus.leases`), which needs no compare-and-set from the store,
only reads that see every write acknowledged before them (Milvus ``Strong`` consistency):

1. Read every claim. Dead claims are deleted (see below). A live claim of another run: the lock
   is held (:class:`LockHeldError`).
2. Write this run's claim.
3. Read every claim again. If another live claim is there, delete ours, wait a random moment and
   start over (a few times), then give up with :class:`LockHeldError`.

Why two runs never both hold the lock: if A and B both passed step 3, A's read missed B's claim,
so B wrote it after A's read; B's read came after that, so it saw A's claim, which A wrote before
its read. Two runs that start at the same moment may both back off; the random waits separate them.

When a claim is dead:

* on the same machine (same host name, boot and PID namespace, so pids mean the same process):
  at once when its process is gone, or its pid now belongs to a process started at another time.
  A SIGKILLed run frees the lock immediately.
* elsewhere: when its expiry passes. The holder's heartbeat pushes the expiry ``ttl_s`` ahead
  every ``ttl_s / 3``. Expiry compares the holder's wall clock with the reader's, so across
  machines the lock is exclusive as long as their clocks differ by less than ``ttl_s / 3``
  (100 s at the default TTL of 300 s): the holder stops writing (below) once its last refresh is
  ``2 * ttl_s / 3`` old, before any other machine can see its claim expire.

Fencing: the run calls :meth:`Lease.ensure_held` before each write. It raises
:class:`LockLostError` when the heartbeat found the claim gone (another run judged this one dead and
took over), found another live claim beside it, or could not refresh it for ``2 * ttl_s / 3``.
A check-then-write window remains (a write already sent when the lock is lost), which is why the
holder stops a full third of the TTL before anyone else may take over.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from functools import cache

from core.errors import LockHeldError, LockLostError
from core.leases import ClaimStore, LockClaim

log = logging.getLogger("rag_pipeline")

DEFAULT_TTL_S = 300.0
_CLAIM_ATTEMPTS = 4


@cache
def this_machine() -> str:
    """Host name, boot id and PID namespace: equal for exactly the processes whose pids we can check."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(os.readlink(path) if path.endswith("/pid") else open(path, encoding="ascii").read().strip())
        except OSError:
            parts.append("")
    return "|".join(parts)


def process_started(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot, from /proc), or "" where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            stat = handle.read()
    except OSError:
        return ""
    # Field 22 (starttime); the command name (field 2) is in parentheses and may hold spaces.
    return stat.rsplit(")", 1)[-1].split()[19]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def claim_is_live(claim: LockClaim, now: float | None = None) -> bool:
    """Whether the run that wrote ``claim`` may still be running (see the module docstring)."""
    if claim.machine and claim.machine == this_machine():
        if not _process_alive(claim.pid):
            return False
        started = process_started(claim.pid)
        return not (claim.process_started and started and started != claim.process_started)
    return claim.expires_at > (time.time() if now is None else now)


def describe_claim(claim: LockClaim) -> str:
    since = datetime.fromtimestamp(claim.acquired_at, timezone.utc).isoformat(timespec="seconds")
    until = datetime.fromtimestamp(claim.expires_at, timezone.utc).isoformat(timespec="seconds")
    return f"pid {claim.pid} on {claim.host} (since {since}; expires {until} unless refreshed)"


class Lease:
    """This run's hold on the lock: refreshed by a heartbeat thread, checked before each write."""

    def __init__(self, claims: ClaimStore, ttl_s: float = DEFAULT_TTL_S):
        if ttl_s <= 0:
            raise ValueError(f"the lock TTL must be positive, got {ttl_s}")
        self.claims = claims
        self.ttl_s = ttl_s
        host, pid = socket.gethostname(), os.getpid()
        now = time.time()
        self.claim = LockClaim(
            owner=f"{host}:{pid}:{secrets.token_hex(8)}",
            host=host,
            machine=this_machine(),
            pid=pid,
            process_started=process_started(pid),
            acquired_at=now,
            expires_at=now + ttl_s,
        )
        self._renewed = time.monotonic()
        self._lost: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # -- taking and giving back ------------------------------------------------------------------

    def acquire(self) -> Lease:
        for attempt in range(_CLAIM_ATTEMPTS):
            holder = self._live_others()
            if holder is not None:
                raise LockHeldError(f"the re-index lock is held by {describe_claim(holder)}")
            self._renewed = time.monotonic()
            self.claim = replace(self.claim, expires_at=time.time() + self.ttl_s)
            self.claims.put(self.claim)
            rival = self._live_others()
            if rival is None:
                self._start_heartbeat()
                return self
            self.claims.delete(self.claim.owner)
            log.info(
                "another run claimed the re-index lock at the same moment (%s); trying again", describe_claim(rival)
            )
            time.sleep(random.uniform(0.1, 0.5) * (attempt + 1))
        raise LockHeldError(f"the re-index lock is contended: {_CLAIM_ATTEMPTS} claims met another run's claim")

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        try:
            self.claims.delete(self.claim.owner)
        except Exception:  # the claim then expires, or dies with this process on the same machine
            log.warning("could not release the re-index lock", exc_info=True)

    # -- fencing ---------------------------------------------------------------------------------

    def ensure_held(self) -> None:
        """Raise :class:`LockLostError` unless this run may still write."""
        if self._lost is not None:
            raise LockLostError(self._lost)
        age = time.monotonic() - self._renewed
        if age > self.ttl_s * 2 / 3:
            raise LockLostError(
                f"the re-index lock was last refreshed {age:.0f} s ago (TTL {self.ttl_s:.0f} s); another run may take "
                "it over soon, so this run stops writing"
            )

    # -- heartbeat -------------------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        self._heartbeat = threading.Thread(target=self._beat, name="reindex-lock-heartbeat", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3) and self._lost is None:
            try:
                self.refresh()
            except Exception:  # a missed beat is survivable; ensure_held fences once refreshes stay missing
                log.warning("could not refresh the re-index lock", exc_info=True)

    def refresh(self) -> None:
        """Push this run's claim forward, or learn that the lock was lost."""
        current = {claim.owner: claim for claim in self.claims.claims()}
        if self.claim.owner not in current:
            self._lose("this run's claim on the re-index lock is gone: another run judged it dead and took over")
            return
        started = time.monotonic()
        self.claim = replace(self.claim, expires_at=time.time() + self.ttl_s)
        self.claims.put(self.claim)
        rival = self._live_others()
        if rival is not None:
            self.claims.delete(self.claim.owner)
            self._lose(f"another run holds the re-index lock beside this one ({describe_claim(rival)}); this run stops")
            return
        self._renewed = started

    def _lose(self, reason: str) -> None:
        log.error("%s", reason)
        self._lost = reason

    def _live_others(self) -> LockClaim | None:
        """The first live claim of another run; dead claims met on the way are deleted."""
        found = None
        for claim in self.claims.claims():
            if claim.owner == self.claim.owner:
                continue
            if claim_is_live(claim):
                found = found or claim
            else:
                log.info("removing a dead claim on the re-index lock: %s", describe_claim(claim))
                self.claims.delete(claim.owner)
        return found


@contextmanager
def index_lock(claims: ClaimStore, ttl_s: float = DEFAULT_TTL_S) -> Iterator[Lease]:
    """Hold the collection's lock for the block; raise LockHeldError if another live run has it."""
    lease = Lease(claims, ttl_s).acquire()
    try:
        yield lease
    finally:
        lease.release()


def live_holders(claims: ClaimStore) -> list[LockClaim]:
    """The claims of runs that may be running now (for status)."""
    return [claim for claim in claims.claims() if claim_is_live(claim)]
