"""Re-index cost on SciFact: a no-change reindex and a 1%-changed reindex versus the full ingest.

    python benchmarks/reindex_cost.py [--limit N] [--changed-fraction 0.01] [--datasets DIR]

Writes SciFact's abstracts as .txt files (as benchmarks/ingest_throughput.py does), indexes them
with ``reindex`` into a fresh Milvus Lite collection (local source -> unstructured -> recursive
1000/100 -> packaged all-MiniLM-L6-v2), then, in the same process:
1. reindexes with no change: listing + record lookups only (targets: <= 0.05 of the full ingest);
2. edits 1% of the files (a sentence appended) and reindexes: only those are parsed, chunked,
   embedded and rewritten (target: <= 0.10).
Prints each time, its ratio to the full ingest, and the change counts that show what was redone.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

from ingest_throughput import scifact_folder_spec, write_corpus  # noqa: E402

from pipeline import Pipeline  # noqa: E402


def timed_reindex(pipeline: Pipeline) -> tuple[float, object]:
    started = time.perf_counter()
    summary = pipeline.reindex()
    seconds = time.perf_counter() - started
    assert summary.documents_failed == 0, summary.format()
    return seconds, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--datasets",
        type=Path,
        default=Path(os.environ.get("RAG_PIPELINE_DATASETS", ROOT.parent / "shared" / "datasets")),
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N abstracts")
    parser.add_argument("--changed-fraction", type=float, default=0.01)
    args = parser.parse_args()

    corpus = args.datasets / "scifact" / "corpus.jsonl"
    if not corpus.is_file():
        print(f"SKIP: SciFact not found at {corpus}; set --datasets or RAG_PIPELINE_DATASETS")
        return

    with tempfile.TemporaryDirectory(prefix="reindex-bench-") as tmp:
        tmp_path = Path(tmp)
        docs = tmp_path / "scifact"
        docs.mkdir()
        n_docs = write_corpus(corpus, docs, args.limit)
        spec = scifact_folder_spec("reindex-bench", docs, tmp_path / "bench.db", {"cleanup": "full"})
        with Pipeline(spec, base_dir=tmp_path) as pipeline:
            full_seconds, full = timed_reindex(pipeline)
            unchanged_seconds, unchanged = timed_reindex(pipeline)

            files = sorted(docs.iterdir())
            edited = random.Random(0).sample(files, max(1, round(len(files) * args.changed_fraction)))
            for path in edited:
                with path.open("a", encoding="utf-8") as handle:
                    handle.write("\n\nThis abstract was revised for the re-index benchmark.")
            changed_seconds, changed = timed_reindex(pipeline)

    print(
        f"corpus: SciFact, {n_docs} documents, {full.chunks_written} chunks, all-MiniLM-L6-v2, Milvus Lite; "
        f"{os.cpu_count()} cores"
    )
    print(f"full ingest (reindex of an empty index): {full_seconds:.1f} s, {full.changes.added} added")
    print(
        f"no-change reindex {unchanged_seconds:.2f} s vs full ingest {full_seconds:.1f} s: ratio "
        f"{unchanged_seconds / full_seconds:.3f} (target <= 0.05); {unchanged.changes.unchanged} unchanged, "
        f"{unchanged.documents_seen} parsed"
    )
    print(
        f"{len(edited)}-file ({args.changed_fraction:.0%}) reindex {changed_seconds:.2f} s vs full ingest "
        f"{full_seconds:.1f} s: ratio {changed_seconds / full_seconds:.3f} (target <= 0.10); {changed.changes.updated} "
        f"updated, {changed.changes.unchanged} unchanged, {changed.chunks_written} chunks written"
    )


if __name__ == "__main__":
    main()
