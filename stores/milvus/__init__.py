"""The Milvus store: Milvus Lite (a local .db path), a Milvus server, or Zilliz Cloud.

By responsibility: :mod:`.config` (the spec's settings and Milvus' limits), :mod:`.connection`
(endpoints, shared clients, Milvus Lite's database lock, retries), :mod:`.layout` (the existing
collection as described), :mod:`.store` (rows, writes, deletes, queries and search),
:mod:`.records` (the index record), :mod:`.leases` (the re-index lock's claims) and
:mod:`.rebuild` (full rebuilds beside the served index).
"""

from core.search import Fusion, Hit, RRFFusion, SearchRequest, WeightedFusion
from stores.milvus.config import (
    ANALYZER_PRESETS,
    BM25Config,
    IndexConfig,
    LearnedSparseConfig,
    MilvusStoreConfig,
)
from stores.milvus.connection import Endpoint
from stores.milvus.errors import DatabaseInUseError, InvalidChunksError, MilvusStoreError
from stores.milvus.layout import CollectionLayout
from stores.milvus.leases import MilvusClaims
from stores.milvus.records import MilvusRecords
from stores.milvus.store import DenseHit, MilvusStore

__all__ = [
    "ANALYZER_PRESETS",
    "BM25Config",
    "CollectionLayout",
    "DatabaseInUseError",
    "DenseHit",
    "Endpoint",
    "Fusion",
    "Hit",
    "IndexConfig",
    "InvalidChunksError",
    "LearnedSparseConfig",
    "MilvusClaims",
    "MilvusRecords",
    "MilvusStore",
    "MilvusStoreConfig",
    "MilvusStoreError",
    "RRFFusion",
    "SearchRequest",
    "WeightedFusion",
]
