"""What compact vector storage costs: the same SciFact vectors kept as float32, float16 and binary.

    python benchmarks/vector_storage_quality.py --index DIR/scifact.db [--dataset scifact] [--json FILE]

Reads the chunks and their float32 vectors from an index built by ``benchmarks/retrieval_quality.py
--index DIR/scifact.db`` (one chunk per abstract, packaged all-MiniLM-L6-v2, exact FLAT search),
writes the same rows through the store into one collection per storage (``vector_storage:
float16`` and ``binary``, the sign of each dimension searched by Hamming distance), and scores the
test queries in dense mode on each, as ``pipeline eval`` does. The vectors are the same on every
side, so the differences in nDCG@10 and recall are the storage's alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.retrieval_quality import DATASETS, build_spec  # noqa: E402
from core.types import Chunk  # noqa: E402
from pipeline.evaluate import ModeEvaluator, eval_spec, load_beir  # noqa: E402
from pipeline.pipeline import Pipeline  # noqa: E402
from pipeline.spec import parse_spec  # noqa: E402
from stores.base import IndexSchema  # noqa: E402

BYTES_PER_DIMENSION = {"float32": 4.0, "float16": 2.0, "binary": 1 / 8}


def pipeline_for(folder: Path, index: Path, dataset, storage: str) -> Pipeline:
    spec_data = build_spec(folder.name, index, chunk_size=100_000, sparse=False, reranker=None)
    store = spec_data["stages"]["store"]
    collection = f"bench_{folder.name.replace('-', '_')}"  # the collection benchmarks/retrieval_quality.py fills
    if storage != "float32":
        store.pop("bm25")  # dense mode only
        store["vector_storage"] = storage
        collection += f"_{storage}"
        if storage == "binary":
            store["index"] = {"type": "FLAT"}  # becomes BIN_FLAT with the Hamming metric
    return Pipeline(eval_spec(parse_spec(spec_data, base_dir=folder), dataset, collection=collection))


def stored_chunks(pipeline: Pipeline) -> list[Chunk]:
    """Every chunk of the float32 index, with its vector, read back through pymilvus."""
    store = pipeline.store
    store.exists()  # opens and loads the collection
    client = store.client()
    fields = ["id", "source_id", "chunk_index", "text", "metadata", store.config.vector_field]
    iterator = client.query_iterator(store.config.collection, batch_size=1000, output_fields=fields)
    chunks = []
    while rows := iterator.next():
        for row in rows:
            metadata = dict(row["metadata"])
            start, end = metadata.pop("start"), metadata.pop("end")
            chunks.append(
                Chunk(
                    id=row["id"],
                    source_id=row["source_id"],
                    index=row["chunk_index"],
                    text=row["text"],
                    start=start,
                    end=end,
                    metadata=metadata,
                    vectors={"dense": np.asarray(row[store.config.vector_field], dtype=np.float32)},
                )
            )
    iterator.close()
    return chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="scifact")
    parser.add_argument(
        "--index", type=Path, required=True, help="the index benchmarks/retrieval_quality.py --index built"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    folder = Path(args.dataset) if Path(args.dataset).is_dir() else DATASETS / args.dataset
    dataset = load_beir(folder, "test")

    source = pipeline_for(folder, args.index, dataset, "float32")
    if source.store.count() == 0:
        sys.exit(f"{source.store.where} is empty: build it with benchmarks/retrieval_quality.py --index {args.index}")
    chunks = stored_chunks(source)
    dimension = len(chunks[0].vectors["dense"])
    figures: dict = {"dataset": folder.name, "chunks": len(chunks), "dimension": dimension, "storage": {}}
    pipelines = [source]
    try:
        for storage in ("float32", "float16", "binary"):
            pipeline = source if storage == "float32" else pipeline_for(folder, args.index, dataset, storage)
            if pipeline is not source:
                pipelines.append(pipeline)
                pipeline.store.prepare(IndexSchema(dimension, source.embedder.model_id))
                if pipeline.store.count() != len(chunks):
                    for start in range(0, len(chunks), 1000):
                        pipeline.store.upsert(chunks[start : start + 1000])
            progress = lambda message, s=storage: print(f"{s}: {message}", file=sys.stderr, flush=True)  # noqa: E731
            result = ModeEvaluator(pipeline.query_engine, dataset, progress=progress).run(["dense"])[0]
            figures["storage"][storage] = {
                "bytes_per_vector": BYTES_PER_DIMENSION[storage] * dimension,
                **result.to_dict(),
            }
    finally:
        for pipeline in pipelines:
            pipeline.close()

    base = figures["storage"]["float32"]["metrics"]
    print(
        f"\n{folder.name} (test), {len(dataset.queries)} queries, {len(chunks)} chunks, {dimension}-d "
        "all-MiniLM-L6-v2, dense mode"
    )
    print(
        f"{'storage':<9}{'bytes/vector':>13}{'nDCG@10':>9}{'vs float32':>11}{'R@100':>8}{'vs float32':>11}{'p50 ms':>8}"
    )
    for storage, f in figures["storage"].items():
        m = f["metrics"]
        print(
            f"{storage:<9}{f['bytes_per_vector']:>13g}{m['nDCG@10']:>9.4f}{m['nDCG@10'] - base['nDCG@10']:>+11.4f}"
            f"{m['R@100']:>8.4f}{m['R@100'] - base['R@100']:>+11.4f}{f['latency_ms']['p50']:>8.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
