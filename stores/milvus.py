"""Milvus store: Milvus Lite (a local folder), a Milvus server, or Zilliz Cloud.

One row per chunk::

    id           VARCHAR primary key   chunk id (32 hex chars today; room for other id schemes)
    source_id    VARCHAR               the document the chunk came from (paths can be long)
    chunk_index  INT64                 position of the chunk in its document
    text         VARCHAR               the chunk text (Milvus limits VARCHAR in UTF-8 *bytes*)
    metadata     JSON                  chunk metadata plus its start/end character offsets
    <vector>     FLOAT_VECTOR          named after the embedder's vector field ("dense")

The embedding model id and dimension are recorded as collection properties, so a spec whose
embedder differs is refused before a single row is written (:class:`StoreSchemaError`), instead
of mixing incomparable vectors into one index.

Writes are upserts by chunk id, so re-running never duplicates; transient failures (connection
loss, timeouts, rate limits) are retried with exponential backoff and jitter, which is safe because
upserts and deletes are idempotent. The access token is read from the environment variable named
by ``token_env`` only, and is scrubbed from every error message this module raises or logs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import numpy as np
from pydantic import Field, field_validator

from pipeline.component import ComponentConfig, require
from pipeline.errors import PipelineError, StoreSchemaError
from pipeline.types import Chunk
from stores import filters
from stores.base import Store

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Collection properties that make a collection self-describing.
PROPERTY_MODEL = "rag_pipeline.embedding_model"
PROPERTY_DIMENSION = "rag_pipeline.embedding_dimension"
PROPERTY_SCHEMA_VERSION = "rag_pipeline.schema_version"
SCHEMA_VERSION = "1"

ID_MAX_BYTES = 128
SOURCE_ID_MAX_BYTES = 4096
VARCHAR_MAX_BYTES = 65535  # Milvus' ceiling for a VARCHAR field
SCALAR_FIELDS = ("id", "source_id", "chunk_index", "text", "metadata")
DEFAULT_OUTPUT_FIELDS = ("source_id", "chunk_index", "text", "metadata")

# Requests stay well under the server's default 64 MiB gRPC message limit whatever the batch size.
MAX_REQUEST_BYTES = 32 * 1024 * 1024
# Source ids per delete expression: keeps each filter string small for the server's parser.
DELETE_BATCH_SIZE = 256

_MILVUS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}\Z")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SERVER_SCHEMES = ("http", "https", "tcp", "unix")
_TRANSIENT_GRPC_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED"})
_CONNECT_FAILED = 2  # pymilvus Status.CONNECT_FAILED: the first connection attempt got no answer
_RATE_LIMIT = 8  # pymilvus ErrorCode.RATE_LIMIT


class MilvusStoreError(PipelineError):
    """A Milvus operation failed after its retries; names the collection, the operation and why."""


class InvalidChunksError(ValueError):
    """Chunks that cannot be stored as they are; nothing from the call was written.

    ``problems`` maps each offending source id to its reasons, so the caller can record those
    documents as failed in the store stage and write the others.
    """

    def __init__(self, problems: dict[str, list[str]], where: str):
        self.problems = problems
        lines = [f"{_printable(source_id)}: {'; '.join(reasons)}" for source_id, reasons in problems.items()]
        super().__init__(f"{where}: {len(problems)} document(s) have chunks that cannot be stored:\n" + "\n".join(lines))

    @property
    def source_ids(self) -> list[str]:
        return list(self.problems)


def _printable(text: str) -> str:
    """``text`` as is, or quoted with escapes when it holds newlines or other control characters."""
    return text if text.isprintable() else repr(text)


@dataclass(frozen=True)
class DenseHit:
    """One search result. ``score`` is Milvus' distance: higher is closer for COSINE and IP,
    lower is closer for L2."""

    id: str
    score: float
    fields: dict[str, Any]


class IndexConfig(ComponentConfig):
    type: Literal["AUTOINDEX", "HNSW", "FLAT", "IVF_FLAT"] = "AUTOINDEX"
    metric: Literal["COSINE", "IP", "L2"] = "COSINE"
    params: dict[str, Any] = Field(
        default_factory=dict, description="Index build parameters, e.g. {M: 16, efConstruction: 200} for HNSW."
    )


class MilvusStoreConfig(ComponentConfig):
    uri: str = Field(
        "./milvus.db",
        description=(
            "A local folder ending in .db (Milvus Lite, relative to the spec's folder), "
            "or http(s)://, tcp:// or unix: for a Milvus server or Zilliz Cloud."
        ),
    )
    token_env: str = Field(
        "MILVUS_TOKEN", description="Name of the environment variable that holds the token / API key (never the token itself)."
    )
    db_name: str | None = None
    collection: str = "documents"
    vector_field: str = Field("dense", description="Must match the embedder's vector field.")
    index: IndexConfig = Field(default_factory=IndexConfig)
    # Strong: every read sees every write acknowledged before it, so a count or search right after
    # an ingest (or a delete) sees its effect. On a distributed server that costs read latency,
    # since queries wait for the newest timestamp; a search-heavy service that tolerates a few
    # seconds of staleness can choose Bounded (Milvus' own default). count() is always Strong.
    consistency_level: Literal["Strong", "Bounded", "Session", "Eventually"] = "Strong"
    text_max_length: int = Field(
        VARCHAR_MAX_BYTES, ge=1, le=VARCHAR_MAX_BYTES,
        description="Bytes of UTF-8 per chunk text; longer chunks are refused, never truncated.",
    )
    write_batch_size: int = Field(512, ge=1, description="Rows per upsert request.")
    timeout_s: float = Field(30.0, gt=0, description="Per-request timeout.")
    max_attempts: int = Field(5, ge=1, description="Tries per request when the failure is transient.")
    retry_max_wait_s: float = Field(20.0, gt=0, description="Longest pause between tries.")

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, value: str) -> str:
        scheme = urlsplit(value).scheme.lower()
        if scheme in _SERVER_SCHEMES:
            parts = urlsplit(value)
            if parts.username or parts.password:
                raise ValueError("the uri must not carry credentials: put the token in the environment variable named by token_env")
            return value
        if not value.endswith(".db"):
            raise ValueError(
                f"{value!r} is neither a server address (http://, https://, tcp://, unix:) nor a Milvus Lite "
                "folder: Milvus Lite paths must end in .db, e.g. ./index.db"
            )
        return value

    @field_validator("collection", "db_name")
    @classmethod
    def _check_milvus_name(cls, value: str | None) -> str | None:
        if value is not None and not _MILVUS_NAME.match(value):
            raise ValueError(
                f"{value!r} is not a valid Milvus name: use letters, digits and underscores, "
                "start with a letter or underscore, at most 255 characters"
            )
        return value

    @field_validator("vector_field")
    @classmethod
    def _check_vector_field(cls, value: str) -> str:
        filters.field_name(value)
        if value in SCALAR_FIELDS:
            raise ValueError(f"the vector field cannot be named {value!r}: the store uses that name for {', '.join(SCALAR_FIELDS)}")
        return value

    @field_validator("token_env")
    @classmethod
    def _check_token_env(cls, value: str) -> str:
        if not _ENV_NAME.match(value):
            raise ValueError("token_env is the *name* of an environment variable (e.g. MILVUS_TOKEN), not the token")
        return value


@dataclass(frozen=True)
class Endpoint:
    """Where the collection lives, resolved against the spec's folder."""

    uri: str  # what pymilvus is given: an absolute Lite folder path or the server URI
    db_name: str
    lite_path: Path | None  # the data folder for Milvus Lite, None for a server

    def describe(self) -> str:
        where = str(self.lite_path) if self.lite_path else self.uri
        return f"{where} (database {self.db_name!r})" if self.db_name else where


# --------------------------------------------------------------------------------------------
# Clients: one per (endpoint, token) per process. Milvus Lite lets one process open a data folder
# once, so the ingest path and a query path in the same service must share a client.


@dataclass
class _PooledClient:
    client: Any
    users: int


class _ClientPool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str, str], _PooledClient] = {}

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
                _stop_lite_server(endpoint.lite_path)


_clients = _ClientPool()


def _stop_lite_server(path: Path) -> None:
    """Flush and unlock a Milvus Lite folder so other processes (or a later reopen) can use it."""
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:
        return
    server_manager_instance.release_server(str(path))


def _lite_folder_locked_elsewhere(path: Path) -> bool:
    """Whether another process holds Milvus Lite's lock on ``path`` (probed after a failed open)."""
    lock_file = path / "LOCK"  # milvus_lite.db.LOCK_FILENAME
    if not lock_file.is_file():
        return False
    try:
        import fcntl
    except ImportError:  # Windows: Lite uses msvcrt locks there; give the generic message
        return False
    fd = os.open(lock_file, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
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


# --------------------------------------------------------------------------------------------
# The existing collection, as described by Milvus.


@dataclass(frozen=True)
class CollectionLayout:
    """What an existing collection holds: enough to check it against a spec and to validate rows."""

    fields: dict[str, tuple[str, dict[str, Any], bool]]  # name -> (data type name, params, is primary)
    properties: dict[str, str]
    metric: str | None

    @classmethod
    def from_description(cls, description: dict[str, Any], metric: str | None) -> CollectionLayout:
        fields = {
            f["name"]: (getattr(f["type"], "name", str(f["type"])), dict(f.get("params") or {}), bool(f.get("is_primary")))
            for f in description.get("fields", [])
        }
        properties = {str(k): str(v) for k, v in (description.get("properties") or {}).items()}
        return cls(fields=fields, properties=properties, metric=metric)

    def dimension(self, vector_field: str) -> int | None:
        kind, params, _ = self.fields.get(vector_field, ("", {}, False))
        return int(params["dim"]) if kind == "FLOAT_VECTOR" and "dim" in params else None

    def max_bytes(self, name: str) -> int:
        return int(self.fields[name][1].get("max_length", VARCHAR_MAX_BYTES))

    @property
    def model_id(self) -> str | None:
        return self.properties.get(PROPERTY_MODEL)

    def problems(self, where: str, vector_field: str, dimension: int, model_id: str, metric: str) -> list[str]:
        expected = {
            "id": "VARCHAR",
            "source_id": "VARCHAR",
            "chunk_index": "INT64",
            "text": "VARCHAR",
            "metadata": "JSON",
            vector_field: "FLOAT_VECTOR",
        }
        problems = []
        for name, kind in expected.items():
            if name not in self.fields:
                problems.append(f"{where} has no field {name!r} ({kind}) that the store writes")
            elif self.fields[name][0] != kind:
                problems.append(f"{where} field {name!r} is {self.fields[name][0]}, the store writes {kind}")
        if "id" in self.fields and not self.fields["id"][2]:
            problems.append(f"{where} field 'id' is not the primary key, so upserts would duplicate rows")
        if self.model_id is None:
            problems.append(
                f"{where} records no embedding model, so it was not created by rag-pipeline; "
                "use another collection name, or drop this collection to rebuild it"
            )
        stored_dimension = self.dimension(vector_field)
        if stored_dimension is not None and stored_dimension != dimension:
            problems.append(
                f"{where} stores {stored_dimension}-d vectors from model {self.model_id or 'unknown'}; the spec's "
                f"embedder makes {dimension}-d vectors with model {model_id}. Use a new collection name "
                "(or drop this one to rebuild it with the new model)"
            )
        elif self.model_id is not None and self.model_id != model_id:
            problems.append(
                f"{where} stores vectors from model {self.model_id}; the spec's embedder is {model_id}. "
                "Vectors from different models are not comparable: use a new collection name "
                "(or drop this one to rebuild it with the new model)"
            )
        if self.metric is not None and self.metric != metric:
            problems.append(f"{where} indexes {vector_field!r} with metric {self.metric}; the spec says {metric}")
        return problems


# --------------------------------------------------------------------------------------------


@dataclass
class _Row:
    values: dict[str, Any]
    size: int  # rough request bytes, to keep requests under the message limit


@dataclass
class _ChunkRows:
    rows: list[_Row] = field(default_factory=list)
    problems: dict[str, list[str]] = field(default_factory=dict)


class MilvusStore(Store):
    type_name = "milvus"
    Config = MilvusStoreConfig
    config: MilvusStoreConfig

    def __init__(self, config: MilvusStoreConfig | dict[str, Any] | None = None, /, **settings: Any):
        super().__init__(config, **settings)
        self._client: Any = None
        self._opened: tuple[Endpoint, str] | None = None  # what the pool must be told on close()
        self._layout: CollectionLayout | None = None  # set once the collection is known to fit and is loaded

    # ---- settings -----------------------------------------------------------------------

    def fingerprint_settings(self) -> dict[str, Any]:
        """Where the rows go and how they are indexed; not speed, retry or credential settings."""
        settings = self.to_dict()
        for key in ("write_batch_size", "timeout_s", "max_attempts", "retry_max_wait_s", "token_env", "consistency_level"):
            settings.pop(key, None)
        return settings

    @property
    def endpoint(self) -> Endpoint:
        uri = self.config.uri
        if urlsplit(uri).scheme.lower() in _SERVER_SCHEMES:
            return Endpoint(uri=uri, db_name=self.config.db_name or "", lite_path=None)
        path = self.resolve_path(uri).resolve()
        return Endpoint(uri=str(path), db_name=self.config.db_name or "", lite_path=path)

    @property
    def where(self) -> str:
        return f"collection {self.config.collection!r} at {self.endpoint.describe()}"

    def _token(self) -> str:
        if self.endpoint.lite_path is not None:
            return ""
        return os.environ.get(self.config.token_env, "")

    def _scrub(self, text: str) -> str:
        token = os.environ.get(self.config.token_env, "")
        return text.replace(token, "***") if token else text

    # ---- calling Milvus -----------------------------------------------------------------

    def _call(self, operation: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn`` with retries for transient failures; any final failure as a scrubbed MilvusStoreError."""
        tenacity = require("tenacity", purpose="retrying Milvus requests")

        def log_retry(state: Any) -> None:
            error = state.outcome.exception()
            logger.warning(
                "%s: %s failed (attempt %d of %d), retrying: %s",
                self.where, operation, state.attempt_number, self.config.max_attempts,
                self._scrub(f"{type(error).__name__}: {error}"),
            )

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.config.max_attempts),
            wait=tenacity.wait_exponential_jitter(initial=0.5, max=self.config.retry_max_wait_s, jitter=0.5),
            retry=tenacity.retry_if_exception(_is_transient),
            before_sleep=log_retry,
            reraise=True,
        )
        try:
            return retrying(fn, *args, **kwargs)
        except (MilvusStoreError, StoreSchemaError):
            raise
        except Exception as exc:
            # Re-raised without the original chained, whose text and frames could carry the token.
            reason = self._scrub(f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}")
            raise MilvusStoreError(f"{self.where}: {operation} failed: {reason}") from None

    def _connect(self) -> Any:
        if self._client is not None:
            return self._client
        endpoint, token = self.endpoint, self._token()
        self._check_lite_folder(endpoint)
        client = self._call("connect", _clients.acquire, endpoint, token, lambda: self._open_client(endpoint, token))
        self._client, self._opened = client, (endpoint, token)
        return client

    def _open_client(self, endpoint: Endpoint, token: str) -> Any:
        pymilvus = require("pymilvus", purpose="the Milvus store")
        try:
            return pymilvus.MilvusClient(uri=endpoint.uri, token=token, db_name=endpoint.db_name, timeout=self.config.timeout_s)
        except pymilvus.exceptions.ConnectionConfigException as exc:
            if endpoint.lite_path is not None and _lite_folder_locked_elsewhere(endpoint.lite_path):
                raise MilvusStoreError(
                    f"{self.where}: {endpoint.lite_path} is in use by another process (Milvus Lite allows one "
                    "process per data folder); stop that process, or use a Milvus server for concurrent access"
                ) from None
            if endpoint.lite_path is not None:
                raise MilvusStoreError(f"{self.where}: cannot open the Milvus Lite folder: {exc.message}") from None
            raise

    def _check_lite_folder(self, endpoint: Endpoint) -> None:
        path = endpoint.lite_path
        if path is not None and path.exists() and not path.is_dir():
            raise MilvusStoreError(
                f"{self.where}: {path} is a file, but Milvus Lite 3 keeps its data in a folder "
                "(a single-file .db comes from Milvus Lite 2.x, which this version cannot read); choose another uri"
            )

    def _lite_folder_missing(self) -> bool:
        """True for a Milvus Lite uri whose folder does not exist yet: nothing to read, nothing to create."""
        path = self.endpoint.lite_path
        return path is not None and not path.exists()

    def _database_exists(self, client: Any) -> bool:
        db_name = self.config.db_name
        return not db_name or db_name in self._call("list databases", client.list_databases, timeout=self.config.timeout_s)

    def _collection_exists(self, client: Any) -> bool:
        if not self._database_exists(client):
            return False
        return self._call("has_collection", client.has_collection, self.config.collection, timeout=self.config.timeout_s)

    def _describe(self, client: Any) -> CollectionLayout:
        name, timeout = self.config.collection, self.config.timeout_s
        description = self._call("describe collection", client.describe_collection, name, timeout=timeout)
        metric = None
        index_names = self._call("list indexes", client.list_indexes, name, field_name=self.config.vector_field)
        if index_names:
            index = self._call("describe index", client.describe_index, name, index_names[0], timeout=timeout)
            metric = index.get("metric_type")
        return CollectionLayout.from_description(description, metric)

    def _schema_problems(self, layout: CollectionLayout, dimension: int, model_id: str) -> list[str]:
        return layout.problems(self.where, self.config.vector_field, dimension, model_id, self.config.index.metric)

    def _load(self, client: Any) -> None:
        """A collection reopened from disk (Lite) or released on a server must be loaded to be read."""
        name, timeout = self.config.collection, self.config.timeout_s
        state = self._call("get load state", client.get_load_state, name, timeout=timeout)
        if getattr(state.get("state"), "name", "") != "Loaded":
            self._call("load collection", client.load_collection, name, timeout=timeout)

    def _existing(self) -> tuple[Any, CollectionLayout] | None:
        """Client and layout of the existing collection, loaded; None when it does not exist.

        Reads and writes work without ``prepare`` (a query service has no reason to call it), and
        a missing Milvus Lite folder is not created just to find it empty.
        """
        if self._layout is not None:
            return self._client, self._layout
        if self._lite_folder_missing():
            return None
        client = self._connect()
        if not self._collection_exists(client):
            return None
        layout = self._describe(client)
        if layout.dimension(self.config.vector_field) is None:
            raise StoreSchemaError(f"{self.where} has no FLOAT_VECTOR field {self.config.vector_field!r}")
        self._load(client)
        self._layout = layout
        return client, layout

    def _ready(self) -> tuple[Any, CollectionLayout]:
        existing = self._existing()
        if existing is None:
            raise MilvusStoreError(f"{self.where} does not exist; run an ingest first (prepare creates it)")
        return existing

    # ---- Store API ----------------------------------------------------------------------

    def check(self, dimension: int, model_id: str) -> list[str]:
        """Problems that ``prepare`` would raise; creates nothing (not even a Milvus Lite folder)."""
        if self._lite_folder_missing():
            return []
        try:
            client = self._connect()
            if not self._collection_exists(client):
                return []
            return self._schema_problems(self._describe(client), dimension, model_id)
        except MilvusStoreError as exc:
            return [str(exc)]

    def prepare(self, dimension: int, model_id: str) -> None:
        """Create the collection, or check that the existing one fits; then load it."""
        if isinstance(dimension, bool) or not isinstance(dimension, int) or dimension <= 0:
            raise ValueError(f"{self.where}: the vector dimension must be a positive integer, got {dimension!r}")
        if not model_id:
            raise ValueError(f"{self.where}: the embedder reported no model id")
        lite_path = self.endpoint.lite_path
        if lite_path is not None:
            lite_path.parent.mkdir(parents=True, exist_ok=True)
        client = self._connect()
        if self.config.db_name and not self._database_exists(client):
            self._call("create database", client.create_database, self.config.db_name, timeout=self.config.timeout_s)
        if not self._collection_exists(client):
            self._create(client, dimension, model_id)
        layout = self._describe(client)
        problems = self._schema_problems(layout, dimension, model_id)
        if problems:
            raise StoreSchemaError("\n".join(problems))
        self._load(client)
        self._layout = layout

    def _create(self, client: Any, dimension: int, model_id: str) -> None:
        pymilvus = require("pymilvus", purpose="the Milvus store")
        DataType = pymilvus.DataType
        schema = pymilvus.MilvusClient.create_schema(
            auto_id=False, enable_dynamic_field=False, description=f"rag-pipeline chunks embedded with {model_id} ({dimension}-d)"
        )
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX_BYTES)
        schema.add_field("source_id", DataType.VARCHAR, max_length=SOURCE_ID_MAX_BYTES)
        schema.add_field("chunk_index", DataType.INT64)
        schema.add_field("text", DataType.VARCHAR, max_length=self.config.text_max_length)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field(self.config.vector_field, DataType.FLOAT_VECTOR, dim=dimension)
        index_params = client.prepare_index_params()
        index = self.config.index
        index_params.add_index(self.config.vector_field, index_type=index.type, metric_type=index.metric, params=dict(index.params))
        properties = {PROPERTY_MODEL: model_id, PROPERTY_DIMENSION: str(dimension), PROPERTY_SCHEMA_VERSION: SCHEMA_VERSION}
        logger.info("creating %s for %d-d vectors from %s", self.where, dimension, model_id)
        try:
            self._call(
                "create collection", client.create_collection, self.config.collection,
                schema=schema, index_params=index_params, consistency_level=self.config.consistency_level,
                properties=properties, timeout=self.config.timeout_s,
            )
        except MilvusStoreError:
            # Another process may have created it meanwhile; the caller then checks that it fits.
            if not self._collection_exists(client):
                raise

    def upsert(self, chunks: Sequence[Chunk], batch_size: int | None = None) -> int:
        """Insert or replace ``chunks`` by id, in batches; returns the number of rows written.

        Every chunk is validated first: if any cannot be stored (text over the byte limit, wrong
        vector, ...) nothing is written and :class:`InvalidChunksError` names the documents. A
        request that still fails after its retries raises :class:`MilvusStoreError`; earlier
        batches of the call may then be stored already, which a re-run simply overwrites.
        """
        if not chunks:
            return 0
        client, layout = self._ready()
        prepared = self._rows(chunks, layout)
        if prepared.problems:
            raise InvalidChunksError(prepared.problems, f"store stage, {self.where}")
        for batch in _batches(prepared.rows, batch_size or self.config.write_batch_size, MAX_REQUEST_BYTES):
            self._call(
                "upsert", client.upsert, self.config.collection, [row.values for row in batch], timeout=self.config.timeout_s
            )
        return len(prepared.rows)

    def _rows(self, chunks: Sequence[Chunk], layout: CollectionLayout) -> _ChunkRows:
        limits = {name: layout.max_bytes(name) for name in ("id", "source_id", "text")}
        dimension = layout.dimension(self.config.vector_field)
        result = _ChunkRows()
        rows_by_id: dict[str, _Row] = {}  # the same id twice in one call: the last one wins, as in an upsert
        for chunk in chunks:
            row = self._row(chunk, limits, dimension)
            if isinstance(row, _Row):
                rows_by_id[chunk.id] = row
            else:
                result.problems.setdefault(chunk.source_id, []).extend(row)
        result.rows = list(rows_by_id.values())
        return result

    def _row(self, chunk: Chunk, limits: dict[str, int], dimension: int | None) -> _Row | list[str]:
        """The row for ``chunk``, or why it cannot be stored (never truncated to fit)."""
        label = f"chunk {chunk.index} (id {chunk.id[:ID_MAX_BYTES]!r})"
        reasons = []
        sizes = {}
        for name, limit in limits.items():
            try:
                sizes[name] = len(getattr(chunk, name).encode("utf-8"))
            except UnicodeEncodeError:
                reasons.append(f"{label}: {name} is not valid Unicode text (it holds a lone surrogate)")
                continue
            if sizes[name] > limit:
                reasons.append(f"{label}: {name} is {sizes[name]} bytes of UTF-8, over the collection's limit of {limit}")
        if not chunk.id:
            reasons.append(f"{label}: the id is empty")
        vector = _vector_problem_or_list(chunk.vectors.get(self.config.vector_field), dimension)
        if isinstance(vector, str):
            reasons.append(f"{label}: {self.config.vector_field!r} vector {vector}")
        try:
            metadata = _json_ready({**chunk.metadata, "start": chunk.start, "end": chunk.end})
        except (TypeError, ValueError) as exc:
            reasons.append(f"{label}: metadata cannot be stored as JSON: {exc}")
        if reasons:
            return reasons
        values = {
            "id": chunk.id,
            "source_id": chunk.source_id,
            "chunk_index": int(chunk.index),
            "text": chunk.text,
            "metadata": metadata,
            self.config.vector_field: vector,
        }
        return _Row(values, sum(sizes.values()) + len(json.dumps(metadata)) + 4 * len(vector) + 64)

    def delete_sources(self, source_ids: Sequence[str]) -> None:
        """Delete every chunk of these sources (filter built with escaped literals)."""
        ids = list(dict.fromkeys(source_ids))
        existing = self._existing() if ids else None
        if existing is None:
            return
        client, _ = existing
        for start in range(0, len(ids), DELETE_BATCH_SIZE):
            expression = filters.in_list("source_id", ids[start : start + DELETE_BATCH_SIZE])
            self._call("delete", client.delete, self.config.collection, filter=expression, timeout=self.config.timeout_s)

    def delete_stale(self, keep: Mapping[str, Sequence[str]]) -> None:
        """Delete chunks of these sources whose ids are not in ``keep[source_id]``.

        One query lists the sources' current chunk ids; only ids that are really stale are
        deleted, so a first ingest costs a query per batch and no deletes.
        """
        existing = self._existing() if keep else None
        if existing is None:
            return
        client, _ = existing
        keep_sets = {source_id: set(ids) for source_id, ids in keep.items()}
        source_ids = list(keep_sets)
        stale: list[str] = []
        for start in range(0, len(source_ids), DELETE_BATCH_SIZE):
            # An iterator, not a plain query: one large document can own more chunks than a
            # single query may return. (pymilvus pages with an unescaped `id > "<last id>"`,
            # which is safe here because chunk ids are hex digests.)
            iterator = self._call(
                "query", client.query_iterator, self.config.collection, batch_size=4096,
                filter=filters.in_list("source_id", source_ids[start : start + DELETE_BATCH_SIZE]),
                output_fields=["id", "source_id"], timeout=self.config.timeout_s,
            )
            try:
                while rows := self._call("query", iterator.next):
                    stale.extend(row["id"] for row in rows if row["id"] not in keep_sets[row["source_id"]])
            finally:
                iterator.close()
        for start in range(0, len(stale), DELETE_BATCH_SIZE):
            expression = filters.in_list("id", stale[start : start + DELETE_BATCH_SIZE])
            self._call("delete", client.delete, self.config.collection, filter=expression, timeout=self.config.timeout_s)

    def count(self) -> int:
        """Exact number of rows (a Strong-consistency count, whatever the configured level)."""
        existing = self._existing()
        if existing is None:
            return 0
        client, _ = existing
        result = self._call(
            "count", client.query, self.config.collection, filter="", output_fields=["count(*)"],
            consistency_level="Strong", timeout=self.config.timeout_s,
        )
        return int(result[0]["count(*)"])

    def search_dense(
        self,
        vector: Sequence[float] | np.ndarray,
        top_k: int = 10,
        filter_expr: str | None = None,
        output_fields: Sequence[str] = DEFAULT_OUTPUT_FIELDS,
        search_params: dict[str, Any] | None = None,
    ) -> list[DenseHit]:
        """The ``top_k`` rows nearest to ``vector``, best first.

        ``filter_expr`` must be built with :mod:`stores.filters` when it contains any outside value.
        """
        if top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}")
        client, layout = self._ready()
        query = _vector_problem_or_list(vector, layout.dimension(self.config.vector_field))
        if isinstance(query, str):
            raise ValueError(f"{self.where}: query vector {query}")
        params = {"metric_type": layout.metric or self.config.index.metric, "params": dict(search_params or {})}
        results = self._call(
            "search", client.search, self.config.collection, data=[query], anns_field=self.config.vector_field,
            limit=top_k, filter=filter_expr or "", output_fields=list(output_fields), search_params=params,
            consistency_level=self.config.consistency_level, timeout=self.config.timeout_s,
        )
        return [DenseHit(id=str(hit["id"]), score=float(hit["distance"]), fields=dict(hit.get("entity") or {})) for hit in results[0]]

    def close(self) -> None:
        """Release this store's share of the client; the last user closes it (and unlocks a Lite folder)."""
        if self._opened is not None:
            endpoint, token = self._opened
            self._client = self._opened = self._layout = None
            _clients.release(endpoint, token)


def _vector_problem_or_list(vector: Any, dimension: int | None) -> list[float] | str:
    """The vector as a list of floats, or a sentence saying what is wrong with it."""
    if vector is None:
        return "is missing (was the chunk embedded?)"
    array = np.asarray(vector, dtype=np.float32)
    if array.ndim != 1:
        return f"has shape {array.shape}, expected one row"
    if dimension is not None and array.shape[0] != dimension:
        return f"has {array.shape[0]} dimensions, the collection stores {dimension}"
    if not np.isfinite(array).all():
        return "contains NaN or infinite values"
    return array.tolist()


def _batches(rows: list[_Row], max_rows: int, max_bytes: int) -> Iterator[list[_Row]]:
    batch: list[_Row] = []
    size = 0
    for row in rows:
        if batch and (len(batch) >= max_rows or size + row.size > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(row)
        size += row.size
    if batch:
        yield batch


__all__ = [
    "CollectionLayout",
    "DenseHit",
    "Endpoint",
    "InvalidChunksError",
    "MilvusStore",
    "MilvusStoreConfig",
    "MilvusStoreError",
]
