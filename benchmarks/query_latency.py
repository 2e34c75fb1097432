"""Single-query latency at 100,000 chunks in the embedded store: dense, BM25, hybrid, and reranking.

    # 1. rows and queries from a SciFact index built by retrieval_quality.py (real text, real MiniLM vectors)
    python benchmarks/query_latency.py prepare --index /tmp/scifact.db --out /tmp/latency.npz
    # 2. one run per engine; the engine is whatever pymilvus + milvus-lite the interpreter has
    python benchmarks/query_latency.py measure --data /tmp/latency.npz --db /tmp/lat3.db
    /work/venvs/lite25/bin/python benchmarks/query_latency.py measure --data /tmp/latency.npz --db /tmp/lat25.db
    # 3. reranking the top 20 (the engine does not matter)
    python benchmarks/query_latency.py rerank --data /tmp/latency.npz --reranker query-likelihood

``prepare`` repeats SciFact's 5,183 abstracts with varied ids until there are ``--rows`` chunks;
each copy's vector gets a little noise (then is re-normalised) so that copies are near, not equal.
``measure`` needs only numpy and pymilvus, so it runs unchanged in a separate virtual environment
holding another Milvus Lite: it creates the project's schema (dense FLOAT_VECTOR + text with the
built-in BM25 function), inserts the rows, and times single queries (one at a time, as a service
answers them) for dense, BM25 and hybrid (RRF), printing p50/p95 in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def prepare(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from embedders.huggingface import HuggingFaceEmbedder
    from stores.milvus import MilvusStore

    rng = np.random.default_rng(0)
    ids, texts, vectors = [], [], []
    if args.index is not None:
        store = MilvusStore(uri=str(args.index), collection=args.collection)
        client, _ = store._ready()
        iterator = client.query_iterator(
            args.collection, batch_size=2000, filter="", output_fields=["source_id", "text", "dense"]
        )
        while rows := iterator.next():
            for row in rows:
                ids.append(row["source_id"])
                texts.append(row["text"])
                vectors.append(row["dense"])
        iterator.close()
        store.close()
    else:
        # Real text, random unit vectors: a flat scan's cost does not depend on the values.
        for line in open(args.corpus, encoding="utf-8"):
            record = json.loads(line)
            ids.append(record["_id"])
            texts.append(f"{record['title']} {record['text']}".strip())
        vectors = rng.normal(size=(len(texts), 384)).tolist()
    base = np.asarray(vectors, dtype=np.float32)
    copies = -(-args.rows // len(base))
    all_vectors = np.concatenate(
        [base] + [base + rng.normal(0, 0.02, base.shape).astype(np.float32) for _ in range(copies - 1)]
    )[: args.rows]
    all_vectors /= np.linalg.norm(all_vectors, axis=1, keepdims=True)
    all_texts = (texts * copies)[: args.rows]
    all_ids = [f"{ids[i % len(ids)]}#{i // len(ids)}" for i in range(args.rows)]
    queries = [json.loads(line)["text"] for line in open(args.queries, encoding="utf-8")][: args.queries_count]
    if args.index is not None:
        embedder = HuggingFaceEmbedder()
        query_vectors = np.stack([embedder.embed_query(q) for q in queries])
    else:
        query_vectors = rng.normal(size=(len(queries), 384)).astype(np.float32)
        query_vectors /= np.linalg.norm(query_vectors, axis=1, keepdims=True)
    np.savez(
        args.out,
        ids=np.array(all_ids),
        texts=np.array(all_texts),
        vectors=all_vectors,
        queries=np.array(queries),
        query_vectors=query_vectors,
    )
    print(f"wrote {args.rows} rows and {len(queries)} queries to {args.out}")


def _create(client, name: str, dim: int, index_type: str) -> None:
    from pymilvus import DataType, Function, FunctionType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=128)
    schema.add_field(
        "text",
        DataType.VARCHAR,
        max_length=65535,
        enable_analyzer=True,
        analyzer_params={"tokenizer": "standard", "filter": ["lowercase"]},
    )
    schema.add_field("dense", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("bm25", DataType.SPARSE_FLOAT_VECTOR)
    schema.add_function(
        Function(
            name="bm25_from_text",
            function_type=FunctionType.BM25,
            input_field_names=["text"],
            output_field_names=["bm25"],
        )
    )
    index = client.prepare_index_params()
    params = {"M": 16, "efConstruction": 200} if index_type == "HNSW" else {}
    index.add_index("dense", index_type=index_type, metric_type="COSINE", params=params)
    index.add_index("bm25", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
    client.create_collection(name, schema=schema, index_params=index)


def _percentiles(samples: list[float]) -> str:
    ms = np.array(samples) * 1000
    return f"p50 {np.percentile(ms, 50):7.1f} ms   p95 {np.percentile(ms, 95):7.1f} ms"


def measure(args: argparse.Namespace) -> None:
    from importlib.metadata import version

    from pymilvus import AnnSearchRequest, MilvusClient, RRFRanker

    data = np.load(args.data)
    client = MilvusClient(str(args.db))
    name = "latency"
    engine = f"milvus-lite {version('milvus-lite')} (pymilvus {version('pymilvus')}), {args.index} index"
    if not client.has_collection(name):
        _create(client, name, data["vectors"].shape[1], args.index)
        started = time.perf_counter()
        ids, texts, vectors = data["ids"], data["texts"], data["vectors"]
        for start in range(0, len(ids), args.batch):
            rows = [
                {"id": str(ids[i]), "text": str(texts[i]), "dense": vectors[i].tolist()}
                for i in range(start, min(start + args.batch, len(ids)))
            ]
            client.insert(name, rows)
        print(f"{engine}: inserted {len(ids)} rows in {time.perf_counter() - started:.0f} s", flush=True)
    client.load_collection(name)
    count = client.query(name, filter="", output_fields=["count(*)"])[0]["count(*)"]
    queries, query_vectors = [str(q) for q in data["queries"]], data["query_vectors"]
    search_params = {"metric_type": "COSINE", "params": {"ef": 64} if args.index == "HNSW" else {}}

    def dense(i: int):
        return client.search(
            name, data=[query_vectors[i].tolist()], anns_field="dense", limit=args.top_k, search_params=search_params
        )

    def bm25(i: int):
        return client.search(
            name, data=[queries[i]], anns_field="bm25", limit=args.top_k, search_params={"metric_type": "BM25"}
        )

    def hybrid(i: int):
        requests = [
            AnnSearchRequest([query_vectors[i].tolist()], "dense", search_params, limit=args.candidates),
            AnnSearchRequest([queries[i]], "bm25", {"metric_type": "BM25"}, limit=args.candidates),
        ]
        return client.hybrid_search(name, requests, RRFRanker(60), limit=args.top_k)

    figures = {"engine": engine, "rows": count}
    print(
        f"{engine}, {count} rows, {len(queries)} single queries, top_k {args.top_k} (hybrid: {args.candidates} per "
        "branch)"
    )
    for label, run in (("dense", dense), ("bm25", bm25), ("hybrid", hybrid)):
        for i in range(min(5, len(queries))):  # warm-up
            run(i)
        samples = []
        for i in range(len(queries)):
            began = time.perf_counter()
            run(i)
            samples.append(time.perf_counter() - began)
        figures[label] = {
            "p50_ms": float(np.percentile(samples, 50) * 1000),
            "p95_ms": float(np.percentile(samples, 95) * 1000),
        }
        print(f"  {label:<7}{_percentiles(samples)}", flush=True)
    client.close()
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


def rerank(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rerankers.cross_encoder import CrossEncoderReranker
    from rerankers.query_likelihood import QueryLikelihoodReranker

    data = np.load(args.data)
    texts, queries = [str(t) for t in data["texts"][:5000]], [str(q) for q in data["queries"]]
    if args.reranker == "query-likelihood":
        reranker = QueryLikelihoodReranker(top_n=args.top_n)
    else:
        reranker = CrossEncoderReranker(model=args.reranker, top_n=args.top_n)
    rng = np.random.default_rng(0)
    reranker.score("warm-up", texts[:2])
    samples = []
    for query in queries[: args.rerank_queries]:
        passages = [texts[i] for i in rng.choice(len(texts), args.top_n, replace=False)]
        began = time.perf_counter()
        reranker.rerank(query, passages)
        samples.append(time.perf_counter() - began)
    print(
        f"rerank top {args.top_n} with {reranker.type_name} ({reranker.model_id}), {len(samples)} queries: "
        f"{_percentiles(samples)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument(
        "--index",
        type=Path,
        default=None,
        help="Milvus Lite folder built by retrieval_quality.py (real MiniLM vectors)",
    )
    p.add_argument(
        "--corpus",
        type=Path,
        default=ROOT.parent / "shared" / "datasets" / "scifact" / "corpus.jsonl",
        help="without --index: real text from this corpus, random vectors",
    )
    p.add_argument("--collection", default="bench_scifact")
    p.add_argument("--queries", type=Path, default=ROOT.parent / "shared" / "datasets" / "scifact" / "queries.jsonl")
    p.add_argument("--queries-count", type=int, default=200)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--out", type=Path, required=True)
    m = sub.add_parser("measure")
    m.add_argument("--data", type=Path, required=True)
    m.add_argument("--db", type=Path, required=True, help="Milvus Lite path (kept: a second run skips the insert)")
    m.add_argument("--index", default="AUTOINDEX", choices=["AUTOINDEX", "HNSW", "FLAT", "IVF_FLAT"])
    m.add_argument("--top-k", type=int, default=10)
    m.add_argument("--candidates", type=int, default=100)
    m.add_argument("--batch", type=int, default=2000)
    m.add_argument("--json", default=None)
    r = sub.add_parser("rerank")
    r.add_argument("--data", type=Path, required=True)
    r.add_argument(
        "--reranker", default="query-likelihood", help="query-likelihood, or a cross-encoder folder / hub id"
    )
    r.add_argument("--top-n", type=int, default=20)
    r.add_argument("--rerank-queries", type=int, default=20)
    args = parser.parse_args()
    {"prepare": prepare, "measure": measure, "rerank": rerank}[args.command](args)


if __name__ == "__main__":
    main()
