"""One very large text document: peak memory and chunks per second, against many small documents.

    python benchmarks/large_document_memory.py [--megabytes 100] [--variants paragraphs single-line]
        [--max-tokens 0] [--embed-threads N] [--repeat 1] [--keep DIR] [--json FILE]

For each variant, writes one ``--megabytes`` MB text file of English-like words (``paragraphs``:
paragraphs of 40-160 words separated by blank lines; ``single-line``: the same words with no
newline at all), and a corpus of 2-8 KB files written the same way that gives about the same
number of chunks. Each corpus is ingested in a fresh process with the shipped all-MiniLM-L6-v2
(local source -> unstructured parser, native text route -> recursive chunker 1000/200 -> MiniLM ->
Milvus Lite), while this process samples the memory of that process tree every 0.1 s:

* peak RSS of the main process and of the parser worker, from each one's ``VmHWM`` (the kernel's
  own high-water mark, so no peak between samples is missed) and, for the main process, getrusage;
* the peak of main + worker RSS summed at the same instant (sampled);
* Milvus Lite's server process, reported beside (it holds the index, not the document).

Chunks per second is chunks written over the whole ingest (model loading and parsing included, the
same for both sides); chunks per CPU second (user + system time of the ingest process and its
children) is printed beside it, as it moves less when other work shares the cores. ``--repeat``
runs the two sides alternately and compares the best of each.

``--max-tokens`` sets the embedder's max_length. MiniLM reads 256 tokens of a 1,000-character chunk
by default, a few chunks per second on a busy 2-core machine (a 100 MB document is ~125,000
chunks); a small value keeps the model cheap, which makes the comparison stricter, since the
per-chunk overhead of the pipeline is then most of the time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

from benchmarks.memory_flat import WORDS  # noqa: E402
from core.cpu import cpu_model  # noqa: E402

MIB = 2**20
SAMPLE_INTERVAL_S = 0.1
CHUNK_SIZE, CHUNK_OVERLAP = 1000, 200


# -- the documents ----------------------------------------------------------------------------


def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 24))]
    return " ".join(words).capitalize() + "."


def paragraph(rng: random.Random) -> str:
    words: list[str] = []
    while len(words) < rng.randint(40, 160):
        words.extend(sentence(rng).split())
    return " ".join(words)


def write_large(path: Path, size: int, variant: str, seed: int) -> None:
    """``size`` bytes of paragraphs, joined by blank lines or, for single-line, by a space."""
    rng = random.Random(seed)
    joint = "\n\n" if variant == "paragraphs" else " "
    written = 0
    with path.open("w", encoding="utf-8") as out:
        while written < size:
            piece = paragraph(rng)[: size - written]
            if written:
                piece = joint + piece
            out.write(piece)
            written += len(piece)


def write_small(folder: Path, chunks_wanted: int, variant: str, seed: int) -> int:
    """Files of 2-8 KB written like the large document, until the recursive chunker cuts ``chunks_wanted`` from them."""
    from chunkers.recursive import RecursiveChunker
    from core.types import ParsedDocument

    chunker = RecursiveChunker(chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP)
    rng = random.Random(seed)
    chunks = files = 0
    while chunks < chunks_wanted:
        target = rng.randint(2000, 8000)
        parts: list[str] = []
        while sum(map(len, parts)) < target:
            parts.append(paragraph(rng))
        text = ("\n\n" if variant == "paragraphs" else " ").join(parts)
        chunks += len(chunker.split(ParsedDocument(f"f{files}", "", "text/plain", "", text, ())))
        (folder / f"doc-{files:06d}.txt").write_text(text, encoding="utf-8")
        files += 1
    return files


# -- measuring a run in a child process --------------------------------------------------------


@dataclass
class Peaks:
    main_mib: float = 0.0  # VmHWM
    worker_mib: float = 0.0  # VmHWM of the parser worker (the largest, were there several)
    together_mib: float = 0.0  # main + worker RSS at the same sample
    milvus_mib: float = 0.0


def _status_mib(pid: int, field_name: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _role(process: Any) -> str:
    try:
        command = " ".join(process.cmdline())
    except Exception:
        return "gone"
    if "spawn_main" in command:
        return "worker"
    if "milvus" in command:
        return "milvus"
    return "other"


def sample(pid: int, peaks: Peaks, stop: threading.Event) -> None:
    import psutil

    main = psutil.Process(pid)
    while not stop.is_set():
        try:
            children = main.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        roles = [(child.pid, _role(child)) for child in children]
        workers = [p for p, role in roles if role == "worker"]
        peaks.main_mib = max(peaks.main_mib, _status_mib(pid, "VmHWM"))
        peaks.worker_mib = max([peaks.worker_mib, *(_status_mib(p, "VmHWM") for p in workers)])
        peaks.milvus_mib = max([peaks.milvus_mib, *(_status_mib(p, "VmHWM") for p, role in roles if role == "milvus")])
        together = _status_mib(pid, "VmRSS") + sum(_status_mib(p, "VmRSS") for p in workers)
        peaks.together_mib = max(peaks.together_mib, together)
        stop.wait(SAMPLE_INTERVAL_S)


@dataclass
class Run:
    label: str
    documents: int = 0
    failed: int = 0
    chunks: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    main_rusage_mib: float = 0.0
    cpu_seconds: float = 0.0
    peaks: Peaks = field(default_factory=Peaks)

    @property
    def rate(self) -> float:
        return self.chunks / self.seconds if self.seconds else 0.0

    @property
    def cpu_rate(self) -> float:
        return self.chunks / self.cpu_seconds if self.cpu_seconds else 0.0


def measure(label: str, docs: Path, index: Path, options: argparse.Namespace) -> Run:
    job = {
        "docs": str(docs),
        "index": str(index),
        "max_tokens": options.max_tokens,
        "embed_threads": options.embed_threads,
    }
    child = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(job)], stdout=subprocess.PIPE, text=True)
    peaks, stop = Peaks(), threading.Event()
    sampler = threading.Thread(target=sample, args=(child.pid, peaks, stop), daemon=True)
    sampler.start()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out, _ = child.communicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    stop.set()
    sampler.join()
    if child.returncode not in (0, 1):
        raise SystemExit(f"{label}: the ingest process exited with {child.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)  # the child and its reaped children
    return Run(label, peaks=peaks, cpu_seconds=cpu, **result)


def child_main(job: dict[str, Any]) -> None:
    from pipeline import Pipeline

    embedder: dict[str, Any] = {"type": "huggingface", "model": "all-MiniLM-L6-v2"}
    if job["max_tokens"]:
        embedder["max_length"] = job["max_tokens"]
    if job["embed_threads"]:
        embedder["num_threads"] = job["embed_threads"]
    spec = {
        "name": "large-document",
        "stages": {
            "source": {"type": "local", "path": job["docs"]},
            "parser": {"type": "unstructured"},
            "chunker": {"type": "recursive", "chunk_size": CHUNK_SIZE, "chunk_overlap": CHUNK_OVERLAP},
            "embedder": embedder,
            "store": {"type": "milvus", "uri": job["index"], "collection": "large_document"},
        },
        "runner": {"progress": "never", "failures_file": ""},
    }
    pipeline = Pipeline(spec)
    summary = pipeline.ingest()
    pipeline.close()
    for failure in summary.failures:
        print(f"failed: {failure.source_id}: {failure.stage}: {failure.reason}", file=sys.stderr)
    print(
        json.dumps(
            {
                "documents": summary.documents_indexed,
                "failed": summary.documents_failed,
                "chunks": summary.chunks_written,
                "seconds": summary.seconds,
                "stage_seconds": summary.stage_seconds,
                "main_rusage_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


# -- the report --------------------------------------------------------------------------------


def describe(run: Run) -> list[str]:
    p = run.peaks
    stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in run.stage_seconds.items())
    return [
        f"  {run.label}: {run.documents} documents ({run.failed} failed), {run.chunks} chunks in {run.seconds:.1f} s = "
        f"{run.rate:.1f} chunks/s ({run.cpu_rate:.1f} per CPU second)",
        f"    peak RSS: main {p.main_mib:.0f} MiB (getrusage {run.main_rusage_mib:.0f}), parser worker "
        f"{p.worker_mib:.0f} MiB, main + worker at once {p.together_mib:.0f} MiB; Milvus Lite server "
        f"{p.milvus_mib:.0f} MiB",
        f"    time per stage: {stages}",
    ]


def run_variant(variant: str, options: argparse.Namespace, work: Path) -> None:
    large_dir, small_dir = work / f"large-{variant}", work / f"small-{variant}"
    large_dir.mkdir()
    small_dir.mkdir()
    write_large(large_dir / "document.txt", int(options.megabytes * 1_000_000), variant, options.seed)
    large_label = f"one {options.megabytes:g} MB document ({variant})"
    larges = [measure(large_label, large_dir, work / f"large-{variant}-0.db", options)]
    files = write_small(small_dir, larges[0].chunks, variant, options.seed + 1)
    small_label = f"{files} small documents (2-8 KB, {variant})"
    smalls = [measure(small_label, small_dir, work / f"small-{variant}-0.db", options)]
    for attempt in range(1, options.repeat):  # alternately, so both sides meet the same background load
        larges.append(measure(large_label, large_dir, work / f"large-{variant}-{attempt}.db", options))
        smalls.append(measure(small_label, small_dir, work / f"small-{variant}-{attempt}.db", options))
    print(f"{variant}:")
    for run in (*larges, *smalls):
        print(*describe(run), sep="\n")
    large, small = max(larges, key=lambda r: r.rate), max(smalls, key=lambda r: r.rate)
    best = f"best of {options.repeat}: " if options.repeat > 1 else ""
    print(
        f"  {best}large {large.rate:.1f} chunks/s vs small docs {small.rate:.1f} chunks/s: ratio "
        f"{large.rate / small.rate:.2f}; per CPU second {large.cpu_rate:.1f} vs {small.cpu_rate:.1f}: ratio "
        f"{large.cpu_rate / small.cpu_rate:.2f}",
        flush=True,
    )
    if options.json:
        with open(options.json, "a") as out:
            out.write(
                json.dumps(
                    {"variant": variant, "large": [asdict(r) for r in larges], "small": [asdict(r) for r in smalls]}
                )
                + "\n"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=100.0, help="size of the large document, in MB (10^6 bytes)")
    parser.add_argument(
        "--variants", nargs="+", choices=["paragraphs", "single-line"], default=["paragraphs", "single-line"]
    )
    parser.add_argument("--max-tokens", type=int, default=0, help="embedder max_length; 0 for the model's own (256)")
    parser.add_argument("--embed-threads", type=int, default=0, help="torch threads; 0 for torch's choice")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each side, alternately; the best of each is compared"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", type=Path, help="write the corpora and indexes here and keep them")
    parser.add_argument("--json", help="append one JSON line per variant to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        child_main(json.loads(options.child))
        return
    import torch

    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}, torch {torch.__version__}")
    print(
        f"spec: recursive {CHUNK_SIZE}/{CHUNK_OVERLAP}, all-MiniLM-L6-v2 max_length "
        f"{options.max_tokens or 'default (256)'}, {options.embed_threads or 'default'} torch threads; Milvus Lite; "
        "runner defaults"
    )
    print(
        f"large document: {options.megabytes:g} MB; load average before: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )
    if options.keep:
        options.keep.mkdir(parents=True, exist_ok=False)
    for variant in options.variants:
        with tempfile.TemporaryDirectory(prefix="large-document-") as scratch:
            run_variant(variant, options, options.keep or Path(scratch))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
