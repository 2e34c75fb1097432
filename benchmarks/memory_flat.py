"""Peak memory of a large ingest: does the process tree stay flat as the corpus grows?

    python benchmarks/memory_flat.py [--files 20000] [--seed 7] [--keep DIR] [--json FILE]

Writes ``--files`` synthetic text and Markdown files (200 B - 20 KB, log-uniform sizes, headings,
lists, a few nested folders; the same bytes for the same seed) into a temporary folder, ingests
them with ``Pipeline(spec).ingest()`` (local source -> unstructured parser -> recursive chunker ->
packaged all-MiniLM-L6-v2 -> Milvus Lite in the same folder) and measures the memory of the whole
process tree: this process, the parser worker processes and the Milvus Lite server.

A sampler thread adds up the resident memory (RSS) of the tree every 0.2 s. Flatness shows in two
ways: the peak of each quarter of the documents, and a snapshot at 25/50/75/100% of them that also
measures PSS (shared pages counted once) and counts the live Python objects of this process
(they grow if something keeps per-document state). ``getrusage`` peaks (this process, and the
largest reaped child) corroborate the sampled peak. The run PASSES when the sampled peak tree RSS
stays under 2 GB (2,000,000,000 bytes). At 100% the parser pool has already shut down.

The defaults keep a 20,000-file run short on a small machine: each file is one chunk and the
embedder reads its first 32 tokens (``--max-tokens``), and 5% of the files are Markdown, which
goes through unstructured's spaCy heuristics (~1 s per file on a busy core; plain text takes the
native route). The full text still travels through every stage and into the store. Per-batch
embedding memory grows with the tokens per text: ``--chunk-size 1000 --max-tokens 0`` (the
model's 256) shows the realistic transient, at about eight times the model time.

Summing RSS counts shared library pages once per process, so the tree figure is an upper bound.
Run it with Milvus Lite 2.5.1, the project's embedded default, when another version is installed:

    PYTHONPATH=/work/venvs/lite25only GRPC_VERBOSITY=NONE .venv/bin/python benchmarks/memory_flat.py
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

from pipeline import Pipeline  # noqa: E402
from pipeline.report import Progress, RunSummary  # noqa: E402

LIMIT_BYTES = 2_000_000_000
MIB = 2**20
SAMPLE_INTERVAL_S = 0.2
CHECKPOINTS = (0.25, 0.5, 0.75, 1.0)

# Common English words, so that the tokenizer sees about as many tokens per character as in prose.
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they you "
    "were her she there one all we their been has when who will more no if out so said what up its about into than "
    "them can only other new some could time these two may then do first any my now such like our over man me even "
    "most made after also did many before must through back years where much your way well down should because each "
    "just those people how too little state good very make world still own see men work long get here between both "
    "life being under never day same another know while last might us great old year off come since against go came "
    "right used take three index search vector model document chunk parser memory corpus embedding store query "
    "pipeline record source batch worker process stage server cluster latency throughput retrieval ranking score"
).split()


# -- the corpus ------------------------------------------------------------------------------


@dataclass
class CorpusStats:
    files: int = 0
    markdown_files: int = 0
    text_files: int = 0
    total_bytes: int = 0
    folders: int = 0


class SyntheticCorpus:
    """Deterministic prose in .txt and .md files spread over a few nested folders.

    Sizes are log-uniform between ``min_bytes`` and ``max_bytes`` (many small files, a tail of
    large ones, as in real folders); every file differs, so no two share a content hash.
    """

    FOLDERS = ("notes", "notes/2023", "notes/2024", "reports", "reports/q1", "reports/q2", "wiki", "wiki/howto", "")

    def __init__(self, seed: int, min_bytes: int = 200, max_bytes: int = 20_000, markdown_share: float = 0.3):
        self.seed = seed
        self.min_bytes = min_bytes
        self.max_bytes = max_bytes
        self.markdown_share = markdown_share

    def write(self, root: Path, count: int) -> CorpusStats:
        rng = random.Random(self.seed)
        stats = CorpusStats(folders=len(self.FOLDERS))
        for folder in self.FOLDERS:
            (root / folder).mkdir(parents=True, exist_ok=True)
        for number in range(count):
            size = int(math.exp(rng.uniform(math.log(self.min_bytes), math.log(self.max_bytes))))
            markdown = rng.random() < self.markdown_share
            text = self._markdown(rng, number, size) if markdown else self._text(rng, number, size)
            folder = rng.choice(self.FOLDERS)
            path = root / folder / f"doc-{number:06d}.{'md' if markdown else 'txt'}"
            data = text.encode("utf-8")
            path.write_bytes(data)
            stats.files += 1
            stats.total_bytes += len(data)
            stats.markdown_files += markdown
            stats.text_files += not markdown
        return stats

    @staticmethod
    def _sentence(rng: random.Random) -> str:
        words = rng.choices(WORDS, k=rng.randint(6, 18))
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(2, 99_999)))
        return " ".join(words).capitalize() + "."

    def _paragraph(self, rng: random.Random) -> str:
        return " ".join(self._sentence(rng) for _ in range(rng.randint(2, 6)))

    def _title(self, rng: random.Random) -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(2, 5))).title()

    def _text(self, rng: random.Random, number: int, size: int) -> str:
        parts = [f"Document {number} {self._title(rng)}"]
        length = len(parts[0])
        while length < size:
            part = self._title(rng) if rng.random() < 0.15 else self._paragraph(rng)
            parts.append(part)
            length += len(part) + 2
        return "\n\n".join(parts)[:size] + "\n"

    def _markdown(self, rng: random.Random, number: int, size: int) -> str:
        parts = [f"# Document {number}: {self._title(rng)}"]
        length = len(parts[0])
        while length < size:
            roll = rng.random()
            if roll < 0.15:
                part = f"{'#' * rng.randint(2, 3)} {self._title(rng)}"
            elif roll < 0.25:
                part = "\n".join(f"- {self._sentence(rng)}" for _ in range(rng.randint(2, 5)))
            else:
                part = self._paragraph(rng)
            parts.append(part)
            length += len(part) + 2
        return "\n\n".join(parts)[:size] + "\n"


# -- measuring the process tree ----------------------------------------------------------------


@dataclass
class TreeSample:
    """Resident memory of the process tree at one moment, by role (MiB)."""

    at_s: float
    documents: int
    total_mib: float
    main_mib: float
    parsers_mib: float
    milvus_mib: float
    other_mib: float
    processes: int


@dataclass
class Checkpoint:
    share: float
    documents: int
    at_s: float
    rss: TreeSample
    pss_total_mib: float
    python_objects: int  # gc-tracked objects of this process: grows if per-document state is kept


class ProcessTree:
    """This process and its descendants, each given a role from its command line."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self.main = psutil.Process(os.getpid())
        self._roles: dict[int, str] = {}

    def members(self) -> list[tuple[str, Any]]:
        try:
            children = self.main.children(recursive=True)
        except self._psutil.Error:
            children = []
        return [("main", self.main)] + [(self._role(child), child) for child in children]

    def _role(self, child: Any) -> str:
        if child.pid not in self._roles:
            try:
                command = " ".join(child.cmdline())
            except self._psutil.Error:
                return "other"
            if "milvus" in command:
                self._roles[child.pid] = "milvus"
            elif "multiprocessing.spawn" in command or "spawn_main" in command:
                self._roles[child.pid] = "parsers"
            else:  # e.g. multiprocessing's resource tracker
                self._roles[child.pid] = "other"
        return self._roles[child.pid]

    def sample(self, started: float, documents: int) -> TreeSample:
        by_role = {"main": 0, "parsers": 0, "milvus": 0, "other": 0}
        count = 0
        for role, process in self.members():
            try:
                by_role[role] += process.memory_info().rss
                count += 1
            except self._psutil.Error:  # a worker replaced between listing and reading
                continue
        return TreeSample(
            at_s=round(time.monotonic() - started, 2),
            documents=documents,
            total_mib=round(sum(by_role.values()) / MIB, 1),
            main_mib=round(by_role["main"] / MIB, 1),
            parsers_mib=round(by_role["parsers"] / MIB, 1),
            milvus_mib=round(by_role["milvus"] / MIB, 1),
            other_mib=round(by_role["other"] / MIB, 1),
            processes=count,
        )

    def pss_mib(self) -> float:
        total = 0
        for _, process in self.members():
            try:
                total += process.memory_full_info().pss
            except (self._psutil.Error, AttributeError):
                continue
        return round(total / MIB, 1)


class MemorySampler:
    """Samples the tree every ``interval_s`` in a daemon thread; keeps every sample and the peak."""

    def __init__(self, tree: ProcessTree, interval_s: float = SAMPLE_INTERVAL_S):
        self.tree = tree
        self.interval_s = interval_s
        self.samples: list[TreeSample] = []
        self.documents = 0  # updated by the progress hook
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)

    def start(self) -> None:
        self.started = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> TreeSample:
        sample = self.tree.sample(self.started, self.documents)
        self.samples.append(sample)
        return sample

    @property
    def peak(self) -> TreeSample:
        return max(self.samples, key=lambda s: s.total_mib)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)


class CheckpointProgress(Progress):
    """The runner's progress hook: feeds the sampler the document count and measures at each checkpoint."""

    def __init__(self, sampler: MemorySampler, total: int):
        super().__init__("never")
        self.sampler = sampler
        self.total = total
        self.checkpoints: list[Checkpoint] = []
        self._pending = list(CHECKPOINTS)

    def update(self, summary: RunSummary, documents: int) -> None:
        self.sampler.documents = summary.documents_seen
        while self._pending and summary.documents_seen >= self._pending[0] * self.total:
            self.checkpoints.append(measure_checkpoint(self.sampler, self._pending.pop(0)))


def measure_checkpoint(sampler: MemorySampler, share: float) -> Checkpoint:
    return Checkpoint(
        share=share,
        documents=sampler.documents,
        at_s=round(time.monotonic() - sampler.started, 2),
        rss=sampler.sample(),
        pss_total_mib=sampler.tree.pss_mib(),
        python_objects=len(gc.get_objects()),
    )


# -- the run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What the corpus and the spec look like. The defaults (one chunk per file, each embedded from its
    first 32 tokens) ran 20,000 files in 20 min on two cores busy with other work (--embed-threads 1)."""

    files: int = 20_000
    seed: int = 7
    chunk_size: int = 20_000
    chunk_overlap: int = 0
    max_tokens: int | None = 32
    markdown_share: float = 0.05
    embed_threads: int | None = None  # torch's choice; 1 is faster when other work keeps the cores busy


def benchmark_spec(docs: Path, index: Path, settings: Settings) -> dict[str, Any]:
    embedder: dict[str, Any] = {"type": "huggingface", "model": "all-MiniLM-L6-v2"}
    if settings.max_tokens is not None:
        embedder["max_length"] = settings.max_tokens
    if settings.embed_threads is not None:
        embedder["num_threads"] = settings.embed_threads
    return {
        "name": "memory-flat",
        "stages": {
            "source": {"type": "local", "path": str(docs), "include": ["**/*.txt", "**/*.md"]},
            "parser": {"type": "unstructured"},
            "chunker": {
                "type": "recursive",
                "chunk_size": settings.chunk_size,
                "chunk_overlap": settings.chunk_overlap,
            },
            "embedder": embedder,
            "store": {"type": "milvus", "uri": str(index), "collection": "memory_flat"},
        },
        "runner": {"progress": "never", "failures_file": ""},
    }


@dataclass
class Report:
    settings: Settings
    corpus: CorpusStats
    milvus_lite: str
    documents_indexed: int = 0
    documents_failed: int = 0
    chunks_written: int = 0
    ingest_seconds: float = 0.0
    documents_per_second: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    peak: TreeSample | None = None
    checkpoints: list[Checkpoint] = field(default_factory=list)
    rusage_self_max_mib: float = 0.0
    rusage_children_max_mib: float = 0.0  # the largest single child that was reaped, not a sum
    limit_mib: float = round(LIMIT_BYTES / MIB, 1)
    passed: bool = False
    load_average: list[float] = field(default_factory=list)
    samples: list[TreeSample] = field(default_factory=list)

    def quarter_peaks(self) -> list[tuple[float, TreeSample, TreeSample, TreeSample]]:
        """For each quarter of the documents: the samples with the highest tree, main and Milvus RSS."""
        peaks = []
        total = max(self.corpus.files, 1)
        for low, high in zip((0.0,) + CHECKPOINTS[:-1], CHECKPOINTS):
            # Samples taken before the first batch (model loading, start-up) belong to the first quarter.
            inside = [
                s for s in self.samples if (low == 0.0 or low * total < s.documents) and s.documents <= high * total
            ]
            if inside:
                peaks.append(
                    (
                        high,
                        max(inside, key=lambda s: s.total_mib),
                        max(inside, key=lambda s: s.main_mib),
                        max(inside, key=lambda s: s.milvus_mib),
                    )
                )
        return peaks

    def lines(self) -> list[str]:
        c = self.corpus
        out = [
            f"corpus: {c.files} files ({c.text_files} .txt, {c.markdown_files} .md) in {c.folders} folders, "
            f"{c.total_bytes / 1e6:.1f} MB, seed {self.settings.seed}; Milvus Lite {self.milvus_lite}",
            f"spec: recursive {self.settings.chunk_size}/{self.settings.chunk_overlap}, all-MiniLM-L6-v2 max_length "
            f"{self.settings.max_tokens or 'default'}, {self.settings.embed_threads or 'default'} torch threads",
            f"indexed {self.documents_indexed} documents ({self.documents_failed} failed), {self.chunks_written} "
            f"chunks in {self.ingest_seconds:.1f} s: {self.documents_per_second:.1f} documents/s",
            "time per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.stage_seconds.items()),
            "memory at each share of the documents (MiB; RSS summed over the tree, PSS counts shared pages once):",
            f"  {'share':>5} {'docs':>7} {'time s':>7} {'tree RSS':>9} {'main':>7} {'parsers':>8} {'milvus':>7} "
            f"{'other':>6} {'tree PSS':>9} {'py objects':>11}",
        ]
        for p in self.checkpoints:
            r = p.rss
            out.append(
                f"  {p.share:>5.0%} {p.documents:>7} {p.at_s:>7.1f} {r.total_mib:>9.1f} {r.main_mib:>7.1f} "
                f"{r.parsers_mib:>8.1f} {r.milvus_mib:>7.1f} {r.other_mib:>6.1f} {p.pss_total_mib:>9.1f} "
                f"{p.python_objects:>11}"
            )
        if len(self.checkpoints) >= 2:
            first, last = self.checkpoints[0], self.checkpoints[-1]
            out.append(
                f"growth 25% -> 100%: tree RSS {last.rss.total_mib - first.rss.total_mib:+.1f} MiB, main "
                f"{last.rss.main_mib - first.rss.main_mib:+.1f}, milvus "
                f"{last.rss.milvus_mib - first.rss.milvus_mib:+.1f}, python objects "
                f"{last.python_objects - first.python_objects:+d}"
            )
        out.append("peak RSS within each quarter of the documents (MiB):")
        for high, tree, main, milvus in self.quarter_peaks():
            out.append(
                f"  up to {high:>4.0%}: tree {tree.total_mib:7.1f}  main {main.main_mib:7.1f}  milvus "
                f"{milvus.milvus_mib:6.1f}"
            )
        if self.peak is not None:
            p = self.peak
            out.append(
                f"peak tree RSS (sampled every {SAMPLE_INTERVAL_S} s, {len(self.samples)} samples): {p.total_mib:.1f} "
                f"MiB at {p.at_s:.1f} s (main {p.main_mib:.1f}, parsers {p.parsers_mib:.1f}, milvus "
                f"{p.milvus_mib:.1f}, other {p.other_mib:.1f}; {p.processes} processes)"
            )
        out.append(
            f"getrusage max RSS: this process {self.rusage_self_max_mib:.1f} MiB, largest reaped child "
            f"{self.rusage_children_max_mib:.1f} MiB"
        )
        out.append(f"load average: {' '.join(f'{x:.2f}' for x in self.load_average)}; cores {os.cpu_count()}")
        verdict = "PASS" if self.passed else "FAIL"
        out.append(
            f"{verdict}: peak tree RSS {self.peak.total_mib if self.peak else 0:.1f} MiB vs limit 2 GB "
            f"({self.limit_mib:.1f} MiB)"
        )
        return out


def _milvus_lite_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("milvus-lite")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run(settings: Settings, workdir: Path) -> Report:
    docs = workdir / "docs"
    corpus = SyntheticCorpus(settings.seed, markdown_share=settings.markdown_share).write(docs, settings.files)
    report = Report(settings=settings, corpus=corpus, milvus_lite=_milvus_lite_version())
    pipeline = Pipeline(benchmark_spec(docs, workdir / "index.db", settings), base_dir=workdir)
    sampler = MemorySampler(ProcessTree())
    progress = CheckpointProgress(sampler, corpus.files)
    sampler.start()
    started = time.perf_counter()
    try:
        summary = pipeline.ingest(progress=progress)
        report.ingest_seconds = round(time.perf_counter() - started, 1)
        if not any(p.share == 1.0 for p in progress.checkpoints):  # failures count as seen; this is a fallback
            progress.checkpoints.append(measure_checkpoint(sampler, 1.0))
    finally:
        sampler.stop()
        pipeline.close()  # stops the Milvus Lite server, so RUSAGE_CHILDREN can include it
    report.documents_indexed = summary.documents_indexed
    report.documents_failed = summary.documents_failed
    report.chunks_written = summary.chunks_written
    report.documents_per_second = (
        round(summary.documents_seen / report.ingest_seconds, 1) if report.ingest_seconds else 0.0
    )
    report.stage_seconds = {k: round(v, 1) for k, v in summary.stage_seconds.items()}
    report.checkpoints = progress.checkpoints
    report.samples = sampler.samples
    report.peak = sampler.peak
    # ru_maxrss is in KiB on Linux.
    report.rusage_self_max_mib = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    report.rusage_children_max_mib = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    report.passed = report.peak.total_mib * MIB < LIMIT_BYTES
    report.load_average = [round(x, 2) for x in os.getloadavg()]
    for failure in summary.failures[:5]:
        print(f"failure: {failure.source_id}: {failure.stage}: {failure.reason}")
    return report


def main() -> None:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=defaults.files, help="number of synthetic files")
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="corpus seed: the same seed writes the same bytes"
    )
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="write corpus and index into DIR and keep them (DIR must be empty or absent)",
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the figures and every memory sample to FILE"
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=defaults.chunk_size,
        help="recursive chunker size in characters (the default keeps each file one chunk)",
    )
    parser.add_argument("--chunk-overlap", type=int, default=defaults.chunk_overlap)
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=defaults.max_tokens,
        help="embedder max_length; 0 for the model's own (256): realistic per-batch memory, ~8x the model time",
    )
    parser.add_argument(
        "--markdown-share",
        type=float,
        default=defaults.markdown_share,
        help="share of .md files (unstructured's partition_md, ~1 s each on a busy core; .txt files take the native "
        "route)",
    )
    parser.add_argument(
        "--embed-threads", type=int, default=None, help="torch threads of the embedder (default: torch's choice)"
    )
    args = parser.parse_args()
    settings = Settings(
        files=args.files,
        seed=args.seed,
        chunk_size=args.chunk_size,
        chunk_overlap=args.chunk_overlap,
        max_tokens=args.max_tokens or None,
        markdown_share=args.markdown_share,
        embed_threads=args.embed_threads,
    )

    if args.keep is not None:
        if args.keep.exists() and any(args.keep.iterdir()):
            parser.error(f"--keep {args.keep} is not empty")
        args.keep.mkdir(parents=True, exist_ok=True)
        report = run(settings, args.keep)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="memory-flat-"))
        try:
            report = run(settings, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    for line in report.lines():
        print(line)
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(report), indent=1), encoding="utf-8")
    sys.exit(0 if report.passed else 1)


if __name__ == "__main__":
    main()
