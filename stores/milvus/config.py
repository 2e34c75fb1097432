"""Settings of the Milvus store (the spec's ``store:`` section) and the limits Milvus sets."""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np
from pydantic import Field, field_validator, model_validator

from core.component import ComponentConfig
from stores import filters

# Collection properties that make a collection self-describing.
PROPERTY_MODEL = "rag_pipeline.embedding_model"
PROPERTY_DIMENSION = "rag_pipeline.embedding_dimension"
PROPERTY_SCHEMA_VERSION = "rag_pipeline.schema_version"
PROPERTY_SPARSE_MODEL = "rag_pipeline.sparse_model"
SCHEMA_VERSION = "1"
# An escape sequence in a filter's string literal: \n, \r or \t after an even run of backslashes.
_ESCAPE_IN_LITERAL = re.compile(r"(?<!\\)((?:\\\\)*)\\([nrt])")
DESCRIPTION_KEY = "rag_pipeline"  # the same properties, as JSON in the schema description
LITE2_INDEX_TYPES = ("AUTOINDEX", "FLAT", "IVF_FLAT")  # what Milvus Lite 2.5 can build

ID_MAX_BYTES = 128
SOURCE_ID_MAX_BYTES = 4096
VARCHAR_MAX_BYTES = 65535  # Milvus' ceiling for a VARCHAR field
MAX_DIMENSION = 32768  # Milvus' ceiling for a vector field's dim
JSON_MAX_BYTES = 65536  # Milvus' ceiling for a JSON field value (Milvus Lite does not check it; we do)
SCALAR_FIELDS = ("id", "source_id", "chunk_index", "text", "metadata")
DEFAULT_OUTPUT_FIELDS = ("source_id", "chunk_index", "text", "metadata")
QUERY_PAGE_ROWS = 4096
QUERY_PAGE_VECTOR_BYTES = 1 << 20

# Requests stay well under the server's default 64 MiB gRPC message limit whatever the batch size.
MAX_REQUEST_BYTES = 32 * 1024 * 1024
# Source ids per delete expression: keeps each filter string small for the server's parser.
QUERY_WINDOW = 16384  # Milvus' largest offset + limit for one query
DELETE_BATCH_SIZE = 256

_MILVUS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}\Z")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# The longest start of a text that goes into a `like` pattern as it is: no wildcard (% _), nothing
# that needs an escape (\ "), no control character.
_UNESCAPED_PREFIX = re.compile(r'[^%_\\"\x00-\x1f\x7f]*')
_SERVER_SCHEMES = ("http", "https", "tcp", "unix")
_TRANSIENT_GRPC_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED"})
_CONNECT_FAILED = 2  # pymilvus Status.CONNECT_FAILED: the first connection attempt got no answer
_RATE_LIMIT = 8  # pymilvus ErrorCode.RATE_LIMIT


# Lucene's English stop words, which is what the Milvus server's "_english_" list expands to;
# spelt out because Milvus Lite 3 takes stop words only as a literal list.
ENGLISH_STOP_WORDS = (
    "a",
    "an",
    "and",
    "are",
    "as",
    "at",
    "be",
    "but",
    "by",
    "for",
    "if",
    "in",
    "into",
    "is",
    "it",
    "no",
    "not",
    "of",
    "on",
    "or",
    "such",
    "that",
    "the",
    "their",
    "then",
    "there",
    "these",
    "they",
    "this",
    "to",
    "was",
    "will",
    "with",
)
# Named analyzers -> Milvus analyzer_params. Milvus Lite 3 honours the tokenizer, lowercasing and
# stop words, and ignores the stemmer (so "cells" never matches "cell" there); a server stems.
ANALYZER_PRESETS: dict[str, dict[str, Any]] = {
    "standard": {"tokenizer": "standard", "filter": ["lowercase"]},
    "english": {
        "tokenizer": "standard",
        "filter": [
            "lowercase",
            {"type": "stop", "stop_words": list(ENGLISH_STOP_WORDS)},
            {"type": "stemmer", "language": "english"},
        ],
    },
    # The string form: Milvus Lite 2.5 refuses the {"type": "jieba", ...} mapping that newer servers take.
    "jieba": {"tokenizer": "jieba", "filter": ["lowercase"]},
}


class BM25Config(ComponentConfig):
    """Milvus' built-in BM25: a Function turns each chunk's text into a sparse field on insert,
    with corpus statistics kept by Milvus, so nothing is refitted when documents change."""

    field: str = Field("bm25", description="Sparse field the BM25 function writes.")
    analyzer: Literal["standard", "english", "jieba"] | dict[str, Any] = Field(
        "standard",
        description=(
            "standard (words, lowercased), english (+ stop words and stemming; Milvus Lite 3 ignores stemming), "
            "jieba (Chinese), or a mapping of Milvus analyzer_params passed as is."
        ),
    )
    k1: float = Field(1.2, gt=0, description="BM25 term-frequency saturation (applies when the collection is created).")
    b: float = Field(
        0.75, ge=0, le=1, description="BM25 length normalisation (applies when the collection is created)."
    )

    @field_validator("field")
    @classmethod
    def _check_field(cls, value: str) -> str:
        return filters.field_name(value)

    @property
    def analyzer_params(self) -> dict[str, Any]:
        return ANALYZER_PRESETS[self.analyzer] if isinstance(self.analyzer, str) else dict(self.analyzer)


class LearnedSparseConfig(ComponentConfig):
    """A sparse field filled by a learned sparse encoder (SPLADE) at ingest, searched by inner product."""

    field: str = Field("sparse", description="Must match the sparse stage's vector_field.")

    @field_validator("field")
    @classmethod
    def _check_field(cls, value: str) -> str:
        return filters.field_name(value)


class IndexConfig(ComponentConfig):
    type: Literal["AUTOINDEX", "HNSW", "FLAT", "IVF_FLAT"] = "AUTOINDEX"
    metric: Literal["COSINE", "IP", "L2"] = "COSINE"
    params: dict[str, Any] = Field(
        default_factory=dict, description="Index build parameters, e.g. {M: 16, efConstruction: 200} for HNSW."
    )


# How the dense vectors are kept: Milvus field type, the bytes per dimension, and how a float
# vector becomes a row value or query payload.
VECTOR_FIELD_TYPES = {"float32": "FLOAT_VECTOR", "float16": "FLOAT16_VECTOR", "binary": "BINARY_VECTOR"}
BINARY_INDEX = ("BIN_FLAT", "HAMMING")  # the binary index Milvus Lite builds too


def encode_vector(values: list[float], storage: str) -> Any:
    if storage == "float16":
        return np.asarray(values, dtype=np.float16)
    if storage == "binary":
        return np.packbits(np.asarray(values) > 0).tobytes()  # one bit per dimension: its sign
    return values


class MilvusStoreConfig(ComponentConfig):
    uri: str = Field(
        "./milvus.db",
        description=(
            "A local path ending in .db (Milvus Lite, relative to the spec's folder: a file for Lite 2.5, a folder "
            "for Lite 3), or http(s)://, tcp:// or unix: for a Milvus server or Zilliz Cloud."
        ),
    )
    token_env: str = Field(
        "MILVUS_TOKEN",
        description="Name of the environment variable that holds the token / API key (never the token itself).",
    )
    db_name: str | None = None
    collection: str = "documents"
    vector_field: str = Field("dense", description="Must match the embedder's vector field.")
    vector_storage: Literal["float32", "float16", "binary"] = Field(
        "float32",
        description=(
            "How dense vectors are kept: float32; float16 (half the memory); binary (the sign of each dimension, 32x "
            "smaller, searched by Hamming distance with a BIN_FLAT index). Quality cost: "
            "benchmarks/retrieval_quality.py."
        ),
    )
    index: IndexConfig = Field(default_factory=IndexConfig)
    bm25: BM25Config | None = Field(None, description="Add Milvus' built-in BM25 sparse field ({} for the defaults).")
    learned_sparse: LearnedSparseConfig | None = Field(
        None, description="Add a sparse field for a learned sparse encoder (the spec's sparse stage fills it)."
    )
    # Strong: every read sees every write acknowledged before it, so a count or search right after
    # an ingest (or a delete) sees its effect. On a distributed server that costs read latency,
    # since queries wait for the newest timestamp; a search-heavy service that tolerates a few
    # seconds of staleness can choose Bounded (Milvus' own default). count() is always Strong.
    consistency_level: Literal["Strong", "Bounded", "Session", "Eventually"] = "Strong"
    text_max_length: int = Field(
        VARCHAR_MAX_BYTES,
        ge=1,
        le=VARCHAR_MAX_BYTES,
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
                raise ValueError(
                    "the uri must not carry credentials: put the token in the environment variable named by token_env"
                )
            return value
        if not value.endswith(".db"):
            raise ValueError(
                f"{value!r} is neither a server address (http://, https://, tcp://, unix:) nor a Milvus Lite "
                "path: Milvus Lite paths must end in .db, e.g. ./index.db"
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
            raise ValueError(
                f"the vector field cannot be named {value!r}: the store uses that name for {', '.join(SCALAR_FIELDS)}"
            )
        return value

    @field_validator("token_env")
    @classmethod
    def _check_token_env(cls, value: str) -> str:
        if not _ENV_NAME.match(value):
            raise ValueError("token_env is the *name* of an environment variable (e.g. MILVUS_TOKEN), not the token")
        return value

    @model_validator(mode="after")
    def _binary_vectors_have_their_own_index(self) -> MilvusStoreConfig:
        if self.vector_storage == "binary":
            if self.index.type not in ("AUTOINDEX", "FLAT") or "metric" in self.index.model_fields_set:
                raise ValueError(
                    "binary vectors are searched by Hamming distance in a BIN_FLAT index: leave index.type at "
                    "AUTOINDEX or FLAT and index.metric unset"
                )
        return self

    def dense_index(self) -> tuple[str, str]:
        """The dense field's index type and metric as Milvus builds them."""
        return BINARY_INDEX if self.vector_storage == "binary" else (self.index.type, self.index.metric)

    @model_validator(mode="after")
    def _vector_fields_are_distinct(self) -> MilvusStoreConfig:
        names = [self.vector_field] + [c.field for c in (self.bm25, self.learned_sparse) if c is not None]
        for name in names[1:]:
            if name in SCALAR_FIELDS:
                raise ValueError(
                    f"a sparse field cannot be named {name!r}: the store uses that name for {', '.join(SCALAR_FIELDS)}"
                )
        if len(set(names)) != len(names):
            raise ValueError(f"the dense, BM25 and learned sparse fields need distinct names, got {', '.join(names)}")
        return self

    def sparse_fields(self) -> dict[str, str]:
        """Sparse field name -> its metric: BM25 for the function's output, IP for learned sparse."""
        out = {}
        if self.bm25 is not None:
            out[self.bm25.field] = "BM25"
        if self.learned_sparse is not None:
            out[self.learned_sparse.field] = "IP"
        return out
