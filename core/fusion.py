"""Fusing the rankings of several retrieval branches into one, as pure functions.

Each branch gives a ranking: ``(id, score)`` pairs, best first, scores higher-is-better (what
:meth:`stores.base.Store.search` returns). The fusions here turn several rankings into one:

* :func:`rrf`, reciprocal rank fusion: ``sum over branches of weight / (k + rank)``, ranks from 1.
  Only ranks count, so the branches' score scales never matter; unweighted, it is exactly what
  Milvus' ``RRFRanker`` computes server-side.
* :func:`weighted_sum` of normalised scores: each branch's scores are mapped into [0, 1] first,
  by :func:`minmax` (the branch's best candidate 1, its worst 0) or by :func:`dbsf`
  (distribution-based score fusion, as Qdrant's DBSF: mean +- 3 standard deviations map to 0 and 1,
  clipped), then summed with a weight per branch; an id a branch did not return gets 0 from it.
* :func:`confidence` and :func:`adaptive_weights`: per-query weights that trust a branch by its score
  distribution, how far its best score stands above the rest of its candidates (a z-score). A
  branch that sees no clear match (flat scores, as an English-only embedder gives on Chinese text)
  then weighs little for that query.

Ties are broken by id, so a fusion's order never depends on dict or thread order. The same id twice
in one ranking counts once, at its first (best) place. Scores must be finite for the score-based
fusions (a ``ValueError`` otherwise); :func:`rrf` reads ranks only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

Ranking = Sequence[tuple[str, float]]
"""One branch's candidates: ``(id, score)``, best first."""

NORMALIZATIONS = ("minmax", "dbsf")
DBSF_SPREAD = 3.0  # standard deviations either side of the mean that map to 0 and 1


def _unique(ranking: Ranking) -> list[tuple[str, float]]:
    """The ranking with each id once, at its first place."""
    seen: set[str] = set()
    out = []
    for item_id, score in ranking:
        if item_id not in seen:
            seen.add(item_id)
            out.append((item_id, score))
    return out


def _check_finite(ranking: Ranking, branch: int) -> None:
    for item_id, score in ranking:
        if not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ValueError(f"branch {branch}: score {score!r} of {item_id!r} is not a finite number")


def _weights(rankings: Sequence[Ranking], weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * len(rankings)
    if len(weights) != len(rankings):
        raise ValueError(f"one weight per branch: {len(rankings)} branches, {len(weights)} weights")
    for weight in weights:
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"fusion weights must be finite and non-negative, got {weight!r}")
    return [float(w) for w in weights]


def _ordered(totals: Mapping[str, float], limit: int | None) -> list[tuple[str, float]]:
    order = sorted(totals.items(), key=lambda item: (-item[1], item[0]))
    return order if limit is None else order[:limit]


def rrf(
    rankings: Sequence[Ranking], k: int = 60, weights: Sequence[float] | None = None, limit: int | None = None
) -> list[tuple[str, float]]:
    """Reciprocal rank fusion: each id scores ``sum of weight / (k + rank)`` over the branches that
    returned it (rank 1 for a branch's best); best first, ties by id."""
    if k < 1:
        raise ValueError(f"the RRF constant k must be at least 1, got {k}")
    chosen = _weights(rankings, weights)
    totals: dict[str, float] = {}
    for ranking, weight in zip(rankings, chosen):
        for rank, (item_id, _) in enumerate(_unique(ranking), start=1):
            totals[item_id] = totals.get(item_id, 0.0) + weight / (k + rank)
    return _ordered(totals, limit)


def minmax(scores: Sequence[float]) -> list[float]:
    """Scores mapped linearly into [0, 1]: the best 1, the worst 0; all 1 when they are all equal."""
    if not scores:
        return []
    low, high = min(scores), max(scores)
    if high == low:
        return [1.0] * len(scores)
    return [(s - low) / (high - low) for s in scores]


def dbsf(scores: Sequence[float]) -> list[float]:
    """Distribution-based score fusion's normalisation (Qdrant's DBSF): ``mean - 3 std`` maps to 0,
    ``mean + 3 std`` to 1, clipped into [0, 1]; all 1 when the scores are all equal (or only one)."""
    if not scores:
        return []
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    if std == 0:
        return [1.0] * len(scores)
    low, span = mean - DBSF_SPREAD * std, 2 * DBSF_SPREAD * std
    return [min(1.0, max(0.0, (s - low) / span)) for s in scores]


def normalize(scores: Sequence[float], method: str) -> list[float]:
    if method == "minmax":
        return minmax(scores)
    if method == "dbsf":
        return dbsf(scores)
    raise ValueError(f"unknown score normalisation {method!r}; use one of {', '.join(NORMALIZATIONS)}")


def weighted_sum(
    rankings: Sequence[Ranking],
    weights: Sequence[float] | None = None,
    normalization: str = "minmax",
    limit: int | None = None,
) -> list[tuple[str, float]]:
    """Each branch's scores normalised (``minmax`` or ``dbsf``) over its own candidates, then summed
    with one weight per branch; an id a branch did not return gets 0 from it. Best first, ties by id."""
    chosen = _weights(rankings, weights)
    totals: dict[str, float] = {}
    for branch, (ranking, weight) in enumerate(zip(rankings, chosen)):
        _check_finite(ranking, branch)
        unique = _unique(ranking)
        for (item_id, _), value in zip(unique, normalize([s for _, s in unique], normalization)):
            totals[item_id] = totals.get(item_id, 0.0) + weight * value
    return _ordered(totals, limit)


def confidence(scores: Sequence[float]) -> float:
    """How clearly a branch's best candidate stands out: the z-score of its best score among all its
    candidates' scores (0 when there are fewer than two, or they are all equal)."""
    if len(scores) < 2:
        return 0.0
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    return 0.0 if std == 0 else max(0.0, (max(scores) - mean) / std)


def adaptive_weights(rankings: Sequence[Ranking], weights: Sequence[float] | None = None) -> list[float]:
    """Per-query weights: each branch's weight times its :func:`confidence` on this query, so the
    branch whose best match stands out most counts most; the weights as given when no branch has
    any confidence (every ranking flat, short or empty)."""
    chosen = _weights(rankings, weights)
    for branch, ranking in enumerate(rankings):
        _check_finite(ranking, branch)
    trust = [confidence([s for _, s in _unique(r)]) for r in rankings]
    scaled = [w * t for w, t in zip(chosen, trust)]
    return scaled if any(scaled) else chosen


def fuse(
    rankings: Sequence[Ranking],
    method: str = "rrf",
    *,
    k: int = 60,
    weights: Sequence[float] | None = None,
    adaptive: bool = False,
    limit: int | None = None,
) -> list[tuple[str, float]]:
    """One of the fusions by name: ``rrf`` (:func:`rrf`), ``minmax`` or ``dbsf`` (:func:`weighted_sum`
    with that normalisation); ``adaptive`` multiplies the weights by :func:`adaptive_weights` per query."""
    if method not in ("rrf", *NORMALIZATIONS):
        raise ValueError(f"unknown fusion method {method!r}; use rrf, minmax or dbsf")
    chosen = adaptive_weights(rankings, weights) if adaptive else _weights(rankings, weights)
    if method == "rrf":
        return rrf(rankings, k, chosen, limit)
    return weighted_sum(rankings, chosen, method, limit)
