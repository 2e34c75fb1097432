"""The query path: a question in, the best chunks out, with their text, source, pages and scores.

Retrieval modes, over one collection that holds the dense and sparse fields side by side:

* ``dense``: approximate nearest neighbours of the query embedding;
* ``bm25``: Milvus' built-in BM25 over the chunk text (the store's ``bm25`` field);
* ``sparse``: a learned sparse encoder (SPLADE; the store's ``learned_sparse`` field);
* ``hybrid``: several of those branches fused by Milvus ``hybrid_search``, with reciprocal rank
  fusion (``k`` configurable) or a weighted sum;
* ``auto`` (the default): hybrid when the store has a sparse field, else dense.

Then, optionally, a reranker rescores the best candidates. Every score a caller sees is
higher-is-better (Milvus Lite's negative BM25 scores are flipped by the store).

A :class:`QueryEngine` loads its models and opens its Milvus client once; ``query`` is safe to
call from many threads at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.errors import PipelineError
from core.filters import Filter, FilterValueError
from core.search import BRANCHES, Branch, Hit, RRFFusion, SearchRequest, WeightedFusion
from stores.base import IndexSchema, Store

if TYPE_CHECKING:
    from embedders.base import Embedder
    from embedders.sparse import SparseEncoder
    from rerankers.base import Reranker


Mode = Literal["auto", "dense", "bm25", "sparse", "hybrid"]
MAX_LIMIT = 16_384  # Milvus' ceiling for a search's limit


class QueryError(PipelineError):
    """A query that cannot run: nothing ingested yet, a mode the collection cannot serve."""


class QueryInputError(QueryError):
    """The request itself is wrong: an empty query, a bad top_k, a malformed filter, a mode the spec lacks."""


class FusionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["rrf", "weighted"] = Field(
        "rrf", description="rrf: reciprocal rank fusion; weighted: weighted sum of normalised scores."
    )
    k: int = Field(60, ge=1, description="RRF constant: score = sum of 1 / (k + rank).")
    weights: dict[Branch, float] = Field(
        default_factory=dict, description="Weighted fusion: weight per branch (missing: 1.0)."
    )
    normalize: bool = Field(True, description="Weighted fusion: map each branch's scores into [0, 1] first.")


class QueryConfig(BaseModel):
    """The spec's ``query:`` section (its ``reranker:`` is a component, validated by the spec loader)."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode = Field("auto", description="auto: hybrid when the store has a sparse field, else dense.")
    top_k: int = Field(10, ge=1, le=MAX_LIMIT, description="Chunks returned.")
    candidates: int = Field(
        100, ge=1, le=MAX_LIMIT, description="Chunks each branch retrieves before fusion and reranking."
    )
    hybrid: list[Branch] | None = Field(
        None, min_length=1, description="Branches hybrid fuses; default: dense plus every sparse field the store has."
    )
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    rerank: bool = Field(True, description="Rerank when a reranker is configured (a query can still turn it off).")
    search_params: dict[str, Any] = Field(
        default_factory=dict, description="Dense index search parameters, e.g. {ef: 64} for HNSW."
    )


@dataclass(frozen=True)
class RetrievedChunk:
    rank: int
    id: str
    source_id: str
    chunk_index: int
    text: str
    score: float  # what the ranking follows: the rerank score when reranked, else the retrieval score
    retrieval_score: float  # from the branch or the fusion
    rerank_score: float | None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def page_numbers(self) -> list[int]:
        return list(self.metadata.get("page_numbers") or [])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class QueryResult:
    query: str
    mode: str  # the mode actually run (auto resolved)
    reranked: bool
    hits: list[RetrievedChunk]
    seconds: dict[str, float]  # encode, search, rerank, total
    reranked_count: int = 0  # the first hits the reranker rescored (its top_n); the rest keep retrieval order
    searched: str = ""  # the collection searched, where it lives

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "mode": self.mode,
            "reranked": self.reranked,
            "reranked_count": self.reranked_count,
            "searched": self.searched,
            "seconds": self.seconds,
            "hits": [h.to_dict() for h in self.hits],
        }


class QueryEngine:
    def __init__(
        self,
        store: Store,
        embedder: Embedder,
        config: QueryConfig | None = None,
        *,
        sparse: SparseEncoder | None = None,
        reranker: Reranker | None = None,
    ):
        self.store = store
        self.embedder = embedder
        self.config = config or QueryConfig()
        self.sparse = sparse
        self.reranker = reranker
        self._ready = False
        self._ready_lock = threading.Lock()
        self.load_seconds: dict[str, float] = {}  # model -> seconds its warm-up took (set by warm_up)

    # -- what the collection can serve -------------------------------------------------------------

    def available_branches(self) -> list[Branch]:
        """Branches this engine can run: dense always; bm25 and sparse when the store has their fields."""
        stored = self.store.branches()
        return [b for b in BRANCHES if b in stored and (b != "sparse" or self.sparse is not None)]

    def resolve_mode(self, mode: Mode | None = None) -> Mode:
        mode = mode or self.config.mode
        if mode == "auto":
            return "hybrid" if len(self.available_branches()) > 1 else "dense"
        return mode

    def hybrid_branches(self) -> list[Branch]:
        configured = self.config.hybrid or self.available_branches()
        missing = [b for b in configured if b not in self.available_branches()]
        if missing:
            raise QueryInputError(f"hybrid search over {', '.join(configured)}: {self._why_missing(missing[0])}")
        if len(configured) < 2:
            raise QueryInputError(
                f"hybrid search needs two branches, this spec has only {', '.join(configured)}: "
                f"{self._why_missing('bm25')}"
            )
        return list(configured)

    def _why_missing(self, branch: Branch) -> str:
        if branch == "bm25":
            return "the store has no BM25 field (add `bm25: {}` to the store stage and ingest into a new collection)"
        if "sparse" not in self.store.branches():
            return "the store has no learned sparse field (add `learned_sparse: {}` to the store stage)"
        return "the spec has no sparse stage to encode queries (add `sparse: {type: splade}` under stages)"

    def warm_up(self) -> None:
        """Open the collection, check it matches the models, and load them; run once, under a lock."""
        with self._ready_lock:
            if self._ready:
                return
            if not self.store.exists():
                raise QueryError(
                    f"nothing to search: {self.store.where} does not exist yet; run an ingest first "
                    "(python -m pipeline ingest SPEC), or name the collection to search (query --collection; "
                    "eval builds <collection>_beir_<dataset>)"
                )
            sparse_id = self.sparse.model_id if self.sparse is not None else None
            problems = self.store.check(IndexSchema(self.embedder.dimension, self.embedder.model_id, sparse_id))
            if problems:
                raise QueryError("the collection does not fit this spec:\n" + "\n".join(problems))
            # Every model the query path uses is loaded now, not inside the first request (whose
            # latency would include it); each one's load time is kept apart (load_seconds).
            self.load_seconds["embedder"] = _timed(lambda: self.embedder.embed_query("warm-up"))
            if self.sparse is not None:
                sparse = self.sparse
                self.load_seconds["sparse"] = _timed(lambda: sparse.encode_query("warm-up"))
            if self.reranker is not None:
                reranker = self.reranker
                self.load_seconds["reranker"] = _timed(lambda: reranker.score("warm-up", ["warm-up"]))
            self._ready = True

    # -- querying ----------------------------------------------------------------------------------

    def query(
        self,
        text: str,
        *,
        top_k: int | None = None,
        filters: Mapping[str, Any] | None = None,
        mode: Mode | None = None,
        rerank: bool | None = None,
    ) -> QueryResult:
        """The ``top_k`` best chunks for ``text``; ``filters`` restrict them (see :mod:`core.filters`)."""
        started = time.perf_counter()
        if not isinstance(text, str) or not text.strip():
            raise QueryInputError("the query is empty")
        top_k = top_k or self.config.top_k
        if not 1 <= top_k <= MAX_LIMIT:
            raise QueryInputError(f"top_k must be between 1 and {MAX_LIMIT}, got {top_k}")
        try:
            conditions = Filter.parse(filters)
        except FilterValueError as exc:
            raise QueryInputError(f"invalid filter: {exc}") from None
        self.warm_up()
        resolved = self.resolve_mode(mode)
        use_reranker = self.reranker is not None and (self.config.rerank if rerank is None else rerank)
        if rerank and self.reranker is None:
            raise QueryInputError("reranking was asked for, but the spec's query section has no reranker")
        # The reranker rescores the best top_n candidates (its setting, whatever top_k is); with top_k
        # above top_n, the rest follow them in retrieval order, as the result says (reranked_count).
        top_n = self.reranker.config.top_n if use_reranker and self.reranker is not None else 0
        wanted = max(top_k, top_n)
        seconds: dict[str, float] = {}
        hits = self._retrieve(text, resolved, min(wanted, MAX_LIMIT), conditions, seconds)
        rerank_scores: list[float | None] = [None] * len(hits)
        reranked_count = min(top_n, len(hits))
        if reranked_count:
            began = time.perf_counter()
            head = hits[:reranked_count]
            order = self.reranker.rerank(text, [h.fields.get("text", "") for h in head])  # type: ignore[union-attr]
            seconds["rerank"] = time.perf_counter() - began
            hits = [head[i] for i, _ in order] + hits[reranked_count:]
            rerank_scores[:reranked_count] = [score for _, score in order]
        chunks = [
            _retrieved(rank, hit, rerank_score)
            for rank, (hit, rerank_score) in enumerate(zip(hits[:top_k], rerank_scores[:top_k]), start=1)
        ]
        seconds["total"] = time.perf_counter() - started
        return QueryResult(
            query=text,
            mode=resolved,
            reranked=use_reranker,
            hits=chunks,
            seconds=seconds,
            reranked_count=min(reranked_count, len(chunks)),
            searched=self.store.where,
        )

    def _retrieve(self, text: str, mode: Mode, limit: int, conditions: Filter, seconds: dict[str, float]) -> list[Hit]:
        branches: list[Branch] = self.hybrid_branches() if mode == "hybrid" else [mode]  # type: ignore[list-item]
        for branch in branches:
            if branch not in self.available_branches():
                raise QueryInputError(f"{branch} search is not available: {self._why_missing(branch)}")
        began = time.perf_counter()
        per_branch = max(self.config.candidates, limit)
        requests = [self._request(branch, text, per_branch if mode == "hybrid" else limit) for branch in branches]
        seconds["encode"] = time.perf_counter() - began
        began = time.perf_counter()
        if mode != "hybrid":
            hits = self.store.search(
                requests[0], conditions, search_params=self.config.search_params if mode == "dense" else None
            )
        else:
            fusion_config = self.config.fusion
            fusion = (
                RRFFusion(fusion_config.k)
                if fusion_config.method == "rrf"
                else WeightedFusion(tuple(fusion_config.weights.get(b, 1.0) for b in branches), fusion_config.normalize)
            )
            hits = self.store.hybrid_search(requests, fusion, limit, conditions)
        seconds["search"] = time.perf_counter() - began
        return hits

    def _request(self, branch: Branch, text: str, limit: int) -> SearchRequest:
        if branch == "dense":
            return SearchRequest("dense", self.embedder.embed_query(text), limit)
        if branch == "bm25":
            return SearchRequest("bm25", text, limit)
        return SearchRequest("sparse", self.sparse.encode_query(text), limit)  # type: ignore[union-attr]


def _timed(action: Callable[[], object]) -> float:
    began = time.perf_counter()
    action()
    return time.perf_counter() - began


def _retrieved(rank: int, hit: Hit, rerank_score: float | None) -> RetrievedChunk:
    fields = hit.fields
    return RetrievedChunk(
        rank=rank,
        id=hit.id,
        source_id=str(fields.get("source_id", "")),
        chunk_index=int(fields.get("chunk_index", 0)),
        text=str(fields.get("text", "")),
        score=rerank_score if rerank_score is not None else hit.score,
        retrieval_score=hit.score,
        rerank_score=rerank_score,
        metadata=dict(fields.get("metadata") or {}),
    )


def format_table(result: QueryResult, snippet_chars: int = 100) -> str:
    """A readable table: rank, score, source, page, snippet."""
    rows = [("rank", "score", "source", "page", "snippet")]
    for hit in result.hits:
        pages = hit.page_numbers
        page = "-" if not pages else str(pages[0]) if len(pages) == 1 else f"{pages[0]}-{pages[-1]}"
        snippet = " ".join(hit.text.split())
        if len(snippet) > snippet_chars:
            snippet = snippet[: snippet_chars - 1] + "…"
        rows.append((str(hit.rank), f"{hit.score:.4f}", hit.source_id, page, snippet))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    timing = ", ".join(f"{name} {value * 1000:.0f} ms" for name, value in result.seconds.items())
    rerank = ""
    if result.reranked:
        rerank = " + rerank"
        if result.reranked_count < len(result.hits):
            rerank += f" of the first {result.reranked_count} (the reranker's top_n; the rest in retrieval order)"
    searched = f" in {result.searched}" if result.searched else ""
    header = f"{len(result.hits)} result(s){searched}, mode {result.mode}{rerank} ({timing})"
    return "\n".join([header, *lines]) if result.hits else header
