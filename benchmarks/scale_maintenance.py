"""Scale benchmark for index maintenance: ingest, reindex, status and reconcile at 10k to 1M sources.

    python benchmarks/scale_maintenance.py [--sizes 10000,100000] [--form jsonl,folder] [--store lite,server]
                                           [--workdir /tmp/scale-maintenance] [--step-timeout S] [--py-spy PATH]

    # against a Milvus 2.3.5 server (RAG_PIPELINE_MILVUS_SERVER is set by the wrapper):
    .venv/bin/python scripts/milvus_server.py run -- .venv/bin/python benchmarks/scale_maintenance.py --store server

PLUMBING ONLY. The stages are the test plugins of ``tests/plugins/components.py``: LineParser (one
element per non-empty line, in-process: ``runner.parse_workers: 0``), ElementChunker (one chunk per
element) and HashEmbedder (an 8-dimension vector from a hash of the text). No model runs and no real
parser runs, so what is timed is the pipeline's own bookkeeping: listing, the change record
(``<collection>_records``), the chunk store and the runner. Both corpus forms use LineParser, on
purpose: the real ``unstructured`` parser's .txt path would add a per-document parse cost that is
not index maintenance, and would make the JSONL and folder forms differ by more than their
listing and reading (``--folder-parser unstructured`` runs it anyway).

The corpus: N documents of a few sentences (1 to 3 lines, each line 1 to 3 sentences, so 1 to 3
chunks), generated deterministically (seed 7) into ``<workdir>/corpus`` and reused by later runs,
in two forms of one source each:
- ``jsonl``: one file, ``{"_id": "d0000042", "text": ...}`` per line (source type ``jsonl``,
  source ids ``corpus/d0000042``);
- ``folder``: ``docs/gNN/fNN/doc-NNNNNNN.txt``, 1,000 files per leaf folder, 100 leaf folders per
  top folder (source type ``local``, source ids ``docs/g00/f00/doc-0000042.txt``).

Per size, form and store, on a fresh copy of the corpus (a hard-linked copy for the folder; edits
replace files, so the reused corpus is never changed) and a fresh index, each step runs the CLI
(``python -m pipeline <command> spec.yaml --allow-module tests.plugins``) in a fresh subprocess:
1. ``ingest``;
2. ``reindex`` with nothing changed;
3. ``reindex`` after 1% of the documents were edited (the first line of each rewritten, so one
   chunk per edited document is replaced and its old chunk must be deleted);
4. ``reindex`` after another, disjoint 1% of the documents were deleted;
5. ``status``; 6. ``reconcile --dry-run``; 7. ``reconcile`` (repairing);
then the maintained index is compared with a clean build of the final corpus: the multiset of
(source_id, chunk id) rows and the records (status, content hash, change signal, stage fingerprint,
chunk count and chunk digest per source) through sorted arrays of 64-bit digests (exact sets as
well up to 200,000 rows), plus 1,000 sampled sources (and 10 deleted ones) row by row. Two
references (``--reference``): ``clean``, a clean ``ingest`` of the final corpus into a second,
fresh index (timed as a step); ``computed``, what a clean build must hold, computed from the
final corpus by the spec's own source, parser and chunker without any store (chunk ids are
deterministic; the record is what ``ChangeTracker.written`` writes). ``auto`` (the default) uses
both up to 100,000 documents, so the two references are checked against each other in the same
run, and only ``computed`` above, where a clean ingest on Milvus Lite takes hours.

Memory: each step's subprocess runs ``pipeline.cli.main`` and, as it exits, writes its own
``getrusage(RUSAGE_SELF).ru_maxrss`` (the peak RSS of the pipeline process: "CLI peak") and
``RUSAGE_CHILDREN`` (the largest reaped child: with Milvus Lite, its server process, which the
pipeline stops and reaps when it closes the store: "Lite server peak"). Bytes per source of a step
at size N = (its peak at N - the same step's peak at the smallest size of this run) / (N - that
smallest size); both peaks come from this one run. The targets apply to the pipeline process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

SERVER_ENV = "RAG_PIPELINE_MILVUS_SERVER"  # set by scripts/milvus_server.py run
PLUGINS = "tests.plugins"
SEED = 7
CHANGED_FRACTION = 0.01
SAMPLE_SOURCES = 1000
EXACT_SET_MAX_ROWS = 200_000
AUTO_CLEAN_MAX = 100_000  # --reference auto: a clean ingest up to this size; above, the computed reference only
FILES_PER_FOLDER = 1000
TARGET_NO_CHANGE_RATIO = 0.02
TARGET_BYTES_PER_SOURCE = 100.0
MB = 2**20

WORDS = (
    "the of and to in is that for it as was with be by on not this are or from at which but have an they were there "
    "one all we their been has when who will more no if out so what up its about into than them can only other new "
    "some could time these two may then do first any now such like our over even most made after also did many before "
    "must through back years where much way well down should because each just those people how too little state good "
    "very make world still own see work long get here between both life being under never day same another know while "
    "last might great old year off come since against go came right used take three index search vector model "
    "document chunk parser memory corpus embedding store query pipeline record source batch worker process stage "
    "server cluster latency throughput retrieval ranking score river forest mountain harbor bridge garden library "
    "market winter summer signal engine"
).split()


# -- the corpus ------------------------------------------------------------------------------


def document_text(rng: random.Random, number: int) -> str:
    """1-3 lines of 1-3 sentences; the first line names the document, so every text differs."""
    lines = []
    for line in range(rng.choice((1, 1, 2, 2, 3))):
        sentences = []
        for _ in range(rng.randint(1, 3)):
            sentences.append(" ".join(rng.choices(WORDS, k=rng.randint(6, 14))).capitalize() + ".")
        if line == 0:
            sentences.insert(0, f"Document {number}.")
        lines.append(" ".join(sentences))
    return "\n".join(lines)


def record_id(number: int) -> str:
    return f"d{number:07d}"


def relative_file(number: int) -> str:
    return f"g{number // (100 * FILES_PER_FOLDER):02d}/f{(number // FILES_PER_FOLDER) % 100:02d}/doc-{number:07d}.txt"


def source_id(form: str, number: int) -> str:
    return f"corpus/{record_id(number)}" if form == "jsonl" else f"docs/{relative_file(number)}"


def edited_text(text: str) -> str:
    first, _, rest = text.partition("\n")
    return f"Revised for the maintenance benchmark: {first}" + (f"\n{rest}" if rest else "")


def ensure_corpus(workdir: Path, form: str, size: int) -> Path:
    """The generated corpus of ``size`` documents in ``form`` (reused when complete); its path."""
    base = workdir / "corpus" / f"{form}-{size}"
    marker = base / ".complete"
    stamp = f"seed={SEED} size={size} form={form} v1"
    if marker.is_file() and marker.read_text() == stamp:
        return base
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    started = time.perf_counter()
    rng = random.Random(SEED)
    if form == "jsonl":
        with open(base / "corpus.jsonl", "w", encoding="utf-8") as out:
            for number in range(size):
                out.write(json.dumps({"_id": record_id(number), "text": document_text(rng, number)}) + "\n")
    else:
        docs = base / "docs"
        for number in range(size):
            path = docs / relative_file(number)
            if number % FILES_PER_FOLDER == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(document_text(rng, number), encoding="utf-8")
    marker.write_text(stamp)
    print(
        f"  generated the {form} corpus of {size:,} documents in {base} in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    return base


def changed_sets(size: int) -> tuple[list[int], list[int]]:
    """Disjoint, deterministic: the 1% of documents edited, and the 1% deleted afterwards."""
    count = max(1, round(size * CHANGED_FRACTION))
    picked = random.Random(f"changes-{size}").sample(range(size), 2 * count)
    return sorted(picked[:count]), sorted(picked[count:])


def copy_corpus(base: Path, run: Path, form: str) -> None:
    if form == "jsonl":
        shutil.copyfile(base / "corpus.jsonl", run / "corpus.jsonl")
    else:  # hard links: fast at 1M files; edits write new files, so the reused corpus never changes
        subprocess.run(["cp", "-al", str(base / "docs"), str(run / "docs")], check=True)


def rewrite_jsonl(path: Path, edit: set[int], delete: set[int]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(path, encoding="utf-8") as source, open(tmp, "w", encoding="utf-8") as out:
        for line in source:
            record = json.loads(line)
            number = int(record["_id"][1:])
            if number in delete:
                continue
            if number in edit:
                record["text"] = edited_text(record["text"])
                line = json.dumps(record) + "\n"
            out.write(line)
    os.replace(tmp, path)


def edit_documents(run: Path, form: str, numbers: list[int]) -> None:
    if form == "jsonl":
        rewrite_jsonl(run / "corpus.jsonl", set(numbers), set())
        return
    for number in numbers:
        path = run / "docs" / relative_file(number)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(edited_text(path.read_text(encoding="utf-8")), encoding="utf-8")
        os.replace(tmp, path)  # a new inode: the hard-linked original in the corpus stays as it was


def delete_documents(run: Path, form: str, numbers: list[int]) -> None:
    if form == "jsonl":
        rewrite_jsonl(run / "corpus.jsonl", set(), set(numbers))
        return
    for number in numbers:
        (run / "docs" / relative_file(number)).unlink()


# -- specs -----------------------------------------------------------------------------------


def spec_yaml(form: str, store: dict[str, str], folder_parser: str) -> str:
    if form == "jsonl":
        source = {"type": "jsonl", "path": "corpus.jsonl", "id_prefix": "corpus/"}
        parser = {"type": "tests.plugins.components:LineParser"}
    else:
        source = {"type": "local", "path": "docs", "namespace": "docs"}
        parser = (
            {"type": "tests.plugins.components:LineParser"} if folder_parser == "lines" else {"type": "unstructured"}
        )
    spec = {
        "version": 1,
        "name": "scale",
        "stages": {
            "source": source,
            "parser": parser,
            "chunker": {"type": "tests.plugins.components:ElementChunker"},
            "embedder": {"type": "tests.plugins.components:HashEmbedder", "dimension": 8},
            "store": {"type": "milvus", **store},
        },
        "runner": {"parse_workers": 0, "progress": "auto", "failures_file": "failures.jsonl"},
    }
    return json.dumps(spec, indent=2)  # JSON is YAML


# -- child processes -------------------------------------------------------------------------


def child_step(out: Path, argv: list[str]) -> int:
    """Run the CLI in this (fresh) process; write its exit code and peak RSS figures to ``out``."""
    sys.path.insert(0, str(ROOT))
    from pipeline.cli import main as cli_main

    try:
        code = cli_main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    out.write_text(
        json.dumps(
            {
                "rc": code,
                "self_maxrss_kb": own.ru_maxrss,
                "children_maxrss_kb": children.ru_maxrss,
                "cpu_s": own.ru_utime + own.ru_stime,
                "children_cpu_s": children.ru_utime + children.ru_stime,
            }
        )
    )
    return int(code or 0)


def child_info(out: Path, uri: str | None) -> int:
    """Versions of pymilvus, Milvus Lite and (with ``uri``) the server."""
    from importlib.metadata import PackageNotFoundError, version

    info: dict[str, Any] = {"python": platform.python_version()}
    for package in ("pymilvus", "milvus-lite", "numpy"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = "not installed"
    if uri:
        from pymilvus import MilvusClient

        client = MilvusClient(uri=uri)
        info["server"] = client.get_server_version()
        client.close()
    out.write_text(json.dumps(info))
    return 0


def child_drop(uri: str, prefixes: list[str]) -> int:
    """Drop every collection named ``<prefix>...`` on a server (the configured name is an alias of a
    ``<name>__rebuild_...`` collection there; the record and lock are ``..._records``, ``..._lock``),
    its aliases first."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri)
    for collection in client.list_collections():
        if any(collection.startswith(prefix) for prefix in prefixes):
            for alias in client.list_aliases(collection).get("aliases", []):
                client.drop_alias(alias)
            client.drop_collection(collection)
    client.close()
    return 0


def _rows_digests(spec: Path, keep_exact: bool) -> dict[str, Any]:
    """Stream the index of ``spec``: sorted 64-bit digests of its (source_id, chunk id) rows and of
    its records, exact sets when small, status counts."""
    from collections import Counter

    import numpy as np

    from core.digests import digest64
    from pipeline import Pipeline

    pipeline = Pipeline.from_yaml(spec, allowed_modules=[PLUGINS])
    try:
        store = pipeline.store
        rows = np.fromiter(
            (digest64(f"{r['source_id']}\0{r['id']}") for r in store.rows(["id", "source_id"])), dtype=np.uint64
        )
        exact_rows = {(r["source_id"], r["id"]) for r in store.rows(["id", "source_id"])} if keep_exact else None
        statuses: Counter[str] = Counter()
        record_digests = []
        exact_records = {} if keep_exact else None
        for record in store.index_record().all():
            statuses[record.status] += 1
            key = record_key(record)
            record_digests.append(digest64(json.dumps(key)))
            if exact_records is not None:
                exact_records[record.source_id] = key
        records = np.array(record_digests, dtype=np.uint64)
        rows.sort()
        records.sort()
        return {
            "rows": rows,
            "records": records,
            "statuses": dict(statuses),
            "exact_rows": exact_rows,
            "exact_records": exact_records,
            "pipeline": pipeline,
        }
    except BaseException:
        pipeline.close()
        raise


def record_key(record: Any) -> list[Any]:
    return [
        record.source_id,
        record.scope,
        record.status,
        record.content_hash,
        record.change_signal,
        record.fingerprint,
        record.chunk_count,
        record.chunk_digest,
        record.stage,
        record.reason,
    ]


def _computed_digests(spec: Path, keep_exact: bool, sample: list[str]) -> dict[str, Any]:
    """What a clean build of the corpus must hold, computed without any store: every listed source is
    read, parsed and chunked by the spec's own source, parser and chunker, and its record is what
    ``ChangeTracker.written`` would write (content hash, change signal, stage fingerprint, chunk count
    and digest, status indexed)."""
    from collections import Counter

    import numpy as np

    from core.digests import digest64
    from core.records import SourceRecord, chunk_digest
    from pipeline import Pipeline
    from pipeline.incremental import stage_fingerprint

    pipeline = Pipeline.from_yaml(spec, allowed_modules=[PLUGINS])  # its store is never touched
    fingerprint = stage_fingerprint([pipeline.parser, pipeline.chunker, pipeline.embedder, pipeline.sparse])
    wanted = set(sample)
    rows, record_digests, statuses = [], [], Counter()
    exact_rows: set[tuple[str, str]] | None = set() if keep_exact else None
    exact_records: dict[str, list[Any]] | None = {} if keep_exact else None
    sample_chunks: dict[str, list[str]] = {}
    sample_records: dict[str, list[Any]] = {}
    for source in pipeline.sources:
        for ref in source.list():
            document = source.load(ref)
            ids = [chunk.id for chunk in pipeline.chunker.plan(pipeline.parser.parse(document)).chunks()]
            record = SourceRecord(
                ref.source_id,
                source.scope,
                document.content_hash,
                ref.change_signal,
                fingerprint,
                len(ids),
                chunk_digest(ids),
                "indexed",
            )
            statuses[record.status] += 1
            key = record_key(record)
            record_digests.append(digest64(json.dumps(key)))
            rows.extend(digest64(f"{ref.source_id}\0{chunk_id}") for chunk_id in ids)
            if exact_rows is not None and exact_records is not None:
                exact_rows.update((ref.source_id, chunk_id) for chunk_id in ids)
                exact_records[ref.source_id] = key
            if ref.source_id in wanted:
                if ids:
                    sample_chunks[ref.source_id] = sorted(ids)
                sample_records[ref.source_id] = key
    pipeline.close()
    return {
        "rows": np.sort(np.array(rows, dtype=np.uint64)),
        "records": np.sort(np.array(record_digests, dtype=np.uint64)),
        "statuses": dict(statuses),
        "exact_rows": exact_rows,
        "exact_records": exact_records,
        "sample": (sample_chunks, sample_records),
    }


def _compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    result: dict[str, Any] = {
        "rows": [len(a["rows"]), len(b["rows"])],
        "records": [len(a["records"]), len(b["records"])],
        "statuses": [a["statuses"], b["statuses"]],
        "rows_digest": [
            hashlib.sha256(a["rows"].tobytes()).hexdigest()[:16],
            hashlib.sha256(b["rows"].tobytes()).hexdigest()[:16],
        ],
        "records_digest": [
            hashlib.sha256(a["records"].tobytes()).hexdigest()[:16],
            hashlib.sha256(b["records"].tobytes()).hexdigest()[:16],
        ],
        "rows_equal": bool(np.array_equal(a["rows"], b["rows"])),
        "records_equal": bool(np.array_equal(a["records"], b["records"])),
    }
    if a["exact_rows"] is not None and b["exact_rows"] is not None:
        result["exact_rows_equal"] = a["exact_rows"] == b["exact_rows"]
        result["exact_records_equal"] = a["exact_records"] == b["exact_records"]
        result["rows_only_maintained"] = sorted(a["exact_rows"] - b["exact_rows"])[:5]
        result["rows_only_reference"] = sorted(b["exact_rows"] - a["exact_rows"])[:5]
    result["sample_with_chunks"] = [len(a["sample"][0]), len(b["sample"][0])]
    result["sample_equal"] = a["sample"] == b["sample"]
    equal = result["rows_equal"] and result["records_equal"] and result["sample_equal"]
    result["equal"] = bool(equal and result.get("exact_rows_equal", True) and result.get("exact_records_equal", True))
    return result


def child_verify(out: Path, spec: Path, sample_file: Path, sources: int, references: list[str]) -> int:
    """Compare the maintained index of ``spec`` with each reference: ``clean=<spec>`` (a clean ingest
    into another index) or ``computed`` (see :func:`_computed_digests`)."""

    sample = json.loads(sample_file.read_text())
    keep_exact = 2 * sources <= EXACT_SET_MAX_ROWS  # about 2 chunks per source; larger: digests only

    def from_store(path: Path) -> dict[str, Any]:
        side = _rows_digests(path, keep_exact=keep_exact)
        try:
            store = side["pipeline"].store  # the sample, source by source, through the store's per-source queries
            chunks = {k: sorted(v) for k, v in store.chunk_ids_of(sample).items()}
            recs = {k: record_key(v) for k, v in store.index_record().get(sample).items()}
            side["sample"] = (chunks, recs)
        finally:
            side.pop("pipeline").close()
        return side

    result: dict[str, Any] = {"sample_sources": len(sample)}
    started = time.perf_counter()
    maintained = from_store(spec)
    result["maintained_stream_s"] = round(time.perf_counter() - started, 2)
    result["maintained_statuses"] = maintained["statuses"]
    result["all_indexed"] = set(maintained["statuses"]) == {"indexed"}
    for reference in references:
        started = time.perf_counter()
        if reference == "computed":
            side = _computed_digests(spec, keep_exact, sample)
        else:
            side = from_store(Path(reference.split("=", 1)[1]))
        name = reference.split("=", 1)[0]
        result[name] = _compare(maintained, side)
        result[name]["seconds"] = round(time.perf_counter() - started, 2)
        del side
    result["equal"] = all(result[r.split("=", 1)[0]]["equal"] for r in references)
    out.write_text(json.dumps(result))
    return 0


# -- the parent ------------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    argv: list[str]
    seconds: float = 0.0
    rc: int | None = None
    finished: bool = False
    cli_maxrss: int = 0  # bytes
    server_maxrss: int = 0  # bytes: the largest reaped child (the Milvus Lite server)
    cpu_s: float = 0.0
    load1: float = 0.0
    result: str = ""  # what the step did, in a few words
    run_s: float | None = None  # ingest / reindex: the run's own time (RunSummary.seconds: no start-up, no imports)
    stage_s: dict[str, float] = field(default_factory=dict)
    note: str = ""


@dataclass
class Case:
    size: int
    form: str
    store: str
    steps: list[Step] = field(default_factory=list)
    prep: dict[str, float] = field(default_factory=dict)
    verify: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    def step(self, name: str) -> Step | None:
        return next((s for s in self.steps if s.name == name), None)


MAINTENANCE_STEPS = [
    "ingest",
    "reindex, no change",
    "reindex, 1% edited",
    "reindex, 1% deleted",
    "status",
    "reconcile --dry-run",
    "reconcile",
]
REFERENCE_STEPS = ["clean ingest (reference)"]


class Runner:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.workdir: Path = args.workdir
        self.python = sys.executable

    def run_child(self, step: Step, run: Path, log: Path) -> None:
        stats = run / f".step-{sum(1 for p in run.glob('.step-*.json'))}.json"
        command = [self.python, str(HERE), "--child-step", str(stats), "--", *step.argv]
        step.load1 = os.getloadavg()[0]
        started = time.perf_counter()
        with open(log, "ab") as log_file:
            log_file.write(f"\n===== {step.name}: python -m pipeline {' '.join(step.argv)}\n".encode())
            log_file.flush()
            process = subprocess.Popen(
                command, cwd=run, stdout=subprocess.PIPE, stderr=log_file, start_new_session=True
            )
            try:
                stdout, _ = process.communicate(timeout=self.args.step_timeout)
            except subprocess.TimeoutExpired:
                step.seconds = time.perf_counter() - started
                step.note = f"stopped after {step.seconds:.0f} s (--step-timeout)"
                self.py_spy(process.pid, log, step)
                os.killpg(process.pid, signal.SIGKILL)  # the step's own process group (it and its Lite server)
                stdout, _ = process.communicate()
                log_file.write(stdout)
                return
        step.seconds = time.perf_counter() - started
        step.rc = process.returncode
        text = stdout.decode(errors="replace")
        with open(log, "a", encoding="utf-8") as log_file:
            log_file.write(text)
        if stats.is_file():
            figures = json.loads(stats.read_text())
            step.finished = True
            step.cli_maxrss = figures["self_maxrss_kb"] * 1024
            step.server_maxrss = figures["children_maxrss_kb"] * 1024
            step.cpu_s = figures["cpu_s"]
        step.result = describe_output(step.argv[0], text)
        if step.argv[0] in ("ingest", "reindex"):
            try:
                summary = json.loads(text)
                step.run_s = summary["seconds"]
                step.stage_s = {k: round(v, 2) for k, v in summary.get("stage_seconds", {}).items()}
            except (json.JSONDecodeError, KeyError):
                pass

    def py_spy(self, pid: int, log: Path, step: Step) -> None:
        if not self.args.py_spy:
            return
        try:
            dump = subprocess.run(
                [self.args.py_spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=120
            )
            text = dump.stdout + dump.stderr
        except Exception as exc:  # noqa: BLE001
            text = f"py-spy failed: {exc}"
        spy = log.with_name(f"py-spy-{step.name.replace(' ', '_').replace(',', '').replace('%', 'pct')}.txt")
        spy.write_text(text)
        step.note += f"; py-spy dump in {spy}"
        print(
            f"    py-spy dump of {step.name} (pid {pid}):\n"
            + "\n".join("      " + line for line in text.splitlines()[:60]),
            flush=True,
        )

    def tool(self, *arguments: str) -> dict[str, Any]:
        out = self.workdir / f".tool-{os.getpid()}.json"
        subprocess.run([self.python, str(HERE), *arguments[:1], str(out), *arguments[1:]], check=True, cwd=ROOT)
        data = json.loads(out.read_text())
        out.unlink()
        return data

    def case(self, size: int, form: str, store: str) -> Case:
        args = self.args
        case = Case(size, form, store)
        base = ensure_corpus(self.workdir, form, size)
        run = self.workdir / "runs" / f"{form}-{size}-{store}"
        if run.exists():
            shutil.rmtree(run)
        run.mkdir(parents=True)
        log = run / "steps.log"
        started = time.perf_counter()
        copy_corpus(base, run, form)
        case.prep["copy corpus s"] = round(time.perf_counter() - started, 2)
        if store == "lite":
            stores = {"uri": "./index.db", "collection": "scale"}, {"uri": "./clean.db", "collection": "scale"}
        else:
            uri = os.environ[SERVER_ENV]
            name = f"scale_{form}_{size}_{time.strftime('%H%M%S')}"
            stores = {"uri": uri, "collection": name}, {"uri": uri, "collection": f"{name}_clean"}
            self.drop(uri, [stores[0]["collection"], stores[1]["collection"]])
        (run / "spec.yaml").write_text(spec_yaml(form, stores[0], args.folder_parser))
        (run / "clean.yaml").write_text(spec_yaml(form, stores[1], args.folder_parser))
        edit, delete = changed_sets(size)
        common = ["--allow-module", PLUGINS]

        def step(name: str, *argv: str) -> Step:
            s = Step(name, list(argv))
            case.steps.append(s)
            self.run_child(s, run, log)
            spent = f"{s.seconds:9.1f} s" if s.finished else "not finished"
            print(
                f"    {name:<26} {spent}  rc={s.rc}  CLI peak {s.cli_maxrss / MB:8.1f} MB  Lite server peak "
                f"{s.server_maxrss / MB:8.1f} MB  load {s.load1:.1f}  {s.result} {s.note}",
                flush=True,
            )
            if not s.finished or s.rc not in (0,):
                raise StepFailed(f"{name} did not complete (rc={s.rc}{'; ' + s.note if s.note else ''}); see {log}")
            return s

        print(f"  {form} x {size:,} on {store}: {run}", flush=True)
        try:
            step("ingest", "ingest", "spec.yaml", *common, "--json")
            step("reindex, no change", "reindex", "spec.yaml", *common, "--json")
            started = time.perf_counter()
            edit_documents(run, form, edit)
            case.prep["edit 1% s"] = round(time.perf_counter() - started, 2)
            step("reindex, 1% edited", "reindex", "spec.yaml", *common, "--json")
            started = time.perf_counter()
            delete_documents(run, form, delete)
            case.prep["delete 1% s"] = round(time.perf_counter() - started, 2)
            step("reindex, 1% deleted", "reindex", "spec.yaml", *common, "--json")
            step("status", "status", "spec.yaml", *common)
            step("reconcile --dry-run", "reconcile", "spec.yaml", *common, "--dry-run")
            step("reconcile", "reconcile", "spec.yaml", *common)
            references = reference_kinds(args.reference, size)
            if "clean" in references:
                step("clean ingest (reference)", "ingest", "clean.yaml", *common, "--json")
            gone = set(delete)
            kept = [n for n in range(size) if n not in gone]
            sample = sorted(random.Random(f"sample-{size}").sample(kept, min(SAMPLE_SOURCES, len(kept))))
            sample_ids = [source_id(form, n) for n in sample]
            sample_ids += [source_id(form, n) for n in delete[:10]]  # deleted ones: must be absent from both
            (run / "sample.json").write_text(json.dumps(sample_ids))
            started = time.perf_counter()
            refs = [f"clean={run / 'clean.yaml'}" if kind == "clean" else kind for kind in references]
            case.verify = self.tool(
                "--child-verify", str(run / "spec.yaml"), str(run / "sample.json"), str(len(kept)), *refs
            )
            case.verify["seconds"] = round(time.perf_counter() - started, 1)
            case.verify["expected_sources"] = len(kept)
            for line in verify_lines(case.verify, references):
                print(f"    verify: {line}", flush=True)
        except StepFailed as exc:
            case.error = str(exc)
            print(f"    STOPPED: {exc}", flush=True)
        finally:
            if store == "server" and not args.keep_collections:
                self.drop(os.environ[SERVER_ENV], [stores[0]["collection"], stores[1]["collection"]])
            if args.remove_runs and not case.error:
                shutil.rmtree(run, ignore_errors=True)
        return case

    def drop(self, uri: str, names: list[str]) -> None:
        if subprocess.run([self.python, str(HERE), "--child-drop", uri, *names], cwd=ROOT).returncode:
            print(f"    warning: could not drop the collections {names} on {uri}", flush=True)


class StepFailed(RuntimeError):
    pass


def describe_output(command: str, text: str) -> str:
    """A few words on what the step did, from the CLI's output."""
    if command in ("ingest", "reindex"):
        try:
            summary = json.loads(text)
        except json.JSONDecodeError:
            return text.strip().splitlines()[-1][:120] if text.strip() else ""
        changes = summary.get("changes") or {}
        return (
            f"[{summary['documents_seen']} parsed, {summary['chunks_written']} chunks written, "
            f"{summary['documents_failed']} failed; {changes.get('added', 0)} added, {changes.get('updated', 0)} "
            f"updated, {changes.get('unchanged', 0)} unchanged, {changes.get('deleted', 0)} deleted]"
        )
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return "[" + " | ".join(lines[:3])[:200] + "]"


# -- the report ------------------------------------------------------------------------------


def cpu_description() -> list[str]:
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    relevant = [
        f
        for f in (
            "sse4_2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512_vnni",
            "avx512_bf16",
            "amx_tile",
            "sha_ni",
            "aes",
            "popcnt",
            "hypervisor",
        )
        if f in flags
    ]
    missing = [f for f in ("avx512f", "amx_tile") if f not in flags]
    memory = ""
    try:
        total_kb = int(
            next(
                line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
            ).split()[1]
        )
        memory = f"{total_kb / 2**20:.1f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    return [
        f"CPU: {info.get('model name', platform.processor() or 'unknown')}; {os.cpu_count()} logical CPUs visible; "
        f"{memory}; load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"CPU flags (relevant to Milvus' SIMD kernels and hashing): {' '.join(relevant)}; absent: "
        f"{' '.join(missing) or 'none'}",
    ]


REFERENCE_NAMES = {
    "clean": "clean ingest of the final corpus into a fresh index",
    "computed": "computed from the final corpus by the spec's source, parser and chunker, no store",
}


def reference_kinds(option: str, size: int) -> list[str]:
    if option == "auto":
        return ["clean", "computed"] if size <= AUTO_CLEAN_MAX else ["computed"]
    return ["clean", "computed"] if option == "both" else [option]


def verify_lines(v: dict[str, Any], references: list[str]) -> list[str]:
    lines = []
    for kind in references:
        r = v[kind]
        exact = (
            f"exact sets compared, equal={r['exact_rows_equal'] and r['exact_records_equal']}"
            if "exact_rows_equal" in r
            else "exact sets not kept (sorted 64-bit digests only)"
        )
        lines.append(
            f"vs {REFERENCE_NAMES[kind]}: {'EQUAL' if r['equal'] else 'DIFFERENT'} - rows {r['rows'][0]:,} / "
            f"{r['rows'][1]:,} (digest {r['rows_digest'][0]} / {r['rows_digest'][1]}); records {r['records'][0]:,} / "
            f"{r['records'][1]:,} (digest {r['records_digest'][0]} / {r['records_digest'][1]}); statuses "
            f"{r['statuses'][0]} / {r['statuses'][1]}; sample of {v['sample_sources']} sources "
            f"equal={r['sample_equal']}; {exact}; {r['seconds']} s"
        )
        if r.get("rows_only_maintained") or r.get("rows_only_reference"):
            lines.append(
                f"  rows only in the maintained index: {r['rows_only_maintained']}; only in the reference: "
                f"{r['rows_only_reference']}"
            )
    return lines


def table(case: Case, smallest: Case | None) -> str:
    header = (
        f"{'step':<26} {'seconds':>9} {'run s':>8} {'CLI peak RSS MB':>15} {'CLI B/source':>12} "
        f"{'Lite srv peak MB':>16} {'srv B/source':>12} {'load1':>5}  what it did"
    )
    lines = [f"size {case.size:,}, form {case.form}, store {case.store}", header, "-" * len(header)]
    for step in case.steps:
        base = smallest.step(step.name) if smallest is not None and smallest is not case else None
        per_cli = per_srv = "-"
        if base is not None and base.finished and step.finished and case.size > smallest.size:
            extra = case.size - smallest.size
            per_cli = f"{(step.cli_maxrss - base.cli_maxrss) / extra:.0f}"
            if step.server_maxrss and base.server_maxrss:
                per_srv = f"{(step.server_maxrss - base.server_maxrss) / extra:.0f}"
        seconds = f"{step.seconds:.1f}" if step.finished else f">{step.seconds:.0f} DNF"
        run_s = f"{step.run_s:.1f}" if step.run_s is not None else "-"
        lines.append(
            f"{step.name:<26} {seconds:>9} {run_s:>8} {step.cli_maxrss / MB:>15.1f} {per_cli:>12} "
            f"{step.server_maxrss / MB:>16.1f} {per_srv:>12} {step.load1:>5.1f}  "
            f"{step.result}{' ' + step.note if step.note else ''}"
        )
    ingest, quiet = case.step("ingest"), case.step("reindex, no change")
    if ingest and quiet and ingest.finished and quiet.finished:
        lines.append(
            f"ratio no-change reindex / ingest (wall time of the CLI processes): {quiet.seconds:.2f} s / "
            f"{ingest.seconds:.2f} s = {quiet.seconds / ingest.seconds:.4f}"
        )
        if quiet.run_s is not None and ingest.run_s:
            lines.append(
                f"ratio of the runs' own times (RunSummary.seconds, no process start-up): {quiet.run_s:.2f} s / "
                f"{ingest.run_s:.2f} s = {quiet.run_s / ingest.run_s:.4f}"
            )
    for step in case.steps:
        if step.stage_s:
            lines.append(f"  {step.name} stage seconds: " + ", ".join(f"{k} {v}" for k, v in step.stage_s.items()))
    if case.prep:
        lines.append("outside the steps: " + ", ".join(f"{k} {v}" for k, v in case.prep.items()))
    if case.verify:
        references = [k for k in ("clean", "computed") if k in case.verify]
        lines.append(
            f"equal to a clean build: {'YES' if case.verify['equal'] else 'NO'} (verify {case.verify['seconds']} s; "
            f"expected sources {case.verify['expected_sources']:,})"
        )
        lines += ["  " + line for line in verify_lines(case.verify, references)]
    if case.error:
        lines.append(f"NOT COMPLETED: {case.error}")
    return "\n".join(lines)


def targets(cases: list[Case], sizes: list[int]) -> str:
    lines = ["targets (CLI process = the pipeline; the Lite server's memory is reported, not judged)"]
    groups: dict[tuple[str, str], list[Case]] = {}
    for case in cases:
        groups.setdefault((case.form, case.store), []).append(case)
    for (form, store), group in groups.items():
        group.sort(key=lambda c: c.size)
        lines.append(f"{form} on {store}:")
        at_million = next((c for c in group if c.size >= 1_000_000), None)
        if at_million is None:
            lines.append(f"  every step completes at 1M: NOT MEASURED (largest size run: {group[-1].size:,})")
        else:
            done = [s.name for s in at_million.steps if s.finished and s.rc == 0]
            missing = [n for n in MAINTENANCE_STEPS if n not in done]
            lines.append(
                f"  every step completes at 1M: {'met' if not missing else 'NOT MET'}"
                + (f" (did not complete: {', '.join(missing)})" if missing else "")
            )
        for case in group:
            ingest, quiet = case.step("ingest"), case.step("reindex, no change")
            if ingest and quiet and ingest.finished and quiet.finished:
                ratio = quiet.seconds / ingest.seconds
                own = (
                    f"; runs' own times {quiet.run_s / ingest.run_s:.2%}"
                    if quiet.run_s is not None and ingest.run_s
                    else ""
                )
                lines.append(
                    f"  {case.size:>9,}: no-change reindex <= 2% of ingest: "
                    f"{'met' if ratio <= TARGET_NO_CHANGE_RATIO else 'NOT MET'} (wall {ratio:.2%}{own})"
                )
            else:
                lines.append(f"  {case.size:>9,}: no-change reindex <= 2% of ingest: NOT MEASURED")
        smallest = group[0]
        for case in group[1:]:
            worst = []
            for step in case.steps:
                base = smallest.step(step.name)
                if base and base.finished and step.finished:
                    worst.append(((step.cli_maxrss - base.cli_maxrss) / (case.size - smallest.size), step.name))
            if worst:
                value, name = max(worst)
                lines.append(
                    f"  {case.size:>9,}: peak RSS <= 100 B per source (vs {smallest.size:,}): "
                    f"{'met' if value <= TARGET_BYTES_PER_SOURCE else 'NOT MET'} (worst: {name}, {value:.0f} B/source)"
                )
        if len(group) == 1:
            lines.append("  peak RSS per source: NOT MEASURED (one size only)")
        for case in group:
            if case.verify:
                lines.append(
                    f"  {case.size:>9,}: results equal a clean build: {'met' if case.verify['equal'] else 'NOT MET'}"
                )
            else:
                lines.append(
                    f"  {case.size:>9,}: results equal a clean build: NOT MEASURED ({case.error or 'no verify'})"
                )
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-step":
        return child_step(Path(sys.argv[2]), sys.argv[4:])
    if len(sys.argv) > 1 and sys.argv[1] == "--child-info":
        return child_info(Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
    if len(sys.argv) > 1 and sys.argv[1] == "--child-drop":
        return child_drop(sys.argv[2], sys.argv[3:])
    if len(sys.argv) > 1 and sys.argv[1] == "--child-verify":
        sys.path.insert(0, str(ROOT))
        return child_verify(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]), sys.argv[6:])

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes", default="10000,100000", help="comma-separated document counts (default 10000,100000)"
    )
    parser.add_argument("--form", default="jsonl,folder", help="jsonl, folder or both")
    parser.add_argument("--store", default="lite", help=f"lite, server or both (server: {SERVER_ENV} must be set)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/scale-maintenance"), help="corpus (reused) and runs")
    parser.add_argument("--folder-parser", choices=["lines", "unstructured"], default="lines")
    parser.add_argument(
        "--step-timeout",
        type=float,
        default=None,
        help="stop a step after this many seconds (reported as not finished)",
    )
    parser.add_argument(
        "--py-spy", default=None, help="py-spy executable: dump the stack of a step stopped by --step-timeout"
    )
    parser.add_argument("--keep-collections", action="store_true", help="server: keep the benchmark's collections")
    parser.add_argument(
        "--remove-runs", action="store_true", help="delete each run's folder (index, corpus copy) after it"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--reference",
        choices=["auto", "clean", "computed", "both"],
        default="auto",
        help="what the maintained index is compared with: a clean ingest into a fresh index, the rows and records "
        f"computed from the corpus without a store, or both (auto: both up to {AUTO_CLEAN_MAX:,} documents, computed "
        "above)",
    )
    args = parser.parse_args()
    sizes = sorted(int(s.replace("_", "")) for s in args.sizes.split(","))
    forms = [f.strip() for f in args.form.split(",")]
    stores = [s.strip() for s in args.store.split(",")]
    if "server" in stores and not os.environ.get(SERVER_ENV):
        parser.error(f"--store server needs {SERVER_ENV} (run under scripts/milvus_server.py run -- ...)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    runner = Runner(args)

    print(
        "scale_maintenance: PLUMBING ONLY - LineParser / ElementChunker / HashEmbedder (tests.plugins), no model, no "
        "real parser;"
    )
    print("  the times are the pipeline's listing, change record, chunk store and runner, not parsing or embedding.")
    print(
        "  folder form parser: "
        f"{'LineParser (in-process)' if args.folder_parser == 'lines' else 'unstructured (native .txt path)'}; jsonl "
        "form parser: LineParser (in-process)"
    )
    print("command: " + " ".join([sys.executable, *sys.argv]))
    for line in cpu_description():
        print(line)
    info = runner.tool("--child-info", *([os.environ[SERVER_ENV]] if "server" in stores else []))
    print(
        f"Python {info['python']}; pymilvus {info['pymilvus']}; Milvus Lite (milvus-lite) {info['milvus-lite']}; numpy "
        f"{info['numpy']}"
        + (f"; Milvus server {info['server']} at {os.environ[SERVER_ENV]}" if "server" in stores else "")
    )
    print(
        f"sizes {sizes}, forms {forms}, stores {stores}, workdir {args.workdir}, reference {args.reference}"
        + (
            f" (clean ingest and computed up to {AUTO_CLEAN_MAX:,} documents, computed only above)"
            if args.reference == "auto"
            else ""
        ),
        flush=True,
    )

    cases: list[Case] = []
    results = args.json or args.workdir / f"results-{time.strftime('%Y%m%dT%H%M%S')}.json"
    for store in stores:
        for form in forms:
            smallest = None
            for size in sizes:
                case = runner.case(size, form, store)
                cases.append(case)
                smallest = smallest or case
                print("\n" + table(case, smallest) + "\n", flush=True)
                results.write_text(json.dumps({"info": info, "cases": [asdict(c) for c in cases]}, indent=1))
    print("=" * 100)
    groups: dict[tuple[str, str], list[Case]] = {}
    for case in cases:
        groups.setdefault((case.form, case.store), []).append(case)
    for group in groups.values():
        for case in group:
            print(table(case, group[0]) + "\n")
    print(targets(cases, sizes))
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; results in {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
