"""Retrieval quality of recursive, PPL and margin-sampling chunks at the same mean chunk length.

    python benchmarks/meta_chunking_quality.py [--scifact-limit N] [--target-tokens T]
                                               [--methods ppl,margin] [--datasets DIR]

SciFact (BEIR test split), every judged document plus a seeded sample of the others, N in all
(fewer distractors than the full corpus, so the figures sit above full-corpus ones; every chunker
sees the same corpus). PPL and margin chunking run with the shipped SmolLM2-135M-Instruct,
threshold 0 (margin: the paper's rolling threshold), then fit to ``--target-tokens`` tokens of the
embedder's tokenizer. The recursive chunker's size is then searched so that its mean chunk length
in characters matches the LM chunkers' (the mean of their means), so no method wins by chunk size.
Every chunk is embedded with the packaged all-MiniLM-L6-v2; retrieval is exact cosine search, a
document scores its best chunk (as in benchmarks/late_chunking.py). Prints Recall@5, Recall@10
and nDCG@10 per method, the chunk statistics and each LM chunker's time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from late_chunking import (  # noqa: E402
    DEFAULT_DATASETS,
    Corpus,
    _collect,
    load_scifact,
    measure,
    rank_documents,
)

from chunkers.base import Chunker  # noqa: E402
from chunkers.meta import MarginSamplingChunker, PerplexityChunker  # noqa: E402
from chunkers.recursive import RecursiveChunker  # noqa: E402
from core.types import ChunkedDocument, ParsedDocument  # noqa: E402
from embedders.huggingface import HuggingFaceEmbedder  # noqa: E402

EMBEDDER_TOKENIZER = "sentence-transformers/all-MiniLM-L6-v2"
METRICS = ["R@5", "R@10", "nDCG@10"]
LM_BATCH_DOCUMENTS = 8


def chunk_all(chunker: Chunker, documents: Sequence[ParsedDocument]) -> tuple[list[ChunkedDocument], float]:
    started = time.perf_counter()
    chunked = []
    for start in range(0, len(documents), LM_BATCH_DOCUMENTS):
        batch = documents[start : start + LM_BATCH_DOCUMENTS]
        chunked += [ChunkedDocument(d, chunks) for d, chunks in zip(batch, chunker.chunk_batch(batch)) if chunks]
        print(
            f"\r  {type(chunker).__name__}: {min(start + LM_BATCH_DOCUMENTS, len(documents))}/{len(documents)} "
            "documents",
            end="",
            file=sys.stderr,
            flush=True,
        )
    print(file=sys.stderr)
    return chunked, time.perf_counter() - started


def mean_length(documents: Sequence[ChunkedDocument]) -> float:
    return statistics.fmean(len(c.text) for d in documents for c in d.chunks)


def size_matching(
    chunk_at: Callable[[int], list[ChunkedDocument]], low: int, high: int, target_mean: float
) -> tuple[list[ChunkedDocument], int]:
    """The chunks ``chunk_at(size)`` whose mean length is closest to ``target_mean`` characters, and
    that size: a binary search over ``low..high``, the mean length growing with the size."""
    best: tuple[float, int, list[ChunkedDocument]] | None = None
    while low <= high:
        size = (low + high) // 2
        chunked = chunk_at(size)
        mean = mean_length(chunked)
        if best is None or abs(mean - target_mean) < best[0]:
            best = (abs(mean - target_mean), size, chunked)
        low, high = (size + 1, high) if mean < target_mean else (low, size - 1)
    assert best is not None
    return best[2], best[1]


def recursive_matching(documents: Sequence[ParsedDocument], target_mean: float) -> tuple[list[ChunkedDocument], int]:
    """Recursive chunks whose mean length is closest to ``target_mean`` characters (size searched)."""

    def chunk_at(size: int) -> list[ChunkedDocument]:
        chunker = RecursiveChunker(chunk_size=size, chunk_overlap=0)
        return [ChunkedDocument(d, chunks) for d in documents if (chunks := chunker.chunk(d))]

    return size_matching(chunk_at, 50, 4000, target_mean)


def evaluate(
    label: str, embedder: HuggingFaceEmbedder, corpus: Corpus, documents: list[ChunkedDocument]
) -> dict[str, float]:
    for start in range(0, len(documents), 32):
        embedder.embed(documents[start : start + 32])
    vectors = _collect(documents)
    scores = measure(
        METRICS,
        corpus.qrels,
        rank_documents(embedder, Corpus(documents, corpus.queries, corpus.qrels), vectors, depth=100),
    )
    chunks = [c for d in documents for c in d.chunks]
    print(
        f"{label:<10} "
        + "  ".join(f"{m} {scores[m]:.3f}" for m in METRICS)
        + f"   {len(chunks):,} chunks, mean {mean_length(documents):.0f} chars",
        flush=True,
    )
    return scores


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=Path, default=DEFAULT_DATASETS)
    parser.add_argument(
        "--scifact-limit", type=int, default=600, help="documents: all judged ones plus a seeded sample"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--target-tokens", type=int, default=128, help="LM chunks are fitted to this many embedder tokens"
    )
    parser.add_argument("--methods", default="ppl,margin", help="comma-separated LM chunkers: ppl, margin")
    args = parser.parse_args(argv)
    if not (args.datasets / "scifact").is_dir():
        print(f"SKIP: SciFact not found under {args.datasets} (set --datasets or RAG_PIPELINE_DATASETS)")
        return 0

    base, description = load_scifact(args.datasets / "scifact", RecursiveChunker(), args.scifact_limit, args.seed)
    documents = [d.document for d in base.documents]
    print(
        f"SciFact: BEIR test split, {description}; {len(base.queries)} queries; torch threads "
        f"{__import__('torch').get_num_threads()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    fitting = {"target_size": args.target_tokens, "size_tokenizer": EMBEDDER_TOKENIZER}
    chunkers = {"ppl": PerplexityChunker(**fitting), "margin": MarginSamplingChunker(**fitting)}
    lm_chunked: dict[str, list[ChunkedDocument]] = {}
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        lm_chunked[name], seconds = chunk_all(chunkers[name], documents)
        characters = sum(len(d.text) for d in documents)
        print(f"{name}: chunked {len(documents)} documents ({characters:,} characters) in {seconds:.1f} s", flush=True)
    target_mean = statistics.fmean(mean_length(chunked) for chunked in lm_chunked.values())
    recursive, size = recursive_matching(documents, target_mean)
    print(f"recursive: chunk_size {size} chars (overlap 0) gives the LM chunkers' mean length, {target_mean:.0f} chars")

    embedder = HuggingFaceEmbedder(device="cpu")
    evaluate("recursive", embedder, base, recursive)
    for name, chunked in lm_chunked.items():
        evaluate(name, embedder, base, chunked)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
