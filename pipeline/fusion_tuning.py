"""Fit the hybrid fusion (method and weights) on labelled queries, and measure fusions side by side.

``python -m pipeline eval spec.yaml --beir DIR --tune-fusion [SPLIT]``:

1. ingest the corpus as ``eval`` does (or reuse the index with ``--reuse-index``);
2. pick the labelled queries to fit on, never the test split: ``train`` to fit and ``dev`` held out
   when both exist; otherwise the one non-test split (``train``, ``dev``, ``validation``, ``trial``,
   or the one named), its queries cut into two halves by a hash of their ids (deterministic; the
   report says so);
3. run every fitting query once per branch (``query.candidates`` hits each, unfused), then fuse those
   candidates every way in :func:`candidates` in Python: RRF, min-max and DBSF score fusion over a
   grid of branch weights, each with and without per-query adaptive weights (:mod:`core.fusion`);
4. score each by nDCG@10 on the fit half and on the held-out half, choose the best on the fit half
   (the simplest first on ties: RRF before score fusions, fewer changes before more), and print
   the held-out figures and the ``query: fusion:`` lines to put in the spec.

:func:`fusion_figures` measures a fixed list of fusions the same way on any split (the benchmark's
table): the fusions only reorder candidates already fetched, so each costs no search.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.search import Branch, Hit
from pipeline.evaluate import BeirDataset, EvalProtocol, EvaluationError, ModeEvaluator, eval_spec, load_beir
from pipeline.query import FusionConfig, QueryEngine, fuse_hits

SPLIT_PREFERENCE = ("train", "dev", "validation", "val", "trial")
WEIGHT_STEPS = 10  # the weight grid: multiples of 1/10, summing to 1
FIT_MEASURE = "nDCG@10"


@dataclass(frozen=True)
class Candidate:
    """One way to fuse: a method, weights per branch (empty: all 1.0), per-query adaptive or not."""

    method: str  # rrf | minmax | dbsf
    weights: tuple[tuple[str, float], ...] = ()
    adaptive: bool = False
    k: int = 60

    def config(self) -> FusionConfig:
        return FusionConfig(method=self.method, k=self.k, weights=dict(self.weights), adaptive=self.adaptive)

    def label(self) -> str:
        parts = [self.method if self.method != "rrf" else f"rrf k={self.k}"]
        if self.weights:
            parts.append(" ".join(f"{b}={w:g}" for b, w in self.weights))
        if self.adaptive:
            parts.append("adaptive")
        return ", ".join(parts)

    def spec_lines(self) -> str:
        """The spec's ``query:`` section for this fusion, as YAML."""
        fusion: dict[str, Any] = {"method": self.method}
        if self.method == "rrf":
            fusion["k"] = self.k
        if self.weights:
            fusion["weights"] = dict(self.weights)
        if self.adaptive:
            fusion["adaptive"] = True
        inner = ", ".join(f"{key}: {_yaml(value)}" for key, value in fusion.items())
        return f"query:\n  fusion: {{{inner}}}"


def _yaml(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


def weight_grid(branches: Sequence[str], steps: int = WEIGHT_STEPS) -> list[tuple[tuple[str, float], ...]]:
    """Every weighting of ``branches`` in multiples of ``1/steps`` that sums to 1, each branch > 0."""
    grid = []
    for parts in itertools.product(range(1, steps), repeat=len(branches)):
        if sum(parts) == steps:
            grid.append(tuple((b, round(p / steps, 4)) for b, p in zip(branches, parts)))
    return grid


def candidates(branches: Sequence[str]) -> list[Candidate]:
    """The fusions ``--tune-fusion`` tries, simplest first: plain RRF, then weighted RRF, min-max and
    DBSF over :func:`weight_grid`, each also with per-query adaptive weights."""
    out = [Candidate("rrf"), Candidate("rrf", adaptive=True)]
    grid = weight_grid(branches)
    for method in ("rrf", "minmax", "dbsf"):
        if method != "rrf":
            out += [Candidate(method), Candidate(method, adaptive=True)]
        for weights in grid:
            if len(set(w for _, w in weights)) > 1:  # equal weights are the unweighted candidate
                out += [Candidate(method, weights), Candidate(method, weights, adaptive=True)]
    return out


FIXED = [
    Candidate("rrf"),
    Candidate("minmax"),
    Candidate("dbsf"),
    Candidate("rrf", adaptive=True),
    Candidate("minmax", adaptive=True),
    Candidate("dbsf", adaptive=True),
]
"""The fusions the benchmark reports with default settings (equal weights, k 60)."""
DEFAULT = Candidate(str(FusionConfig().method), adaptive=FusionConfig().adaptive)
"""The fusion a spec without ``query.fusion`` runs (equal weights)."""


def choose_split(folder: Path, requested: str | None) -> tuple[str, str | None]:
    """The split to fit on and the one held out (None: the fit split is cut into halves)."""
    splits = sorted(p.stem for p in (folder / "qrels").glob("*.tsv")) if (folder / "qrels").is_dir() else []
    if requested and requested != "auto":
        if requested == "test":
            raise EvaluationError("--tune-fusion never fits on the test split; name a train or dev split")
        if requested not in splits:
            raise EvaluationError(f"{folder}: no qrels/{requested}.tsv; splits found: {', '.join(splits) or 'none'}")
        return requested, None
    if "train" in splits and "dev" in splits:
        return "train", "dev"
    usable = [s for s in SPLIT_PREFERENCE if s in splits] + [s for s in splits if s not in SPLIT_PREFERENCE]
    usable = [s for s in usable if s != "test"]
    if not usable:
        raise EvaluationError(
            f"{folder}: only a test split ({', '.join(splits) or 'none'}); --tune-fusion fits on labelled queries "
            "of a train or dev split, never on the test split"
        )
    return usable[0], None


def halves(query_ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """Query ids cut into two halves by a hash of each id: the same halves on every run and machine."""
    ordered = sorted(query_ids, key=lambda q: hashlib.sha256(q.encode("utf-8")).hexdigest())
    middle = (len(ordered) + 1) // 2
    return sorted(ordered[:middle]), sorted(ordered[middle:])


@dataclass
class CandidateResult:
    label: str
    method: str
    weights: dict[str, float]
    adaptive: bool
    fit: float
    held_out: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TuningReport:
    dataset: str
    branches: list[str]
    fit_split: str
    held_out_split: str  # "<split> (second half)" when one split was cut into halves
    fit_queries: int
    held_out_queries: int
    baselines: list[CandidateResult]  # each branch alone, and plain RRF
    results: list[CandidateResult]  # every candidate, in the order tried
    chosen: CandidateResult
    spec_lines: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["baselines"] = [r.to_dict() for r in self.baselines]
        out["results"] = [r.to_dict() for r in self.results]
        out["chosen"] = self.chosen.to_dict()
        return out

    def format(self) -> str:
        lines = [
            f"{self.dataset}: fusion fitted on {self.fit_split} ({self.fit_queries} queries), "
            f"held out: {self.held_out_split} ({self.held_out_queries} queries); branches {', '.join(self.branches)}",
            f"{'fusion':<44}{'fit ' + FIT_MEASURE:>14}{'held-out':>10}",
        ]
        families: dict[tuple[str, bool], CandidateResult] = {}
        for r in self.results:  # the best-fitting weights of each method, with and without adaptive
            best = families.get((r.method, r.adaptive))
            if best is None or r.fit > best.fit:
                families[(r.method, r.adaptive)] = r
        for r in [*self.baselines, *families.values()]:
            lines.append(f"{r.label:<44}{r.fit:>14.4f}{r.held_out:>10.4f}")
        lines.append(f"chosen: {self.chosen.label}; held-out {FIT_MEASURE} {self.chosen.held_out:.4f}")
        lines += [f"note: {n}" for n in self.notes]
        lines += ["put in the spec:", self.spec_lines]
        return "\n".join(lines)


class BranchRuns:
    """Each query's unfused candidates per branch, fetched once; any fusion is then scored offline."""

    def __init__(
        self,
        engine: QueryEngine,
        dataset: BeirDataset,
        branches: Sequence[Branch] | None = None,
        *,
        progress: Callable[[str], None] | None = None,
    ):
        self.engine = engine
        self.dataset = dataset
        engine.warm_up()
        self.branches: list[Branch] = list(branches or engine.hybrid_branches())
        self.evaluator = ModeEvaluator(engine, dataset)
        self.limit = self.evaluator.chunk_limit()
        self.per_branch = max(engine.config.candidates, self.limit)
        self.hits: dict[str, list[list[Hit]]] = {}
        for number, query_id in enumerate(sorted(dataset.queries), start=1):
            self.hits[query_id] = engine.search_branches(dataset.queries[query_id], self.branches, self.per_branch)
            if progress and number % 100 == 0:
                progress(f"branches: {number}/{len(dataset.queries)} queries")

    def score(self, label: str, fused: dict[str, list[Hit]], query_ids: Sequence[str]) -> float:
        rankings = {q: [(str(h.fields.get("source_id", "")), "") for h in fused[q]] for q in query_ids}
        self.evaluator.query_ids = list(query_ids)
        result = self.evaluator._score(label, rankings, {q: 0.0 for q in query_ids})
        return result.metrics[FIT_MEASURE]

    def fuse(self, config: FusionConfig) -> dict[str, list[Hit]]:
        return {q: fuse_hits(found, config, self.branches, self.limit) for q, found in self.hits.items()}

    def branch_alone(self, branch: Branch) -> dict[str, list[Hit]]:
        position = self.branches.index(branch)
        return {q: found[position][: self.limit] for q, found in self.hits.items()}


def _result(label: str, candidate: Candidate | None, fit: float, held: float) -> CandidateResult:
    if candidate is None:
        return CandidateResult(label, label, {}, False, fit, held)
    return CandidateResult(label, candidate.method, dict(candidate.weights), candidate.adaptive, fit, held)


def tune(
    runs: BranchRuns, fit_ids: Sequence[str], held_ids: Sequence[str]
) -> tuple[list[CandidateResult], list[CandidateResult], Candidate, CandidateResult]:
    """Every candidate scored on both sets of queries; the best on ``fit_ids`` chosen (the first tried on ties)."""
    baselines = []
    for branch in runs.branches:
        alone = runs.branch_alone(branch)
        baselines.append(_result(branch, None, runs.score(branch, alone, fit_ids), runs.score(branch, alone, held_ids)))
    results: list[CandidateResult] = []
    best: tuple[float, Candidate, CandidateResult] | None = None
    for candidate in candidates(runs.branches):
        fused = runs.fuse(candidate.config())
        result = _result(
            candidate.label(), candidate, runs.score("fit", fused, fit_ids), runs.score("held", fused, held_ids)
        )
        results.append(result)
        if best is None or result.fit > best[0] + 1e-9:
            best = (result.fit, candidate, result)
    assert best is not None
    return baselines, results, best[1], best[2]


def tune_fusion(
    spec: Any,
    folder: Path,
    *,
    split: str | None = None,
    collection: str | None = None,
    reuse_index: bool = False,
    max_queries: int | None = None,
    protocol: EvalProtocol = "chunks",
    progress: Callable[[str], None] | None = None,
) -> TuningReport:
    """Ingest (or reuse) the dataset's index as ``eval`` does and fit the fusion on labelled queries
    of a non-test split; see the module docs."""
    from pipeline.evaluate import _ingest
    from pipeline.pipeline import Pipeline

    fit_split, held_split = choose_split(folder, split)
    fit_set = load_beir(folder, fit_split)
    notes: list[str] = []
    if held_split is not None:
        held_set = load_beir(folder, held_split)
        fit_ids, held_ids = sorted(fit_set.queries), sorted(held_set.queries)
        queries = {**fit_set.queries, **held_set.queries}
        qrels = {**fit_set.qrels, **held_set.qrels}
        fit_label, held_label = fit_split, held_split
        if set(fit_ids) & set(held_ids):
            raise EvaluationError(f"splits {fit_split} and {held_split} share query ids; cannot hold one out")
    else:
        fit_ids, held_ids = halves(sorted(fit_set.queries))
        queries, qrels = fit_set.queries, fit_set.qrels
        fit_label, held_label = f"{fit_split} (first half)", f"{fit_split} (second half)"
        notes.append(
            f"one labelled split ({fit_split}) without a dev split: its queries were cut into two halves by a hash "
            "of their ids, fitted on one and measured on the other"
        )
    if max_queries:
        fit_ids, held_ids = fit_ids[:max_queries], held_ids[:max_queries]
    chosen_ids = set(fit_ids) | set(held_ids)
    dataset = BeirDataset(
        fit_set.name,
        fit_set.corpus,
        {q: t for q, t in queries.items() if q in chosen_ids},
        {q: r for q, r in qrels.items() if q in chosen_ids},
    )
    evaluation = Pipeline(eval_spec(spec, dataset, collection, protocol))
    try:
        _ingest(evaluation, dataset, fit_split, reuse_index, progress)
        engine = evaluation.query_engine
        runs = BranchRuns(engine, dataset, progress=progress)
        if len(runs.branches) < 2:
            raise EvaluationError("--tune-fusion needs two retrieval branches (add `bm25: {}` to the store stage)")
        baselines, results, candidate, chosen = tune(runs, fit_ids, held_ids)
        default = DEFAULT
        found = next(r for r, c in zip(results, candidates(runs.branches)) if c == default)
        baselines.append(
            CandidateResult(f"{default.label()} (the default)", default.method, {}, False, found.fit, found.held_out)
        )
        lines = candidate.spec_lines()
        alone = max(baselines[:-1], key=lambda r: r.fit)
        if alone.fit > chosen.fit + 1e-9:  # no fusion beats the best branch alone on the fit queries
            chosen, lines = alone, f"query:\n  mode: {alone.label}"
            notes.append(f"no fusion beat {alone.label} alone on the fit queries: search that branch only")
        elif chosen.held_out < found.held_out:
            notes.append(
                f"the fitted fusion ({chosen.label}) scores below the default on the held-out queries "
                f"({chosen.held_out:.4f} < {found.held_out:.4f}): it overfits the fit queries; keep the default"
            )
            chosen, lines = baselines[-1], default.spec_lines()
        return TuningReport(
            dataset.name,
            list(runs.branches),
            fit_label,
            held_label,
            len(fit_ids),
            len(held_ids),
            baselines,
            results,
            chosen,
            lines,
            notes,
        )
    finally:
        evaluation.close()


def fusion_figures(runs: BranchRuns, fusions: Sequence[Candidate] = tuple(FIXED)) -> dict[str, float]:
    """nDCG@10 of each branch alone and of each fusion over every query of ``runs``."""
    query_ids = sorted(runs.hits)
    figures: dict[str, float] = {b: runs.score(b, runs.branch_alone(b), query_ids) for b in runs.branches}
    for candidate in fusions:
        figures[candidate.label()] = runs.score(candidate.label(), runs.fuse(candidate.config()), query_ids)
    return figures
