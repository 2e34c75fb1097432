"""Retrieval quality of a spec on a BEIR-format dataset, every retrieval mode from one command.

``python -m pipeline eval spec.yaml --beir DIR [--split test] [--protocol chunks|documents] [--measures ...]``:

1. ingest ``DIR/corpus.jsonl`` with the spec's parser, chunker, embedder, sparse encoder and store
   (the spec's sources are replaced by a ``jsonl`` source; each record is one document, title and
   text joined as BEIR does, the record id as source id), into a collection of its own
   (``<collection>_beir_<dataset>``) so a production collection is never touched;
2. run every query of the split (``DIR/queries.jsonl``, only those judged in ``DIR/qrels/<split>.tsv``)
   through the spec's query path in each mode: dense, bm25, sparse, hybrid and ``<mode>+rerank``;
3. map chunk hits back to documents (a document scores as its best chunk) and measure nDCG@10,
   Recall@10, Recall@100 and MRR@10 (or the ``measures`` asked for) with ``ir-measures``
   (pytrec_eval), plus per-query latency p50/p95.

The protocol says what a document is to the embedder. ``chunks`` (the default): the spec's chunker
cuts it, as a production index would. ``documents``: every document is one chunk, cut to the
model's token window, the protocol of published BEIR tables (and of ``benchmarks/``); truncation is
the norm there with a 256-token model (1,080 of 1,104 paragraphs of one Chinese set), so it is
counted and reported. Each protocol ingests into a collection of its own, so ``--reuse-index``
never mixes them.

``+rerank`` modes rerank the first ``top_n`` chunks of their base mode's ranking (the reranker's
``top_n``) and keep the rest after them, so recall stays comparable; their latency is the base
mode's plus the reranking.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import numpy as np

from core.component import require
from core.errors import PipelineError
from core.search import BRANCHES
from pipeline.query import MAX_LIMIT, QueryEngine
from pipeline.spec import ComponentSpec, MetricsSettings, RunnerConfig, Spec

log = logging.getLogger("rag_pipeline.eval")

RERANK_SUFFIX = "+rerank"
MEASURES = ("nDCG@10", "R@10", "R@100", "RR@10")
MEASURES_HINT = "use ir-measures names such as nDCG@10, R@100, P@5, RR@10, MAP"
RECALL_DEPTH = 100  # documents kept per query at least: Recall@100 needs 100 (a larger cutoff asks for more)

EvalProtocol = Literal["chunks", "documents"]
PROTOCOLS: dict[EvalProtocol, str] = {
    "chunks": "the spec's chunker; a document scores as its best chunk",
    "documents": "one chunk per document, cut to the model's window, as in published BEIR tables",
}


class EvaluationError(PipelineError):
    """A dataset that cannot be read, or a mode the spec cannot run."""


@dataclass(frozen=True)
class BeirDataset:
    name: str
    corpus: Path
    queries: dict[str, str]  # query id -> text, only the judged ones
    qrels: dict[str, dict[str, int]]  # query id -> {document id: relevance}


def load_beir(folder: Path, split: str = "test") -> BeirDataset:
    """Read a BEIR folder: corpus.jsonl, queries.jsonl (or queries_<split>.jsonl), qrels/<split>.tsv."""
    corpus = folder / "corpus.jsonl"
    qrels_file = folder / "qrels" / f"{split}.tsv"
    for required in (corpus, qrels_file):
        if not required.is_file():
            splits = sorted(p.stem for p in (folder / "qrels").glob("*.tsv")) if (folder / "qrels").is_dir() else []
            hint = f"; splits found: {', '.join(splits)}" if splits else ""
            raise EvaluationError(f"{folder} is not a BEIR dataset: {required} is missing{hint}")
    qrels: dict[str, dict[str, int]] = {}
    with open(qrels_file, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            try:
                qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
            except (KeyError, TypeError, ValueError):
                raise EvaluationError(
                    f"{qrels_file}: expected a header 'query-id corpus-id score' and integer scores"
                ) from None
    queries_file = folder / f"queries_{split}.jsonl"
    if not queries_file.is_file():
        queries_file = folder / "queries.jsonl"
    queries: dict[str, str] = {}
    with open(queries_file, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                if str(record["_id"]) in qrels and str(record.get("text") or "").strip():  # real sets hold empty ones
                    queries[str(record["_id"])] = record["text"]
    missing = len(set(qrels) - set(queries))
    if missing:
        log.warning("%d judged queries of split %s have no text in %s and are skipped", missing, split, queries_file)
    return BeirDataset(folder.resolve().name, corpus, queries, {q: qrels[q] for q in queries})


@dataclass
class ModeResult:
    mode: str
    metrics: dict[str, float]
    latency_ms: dict[str, float]  # p50, p95, mean
    queries: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EvalReport:
    dataset: str
    split: str
    collection: str
    documents: int
    chunks: int
    ingest_seconds: float | None  # None when an existing index was reused, as are the other ingest figures
    protocol: EvalProtocol = "chunks"
    measures: list[str] = field(default_factory=lambda: list(MEASURES))
    index_reused: bool = False
    stage_seconds: dict[str, float] | None = None  # ingest time per stage (parse, chunk, embed, write ...)
    chunks_truncated: int | None = None  # also None when the embedder keeps no count (an API embedder)
    results: list[ModeResult] = field(default_factory=list)
    load_seconds: dict[str, float] = field(default_factory=dict)  # model loading, before any query is timed
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["results"] = [r.to_dict() for r in self.results]
        return out

    def format(self) -> str:
        ingest = (
            f"ingested in {self.ingest_seconds:.0f} s" if self.ingest_seconds is not None else "existing index reused"
        )
        loading = ", ".join(f"{model} {seconds:.1f} s" for model, seconds in self.load_seconds.items())
        widths = {name: max(9, len(name) + 2) for name in self.measures}
        lines = [
            f"{self.dataset} ({self.split}): {self.documents} documents, {self.chunks} chunks in {self.collection!r}, "
            f"{ingest}" + (f"; models loaded before timing: {loading}" if loading else ""),
            f"protocol: {self.protocol} ({PROTOCOLS[self.protocol]})",
            f"{'mode':<16}"
            + "".join(f"{name:>{width}}" for name, width in widths.items())
            + f"{'p50 ms':>9}{'p95 ms':>9}{'queries':>9}",
        ]
        for r in self.results:
            t = r.latency_ms
            lines.append(
                f"{r.mode:<16}"
                + "".join(f"{r.metrics[name]:>{width}.4f}" for name, width in widths.items())
                + f"{t['p50']:>9.1f}{t['p95']:>9.1f}{r.queries:>9}"
            )
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def eval_collection_name(collection: str, dataset: str, protocol: EvalProtocol = "chunks") -> str:
    slug = re.sub(r"[^A-Za-z0-9_]", "_", dataset)
    suffix = "_documents" if protocol == "documents" else ""  # the other protocol's chunks are another index
    return f"{collection}_beir_{slug}{suffix}"[:255]


def eval_spec(
    spec: Spec, dataset: BeirDataset, collection: str | None = None, protocol: EvalProtocol = "chunks"
) -> Spec:
    """The spec with the corpus as its only source and its own collection; with the ``documents``
    protocol also a chunker that keeps each document whole (nothing else changes)."""
    from connectors.jsonl import JsonlSource

    production: str = spec.stage("store").config.collection  # type: ignore[attr-defined]
    name = collection or eval_collection_name(production, dataset.name, protocol)
    source = ComponentSpec(
        "source", JsonlSource.type_name, JsonlSource, JsonlSource.Config(path=str(dataset.corpus.resolve()))
    )
    spec = spec.with_collection(name)
    stages = {**spec.stages, "source": [source]}
    if protocol == "documents":
        stages["chunker"] = _whole_documents()
    return dataclasses.replace(spec, stages=stages, runner=evaluation_runner(spec.runner, name))


def evaluation_runner(runner: RunnerConfig, collection: str) -> RunnerConfig:
    """The spec's runner for an evaluation's ingest into ``collection``: its failures in a file of their own,
    and no metrics published (the textfile and the Pushgateway group are the served index's)."""
    return runner.model_copy(
        update={"failures_file": runner.failures_file or f"{collection}.failures.jsonl", "metrics": MetricsSettings()}
    )


def _whole_documents() -> ComponentSpec:
    """A chunker that never cuts: each document is one chunk, and the embedder truncates it as BEIR's does."""
    from chunkers.recursive import RecursiveChunker

    config = RecursiveChunker.Config(chunk_size=sys.maxsize, chunk_overlap=0)
    return ComponentSpec("chunker", RecursiveChunker.type_name, RecursiveChunker, config)


def parse_measures(names: Sequence[str], qrels: dict[str, dict[str, int]]) -> dict[str, Any]:
    """ir-measures measures by name, in order; an unknown name, or one nothing here can compute on
    ``qrels``, is an :class:`EvaluationError`. Checked before the ingest, so a typo costs nothing."""
    ir_measures = require("ir_measures", purpose="retrieval evaluation", extra="eval")
    sample = dict(islice(qrels.items(), 1))
    perfect = {query_id: {document: 1.0 for document in judged} for query_id, judged in sample.items()}
    measures: dict[str, Any] = {}
    for name in names:
        try:
            measure = ir_measures.parse_measure(name)
            computable = ir_measures.DefaultPipeline.supports(measure)  # also checks the measure's parameters
        except Exception as exc:  # NameError, ValueError, KeyError or AssertionError, by what is wrong
            raise EvaluationError(f"unknown measure {name!r} ({exc}); {MEASURES_HINT}") from None
        if not computable:
            raise EvaluationError(f"measure {name!r}: no installed ir-measures provider computes it; {MEASURES_HINT}")
        if measure.params.get("cutoff", 1) < 1:  # pytrec_eval aborts the whole process on @0
            raise EvaluationError(f"measure {name!r}: the cutoff after @ must be at least 1")
        try:  # on one judged query: a provider that cannot run on it (gdeval needs perl, numeric ids) fails now
            ir_measures.calc_aggregate([measure], sample, perfect)
        except Exception as exc:
            raise EvaluationError(f"measure {name!r} cannot be computed here: {exc}") from None
        measures[name] = measure
    return measures


def default_modes(engine: QueryEngine) -> list[str]:
    modes: list[str] = list(engine.available_branches())
    if len(modes) > 1:
        modes.append("hybrid")
    if engine.reranker is not None:
        modes.append(modes[-1] + RERANK_SUFFIX)
    return modes


def evaluate_dataset(
    pipeline: Any,
    dataset: BeirDataset,
    *,
    split: str = "test",
    modes: Sequence[str] | None = None,
    reuse_index: bool = False,
    max_queries: int | None = None,
    measures: Sequence[str] | None = None,
    protocol: EvalProtocol = "chunks",
    progress: Callable[[str], None] | None = None,
) -> EvalReport:
    """Ingest ``dataset`` with ``pipeline`` (built from :func:`eval_spec` with the same ``protocol``;
    unless ``reuse_index`` finds it ingested) and measure ``modes`` by ``measures`` (default:
    :data:`MEASURES`). :meth:`pipeline.Pipeline.evaluate` is the entry point."""
    chosen = parse_measures(measures or MEASURES, dataset.qrels)
    report = _ingest(pipeline, dataset, split, reuse_index, progress)
    report.protocol, report.measures = protocol, list(chosen)
    if protocol == "documents" and report.chunks_truncated:
        report.notes.append(
            f"{report.chunks_truncated} of {report.documents} documents are longer than the embedder's window and "
            "were embedded truncated (as in published BEIR tables); --protocol chunks scores each by its best chunk"
        )
    engine = pipeline.query_engine
    evaluator = ModeEvaluator(engine, dataset, measures=chosen, max_queries=max_queries, progress=progress)
    report.results = evaluator.run(list(modes) if modes else default_modes(engine))
    report.load_seconds = dict(engine.load_seconds)
    report.notes.extend(evaluator.notes)
    return report


def _ingest(
    pipeline: Any, dataset: BeirDataset, split: str, reuse_index: bool, progress: Callable[[str], None] | None
) -> EvalReport:
    store = pipeline.store
    documents = _count_documents(dataset.corpus)
    if reuse_index and store.count() > 0:
        if progress:
            progress(f"reusing {store.where} ({store.count()} chunks)")
        return EvalReport(dataset.name, split, store.name, documents, store.count(), None, index_reused=True)
    if progress:
        progress(f"ingesting {documents} documents of {dataset.name} into {store.where}")
    summary = pipeline.ingest()
    report = EvalReport(
        dataset.name,
        split,
        store.name,
        documents,
        store.count(),
        summary.seconds,
        stage_seconds=dict(summary.stage_seconds),
        chunks_truncated=summary.chunks_truncated,
    )
    if summary.documents_failed:
        report.notes.append(f"{summary.documents_failed} documents failed to ingest (see {summary.failures_file})")
    report.notes.extend(summary.notes)
    return report


class ModeEvaluator:
    """Runs the judged queries through a query engine in several modes and scores the rankings."""

    def __init__(
        self,
        engine: QueryEngine,
        dataset: BeirDataset,
        *,
        measures: dict[str, Any] | None = None,
        max_queries: int | None = None,
        progress: Callable[[str], None] | None = None,
    ):
        self.engine = engine
        self.dataset = dataset
        self.measures = measures or parse_measures(MEASURES, dataset.qrels)  # name -> ir-measures measure
        cutoffs: list[int] = [measure.params.get("cutoff", 0) for measure in self.measures.values()]
        self.depth = max([RECALL_DEPTH, *cutoffs])  # documents kept per query
        self.query_ids = sorted(dataset.queries)[:max_queries] if max_queries else sorted(dataset.queries)
        self.progress = progress
        self.notes: list[str] = []
        self._rankings: dict[
            str, dict[str, list[tuple[str, str]]]
        ] = {}  # mode -> query id -> [(document id, chunk text)]
        self._latencies: dict[str, dict[str, float]] = {}  # mode -> query id -> seconds

    def chunk_limit(self) -> int:
        """Chunks to fetch so that ``depth`` distinct documents are likely among them."""
        store = self.engine.store
        per_document = max(1.0, store.count() / max(_count_documents(self.dataset.corpus), 1))
        return min(MAX_LIMIT, math.ceil(self.depth * per_document))

    def run(self, modes: Sequence[str]) -> list[ModeResult]:
        self.engine.warm_up()
        limit = self.chunk_limit()
        results = []
        for mode in modes:
            base, reranked = (mode[: -len(RERANK_SUFFIX)], True) if mode.endswith(RERANK_SUFFIX) else (mode, False)
            if base not in (*BRANCHES, "hybrid", "auto"):
                raise EvaluationError(
                    f"unknown mode {mode!r}; use dense, bm25, sparse, hybrid, auto, optionally with {RERANK_SUFFIX}"
                )
            if reranked and self.engine.reranker is None:
                raise EvaluationError(f"mode {mode!r} needs a reranker: add query.reranker to the spec")
            if base not in self._rankings:
                self._retrieve(base, limit)
            ranking, latency = self._rerank(base) if reranked else (self._rankings[base], self._latencies[base])
            results.append(self._score(mode, ranking, latency))
            if self.progress:
                first = next(iter(self.measures))
                self.progress(f"{mode}: {first} {results[-1].metrics[first]:.4f}")
        return results

    def _retrieve(self, mode: str, limit: int) -> None:
        rankings, latencies = {}, {}
        for number, query_id in enumerate(self.query_ids, start=1):
            began = time.perf_counter()
            result = self.engine.query(self.dataset.queries[query_id], top_k=limit, mode=mode, rerank=False)  # type: ignore[arg-type]
            latencies[query_id] = time.perf_counter() - began
            rankings[query_id] = [(hit.source_id, hit.text) for hit in result.hits]
            if self.progress and number % 100 == 0:
                self.progress(f"{mode}: {number}/{len(self.query_ids)} queries")
        self._rankings[mode], self._latencies[mode] = rankings, latencies

    def _rerank(self, base: str) -> tuple[dict[str, list[tuple[str, str]]], dict[str, float]]:
        reranker = self.engine.reranker
        assert reranker is not None
        top_n = reranker.config.top_n
        rankings, latencies = {}, {}
        for number, query_id in enumerate(self.query_ids, start=1):
            ranking = self._rankings[base][query_id]
            began = time.perf_counter()
            order = reranker.rerank(self.dataset.queries[query_id], [text for _, text in ranking[:top_n]])
            latencies[query_id] = self._latencies[base][query_id] + time.perf_counter() - began
            rankings[query_id] = [ranking[i] for i, _ in order] + ranking[top_n:]
            if self.progress and number % 25 == 0:
                self.progress(f"{base}{RERANK_SUFFIX}: {number}/{len(self.query_ids)} queries")
        return rankings, latencies

    def _score(self, mode: str, rankings: dict[str, list[tuple[str, str]]], latencies: dict[str, float]) -> ModeResult:
        ir_measures = require("ir_measures", purpose="retrieval evaluation", extra="eval")
        run: dict[str, dict[str, float]] = {}
        for query_id, ranking in rankings.items():
            documents: dict[str, float] = {}
            for source_id, _ in ranking:  # best chunk first: a document's first chunk is its best
                if source_id not in documents and len(documents) < self.depth:
                    # Scores from ranks, so the metric sees exactly this order (ties would be re-sorted by id).
                    documents[source_id] = float(self.depth - len(documents))
            run[query_id] = documents
        qrels = {q: self.dataset.qrels[q] for q in self.query_ids}
        values = ir_measures.calc_aggregate(list(self.measures.values()), qrels, run)
        seconds = np.array([latencies[q] for q in self.query_ids]) * 1000
        return ModeResult(
            mode=mode,
            metrics={name: float(values[measure]) for name, measure in self.measures.items()},
            latency_ms={
                "p50": float(np.percentile(seconds, 50)),
                "p95": float(np.percentile(seconds, 95)),
                "mean": float(seconds.mean()),
            },
            queries=len(self.query_ids),
        )


def _count_documents(corpus: Path) -> int:
    with open(corpus, encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())
