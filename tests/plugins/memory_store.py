"""A second store behind the :class:`stores.base.Store` contract: chunks in a dict, searched in Python.

It exists to prove the seam: the orchestration (runners, reindex, query) and the shared contract
suite (``tests/test_store_contract.py``) use it exactly as they use Milvus. Search is brute force
(cosine for dense vectors, Okapi BM25 over lower-cased words, dot products for learned sparse
vectors) and filters use :meth:`core.filters.Filter.matches`, the reference meaning of a filter.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import Field

from core.component import ComponentConfig
from core.errors import StoreSchemaError
from core.filters import Filter
from core.leases import ClaimStore, MemoryClaims
from core.records import MemoryRecords, RecordStore
from core.search import BRANCHES, Branch, Fusion, Hit, RRFFusion, SearchRequest, check_hybrid
from core.types import Chunk
from stores.base import HIT_FIELDS, IndexSchema, Store

_WORD = re.compile(r"\w+")
BM25_K1, BM25_B = 1.2, 0.75


class MemoryStore(Store):
    type_name = "memory"

    class Config(ComponentConfig):
        name: str = "memory"
        bm25: bool = Field(False, description="Keep a BM25 branch over the chunk text.")
        sparse_field: str | None = Field(None, description="Keep learned sparse vectors under this field.")
        vector_field: str = "dense"
        keep_record: bool = Field(False, description="Keep an index record and lock claims beside the chunks.")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.table: dict[str, dict[str, Any]] = {}  # chunk id -> stored row
        self.schema: IndexSchema | None = None
        self._records = MemoryRecords() if self.config.keep_record else None
        self._claims = MemoryClaims() if self.config.keep_record else None

    @property
    def name(self) -> str:
        return str(self.config.name)

    # -- schema ------------------------------------------------------------------------------------

    def _field_problems(self, schema: IndexSchema) -> list[str]:
        problems = []
        if schema.vector_field != self.config.vector_field:
            problems.append(f"the store keeps vector field {self.config.vector_field!r}, not {schema.vector_field!r}")
        if schema.sparse_field != self.config.sparse_field:
            problems.append(f"the store keeps sparse field {self.config.sparse_field!r}, not {schema.sparse_field!r}")
        return problems

    def check(self, schema: IndexSchema) -> list[str]:
        if self.schema is None:
            return []
        problems = []
        if (schema.dimension, schema.model_id) != (self.schema.dimension, self.schema.model_id):
            problems.append(
                f"{self.where} holds {self.schema.dimension}-d vectors of {self.schema.model_id}, "
                f"not comparable with {schema.dimension}-d vectors of {schema.model_id}"
            )
        if schema.sparse_model_id and self.schema.sparse_model_id not in (None, schema.sparse_model_id):
            problems.append(f"{self.where} stores sparse vectors from {self.schema.sparse_model_id}")
        return problems

    def prepare(self, schema: IndexSchema) -> None:
        if schema.dimension <= 0 or not schema.model_id:
            raise ValueError(f"{self.where}: needs a positive dimension and a model id, got {schema}")
        if problems := self._field_problems(schema):
            raise ValueError("\n".join(problems))
        if problems := self.check(schema):
            raise StoreSchemaError("\n".join(problems))
        if self.schema is None:
            self.schema = schema

    def exists(self) -> bool:
        return self.schema is not None

    # -- chunks ------------------------------------------------------------------------------------

    def upsert(self, chunks: Sequence[Chunk]) -> int:
        if self.schema is None:
            raise ValueError(f"{self.where}: prepare the store before writing")
        rows = {}
        for chunk in chunks:
            vector = np.asarray(chunk.vectors.get(self.config.vector_field), dtype=np.float32)
            if vector.shape != (self.schema.dimension,) or not np.isfinite(vector).all():
                raise ValueError(
                    f"{chunk.source_id}: chunk {chunk.id} has no finite {self.schema.dimension}-d "
                    f"{self.config.vector_field!r} vector; nothing was written"
                )
            rows[chunk.id] = {
                "id": chunk.id,
                "source_id": chunk.source_id,
                "chunk_index": chunk.index,
                "text": chunk.text,
                "metadata": dict(chunk.metadata),
                "dense": vector,
                "sparse": dict(chunk.vectors.get(self.config.sparse_field or "", {}) or {}),
            }
        self.table.update(rows)  # all or nothing: every chunk was checked first
        return len(rows)

    def delete_stale(self, keep: Mapping[str, Sequence[str]]) -> None:
        kept = {source_id: set(ids) for source_id, ids in keep.items()}
        for chunk_id in [
            cid for cid, row in self.table.items() if row["source_id"] in kept and cid not in kept[row["source_id"]]
        ]:
            del self.table[chunk_id]

    def delete_sources(self, source_ids: Sequence[str]) -> None:
        doomed = set(source_ids)
        for chunk_id in [cid for cid, row in self.table.items() if row["source_id"] in doomed]:
            del self.table[chunk_id]

    def count(self) -> int:
        return len(self.table)

    def chunk_ids_of(self, source_ids: Sequence[str]) -> dict[str, list[str]]:
        wanted = set(source_ids)
        grouped: dict[str, list[str]] = {}
        for row in self.table.values():
            if row["source_id"] in wanted:
                grouped.setdefault(row["source_id"], []).append(row["id"])
        return grouped

    def rows(self, output_fields: Sequence[str]) -> Iterator[dict[str, Any]]:
        for row in list(self.table.values()):
            yield {name: row[name] for name in output_fields}

    def index_record(self) -> RecordStore | None:
        return self._records

    def lock_claims(self) -> ClaimStore | None:
        return self._claims

    # -- search ------------------------------------------------------------------------------------

    def branches(self) -> tuple[Branch, ...]:
        present = {"dense": True, "bm25": self.config.bm25, "sparse": self.config.sparse_field is not None}
        return tuple(b for b in BRANCHES if present[b])

    def search(
        self, request: SearchRequest, filters: Filter | None = None, *, search_params: Mapping[str, Any] | None = None
    ) -> list[Hit]:
        if request.limit <= 0:
            raise ValueError(f"top_k must be positive, got {request.limit}")
        if request.branch not in self.branches():
            raise ValueError(
                f"{self.where}: cannot search branch {request.branch!r}; this store serves {', '.join(self.branches())}"
            )
        rows = [row for row in self.table.values() if filters is None or filters.matches(row)]
        scores = self._scores(request, rows)
        ranked = sorted(zip(rows, scores), key=lambda pair: (-pair[1], pair[0]["id"]))
        if request.branch != "dense":  # sparse branches return only rows sharing a term with the query
            ranked = [(row, score) for row, score in ranked if score > 0]
        return [Hit(row["id"], float(score), _fields(row)) for row, score in ranked[: request.limit]]

    def hybrid_search(
        self, requests: Sequence[SearchRequest], fusion: Fusion, limit: int, filters: Filter | None = None
    ) -> list[Hit]:
        check_hybrid(requests, fusion, limit)
        fused: dict[str, float] = {}
        rows: dict[str, Hit] = {}
        for position, request in enumerate(requests):
            for rank, hit in enumerate(self.search(request, filters), start=1):
                if isinstance(fusion, RRFFusion):
                    gain = 1.0 / (fusion.k + rank)
                else:
                    normalized = _normalized(request.branch, hit.score) if fusion.normalize else hit.score
                    gain = fusion.weights[position] * normalized
                fused[hit.id] = fused.get(hit.id, 0.0) + gain
                rows[hit.id] = hit
        order = sorted(fused, key=lambda cid: (-fused[cid], cid))[:limit]
        return [Hit(cid, fused[cid], rows[cid].fields) for cid in order]

    def _scores(self, request: SearchRequest, rows: list[dict[str, Any]]) -> list[float]:
        if request.branch == "dense":
            query = np.asarray(request.data, dtype=np.float32)
            if self.schema is None or query.shape != (self.schema.dimension,):
                raise ValueError(f"{self.where}: query vector has shape {query.shape}, the store keeps {self.schema}")
            return [_cosine(query, row["dense"]) for row in rows]
        if request.branch == "bm25":
            if not isinstance(request.data, str) or not request.data.strip():
                raise ValueError(f"{self.where}: a BM25 query is non-empty text, got {request.data!r}")
            return self._bm25(request.data, rows)
        weights = {int(term): float(weight) for term, weight in dict(request.data).items()}
        return [sum(weights.get(term, 0.0) * weight for term, weight in row["sparse"].items()) for row in rows]

    def _bm25(self, text: str, rows: list[dict[str, Any]]) -> list[float]:
        """Okapi BM25 with statistics over the whole index, as an engine keeps them."""
        documents = [Counter(_WORD.findall(row["text"].lower())) for row in self.table.values()]
        average = sum(sum(d.values()) for d in documents) / max(len(documents), 1)
        frequency = Counter(term for d in documents for term in d)
        terms = _WORD.findall(text.lower())
        scores = []
        for row in rows:
            counts = Counter(_WORD.findall(row["text"].lower()))
            length = sum(counts.values())
            score = 0.0
            for term in terms:
                if counts[term]:
                    idf = math.log(1 + (len(documents) - frequency[term] + 0.5) / (frequency[term] + 0.5))
                    norm = counts[term] + BM25_K1 * (1 - BM25_B + BM25_B * length / max(average, 1e-9))
                    score += idf * counts[term] * (BM25_K1 + 1) / norm
            scores.append(score)
        return scores


def _fields(row: Mapping[str, Any]) -> dict[str, Any]:
    return {key: row[key] for key in HIT_FIELDS}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / norms if norms else 0.0


def _normalized(branch: Branch, score: float) -> float:
    """Scores mapped into [0, 1] before a weighted sum: cosine linearly, unbounded ones by arctan."""
    if branch == "dense":
        return (score + 1.0) / 2.0
    return 0.5 + math.atan(score) / math.pi
