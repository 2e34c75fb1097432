"""Meta-Chunking speed: the official implementation (lmchunker 0.5.1) versus ours, in one run.

    python benchmarks/meta_chunking_speed.py [--scifact N] [--cmrc N] [--batch-size B] [--threads T]
                                             [--methods ppl,margin] [--save results.json]

Same texts (the first N SciFact abstracts and CMRC 2018 paragraphs), same weights (the shipped
SmolLM2-135M-Instruct, fp32), same CPU, threshold 0, no merging. The official side runs in its own
environment (see meta_chunking_agreement.py for how, and for the two loading-side workarounds);
without that environment or the datasets the script says so and exits 0.

The machine may be shared, so the sides alternate: the official package chunks a block of
``--batch-size`` texts one by one (timed inside its process, model loading excluded), then ours
chunks the same block as one batch (timed here). Each side is warmed up once on a short text
first. Printed: both times, the ratio, the machine's load average, and the boundary agreement of
the very runs that were timed (speed only counts at the same boundaries).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from meta_chunking_agreement import (  # noqa: E402
    DATASETS_ENV,
    LMCHUNKER_PYTHON_ENV,
    OfficialChunker,
    Text,
    as_documents,
    compare,
    datasets_dir,
    lmchunker_python,
    load_texts,
    our_chunkers,
)

WARM_UP = Text("warm-up", "The cat sat on the mat. It was warm there. Then the dog came in and barked.", "en")


class ForwardCounter:
    """Counts the tokens our LM runs and the passes it makes (packed decoder or transformers)."""

    def __init__(self) -> None:
        from core.causal_lm import CausalLM, PackedDecoder

        self.tokens = 0
        self.calls = 0
        packed_call, transformers_call = PackedDecoder.__call__, CausalLM.transformers_forward

        def packed(decoder, rows, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            self.tokens += sum(len(row.ids) for row in rows)
            self.calls += 1
            return packed_call(decoder, rows, *args, **kwargs)

        def sequential(lm, ids, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            self.tokens += len(ids)
            self.calls += 1
            return transformers_call(lm, ids, *args, **kwargs)

        PackedDecoder.__call__ = packed
        CausalLM.transformers_forward = sequential


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scifact", type=int, default=20, help="SciFact abstracts (English)")
    parser.add_argument("--cmrc", type=int, default=10, help="CMRC 2018 paragraphs (Chinese)")
    parser.add_argument("--batch-size", type=int, default=8, help="texts per block (our batch size)")
    parser.add_argument("--threads", type=int, help="torch threads on both sides (default: torch's default)")
    parser.add_argument("--methods", default="ppl,margin", help="comma-separated: ppl, margin")
    parser.add_argument("--datasets", help=f"datasets folder (default ${DATASETS_ENV} or ../shared/datasets)")
    parser.add_argument(
        "--lmchunker-python", help=f"python of the lmchunker environment (default ${LMCHUNKER_PYTHON_ENV})"
    )
    parser.add_argument("--save", help="write both sides' boundaries and times to this JSON file")
    parser.add_argument(
        "--quantize", choices=["none", "int8"], default="none", help="our side's quantisation (the official runs fp32)"
    )
    args = parser.parse_args(argv)

    texts = load_texts(datasets_dir(args.datasets), args.scifact, args.cmrc)
    if texts is None:
        print(f"SKIP: datasets not found under {datasets_dir(args.datasets)} (set {DATASETS_ENV} or --datasets)")
        return 0
    python = lmchunker_python(args.lmchunker_python)
    if python is None:
        print(
            f"SKIP: the lmchunker environment is missing (set {LMCHUNKER_PYTHON_ENV}); see "
            "benchmarks/README_meta_chunking.md"
        )
        return 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    chunkers = our_chunkers(args.batch_size, args.quantize)
    lm = chunkers["ppl"].lm
    official = OfficialChunker(python, Path(lm.path), threads=args.threads)
    counter = ForwardCounter()
    documents = as_documents(texts)
    saved: dict = {"texts": [f"{t.language}/{t.id}" for t in texts], "official": {}, "ours": {}, "seconds": {}}
    ours = "fp32" if args.quantize == "none" else f"fp32 weights, {args.quantize} linear layers"
    print(
        f"{len(texts)} texts ({args.scifact} SciFact, {args.cmrc} CMRC), model {lm.name}, official fp32, ours {ours}, "
        f"threads ours {torch.get_num_threads()} / official {official.info['threads']}, blocks of {args.batch_size}"
    )
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    try:
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            official.chunk(method, WARM_UP)
            chunkers[method].split_batch(as_documents([WARM_UP]))
            official_seconds = ours_seconds = 0.0
            official_results, our_spans = [], []
            official_tokens, official_calls = 0, 0
            counter.tokens = counter.calls = 0
            for first in range(0, len(texts), args.batch_size):
                block = slice(first, first + args.batch_size)
                for text in texts[block]:
                    result = official.chunk(method, text)
                    official_seconds += result["seconds"]
                    official_tokens += result["forward_tokens"]
                    official_calls += result["forward_calls"]
                    official_results.append(result)
                started = time.perf_counter()
                our_spans.extend(chunkers[method].split_batch(documents[block]))
                ours_seconds += time.perf_counter() - started
                print(
                    f"  {method}: {min(first + args.batch_size, len(texts))}/{len(texts)} texts, "
                    f"official {official_seconds:.1f} s, ours {ours_seconds:.1f} s",
                    flush=True,
                )
            agreement = compare(method, texts, our_spans, official_results, verbose=True)
            decisions = sum(len(r["sentences"]) - 1 for r in official_results)
            unit = (
                f"{official_seconds / decisions:.2f} s vs {ours_seconds / decisions:.2f} s per decision"
                if method == "margin"
                else (f"{official_seconds / len(texts):.2f} s vs {ours_seconds / len(texts):.2f} s per text")
            )
            print(
                f"{method}: official {official_seconds:.1f} s, ours {ours_seconds:.1f} s: "
                f"{official_seconds / ours_seconds:.2f}x faster ({unit})"
            )
            print(
                f"{method}: forward tokens official {official_tokens} in {official_calls} calls, ours {counter.tokens} "
                f"in {counter.calls} calls"
            )
            print(f"{method}: {agreement.summary()}")
            saved["official"][method] = {f"{t.language}/{t.id}": r for t, r in zip(texts, official_results)}
            saved["ours"][method] = {f"{t.language}/{t.id}": s for t, s in zip(texts, our_spans)}
            saved["seconds"][method] = {"official": official_seconds, "ours": ours_seconds}
    finally:
        official.close()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.save:
        Path(args.save).write_text(json.dumps(saved))
    return 0


if __name__ == "__main__":
    sys.exit(main())
