"""What a search asks a store and what it gets back, in types that name no engine.

The query path (:mod:`pipeline.query`) builds :class:`SearchRequest` branches and a fusion, and
reads :class:`Hit` rows; a store turns them into its engine's requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Branch = Literal["dense", "bm25", "sparse"]
"""A retrieval branch: dense vectors, BM25 over the chunk text, or a learned sparse encoder."""
BRANCHES: tuple[Branch, ...] = ("dense", "bm25", "sparse")


@dataclass(frozen=True)
class Hit:
    """One retrieved row. ``score`` is higher-is-better for every metric and fusion: Milvus Lite's
    negative BM25 scores are flipped and L2 distances negated, so callers never need to know the metric."""

    id: str
    score: float
    fields: dict[str, Any]


@dataclass(frozen=True)
class SearchRequest:
    """One retrieval branch and what to search it with.

    ``data`` is a dense vector for ``dense``, a ``{term id: weight}`` mapping for ``sparse``, or
    the query text itself for ``bm25`` (the store tokenises it as it tokenised the chunks).
    """

    branch: Branch
    data: Any
    limit: int


@dataclass(frozen=True)
class RRFFusion:
    """Reciprocal rank fusion: score = sum over branches of 1 / (k + rank)."""

    k: int = 60


@dataclass(frozen=True)
class WeightedFusion:
    """Weighted sum of per-branch scores (one weight per request, in order); Milvus maps each
    branch's scores into [0, 1] first (arctan for IP and BM25) unless ``normalize`` is false."""

    weights: tuple[float, ...]
    normalize: bool = True


Fusion = RRFFusion | WeightedFusion


def check_hybrid(requests: Sequence[SearchRequest], fusion: Fusion, limit: int) -> None:
    """Refuse a hybrid search no store can run (every store checks the same way, before searching)."""
    if limit <= 0:
        raise ValueError(f"top_k must be positive, got {limit}")
    if not requests:
        raise ValueError("hybrid search needs at least one request")
    if isinstance(fusion, WeightedFusion) and len(fusion.weights) != len(requests):
        raise ValueError(
            f"weighted fusion needs one weight per branch: {len(requests)} branches, {len(fusion.weights)} weights"
        )
