"""The query path: a question in, the best chunks out, with their text, source, pages and scores.

Retrieval modes, over one collection that holds the dense and sparse fields side by side:

* ``dense``: approximate nearest neighbours of the query embedding;
* ``bm25``: Milvus' built-in BM25 over the chunk text (the store's ``bm25`` field);
* ``sparse``: a learned sparse encoder (SPLADE; the store's ``learned_sparse`` field);
* ``hybrid``: several of those branches fused (``query.fusion``): reciprocal rank fusion and
  Milvus' weighted sum run server-side in Milvus ``hybrid_search``; weighted RRF, min-max and
  distribution-based (DBSF) score fusion, and per-query adaptive weights, run here on each branch's
  candidates (:mod:`core.fusion`);
* ``auto`` (the default): hybrid when the store has a sparse field, else dense; with
  ``fusion.language_aware`` (on by default) the dense branch is left out of a query when the
  embedder's model does not cover the corpus's language (read from a sample of the stored chunks
  at warm-up) or the query's script, and the result's ``notes`` say so.

Then, optionally, a reranker rescores the best candidates. Every score a caller sees is
higher-is-better (Milvus Lite's negative BM25 scores are flipped by the store).

A :class:`QueryEngine` loads its models and opens its Milvus client once; ``query`` is safe to
call from many threads at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.errors import PipelineError
from core.filters import Filter, FilterValueError
from core.fusion import fuse
from core.language import LATIN, UNKNOWN, LanguageTally, covers, detect_language
from core.search import BRANCHES, Branch, Hit, RRFFusion, SearchRequest, WeightedFusion
from stores.base import IndexSchema, Store

if TYPE_CHECKING:
    from embedders.base import Embedder
    from embedders.sparse import SparseEncoder
    from rerankers.base import Reranker


Mode = Literal["auto", "dense", "bm25", "sparse", "hybrid"]
FusionMethod = Literal["rrf", "weighted", "minmax", "dbsf"]
MAX_LIMIT = 16_384  # Milvus' ceiling for a search's limit
LANGUAGE_SAMPLE_CHUNKS = 256  # stored chunks read at warm-up to tell the corpus's language

log = logging.getLogger("rag_pipeline.query")


class QueryError(PipelineError):
    """A query that cannot run: nothing ingested yet, a mode the collection cannot serve."""


class QueryInputError(QueryError):
    """The request itself is wrong: an empty query, a bad top_k, a malformed filter, a mode the spec lacks."""


class FusionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: FusionMethod = Field(
        "minmax",
        description="minmax: weighted sum of each branch's scores min-max normalised over its candidates (the "
        "default); rrf: reciprocal rank fusion, ranks only (server-side in Milvus unless weighted or adaptive); "
        "dbsf: weighted sum of scores normalised by their distribution (mean +- 3 std, as Qdrant's DBSF); "
        "weighted: Milvus' server-side weighted sum (arctan-normalised scores).",
    )
    k: int = Field(60, ge=1, description="rrf: the constant of score = sum of weight / (k + rank).")
    weights: dict[Branch, float] = Field(
        default_factory=dict, description="Weight per branch, for every method (missing: 1.0)."
    )
    normalize: bool = Field(True, description="weighted: map each branch's scores into [0, 1] first.")
    adaptive: bool = Field(
        False,
        description="rrf, minmax, dbsf: scale each branch's weight per query by how clearly its best score "
        "stands out of its candidates' scores (z-score), trusting the branch that sees a clear match.",
    )
    language_aware: bool = Field(
        True,
        description="auto mode: leave the dense branch out when the embedder's model does not cover the "
        "corpus's language (sampled from the stored chunks) or the query's script; the result notes say why.",
    )

    def client_side(self) -> bool:
        """Whether the fusion runs here on each branch's candidates rather than in the store's hybrid search."""
        if self.method == "weighted":
            return False
        return self.method != "rrf" or self.adaptive or any(w != 1.0 for w in self.weights.values())


class QueryConfig(BaseModel):
    """The spec's ``query:`` section (its ``reranker:`` is a component, validated by the spec loader)."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode = Field(
        "auto",
        description="auto: hybrid when the store has a sparse field (without a dense branch whose model does not "
        "cover the language: fusion.language_aware), else dense.",
    )
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
    branches: list[str] = field(default_factory=list)  # the branches searched (fused when more than one)
    notes: list[str] = field(default_factory=list)  # why a branch was left out, and the like

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "mode": self.mode,
            "reranked": self.reranked,
            "reranked_count": self.reranked_count,
            "searched": self.searched,
            "branches": self.branches,
            "notes": self.notes,
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
        self.corpus_languages: dict[str, int] = {}  # sampled stored chunks by language (set by warm_up)

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
            if self.config.fusion.language_aware and len(self.available_branches()) > 1:
                self.corpus_languages = self._sample_languages()
                if note := self._corpus_language_note():
                    log.warning("%s: %s", self.store.where, note)
            self._ready = True

    # -- language-aware auto mode ------------------------------------------------------------------

    def _sample_languages(self) -> dict[str, int]:
        """Stored chunks by language, from the first :data:`LANGUAGE_SAMPLE_CHUNKS` the store lists."""
        tally = LanguageTally()
        rows = self.store.rows(["text"])
        try:
            for row in islice(rows, LANGUAGE_SAMPLE_CHUNKS):
                tally.add(detect_language(str(row.get("text") or "")).language)
        finally:
            close = getattr(rows, "close", None)
            if close is not None:
                close()
        return tally.counts

    def _corpus_language_note(self) -> str | None:
        """Why the dense branch is left out of every auto query, when the corpus's language is one the
        embedder's model is known not to cover (a mixed corpus is judged query by query instead)."""
        tally = LanguageTally(dict(self.corpus_languages))
        dominant = tally.dominant()
        model = self.embedder.languages()
        if dominant is None or tally.mixed() or covers(model, dominant) is not False:
            return None
        return (
            f"dense left out of auto mode: the embedder's model covers {', '.join(sorted(model or ()))} only, "
            f"the corpus is {dominant} ({tally.describe()} of {sum(tally.counts.values())} sampled chunks)"
        )

    def _query_language_note(self, text: str) -> str | None:
        """Why the dense branch is left out of this query: its script names a language the model does
        not cover (a Latin-script query is never judged: too short to tell English from French)."""
        language = detect_language(text).language
        model = self.embedder.languages()
        if language in (UNKNOWN, LATIN, "en") or covers(model, language) is not False:
            return None
        covered = ", ".join(sorted(model or ()))
        return f"dense left out: the query is {language}, the embedder's model covers {covered} only"

    def auto_branches(self, text: str) -> tuple[list[Branch], list[str]]:
        """The branches auto mode searches for ``text``, and why any was left out."""
        branches = self.hybrid_branches()
        if not self.config.fusion.language_aware or "dense" not in branches or len(branches) < 2:
            return branches, []
        note = self._corpus_language_note() or self._query_language_note(text)
        if note is None:
            return branches, []
        return [b for b in branches if b != "dense"], [note]

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
        notes: list[str] = []
        if resolved == "hybrid" and (mode or self.config.mode) == "auto":
            branches, notes = self.auto_branches(text)
        else:
            branches = self.hybrid_branches() if resolved == "hybrid" else [resolved]  # type: ignore[list-item]
        if len(branches) == 1:
            resolved = branches[0]
        hits = self._retrieve(text, branches, min(wanted, MAX_LIMIT), conditions, seconds)
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
            branches=list(branches),
            notes=notes,
        )

    def _retrieve(
        self, text: str, branches: list[Branch], limit: int, conditions: Filter, seconds: dict[str, float]
    ) -> list[Hit]:
        for branch in branches:
            if branch not in self.available_branches():
                raise QueryInputError(f"{branch} search is not available: {self._why_missing(branch)}")
        fused = len(branches) > 1
        began = time.perf_counter()
        per_branch = max(self.config.candidates, limit)
        requests = [self._request(branch, text, per_branch if fused else limit) for branch in branches]
        seconds["encode"] = time.perf_counter() - began
        began = time.perf_counter()
        fusion_config = self.config.fusion
        if not fused:
            hits = self.store.search(
                requests[0], conditions, search_params=self.config.search_params if branches == ["dense"] else None
            )
        elif fusion_config.client_side():
            # One request per branch, fused here: what Milvus cannot do server-side (score
            # normalisations, weighted RRF, per-query weights).
            hits = fuse_hits(self._search_each(requests, conditions), fusion_config, branches, limit)
        else:
            fusion = (
                RRFFusion(fusion_config.k)
                if fusion_config.method == "rrf"
                else WeightedFusion(tuple(fusion_config.weights.get(b, 1.0) for b in branches), fusion_config.normalize)
            )
            hits = self.store.hybrid_search(requests, fusion, limit, conditions)
        seconds["search"] = time.perf_counter() - began
        return hits

    def search_branches(
        self, text: str, branches: list[Branch], limit: int, filters: Mapping[str, Any] | None = None
    ) -> list[list[Hit]]:
        """Each branch's ``limit`` best hits for ``text``, unfused (one store request per branch): what
        client-side fusion fuses, and what ``eval --tune-fusion`` fits fusions on."""
        self.warm_up()
        for branch in branches:
            if branch not in self.available_branches():
                raise QueryInputError(f"{branch} search is not available: {self._why_missing(branch)}")
        requests = [self._request(branch, text, limit) for branch in branches]
        return self._search_each(requests, Filter.parse(filters))

    def _search_each(self, requests: list[SearchRequest], conditions: Filter) -> list[list[Hit]]:
        return [
            self.store.search(
                request, conditions, search_params=self.config.search_params if request.branch == "dense" else None
            )
            for request in requests
        ]

    def _request(self, branch: Branch, text: str, limit: int) -> SearchRequest:
        if branch == "dense":
            return SearchRequest("dense", self.embedder.embed_query(text), limit)
        if branch == "bm25":
            return SearchRequest("bm25", text, limit)
        return SearchRequest("sparse", self.sparse.encode_query(text), limit)  # type: ignore[union-attr]


def fuse_hits(
    found: list[list[Hit]], config: FusionConfig, branches: list[Branch] | None = None, limit: int | None = None
) -> list[Hit]:
    """Each branch's hits (best first) fused as ``config`` says (:func:`core.fusion.fuse`), best first;
    ``branches`` name them, for their weights. A hit keeps the fields of its first appearance."""
    if config.method == "weighted":
        raise ValueError("the weighted method is Milvus' server-side fusion; use minmax or dbsf client-side")
    weights = [config.weights.get(b, 1.0) for b in branches] if branches else [1.0] * len(found)
    fields: dict[str, dict[str, Any]] = {}
    for hits in found:
        for hit in hits:
            fields.setdefault(hit.id, hit.fields)
    rankings = [[(hit.id, hit.score) for hit in hits] for hits in found]
    fused = fuse(rankings, config.method, k=config.k, weights=weights, adaptive=config.adaptive, limit=limit)
    return [Hit(item_id, score, fields[item_id]) for item_id, score in fused]


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
    notes = [f"note: {note}" for note in result.notes]
    return "\n".join([header, *notes, *lines]) if result.hits else "\n".join([header, *notes])
