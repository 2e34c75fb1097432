"""Embedding alone, per backend: the same SciFact abstracts through our embedder on torch float32,
torch bfloat16 (where the CPU has native bf16), onnx float32 and onnx int8, in one process.

    .venv/bin/python benchmarks/embedding_backends.py [--texts 500] [--model all-MiniLM-L6-v2] [--repeat 2]

Each backend embeds the texts ``--repeat`` times after a warm-up pass (export and graph loading
are outside the clock; their one-off cost is printed apart); the fastest pass counts. Backends run
in rotated order per repeat, so a drifting load does not always favour the same one. Printed per
backend: seconds, texts/s, the ratio to torch float32, and the cosine of its vectors to torch
float32's (min and mean). The CPU's model and features and the load average are printed first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

from core.cpu import cpu_model, has_native_bf16, reported_features  # noqa: E402
from embedders.huggingface import HuggingFaceEmbedder  # noqa: E402

DATASETS = Path(os.environ.get("RAG_PIPELINE_DATASETS", ROOT.parent / "shared" / "datasets"))


def abstracts(count: int) -> list[str]:
    texts = []
    with open(DATASETS / "scifact" / "corpus.jsonl", encoding="utf-8") as corpus:
        for line in corpus:
            record = json.loads(line)
            texts.append(f"{record['title']}\n\n{record['text']}")
            if len(texts) == count:
                break
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=500)
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    if not (DATASETS / "scifact").is_dir():
        sys.exit(f"SKIP: SciFact not found under {DATASETS} (set RAG_PIPELINE_DATASETS)")
    os.environ.setdefault("RAG_PIPELINE_CACHE_DIR", tempfile.mkdtemp(prefix="embedding-backends-"))
    texts = abstracts(args.texts)
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores; {reported_features()}); load {os.getloadavg()[0]:.2f}")
    print(f"{len(texts)} SciFact abstracts, {args.model}; graphs cached in {os.environ['RAG_PIPELINE_CACHE_DIR']}")
    settings = {
        "torch float32": {},
        **({"torch bfloat16": {"dtype": "bfloat16"}} if has_native_bf16() else {}),
        "onnx float32": {"backend": "onnx"},
        "onnx int8": {"backend": "onnx", "quantize": "int8"},
    }
    embedders = {}
    for name, options in settings.items():
        began = time.perf_counter()
        embedder = HuggingFaceEmbedder(model=args.model, device="cpu", **options)
        embedder.embed_documents(texts[:8])  # loads (and exports) outside the clock
        embedders[name] = embedder
        print(f"{name}: ready in {time.perf_counter() - began:.1f} s, runs on {embedder.runtime_description}")
    seconds: dict[str, float] = {name: float("inf") for name in embedders}
    vectors: dict[str, np.ndarray] = {}
    names = list(embedders)
    for round_number in range(args.repeat):
        order = names[round_number % len(names) :] + names[: round_number % len(names)]
        for name in order:
            began = time.perf_counter()
            vectors[name] = embedders[name].embed_documents(texts)
            seconds[name] = min(seconds[name], time.perf_counter() - began)
    reference = vectors["torch float32"]
    print(f"\nload after: {os.getloadavg()[0]:.2f}")
    print(f"{'backend':<16}{'seconds':>9}{'texts/s':>9}{'vs torch':>10}{'min cos':>10}{'mean cos':>10}")
    for name in names:
        cosines = (vectors[name] * reference).sum(axis=1)
        print(
            f"{name:<16}{seconds[name]:>9.2f}{len(texts) / seconds[name]:>9.1f}"
            f"{seconds['torch float32'] / seconds[name]:>9.2f}x{cosines.min():>10.5f}{cosines.mean():>10.5f}"
        )
    best = min(names, key=seconds.__getitem__)
    print(
        f"torch float32 {seconds['torch float32']:.2f} s vs {best} {seconds[best]:.2f} s: ratio "
        f"{seconds['torch float32'] / seconds[best]:.2f}"
    )


if __name__ == "__main__":
    main()
