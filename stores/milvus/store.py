"""Milvus store: Milvus Lite (a local .db path), a Milvus server, or Zilliz Cloud.

One row per chunk::

    id           VARCHAR primary key   chunk id (32 hex chars today; room for other id schemes)
    source_id    VARCHAR               the document the chunk came from (paths can be long)
    chunk_index  INT64                 position of the chunk in its document
    text         VARCHAR               the chunk text (Milvus limits VARCHAR in UTF-8 *bytes*)
    metadata     JSON                  chunk metadata plus its start/end character offsets
    <vector>     FLOAT_VECTOR          named after the embedder's vector field ("dense"); FLOAT16_VECTOR
                                       or BINARY_VECTOR with ``vector_storage: float16 | binary``

The embedding model id and dimension are recorded with the collection (as collection properties,
and as JSON in the schema description for engines that drop properties, such as Milvus Lite 2.5),
so a spec whose embedder differs is refused before a single row is written
(:class:`StoreSchemaError`), instead of mixing incomparable vectors into one index.

Milvus Lite comes in two engines with different files: 2.5 (the C++ engine, the default here: fast
search, real analyzers) keeps a database in one file and has no aliases, partitions or HNSW; 3.x
(pure Python) keeps it in a folder and has all three, but scans rows on every search.

Writes are upserts by chunk id, so re-running never duplicates; transient failures (connection
loss, timeouts, rate limits) are retried with exponential backoff and jitter, which is safe because
upserts and deletes are idempotent. The access token is read from the environment variable named
by ``token_env`` only, and is scrubbed from every error message this module raises or logs.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np

from core.component import require
from core.errors import StoreSchemaError
from core.filters import Filter
from core.records import RecordStore
from core.search import BRANCHES, Branch, Fusion, Hit, RRFFusion, SearchRequest, check_hybrid
from core.secrets import register_secret, scrub
from core.types import Chunk
from stores import filters, server_features
from stores.base import IndexSchema, Rebuild, Store
from stores.filters import compile_filter
from stores.milvus.config import (
    _ESCAPE_IN_LITERAL,
    _SERVER_SCHEMES,
    _UNESCAPED_PREFIX,
    DEFAULT_OUTPUT_FIELDS,
    DELETE_BATCH_SIZE,
    DESCRIPTION_KEY,
    ID_MAX_BYTES,
    JSON_MAX_BYTES,
    LITE2_INDEX_TYPES,
    MAX_DIMENSION,
    MAX_REQUEST_BYTES,
    PROPERTY_DIMENSION,
    PROPERTY_MODEL,
    PROPERTY_SCHEMA_VERSION,
    PROPERTY_SPARSE_MODEL,
    QUERY_PAGE_ROWS,
    QUERY_PAGE_VECTOR_BYTES,
    QUERY_WINDOW,
    SCHEMA_VERSION,
    SOURCE_ID_MAX_BYTES,
    VECTOR_FIELD_TYPES,
    MilvusStoreConfig,
    encode_vector,
)
from stores.milvus.connection import (
    Endpoint,
    _clients,
    _is_transient,
    _json_ready,
    _lite_database_locked_elsewhere,
    _lite_lock_file,
    _lite_major_version,
    _lite_version,
    _own_lock_file,
    _quiet_lite_iterator_timestamp_warning,
)
from stores.milvus.errors import DatabaseInUseError, InvalidChunksError, MilvusStoreError
from stores.milvus.layout import CollectionLayout
from stores.milvus.leases import MilvusClaims
from stores.milvus.rebuild import REBUILD_INFIX, start_rebuild
from stores.milvus.records import RECORDS_SUFFIX, MilvusRecords

T = TypeVar("T")
B = TypeVar("B")
READ_FILTER_IDS = (
    4096  # source ids per `in` filter of a read (Lite: 4,096 per query read 20,000 sources 8x faster than 256)
)
READ_FILTER_BYTES = 256 << 10  # and no more than this much of them, so the server's parser gets a bounded expression

logger = logging.getLogger("stores.milvus")


@dataclass(frozen=True)
class DenseHit:
    """One search result. ``score`` is Milvus' distance: higher is closer for COSINE and IP,
    lower is closer for L2."""

    id: str
    score: float
    fields: dict[str, Any]


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
        self._layout: CollectionLayout | None = None  # set once the collection is known to fit
        self._loaded = False  # whether this store loaded its collection (for reads)

    # ---- settings -----------------------------------------------------------------------

    def fingerprint_settings(self) -> dict[str, Any]:
        """Where the rows go and how they are indexed; not speed, retry or credential settings."""
        settings = self.to_dict()
        for key in (
            "write_batch_size",
            "timeout_s",
            "max_attempts",
            "retry_max_wait_s",
            "token_env",
            "consistency_level",
        ):
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

    @property
    def name(self) -> str:
        return self.config.collection

    def _token(self) -> str:
        if self.endpoint.lite_path is not None:
            return ""
        token = os.environ.get(self.config.token_env, "")
        register_secret(token)  # before the client sends it: its debug logs and errors are scrubbed too
        return token

    def _scrub(self, text: str) -> str:
        # Registered here as well: an error can come before the first connection read the token.
        register_secret(os.environ.get(self.config.token_env, ""))
        return scrub(text)

    # ---- calling Milvus -----------------------------------------------------------------

    def call(self, operation: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn`` with retries for transient failures; any final failure as a scrubbed MilvusStoreError."""
        tenacity = require("tenacity", purpose="retrying Milvus requests")
        if isinstance(kwargs.get("filter"), str):
            kwargs["filter"] = self._engine_filter(kwargs["filter"])

        def log_retry(state: Any) -> None:
            error = state.outcome.exception()
            logger.warning(
                "%s: %s failed (attempt %d of %d), retrying: %s",
                self.where,
                operation,
                state.attempt_number,
                self.config.max_attempts,
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
            result: T = retrying(fn, *args, **kwargs)
            return result
        except (MilvusStoreError, StoreSchemaError):
            raise
        except Exception as exc:
            # Re-raised without the original chained, whose text and frames could carry the token.
            reason = self._scrub(f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}")
            raise MilvusStoreError(f"{self.where}: {operation} failed: {reason}") from None

    def client(self) -> Any:
        """The pymilvus client of this store's endpoint, shared in this process (see connection._ClientPool);
        the index record and the lock claims reach Milvus through it and :meth:`call`."""
        if self._client is not None:
            return self._client
        endpoint, token = self.endpoint, self._token()
        self._check_lite_database(endpoint)
        client = self.call("connect", _clients.acquire, endpoint, token, lambda: self._open_client(endpoint, token))
        self._client, self._opened = client, (endpoint, token)
        return client

    def _open_client(self, endpoint: Endpoint, token: str) -> Any:
        pymilvus = require("pymilvus", purpose="the Milvus store")
        if endpoint.lite_path is not None:
            # Milvus Lite serves gRPC inside this process and logs a traceback for every call it
            # does not implement (pymilvus probes AllocTimestamp and falls back by itself).
            logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
        if endpoint.lite_path is not None:
            endpoint.lite_path.parent.mkdir(parents=True, exist_ok=True)
        # Our own lock first: a failed open of Milvus Lite 2.5 deletes the lock file that the other
        # process holds, so probing Lite's lock after the failure could find nothing.
        if endpoint.lite_path is not None and not _clients.hold_lite_lock(endpoint.lite_path):
            raise self._in_use_elsewhere(endpoint.lite_path)
        # pymilvus pings every 10 s; Milvus Lite's gRPC server allows one ping per 5 minutes and
        # answers more with GOAWAY "too_many_pings", logged as an error on stderr during any pause
        # longer than half a minute (a long embedding batch). Pings are pointless on a local socket.
        options = {"grpc_options": {"grpc.keepalive_time_ms": 300_000}} if endpoint.lite_path is not None else {}
        try:
            return pymilvus.MilvusClient(
                uri=endpoint.uri, token=token, db_name=endpoint.db_name, timeout=self.config.timeout_s, **options
            )
        except pymilvus.exceptions.ConnectionConfigException as exc:
            if endpoint.lite_path is not None and not _clients.in_use(endpoint.lite_path):
                _clients.drop_lite_lock(endpoint.lite_path)
            if endpoint.lite_path is not None and _lite_database_locked_elsewhere(endpoint.lite_path):
                raise self._in_use_elsewhere(endpoint.lite_path) from None
            if endpoint.lite_path is not None:
                raise MilvusStoreError(f"{self.where}: cannot open the Milvus Lite database: {exc.message}") from None
            raise

    def _in_use_elsewhere(self, path: Path) -> MilvusStoreError:
        return DatabaseInUseError(
            f"{self.where}: {path} is in use by another process (Milvus Lite allows one process per database); "
            "stop that process, or use a Milvus server for concurrent access"
        )

    def _warn_if_lite_ignores(self, analyzer_params: dict[str, Any]) -> None:
        filters_used = analyzer_params.get("filter") or []
        stems = any(isinstance(f, dict) and f.get("type") == "stemmer" for f in filters_used)
        if stems and self.endpoint.lite_path is not None and _lite_major_version() >= 3:
            logger.warning(
                "%s: Milvus Lite %s ignores the stemmer in the BM25 analyzer, so words match only in the exact "
                "form used (a Milvus server or Milvus Lite 2.5 stems)",
                self.where,
                _lite_version(),
            )

    def _check_lite_database(self, endpoint: Endpoint) -> None:
        path = endpoint.lite_path
        if path is None or not path.exists():
            return
        # Milvus Lite 2.x keeps a database in a single file, 3.x in a folder; neither reads the other's.
        if not path.is_dir() and _lite_major_version() >= 3:
            raise MilvusStoreError(
                f"{self.where}: {path} is a file, but Milvus Lite {_lite_version()} keeps its data in a folder "
                "(a single-file .db comes from Milvus Lite 2.x, which this version cannot read); choose another uri"
            )
        if path.is_dir() and _lite_major_version() < 3:
            raise MilvusStoreError(
                f"{self.where}: {path} is a folder, but Milvus Lite {_lite_version()} keeps its data in a single file "
                "(a folder comes from Milvus Lite 3, which this version cannot read); choose another uri"
            )

    def _lite_engine(self) -> int | None:
        """The Milvus Lite major version serving this store; None for a server."""
        return None if self.endpoint.lite_path is None else _lite_major_version()

    def _engine_filter(self, expression: str) -> str:
        """A filter expression in the dialect of the engine serving this store."""
        return self._lite2_filter(expression) if self._lite_engine() == 2 else expression

    def _lite2_filter(self, expression: str) -> str:
        """A filter in the dialect of Milvus Lite 2.5's parser, which reads no escape but \\ and \".

        It would silently match nothing for an escaped tab or line break, so a tab goes in raw
        (which it reads) and a line break, which it cannot read in any form, is refused.
        """

        def unescape(match: re.Match[str]) -> str:
            backslashes, letter = match.groups()
            if letter != "t":
                raise MilvusStoreError(
                    f"{self.where}: Milvus Lite {_lite_version()} cannot match text containing a line break in a "
                    "filter (a Milvus server or Milvus Lite 3 can); rename the source or use a server"
                )
            return backslashes + "\t"

        return _ESCAPE_IN_LITERAL.sub(unescape, expression)

    def _lite_problems(self) -> list[str]:
        """Settings the installed Milvus Lite cannot serve (it answers them only mid-run otherwise)."""
        engine = self._lite_engine()
        if engine is None:
            return []
        if engine >= 3 and self.config.vector_storage != "float32":
            return [
                f"{self.where}: Milvus Lite {_lite_version()} stores only float32 vectors, not vector_storage "
                f"{self.config.vector_storage}; use Milvus Lite 2.5 (the default) or a Milvus server"
            ]
        if engine < 3 and self.config.index.type not in LITE2_INDEX_TYPES:
            return [
                f"{self.where}: Milvus Lite {_lite_version()} builds only {', '.join(LITE2_INDEX_TYPES)} indexes, not "
                f"{self.config.index.type}; use one of those, or a Milvus server (or Milvus Lite 3) for "
                f"{self.config.index.type}"
            ]
        return []

    def _lite_database_missing(self) -> bool:
        """True for a Milvus Lite uri whose database does not exist yet: nothing to read, nothing to create."""
        path = self.endpoint.lite_path
        return path is not None and not path.exists()

    def _database_exists(self, client: Any) -> bool:
        db_name = self.config.db_name
        return not db_name or db_name in self.call(
            "list databases", client.list_databases, timeout=self.config.timeout_s
        )

    def _collection_exists(self, client: Any) -> bool:
        if not self._database_exists(client):
            return False
        exists: bool = self.call(
            "has_collection", client.has_collection, self.config.collection, timeout=self.config.timeout_s
        )
        return exists

    def _describe(self, client: Any) -> CollectionLayout:
        name, timeout = self.config.collection, self.config.timeout_s
        description = self.call("describe collection", client.describe_collection, name, timeout=timeout)
        metric = None
        index_names = self.call("list indexes", client.list_indexes, name, field_name=self.config.vector_field)
        if index_names:
            index = self.call("describe index", client.describe_index, name, index_names[0], timeout=timeout)
            metric = index.get("metric_type")
        return CollectionLayout.from_description(description, metric)

    def _field_problems(self, schema: IndexSchema) -> list[str]:
        """Vectors the stages fill that this collection has no field for, and the reverse."""
        problems = []
        if schema.vector_field != self.config.vector_field:
            problems.append(
                f"the store writes vector field {self.config.vector_field!r} but the embedder fills "
                f"{schema.vector_field!r}"
            )
        # The sparse stage and the store's learned sparse field come together, under one name.
        learned = self.config.learned_sparse.field if self.config.learned_sparse is not None else None
        if schema.sparse_field is None and learned is not None:
            problems.append(
                f"the store has a learned sparse field {learned!r} but the spec has no sparse stage to fill it"
            )
        elif schema.sparse_field is not None and learned != schema.sparse_field:
            where = f"its learned_sparse field is {learned!r}" if learned else "it has no learned_sparse field"
            problems.append(f"the sparse stage fills {schema.sparse_field!r}, but the store cannot keep it: {where}")
        return problems

    def _schema_problems(self, layout: CollectionLayout, schema: IndexSchema) -> list[str]:
        _, metric = self.config.dense_index()
        vector_type = VECTOR_FIELD_TYPES[self.config.vector_storage]
        problems = layout.problems(
            self.where, self.config.vector_field, schema.dimension, schema.model_id, metric, vector_type
        )
        return problems + layout.sparse_problems(self.where, self.config, schema.sparse_model_id)

    def _load(self, client: Any) -> None:
        """A collection reopened from disk (Lite) or released on a server must be loaded to be read."""
        name, timeout = self.config.collection, self.config.timeout_s
        state = self.call("get load state", client.get_load_state, name, timeout=timeout)
        if getattr(state.get("state"), "name", "") != "Loaded":
            self.call("load collection", client.load_collection, name, timeout=timeout)

    def _existing(self, load: bool = True) -> tuple[Any, CollectionLayout] | None:
        """Client and layout of the existing collection, loaded unless ``load`` is False; None when it does not exist.

        Loading reads the whole collection into the engine's memory (seconds for a few hundred
        thousand chunks on Lite), so it waits for the first read: an upsert needs none, and a
        re-index that changes nothing never reads the chunks.

        Reads and writes work without ``prepare`` (a query service has no reason to call it), and
        a missing Milvus Lite database is not created just to find it empty.
        """
        if self._layout is None:
            if self._lite_database_missing():
                return None
            client = self.client()
            if not self._collection_exists(client):
                return None
            layout = self._describe(client)
            if layout.dimension(self.config.vector_field) is None:
                raise StoreSchemaError(f"{self.where} has no dense vector field {self.config.vector_field!r}")
            self._layout = layout
        if load and not self._loaded:
            self._load(self._client)
            self._loaded = True
        return self._client, self._layout

    def _ready(self, load: bool = True) -> tuple[Any, CollectionLayout]:
        existing = self._existing(load)
        if existing is None:
            raise MilvusStoreError(f"{self.where} does not exist; run an ingest first (prepare creates it)")
        return existing

    # ---- Store API ----------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether the collection exists (it is then opened; loaded on the first read)."""
        return self._existing(load=False) is not None

    def check(self, schema: IndexSchema) -> list[str]:
        """Problems that ``prepare`` would raise; creates nothing (not even a Milvus Lite database)."""
        if unsupported := self._lite_problems():
            return unsupported
        if self._lite_database_missing():
            return []
        try:
            client = self.client()
            if unsupported := self._server_problems(client):
                return unsupported
            if not self._collection_exists(client):
                return []
            return self._schema_problems(self._describe(client), schema)
        except MilvusStoreError as exc:
            return [str(exc)]

    def _server_problems(self, client: Any) -> list[str]:
        """Features these settings need that the server's version lacks (Milvus Lite is no server)."""
        if self.endpoint.lite_path is not None:
            return []
        return server_features.server_problems(client, self.config, self.config.uri, self.config.timeout_s)

    def prepare(self, schema: IndexSchema) -> None:
        """Create the collection, or check that the existing one fits; then load it.

        ``schema.sparse_model_id`` names the learned sparse encoder (recorded like the dense model,
        so a different one is refused); it is needed only when ``learned_sparse`` is configured.
        """
        if field_problems := self._field_problems(schema):
            raise ValueError("\n".join(field_problems))
        dimension, model_id = schema.dimension, schema.model_id
        if isinstance(dimension, bool) or not isinstance(dimension, int) or dimension <= 0:
            raise ValueError(f"{self.where}: the vector dimension must be a positive integer, got {dimension!r}")
        if dimension > MAX_DIMENSION:  # Milvus refuses it too, but only at create time and without naming the embedder
            raise ValueError(
                f"{self.where}: Milvus stores vectors of at most {MAX_DIMENSION} dimensions, the embedder makes "
                f"{dimension}"
            )
        if self.config.vector_storage == "binary" and dimension % 8:
            raise ValueError(
                f"{self.where}: binary vectors are stored 8 dimensions per byte; {dimension} is not a multiple of 8"
            )
        if not model_id:
            raise ValueError(f"{self.where}: the embedder reported no model id")
        if unsupported := self._lite_problems():
            raise MilvusStoreError("\n".join(unsupported))
        lite_path = self.endpoint.lite_path
        if lite_path is not None:
            lite_path.parent.mkdir(parents=True, exist_ok=True)
        client = self.client()
        if unsupported := self._server_problems(client):
            raise MilvusStoreError("\n".join(unsupported))
        if self.config.db_name and not self._database_exists(client):
            self.call("create database", client.create_database, self.config.db_name, timeout=self.config.timeout_s)
        if not self._collection_exists(client):
            self._create(client, schema)
        layout = self._describe(client)
        problems = self._schema_problems(layout, schema)
        if problems:
            raise StoreSchemaError("\n".join(problems))
        self._layout = layout  # loaded on the first read (see _existing)

    def _create(self, client: Any, index: IndexSchema) -> None:
        pymilvus = require("pymilvus", purpose="the Milvus store")
        DataType = pymilvus.DataType
        dimension = index.dimension
        properties = {
            PROPERTY_MODEL: index.model_id,
            PROPERTY_DIMENSION: str(dimension),
            PROPERTY_SCHEMA_VERSION: SCHEMA_VERSION,
        }
        if self.config.learned_sparse is not None and index.sparse_model_id:
            properties[PROPERTY_SPARSE_MODEL] = index.sparse_model_id
        schema = pymilvus.MilvusClient.create_schema(
            auto_id=False, enable_dynamic_field=False, description=json.dumps({DESCRIPTION_KEY: properties})
        )
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX_BYTES)
        schema.add_field("source_id", DataType.VARCHAR, max_length=SOURCE_ID_MAX_BYTES)
        schema.add_field("chunk_index", DataType.INT64)
        bm25, learned = self.config.bm25, self.config.learned_sparse
        text_options: dict[str, Any] = {}
        if bm25 is not None:
            text_options = {"enable_analyzer": True, "analyzer_params": bm25.analyzer_params}
            self._warn_if_lite_ignores(bm25.analyzer_params)
        schema.add_field("text", DataType.VARCHAR, max_length=self.config.text_max_length, **text_options)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field(
            self.config.vector_field, getattr(DataType, VECTOR_FIELD_TYPES[self.config.vector_storage]), dim=dimension
        )
        index_params = client.prepare_index_params()
        index_type, metric = self.config.dense_index()
        if index_type == "AUTOINDEX" and self.config.vector_storage == "float16" and self._lite_engine() == 2:
            index_type = "FLAT"  # Milvus Lite 2.5 accepts AUTOINDEX on a float16 field but builds no index
        index_params.add_index(
            self.config.vector_field, index_type=index_type, metric_type=metric, params=dict(self.config.index.params)
        )
        if bm25 is not None:
            schema.add_field(bm25.field, DataType.SPARSE_FLOAT_VECTOR)
            schema.add_function(
                pymilvus.Function(
                    name=f"{bm25.field}_from_text",
                    function_type=pymilvus.FunctionType.BM25,
                    input_field_names=["text"],
                    output_field_names=[bm25.field],
                )
            )
            index_params.add_index(
                bm25.field,
                index_type="SPARSE_INVERTED_INDEX",
                metric_type="BM25",
                params={"bm25_k1": bm25.k1, "bm25_b": bm25.b},
            )
        if learned is not None:
            schema.add_field(learned.field, DataType.SPARSE_FLOAT_VECTOR)
            index_params.add_index(learned.field, index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
        name = self.config.collection
        target = self._first_build_name()
        logger.info(
            "creating %s for %d-d vectors from %s%s",
            self.where,
            dimension,
            index.model_id,
            f" (as {target!r})" if target != name else "",
        )
        try:
            self.call(
                "create collection",
                client.create_collection,
                target,
                schema=schema,
                index_params=index_params,
                consistency_level=self.config.consistency_level,
                properties=properties,
                timeout=self.config.timeout_s,
            )
        except MilvusStoreError:
            # Another process may have created it meanwhile; the caller then checks that it fits.
            if not self._collection_exists(client):
                raise
        if target != name:
            try:
                self.call("create alias", client.create_alias, target, name, timeout=self.config.timeout_s)
            except MilvusStoreError:
                self.call("drop collection", client.drop_collection, target, timeout=self.config.timeout_s)
                if not self._collection_exists(client):  # not another process that won the name
                    raise

    def _first_build_name(self) -> str:
        """The collection a new index is created as. Where the engine has aliases, a collection of
        its own behind an alias of the configured name, so that every full rebuild switches by one
        atomic ``alter_alias``, the first one included; a build is created as itself."""
        name = self.config.collection
        if not self.has_aliases or REBUILD_INFIX in name:
            return name
        return f"{name}{REBUILD_INFIX}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"

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
        rows = prepared.rows
        for batch in _batches(rows, batch_size or self.config.write_batch_size, MAX_REQUEST_BYTES, _row_size):
            self.call(
                "upsert",
                client.upsert,
                self.config.collection,
                [row.values for row in batch],
                timeout=self.config.timeout_s,
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
                reasons.append(
                    f"{label}: {name} is {sizes[name]} bytes of UTF-8, over the collection's limit of {limit}"
                )
        if not chunk.id:
            reasons.append(f"{label}: the id is empty")
        vector = _vector_problem_or_list(chunk.vectors.get(self.config.vector_field), dimension)
        if isinstance(vector, str):
            reasons.append(f"{label}: {self.config.vector_field!r} vector {vector}")
        sparse: dict[str, dict[int, float]] = {}
        if self.config.learned_sparse is not None:
            name = self.config.learned_sparse.field
            checked = _sparse_problem_or_dict(chunk.vectors.get(name))
            if isinstance(checked, str):
                reasons.append(f"{label}: {name!r} sparse vector {checked}")
            else:
                sparse[name] = checked
        try:
            metadata = _json_ready({**chunk.metadata, "start": chunk.start, "end": chunk.end})
        except (TypeError, ValueError) as exc:
            reasons.append(f"{label}: metadata cannot be stored as JSON: {exc}")
        else:
            metadata_bytes = len(json.dumps(metadata, ensure_ascii=False).encode("utf-8", "surrogatepass"))
            if metadata_bytes > JSON_MAX_BYTES:
                reasons.append(
                    f"{label}: metadata is {metadata_bytes} bytes of JSON, over Milvus' limit of {JSON_MAX_BYTES}"
                )
        if reasons:
            return reasons
        assert not isinstance(vector, str)  # a problem with the vector is one of the reasons above
        values = {
            "id": chunk.id,
            "source_id": chunk.source_id,
            "chunk_index": int(chunk.index),
            "text": chunk.text,
            "metadata": metadata,
            self.config.vector_field: encode_vector(vector, self.config.vector_storage),
            **sparse,
        }
        sparse_bytes = sum(8 * len(v) for v in sparse.values())
        return _Row(values, sum(sizes.values()) + len(json.dumps(metadata)) + 4 * len(vector) + sparse_bytes + 64)

    def delete_sources(self, source_ids: Sequence[str]) -> None:
        """Delete every chunk of these sources (filter built with escaped literals)."""
        ids = list(dict.fromkeys(source_ids))
        existing = self._existing() if ids else None
        if existing is None:
            return
        client, _ = existing
        filterable, unfilterable = self._by_filterability(ids)
        for start in range(0, len(filterable), DELETE_BATCH_SIZE):
            expression = filters.in_list("source_id", filterable[start : start + DELETE_BATCH_SIZE])
            self.call("delete", client.delete, self.config.collection, filter=expression, timeout=self.config.timeout_s)
        for source_id in unfilterable:
            self._delete_ids(client, [row["id"] for row in self._rows_of_unfilterable(client, source_id)])

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
        stale = [
            row["id"]
            for row in self._chunk_rows(client, list(keep_sets))
            if row["id"] not in keep_sets[row["source_id"]]
        ]
        self._delete_ids(client, stale)

    def _delete_ids(self, client: Any, chunk_ids: Sequence[str]) -> None:
        for start in range(0, len(chunk_ids), DELETE_BATCH_SIZE):
            expression = filters.in_list("id", chunk_ids[start : start + DELETE_BATCH_SIZE])
            self.call("delete", client.delete, self.config.collection, filter=expression, timeout=self.config.timeout_s)

    def _by_filterability(self, source_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Source ids a filter expression can match, and those it cannot on this engine.

        Milvus Lite 2.5's parser reads no line break in a string literal, escaped or raw; such
        ids are found another way (:meth:`_rows_of_unfilterable`) rather than blocking every
        deletion of the run.
        """
        if self._lite_engine() != 2:
            return list(source_ids), []
        filterable: list[str] = []
        unfilterable: list[str] = []
        for source_id in source_ids:
            (unfilterable if "\n" in source_id or "\r" in source_id else filterable).append(source_id)
        return filterable, unfilterable

    def _rows_of_unfilterable(self, client: Any, source_id: str) -> list[dict[str, Any]]:
        """``{"id", "source_id"}`` of the chunks of a source id that no filter can name on this engine:
        the rows whose id starts like it (a ``like`` prefix without any character that would need
        an escape), matched exactly here."""
        prefix = _UNESCAPED_PREFIX.match(source_id).group(0)  # type: ignore[union-attr]
        expression = f'source_id like "{prefix}%"' if prefix else ""
        rows = self.query_pages(client, self.config.collection, expression, ["id", "source_id"], QUERY_PAGE_ROWS)
        return [row for row in rows if row["source_id"] == source_id]

    def _chunk_rows(self, client: Any, source_ids: Sequence[str]) -> list[dict[str, Any]]:
        """``{"id", "source_id"}`` of every chunk of these sources."""
        filterable, unfilterable = self._by_filterability(list(dict.fromkeys(source_ids)))
        rows: list[dict[str, Any]] = []
        # Each query scans the collection whatever its list's length, so reads ask for many sources at once.
        for batch in _batches(filterable, READ_FILTER_IDS, READ_FILTER_BYTES, _literal_size):
            rows.extend(self._chunk_ids_of(client, batch))
        for source_id in unfilterable:
            rows.extend(self._rows_of_unfilterable(client, source_id))
        return rows

    def _chunk_ids_of(self, client: Any, source_ids: Sequence[str]) -> list[dict[str, Any]]:
        """``{"id", "source_id"}`` of every chunk of these (filterable) sources."""
        rows: list[dict[str, Any]] = self.call(
            "query",
            client.query,
            self.config.collection,
            filter=filters.in_list("source_id", source_ids),
            output_fields=["id", "source_id"],
            limit=QUERY_WINDOW,
            consistency_level="Strong",
            timeout=self.config.timeout_s,
        )
        if len(rows) < QUERY_WINDOW:
            return rows
        # More chunks than one query may return (a very large document): page with an iterator.
        return list(
            self.query_pages(
                client,
                self.config.collection,
                filters.in_list("source_id", source_ids),
                ["id", "source_id"],
                QUERY_PAGE_ROWS,
            )
        )

    def chunk_ids_of(self, source_ids: Sequence[str]) -> dict[str, list[str]]:
        """The chunk ids of each of these sources that has chunks (for reconciling the record)."""
        existing = self._existing() if source_ids else None
        if existing is None:
            return {}
        grouped: dict[str, list[str]] = {}
        for row in self._chunk_rows(existing[0], source_ids):
            grouped.setdefault(row["source_id"], []).append(row["id"])
        return grouped

    def chunk_ids_by_source(self) -> dict[str, list[str]]:
        """Every chunk id in the collection, grouped by source id (all in memory: for small collections and tests)."""
        grouped: dict[str, list[str]] = {}
        for row in self.rows(["id", "source_id"]):
            grouped.setdefault(row["source_id"], []).append(row["id"])
        return grouped

    def rows(self, output_fields: Sequence[str]) -> Iterator[dict[str, Any]]:
        """Every row of the collection with ``output_fields``, paged, in no particular order.

        Vector fields come back as Milvus returns them (a list of floats for float vectors).
        """
        existing = self._existing()
        if existing is None:
            return
        client, layout = existing
        vector_bytes = sum(4 * (layout.dimension(name) or 0) for name in output_fields)
        # Milvus Lite 2.5 stalls until the deadline, instead of answering, on a page of 4,096 rows
        # of 768-dimension vectors (12.6 MB); 4.6 MB pages still work.
        page_size = (
            max(1, min(QUERY_PAGE_ROWS, QUERY_PAGE_VECTOR_BYTES // vector_bytes)) if vector_bytes else QUERY_PAGE_ROWS
        )
        yield from self.query_pages(client, self.config.collection, "", output_fields, page_size)

    def query_pages(
        self, client: Any, collection: str, expression: str, output_fields: Sequence[str], page_size: int
    ) -> Generator[dict[str, Any], None, None]:
        """Rows of ``collection`` (this store's or a companion's) matching ``expression``, fetched
        page by page with a query iterator, never offset + limit (Milvus caps those at 16,384).

        pymilvus pages with an unescaped ``id > "<last id>"``, which is safe for the collections of
        this project: chunk ids and record row ids are hex digests or fixed words.
        """
        if self.endpoint.lite_path is not None:
            _quiet_lite_iterator_timestamp_warning()
        iterator = self.call(
            "query",
            client.query_iterator,
            collection,
            batch_size=page_size,
            filter=expression,
            output_fields=list(output_fields),
            timeout=self.config.timeout_s,
        )
        try:
            while page := self.call("query", iterator.next):
                yield from page
        finally:
            iterator.close()

    def sources_with_chunks(self, source_ids: Sequence[str]) -> set[str]:
        """Those of ``source_ids`` that have at least one chunk in the collection."""
        existing = self._existing() if source_ids else None
        if existing is None:
            return set()
        return {row["source_id"] for row in self._chunk_rows(existing[0], source_ids)}

    def count(self) -> int:
        """Exact number of rows (a Strong-consistency count, whatever the configured level)."""
        existing = self._existing()
        if existing is None:
            return 0
        client, _ = existing
        result = self.call(
            "count",
            client.query,
            self.config.collection,
            filter="",
            output_fields=["count(*)"],
            consistency_level="Strong",
            timeout=self.config.timeout_s,
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
        params = {"metric_type": layout.metric or self.config.dense_index()[1], "params": dict(search_params or {})}
        results = self.call(
            "search",
            client.search,
            self.config.collection,
            data=[encode_vector(query, self.config.vector_storage)],
            anns_field=self.config.vector_field,
            limit=top_k,
            filter=filter_expr or "",
            output_fields=list(output_fields),
            search_params=params,
            consistency_level=self.config.consistency_level,
            timeout=self.config.timeout_s,
        )
        return [
            DenseHit(id=str(hit["id"]), score=float(hit["distance"]), fields=dict(hit.get("entity") or {}))
            for hit in results[0]
        ]

    def branches(self) -> tuple[Branch, ...]:
        present = {
            "dense": True,
            "bm25": self.config.bm25 is not None,
            "sparse": self.config.learned_sparse is not None,
        }
        return tuple(branch for branch in BRANCHES if present[branch])

    def bm25_analyzer(self) -> str | dict[str, Any] | None:
        bm25 = self.config.bm25
        if bm25 is None:
            return None
        return bm25.analyzer if isinstance(bm25.analyzer, str) else dict(bm25.analyzer)

    def search(
        self, request: SearchRequest, filters: Filter | None = None, *, search_params: Mapping[str, Any] | None = None
    ) -> list[Hit]:
        """One branch: the ``request.limit`` best rows for a dense, BM25 or learned sparse query, best first.

        Scores are higher-is-better whatever the metric (see :class:`Hit`).
        """
        client, layout = self._ready()
        field, metric, data = self._request_data(request, layout)
        results = self.call(
            "search",
            client.search,
            self.config.collection,
            data=[data],
            anns_field=field,
            limit=request.limit,
            filter=compile_filter(filters) if filters else "",
            output_fields=list(DEFAULT_OUTPUT_FIELDS),
            search_params={"metric_type": metric, "params": dict(search_params or {})},
            consistency_level=self.config.consistency_level,
            timeout=self.config.timeout_s,
        )
        dimension = layout.dimension(self.config.vector_field) or 1
        return [
            Hit(
                str(hit["id"]),
                _higher_is_better(metric, float(hit["distance"]), dimension),
                dict(hit.get("entity") or {}),
            )
            for hit in results[0]
        ]

    def hybrid_search(
        self, requests: Sequence[SearchRequest], fusion: Fusion, limit: int, filters: Filter | None = None
    ) -> list[Hit]:
        """Several branches fused by Milvus (``hybrid_search``) into the ``limit`` best rows.

        The filter applies to every branch, so a row that fails it cannot enter through any of them.
        """
        check_hybrid(requests, fusion, limit)
        pymilvus = require("pymilvus", purpose="the Milvus store")
        client, layout = self._ready()
        expression = self._engine_filter(compile_filter(filters)) if filters else None
        branches = []
        for request in requests:
            field, metric, data = self._request_data(request, layout)
            branches.append(
                pymilvus.AnnSearchRequest(
                    data=[data],
                    anns_field=field,
                    param={"metric_type": metric, "params": {}},
                    limit=request.limit,
                    expr=expression,
                )
            )
        if isinstance(fusion, RRFFusion):
            ranker = pymilvus.RRFRanker(fusion.k)
        else:
            ranker = pymilvus.WeightedRanker(*fusion.weights, norm_score=fusion.normalize)
        results = self.call(
            "hybrid search",
            client.hybrid_search,
            self.config.collection,
            branches,
            ranker,
            limit=limit,
            output_fields=list(DEFAULT_OUTPUT_FIELDS),
            consistency_level=self.config.consistency_level,
            timeout=self.config.timeout_s,
        )
        # Fused scores (RRF sums, weighted sums of normalised scores) are already higher-is-better.
        return [Hit(str(hit["id"]), float(hit["distance"]), dict(hit.get("entity") or {})) for hit in results[0]]

    def _request_data(self, request: SearchRequest, layout: CollectionLayout) -> tuple[str, str, Any]:
        """The vector field, the metric and the validated query payload for one branch."""
        if request.limit <= 0:
            raise ValueError(f"top_k must be positive, got {request.limit}")
        if request.branch == "dense":
            query = _vector_problem_or_list(request.data, layout.dimension(self.config.vector_field))
            if isinstance(query, str):
                raise ValueError(f"{self.where}: query vector {query}")
            metric = layout.metric or self.config.dense_index()[1]
            return self.config.vector_field, metric, encode_vector(query, self.config.vector_storage)
        if request.branch == "bm25" and self.config.bm25 is not None:
            if not isinstance(request.data, str) or not request.data.strip():
                raise ValueError(f"{self.where}: a BM25 query is non-empty text, got {request.data!r}")
            return self.config.bm25.field, "BM25", request.data
        if request.branch == "sparse" and self.config.learned_sparse is not None:
            sparse = _sparse_problem_or_dict(request.data)
            if isinstance(sparse, str):
                raise ValueError(f"{self.where}: query sparse vector {sparse}")
            return self.config.learned_sparse.field, "IP", sparse
        raise ValueError(
            f"{self.where}: cannot search branch {request.branch!r}; "
            f"this collection serves {', '.join(self.branches())}"
        )

    # ---- full rebuilds: a new collection behind an alias ----------------------------------

    def serving_collection(self) -> str | None:
        """The collection the configured name reads from: itself, or the target of the alias of
        that name; None when neither exists."""
        if self._lite_database_missing():
            return None
        client = self.client()
        if not self._collection_exists(client):
            return None
        description = self.call(
            "describe collection", client.describe_collection, self.config.collection, timeout=self.config.timeout_s
        )
        return str(description.get("collection_name") or self.config.collection)

    def with_collection(self, name: str) -> MilvusStore:
        """The same store settings writing to another collection (on the same shared client)."""
        twin = type(self)(self.config.model_copy(update={"collection": name}))
        twin.base_dir = self.base_dir
        return twin

    def build_collections(self) -> list[str]:
        """Collections that full rebuilds of this name created (``<name>__rebuild_<time>``)."""
        client = self.client()
        prefix = f"{self.config.collection}{REBUILD_INFIX}"
        names = self.call("list collections", client.list_collections, timeout=self.config.timeout_s)
        return sorted(name for name in names if name.startswith(prefix) and not name.endswith(RECORDS_SUFFIX))

    def switch_to(self, target: str) -> str | None:
        """Make the configured name an alias of ``target``; returns the collection it served before.

        Once the name is an alias, the switch is one atomic ``alter_alias``: a query sees the old
        collection or the new one. Collections are created behind an alias where the engine has
        aliases (:meth:`_first_build_name`); only a collection created under the name itself, by an
        earlier version, must be dropped before the name can become an alias, so queries in that
        moment find no collection (the data is already in ``target`` by then).
        """
        client, name, timeout = self.client(), self.config.collection, self.config.timeout_s
        previous = self.serving_collection()
        if previous is None:
            self.call("create alias", client.create_alias, target, name, timeout=timeout)
        elif previous != name:
            self.call("alter alias", client.alter_alias, target, name, timeout=timeout)
        else:
            logger.warning(
                "%s: replacing the collection with an alias of %r (queries fail until the alias exists)",
                self.where,
                target,
            )
            self.call("drop collection", client.drop_collection, name, timeout=timeout)
            self.call("create alias", client.create_alias, target, name, timeout=timeout)
        self._layout, self._loaded = None, False  # the next read describes and loads the new collection
        return previous

    @property
    def has_aliases(self) -> bool:
        """Whether the engine can serve a name through an alias (Milvus Lite 2.5 has no aliases)."""
        return self.endpoint.lite_path is None or _lite_major_version() >= 3

    # Without aliases (Milvus Lite 2.5), a full rebuild writes a whole new database file beside the
    # served one, under the same collection names, and then moves it over the served file.

    def lite_build_path(self, stamp: str) -> Path:
        path = self._lite_file()
        return path.with_name(f"{path.stem}{REBUILD_INFIX}{stamp}{path.suffix}")

    def lite_build_files(self) -> list[Path]:
        """Database files that full rebuilds of this one created (``<name>__rebuild_<time>.db``)."""
        path = self._lite_file()
        return sorted(path.parent.glob(f"{glob.escape(path.stem)}{REBUILD_INFIX}*{path.suffix}"))

    def with_lite_path(self, path: Path) -> MilvusStore:
        """The same store settings on another Milvus Lite file."""
        twin = type(self)(self.config.model_copy(update={"uri": str(path)}))
        twin.base_dir = self.base_dir
        return twin

    def replace_lite_file(self, build: MilvusStore) -> None:
        """Move ``build``'s database file over this one (one atomic rename), both closed first.

        Every store of this process on either file must be closed: Milvus Lite flushes a file when
        the last client lets go of it, and moving a file that a server still writes would lose data.
        """
        served, built = self._lite_file(), build._lite_file()
        build.close()
        self.close()
        busy = [str(p) for p in (served, built) if _clients.in_use(p)]
        if busy:
            raise MilvusStoreError(
                f"{self.where}: cannot replace the database file: still open elsewhere in this process: "
                f"{', '.join(busy)}"
            )
        os.replace(built, served)
        _lite_lock_file(built).unlink(missing_ok=True)
        _own_lock_file(built).unlink(missing_ok=True)
        logger.info("%s: now serves the rebuilt database (moved from %s)", self.where, built.name)

    def delete_lite_file(self) -> None:
        """Close and delete this store's Milvus Lite file (a build that is not switched in)."""
        path = self._lite_file()
        self.close()
        path.unlink(missing_ok=True)
        _lite_lock_file(path).unlink(missing_ok=True)
        _own_lock_file(path).unlink(missing_ok=True)

    def _lite_file(self) -> Path:
        path = self.endpoint.lite_path
        if path is None or self.has_aliases:
            raise TypeError(f"{self.where}: file rebuilds are for Milvus Lite 2.5 only; this engine has aliases")
        return path

    def drop(self) -> None:
        """Drop this collection (never an alias's target through the alias: name a collection)."""
        client = self.client()
        if self.call("has_collection", client.has_collection, self.config.collection, timeout=self.config.timeout_s):
            self.call("drop collection", client.drop_collection, self.config.collection, timeout=self.config.timeout_s)
        self._layout, self._loaded = None, False

    def index_record(self) -> MilvusRecords:
        """The companion collection ``<collection>_records`` (see :mod:`stores.milvus.records`)."""
        return MilvusRecords(self)

    def start_rebuild(self, serving_records: RecordStore, stamp: str) -> Rebuild:
        """A new collection behind the name's alias, or on Milvus Lite 2.5 a new database file (see
        :mod:`stores.milvus.rebuild`)."""
        return start_rebuild(self, serving_records, stamp)

    def lock_claims(self) -> MilvusClaims:
        """The companion collection ``<collection>_lock`` (see :mod:`stores.milvus.leases`)."""
        return MilvusClaims(self)

    def close(self) -> None:
        """Release this store's share of the client; the last user closes it (and unlocks a Lite database)."""
        if self._opened is not None:
            endpoint, token = self._opened
            self._client = self._opened = self._layout = None
            self._loaded = False
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
    values: list[float] = array.tolist()
    return values


def _higher_is_better(metric: str, distance: float, dimension: int) -> float:
    if metric == "HAMMING":  # differing bits: reported as the share of bits that agree
        return 1.0 - distance / dimension
    if metric == "BM25":
        # A Milvus server reports BM25 scores as they are (positive); Milvus Lite 3 negates them.
        return abs(distance)
    if metric == "L2":
        return -distance
    return distance  # COSINE and IP: larger is closer


_SPARSE_MAX_INDEX = 2**32 - 2  # Milvus sparse dimensions are uint32, the last value reserved


def _sparse_problem_or_dict(vector: Any) -> dict[int, float] | str:
    """A ``{dimension: weight}`` sparse vector as plain ints and floats, or what is wrong with it."""
    if vector is None:
        return "is missing (was the chunk encoded by the sparse stage?)"
    if not isinstance(vector, Mapping):
        return f"must be a mapping of dimension -> weight, got {type(vector).__name__}"
    out: dict[int, float] = {}
    for key, weight in vector.items():
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or not 0 <= int(key) <= _SPARSE_MAX_INDEX:
            return f"has dimension {key!r}; dimensions are integers in [0, {_SPARSE_MAX_INDEX}]"
        value = float(weight)
        if not math.isfinite(value) or value < 0:
            return f"has weight {weight!r} at dimension {key}; weights must be finite and non-negative"
        if value > 0:
            out[int(key)] = value
    return out


def _batches(items: Sequence[B], max_items: int, max_bytes: int, size: Callable[[B], int]) -> Iterator[list[B]]:
    """Consecutive runs of ``items`` of at most ``max_items`` and ``max_bytes`` (one item over it goes alone)."""
    batch: list[B] = []
    total = 0
    for item in items:
        cost = size(item)
        if batch and (len(batch) >= max_items or total + cost > max_bytes):
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += cost
    if batch:
        yield batch


def _row_size(row: _Row) -> int:
    return row.size


def _literal_size(source_id: str) -> int:
    return len(source_id.encode("utf-8", "surrogatepass")) + 4  # quotes, comma, space
