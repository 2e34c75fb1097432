"""Reaching Milvus: endpoints, one shared client per endpoint and token per process, Milvus Lite's
database lock, and which failures are transient (retried)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.component import require
from stores.milvus.config import _CONNECT_FAILED, _RATE_LIMIT, _TRANSIENT_GRPC_CODES

logger = logging.getLogger("stores.milvus")


class _LiteIteratorTimestampFilter(logging.Filter):
    """Drops pymilvus's "failed to get mvccTs from milvus server" warning. Milvus Lite returns no
    session timestamp for a query iterator, so pymilvus warns once per iterator and pages at the
    client's clock instead, which is exact for a database that one process holds."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to get mvccTs" not in record.getMessage()


def _quiet_lite_iterator_timestamp_warning() -> None:
    iterator_log = logging.getLogger("pymilvus.client.iterator.query_iterator")
    if not any(isinstance(existing, _LiteIteratorTimestampFilter) for existing in iterator_log.filters):
        iterator_log.addFilter(_LiteIteratorTimestampFilter())


@dataclass(frozen=True)
class Endpoint:
    """Where the collection lives, resolved against the spec's folder."""

    uri: str  # what pymilvus is given: an absolute Milvus Lite path or the server URI
    db_name: str
    lite_path: Path | None  # the Milvus Lite database (a file for 2.5, a folder for 3), None for a server

    def describe(self) -> str:
        where = str(self.lite_path) if self.lite_path else self.uri
        return f"{where} (database {self.db_name!r})" if self.db_name else where


# --------------------------------------------------------------------------------------------
# Clients: one per (endpoint, token) per process. Milvus Lite lets one process open a database
# once, so the ingest path and a query path in the same service must share a client.


@dataclass
class _PooledClient:
    client: Any
    users: int


class _ClientPool:
    def __init__(self) -> None:
        self._lock = threading.RLock()  # re-entered: opening a client asks whether its Lite file is in use
        self._entries: dict[tuple[str, str, str], _PooledClient] = {}
        self._lite_locks: dict[str, int] = {}  # Milvus Lite path -> our lock's file descriptor

    @staticmethod
    def _key(endpoint: Endpoint, token: str) -> tuple[str, str, str]:
        # A digest, so the pool's keys never hold the secret itself.
        return (endpoint.uri, endpoint.db_name, hashlib.sha256(token.encode()).hexdigest())

    def acquire(self, endpoint: Endpoint, token: str, open_client: Callable[[], Any]) -> Any:
        key = self._key(endpoint, token)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _PooledClient(open_client(), 0)
            entry.users += 1
            return entry.client

    def in_use(self, lite_path: Path) -> bool:
        with self._lock:
            return any(uri == str(lite_path) for uri, _, _ in self._entries)

    def hold_lite_lock(self, lite_path: Path) -> bool:
        """Take this process's lock on a Milvus Lite database; False when another process holds it.

        Our own lock, beside Lite's: Milvus Lite 2.5 deletes its lock file when an open fails, so
        a third process could then open a database that the first still writes. An flock is
        released by the kernel when its process ends, however it ends.
        """
        with self._lock:
            if str(lite_path) in self._lite_locks:
                return True
            try:
                import fcntl
            except ImportError:  # Windows: rely on Milvus Lite's own lock
                return True
            fd = os.open(_own_lock_file(lite_path), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            self._lite_locks[str(lite_path)] = fd
            return True

    def drop_lite_lock(self, lite_path: Path) -> None:
        with self._lock:
            fd = self._lite_locks.pop(str(lite_path), None)
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock

    def release(self, endpoint: Endpoint, token: str) -> None:
        key = self._key(endpoint, token)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            entry.users -= 1
            if entry.users > 0:
                return
            del self._entries[key]
            still_used = any(uri == endpoint.uri for uri, _, _ in self._entries)
        try:
            entry.client.close()
        finally:
            if endpoint.lite_path is not None and not still_used:
                try:
                    _stop_lite_server(endpoint.lite_path)
                finally:
                    self.drop_lite_lock(endpoint.lite_path)


_clients = _ClientPool()


def _lite_version() -> str:
    try:
        return importlib.metadata.version("milvus-lite")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _lite_major_version() -> int:
    """The installed Milvus Lite's major version (3 when unknown: the engine this project targets)."""
    head = _lite_version().split(".", 1)[0]
    return int(head) if head.isdigit() else 3


def _stop_lite_server(path: Path) -> None:
    """Flush and unlock a Milvus Lite database so other processes (or a later reopen) can use it."""
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:
        return
    server_manager_instance.release_server(str(path))


def _own_lock_file(path: Path) -> Path:
    return path.with_name(f".{path.name}.rag-pipeline.lock")


def _lite_lock_file(path: Path) -> Path:
    # Milvus Lite 3 locks <folder>/LOCK; 2.5 locks a hidden sibling of its file, .<name>.lock.
    return path / "LOCK" if path.is_dir() else path.with_name(f".{path.name}.lock")


def _lite_database_locked_elsewhere(path: Path) -> bool:
    """Whether another process holds Milvus Lite's lock on ``path`` (probed after a failed open)."""
    lock_file = _lite_lock_file(path)
    if not lock_file.is_file() or _clients.in_use(path):
        # In use here: a POSIX lock probe from this process would succeed, and closing the probe
        # would drop this process's own lock.
        return False
    try:
        import fcntl
    except ImportError:  # Windows: Lite uses msvcrt locks there; give the generic message
        return False
    # Lite 3 takes a flock, Lite 2.5 a POSIX record lock (lockf); the two do not see each other.
    lock = fcntl.flock if path.is_dir() else fcntl.lockf
    fd = os.open(lock_file, os.O_RDWR)
    try:
        lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        lock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _is_transient(exc: BaseException) -> bool:
    """Connection loss, timeouts and rate limits are worth retrying; bad input and schema errors are not."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    grpc = require("grpc", purpose="the Milvus store")
    pymilvus = require("pymilvus", purpose="the Milvus store")
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        return getattr(code, "name", "") in _TRANSIENT_GRPC_CODES
    if isinstance(exc, pymilvus.exceptions.MilvusException):
        # getattr: older pymilvus releases lack the server's own classification.
        if getattr(exc, "is_input_error", False):
            return False
        if getattr(exc, "retriable", False) or isinstance(exc, pymilvus.exceptions.MilvusUnavailableException):
            return True
        code = exc.code
        if isinstance(code, grpc.StatusCode):  # pymilvus passes gRPC codes through after its own retries
            return code.name in _TRANSIENT_GRPC_CODES
        return code in (_CONNECT_FAILED, _RATE_LIMIT)
    return False


def _json_ready(value: Any) -> Any:
    """Metadata as plain JSON types (numpy scalars and tuples included); raises on anything else."""
    return json.loads(json.dumps(value, allow_nan=False, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
