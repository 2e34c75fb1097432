"""Ingest time on SciFact: this project versus LlamaIndex's IngestionPipeline and LangChain's index().

    .venv/bin/python benchmarks/anchors_ingest.py [--limit N] [--datasets DIR] [--only ours,llamaindex,langchain]
        [--repeat N] [--anchors-python PATH] [--embed-batch-size N] [--json FILE]

One corpus, one model, one vector database, three frameworks. SciFact's abstracts (title + "\\n\\n" +
text, as BEIR joins them) are written once to a folder of .txt files; each system then indexes that
folder into a fresh Milvus Lite database of its own, in a process of its own:

* ours: ``benchmarks/ingest_throughput.py::scifact_folder_spec`` (local source -> unstructured parser,
  which reads .txt with its native text parser -> recursive 1000/100 chunker -> packaged
  all-MiniLM-L6-v2 -> Milvus Lite) through ``Pipeline(spec).ingest()`` at the runner's defaults, with
  the index record it keeps for later reindexing;
* LlamaIndex: ``SimpleDirectoryReader`` -> ``IngestionPipeline`` with a ``LangchainNodeParser``
  around langchain-text-splitters' ``RecursiveCharacterTextSplitter(1000, 100)``, a
  ``HuggingFaceEmbedding`` of the same model folder, a ``SimpleDocumentStore`` (its record of what
  was ingested, persisted at the end) and ``MilvusVectorStore``;
* LangChain: ``DirectoryLoader``/``TextLoader`` -> the same splitter -> ``index()`` with a
  ``SQLRecordManager`` on sqlite, ``HuggingFaceEmbeddings`` of the same folder and ``Milvus``.

LlamaIndex and LangChain run in their own virtual environment (``benchmarks/anchors_env.sh`` makes
it); this file is also their entry point there (``--anchor NAME``), so everything it imports at
module level is standard library and nothing of this project is imported on their side.

What the clock covers, the same for all three: from before the vector store is opened (Milvus Lite
started, the collection created) and the first file is read, to after the framework's call returned
and the collection was flushed. It leaves out Python imports and loading the model's weights, which
every system does once before the clock starts. Every index's row count is checked afterwards. Wall
and CPU time are both reported: on a shared machine the first follows the load, the second less.
Embedding batch sizes are each framework's default (ours: up to 64 texts and, on a CPU, 4,096
padded tokens per pass; LlamaIndex 10; sentence-transformers' 32 under LangChain) unless
``--embed-batch-size`` sets one number of texts for all three (ours keeps its token budget).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("ours", "llamaindex", "langchain")
LABELS = {"ours": "ours", "llamaindex": "LlamaIndex", "langchain": "LangChain"}
ANCHORS_PYTHON_ENV = "ANCHORS_PYTHON"
DEFAULT_ANCHORS_PYTHON = ROOT.parent / "venvs" / "anchors" / "bin" / "python"
MODEL_NAME = "all-MiniLM-L6-v2"
MODEL_DIMENSION = 384  # LlamaIndex's Milvus store must be told it before the first write
CHUNK_SIZE = 1000
CHUNK_OVERLAP = 100
COLLECTION = "scifact"  # the same name in each system's own database folder

# The packages whose versions decide each side's figures, reported with them.
VERSIONED = {
    "ours": ("rag-pipeline", "torch", "transformers", "pymilvus", "milvus-lite"),
    "llamaindex": (
        "llama-index-core",
        "llama-index-vector-stores-milvus",
        "llama-index-embeddings-huggingface",
        "langchain-text-splitters",
        "sentence-transformers",
        "transformers",
        "torch",
        "pymilvus",
        "milvus-lite",
    ),
    "langchain": (
        "langchain-core",
        "langchain-classic",
        "langchain-community",
        "langchain-milvus",
        "langchain-huggingface",
        "langchain-text-splitters",
        "sentence-transformers",
        "transformers",
        "torch",
        "pymilvus",
        "milvus-lite",
    ),
}


@dataclass
class Job:
    """What one system is asked to index, and where."""

    docs: Path
    db: Path
    model: Path
    embed_batch_size: int | None  # None: the framework's own default
    backend: str = "torch"  # ours only: the embedder's backend (torch, onnx, auto)
    quantize: str = "none"  # ours only: none or int8 (onnx)


@dataclass
class Result:
    system: str
    seconds: float
    cpu_seconds: float  # user + system, this process and its waited-for children, over the same region
    documents: int
    chunks: int
    rows: int
    embed_batch_size: int
    torch_threads: int
    loadavg_before: list[float]
    loadavg_after: list[float]
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return LABELS[self.system]


def cpu_seconds() -> float:
    """CPU time of this process (all its threads, Milvus Lite 3's in-process server among them) and its
    ended children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Stopwatch:
    """Wall and CPU time of the measured region, with the machine's load average at both ends.

    On a machine shared with other work the wall time swings with the load; CPU time much less,
    so both are reported.
    """

    def __enter__(self) -> Stopwatch:
        self.loadavg_before = list(os.getloadavg())
        self._cpu_started = cpu_seconds()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._started
        self.cpu_seconds = cpu_seconds() - self._cpu_started
        self.loadavg_after = list(os.getloadavg())


# -- shared by every side (pymilvus is installed in both environments) --------------------------


def flush(uri: Path, collection: str) -> None:
    from pymilvus import MilvusClient

    MilvusClient(uri=str(uri)).flush(collection)


def count_rows(uri: Path, collection: str) -> int:
    from pymilvus import MilvusClient

    rows = MilvusClient(uri=str(uri)).query(
        collection, filter="", output_fields=["count(*)"], consistency_level="Strong"
    )
    return int(rows[0]["count(*)"])


def versions(system: str) -> dict[str, str]:
    found = {}
    for name in VERSIONED[system]:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def recursive_splitter() -> Any:
    """LangChain's recursive splitter at the benchmark's settings (both anchors chunk with it)."""
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    return RecursiveCharacterTextSplitter(chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP)


# -- the three systems, each run in a process of its own ----------------------------------------


def run_ours(job: Job) -> Result:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from ingest_throughput import scifact_folder_spec

    from pipeline import Pipeline

    spec = scifact_folder_spec("anchors-ours", job.docs, job.db, {})
    if job.embed_batch_size is not None:
        spec["stages"]["embedder"]["batch_size"] = job.embed_batch_size
    spec["stages"]["embedder"].update(backend=job.backend, quantize=job.quantize)
    pipeline = Pipeline(spec, base_dir=job.db.parent)
    # Outside the clock, as on the other sides: imports and model weights. The store is left
    # unbuilt so that opening Milvus Lite and creating the collection are timed, as there.
    _ = (pipeline.sources, pipeline.parser, pipeline.chunker)  # built (and their modules imported) on first access
    pipeline.embedder.warm_up()
    with Stopwatch() as clock:
        summary = pipeline.ingest()
        flush(job.db, COLLECTION)
    assert summary.documents_failed == 0, summary.format()
    stages = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in summary.stage_seconds.items())
    result = Result(
        "ours",
        clock.seconds,
        clock.cpu_seconds,
        summary.documents_indexed,
        summary.chunks_written,
        count_rows(job.db, COLLECTION),
        pipeline.embedder.config.batch_size,
        torch_threads(),
        clock.loadavg_before,
        clock.loadavg_after,
        versions("ours"),
        [*summary.notes, f"stage times (summed per stage; writing overlaps embedding): {stages}"],
    )
    pipeline.close()
    return result


def run_llamaindex(job: Job) -> Result:
    from llama_index.core import SimpleDirectoryReader
    from llama_index.core.ingestion import DocstoreStrategy, IngestionPipeline
    from llama_index.core.node_parser import LangchainNodeParser
    from llama_index.core.storage.docstore import SimpleDocumentStore
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    from llama_index.vector_stores.milvus import MilvusVectorStore

    settings = {} if job.embed_batch_size is None else {"embed_batch_size": job.embed_batch_size}
    embed_model = HuggingFaceEmbedding(model_name=str(job.model), normalize=True, device="cpu", **settings)
    splitter = LangchainNodeParser(recursive_splitter())
    with Stopwatch() as clock:
        vector_store = MilvusVectorStore(
            uri=str(job.db),
            collection_name=COLLECTION,
            dim=MODEL_DIMENSION,
            overwrite=True,
            similarity_metric="COSINE",
            index_config={"index_type": "AUTOINDEX"},
        )
        documents = SimpleDirectoryReader(
            input_dir=str(job.docs), required_exts=[".txt"], filename_as_id=True
        ).load_data()
        docstore = SimpleDocumentStore()
        pipeline = IngestionPipeline(
            transformations=[splitter, embed_model],
            vector_store=vector_store,
            docstore=docstore,
            docstore_strategy=DocstoreStrategy.UPSERTS,
        )
        nodes = pipeline.run(documents=documents)
        docstore.persist(str(job.db.parent / "llamaindex-docstore.json"))
        flush(job.db, COLLECTION)
    return Result(
        "llamaindex",
        clock.seconds,
        clock.cpu_seconds,
        len(documents),
        len(nodes),
        count_rows(job.db, COLLECTION),
        embed_model.embed_batch_size,
        torch_threads(),
        clock.loadavg_before,
        clock.loadavg_after,
        versions("llamaindex"),
        ["the embedded text of each node starts with its file_path metadata (LlamaIndex's MetadataMode.EMBED default)"],
    )


def run_langchain(job: Job) -> Result:
    import inspect

    from langchain_classic.indexes import SQLRecordManager
    from langchain_community.document_loaders import DirectoryLoader, TextLoader
    from langchain_core.indexing import index
    from langchain_huggingface import HuggingFaceEmbeddings
    from langchain_milvus import Milvus
    from sentence_transformers import SentenceTransformer

    encode_kwargs: dict[str, Any] = {"normalize_embeddings": True}
    if job.embed_batch_size is not None:
        encode_kwargs["batch_size"] = job.embed_batch_size
    embeddings = HuggingFaceEmbeddings(
        model_name=str(job.model), model_kwargs={"device": "cpu"}, encode_kwargs=encode_kwargs
    )
    splitter = recursive_splitter()
    with Stopwatch() as clock:
        vector_store = Milvus(
            embedding_function=embeddings,
            collection_name=COLLECTION,
            connection_args={"uri": str(job.db)},
            index_params={"index_type": "AUTOINDEX", "metric_type": "COSINE"},
            drop_old=True,
        )
        record_manager = SQLRecordManager(
            f"milvus/{COLLECTION}", db_url=f"sqlite:///{job.db.parent / 'langchain-records.sqlite'}"
        )
        record_manager.create_schema()
        documents = DirectoryLoader(
            str(job.docs), glob="*.txt", loader_cls=TextLoader, loader_kwargs={"encoding": "utf-8"}
        ).load()
        chunks = splitter.split_documents(documents)
        # cleanup="full" keyed by source, like our runner's default: a later run removes stale chunks.
        outcome = index(chunks, record_manager, vector_store, cleanup="full", source_id_key="source")
        flush(job.db, COLLECTION)
    notes = (
        []
        if outcome["num_added"] == len(chunks)
        else [f"index() added {outcome['num_added']} of {len(chunks)} chunks (identical chunks are stored once)"]
    )
    return Result(
        "langchain",
        clock.seconds,
        clock.cpu_seconds,
        len(documents),
        len(chunks),
        count_rows(job.db, COLLECTION),
        encode_kwargs.get("batch_size", inspect.signature(SentenceTransformer.encode).parameters["batch_size"].default),
        torch_threads(),
        clock.loadavg_before,
        clock.loadavg_after,
        versions("langchain"),
        notes,
    )


RUNNERS: dict[str, Callable[[Job], Result]] = {
    "ours": run_ours,
    "llamaindex": run_llamaindex,
    "langchain": run_langchain,
}


def run_anchor(args: argparse.Namespace) -> None:
    """Child side: index one system's job and write its Result as JSON."""
    job = Job(args.docs, args.db, args.model, args.embed_batch_size, args.backend, args.quantize)
    result = RUNNERS[args.anchor](job)
    args.result.write_text(json.dumps(asdict(result)), encoding="utf-8")


# -- the parent: corpus, processes, report ------------------------------------------------------


def child_environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return env


def run_system(system: str, python: str, folder: Path, job_args: list[str]) -> Result | None:
    """One system's run in a fresh process with a fresh database folder; None when it failed."""
    folder.mkdir()
    result_file = folder / "result.json"
    command = [
        python,
        str(Path(__file__).resolve()),
        "--anchor",
        system,
        "--db",
        str(folder / "index.db"),
        "--result",
        str(result_file),
        *job_args,
    ]
    print(f"--- {LABELS[system]} ({python})", flush=True)
    completed = subprocess.run(command, env=child_environment(), check=False)
    if completed.returncode != 0 or not result_file.is_file():
        print(f"{LABELS[system]} failed (exit {completed.returncode}); see its output above", flush=True)
        return None
    result = Result(**json.loads(result_file.read_text(encoding="utf-8")))
    print(
        f"{LABELS[system]}: {result.seconds:.1f} s wall, {result.cpu_seconds:.1f} s CPU, {result.chunks} chunks, "
        f"{result.rows} rows",
        flush=True,
    )
    return result


def resolve_model() -> Path:
    sys.path.insert(0, str(ROOT))
    from core.models import resolve_model_path

    return Path(resolve_model_path(MODEL_NAME))


def rounds(systems: list[str], repeat: int) -> list[list[str]]:
    """The run order per round, rotated so that no system always runs first (load drifts over time)."""
    return [systems[r % len(systems) :] + systems[: r % len(systems)] for r in range(repeat)]


def report(runs: dict[str, list[Result]], n_docs: int) -> list[str]:
    """One line per system (its fastest run), warnings, and ours against each anchor."""
    best = {system: min(results, key=lambda r: r.seconds) for system, results in runs.items() if results}
    lines = []
    for system, result in best.items():
        lines.append(
            f"{result.label:<10} {result.seconds:8.1f} s  ({result.cpu_seconds:.0f} s CPU)  "
            f"{result.documents / result.seconds:6.1f} documents/s  {result.chunks} chunks  {result.rows} rows  embed "
            f"batch {result.embed_batch_size}  milvus-lite {result.versions.get('milvus-lite')}  load "
            f"{result.loadavg_before[0]:.1f} -> {result.loadavg_after[0]:.1f}"
        )
        if len(runs[system]) > 1:
            lines.append("  runs: " + ", ".join(f"{r.seconds:.1f} s" for r in runs[system]))
        if result.rows != result.chunks:
            lines.append(f"  WARNING: {result.label} wrote {result.rows} rows for {result.chunks} chunks")
        if result.documents != n_docs:
            lines.append(f"  WARNING: {result.label} indexed {result.documents} of {n_docs} documents")
        lines.extend(f"  note: {note}" for note in result.notes)
    ours = best.get("ours")
    if ours is not None:
        for system in ("llamaindex", "langchain"):
            other = best.get(system)
            if other is not None:
                lines.append(
                    f"ours {ours.seconds:.1f} s vs {other.label} {other.seconds:.1f} s: ratio "
                    f"{other.seconds / ours.seconds:.2f} (CPU {ours.cpu_seconds:.0f} s vs {other.cpu_seconds:.0f} s: "
                    f"{other.cpu_seconds / ours.cpu_seconds:.2f}; {other.label} / ours, above 1 means ours is faster)"
                )
    engines = {r.versions.get("milvus-lite", "?").split(".")[0] for r in best.values()}
    if len(engines) > 1:
        lines.append(
            "WARNING: the systems ran on different Milvus Lite generations; the comparison is not like for like"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--datasets",
        type=Path,
        default=Path(os.environ.get("RAG_PIPELINE_DATASETS", ROOT.parent / "shared" / "datasets")),
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N abstracts")
    parser.add_argument("--only", default=",".join(SYSTEMS), help="comma-separated subset of: " + ", ".join(SYSTEMS))
    parser.add_argument(
        "--anchors-python",
        default=os.environ.get(ANCHORS_PYTHON_ENV, str(DEFAULT_ANCHORS_PYTHON)),
        help=f"interpreter of the anchors' environment (benchmarks/anchors_env.sh; default ${ANCHORS_PYTHON_ENV} or "
        f"{DEFAULT_ANCHORS_PYTHON})",
    )
    parser.add_argument(
        "--embed-batch-size",
        type=int,
        default=None,
        help="one embedding batch size for all three (default: each framework's own)",
    )
    parser.add_argument(
        "--backend", choices=["torch", "onnx", "auto"], default="torch", help="our embedder's backend (default torch)"
    )
    parser.add_argument("--quantize", choices=["none", "int8"], default="none", help="our embedder: int8 needs onnx")
    parser.add_argument("--repeat", type=int, default=1, help="runs per system, in rotated order; the fastest counts")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    # Child mode: run by the parent with the right interpreter; not meant to be called by hand.
    parser.add_argument("--anchor", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--docs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.anchor:
        run_anchor(args)
        return

    systems = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"--only: unknown system(s) {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    corpus = args.datasets / "scifact" / "corpus.jsonl"
    if not corpus.is_file():
        print(f"SKIP: SciFact not found at {corpus}; set --datasets or RAG_PIPELINE_DATASETS")
        return
    if not Path(args.anchors_python).is_file() and any(s != "ours" for s in systems):
        print(
            f"SKIP LlamaIndex and LangChain: no interpreter at {args.anchors_python}; create it with "
            "benchmarks/anchors_env.sh or pass --anchors-python"
        )
        systems = [s for s in systems if s == "ours"]
    if not systems:
        return

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from ingest_throughput import write_corpus

    model = resolve_model()
    from core.cpu import cpu_model, reported_features

    runs: dict[str, list[Result]] = {system: [] for system in systems}
    with tempfile.TemporaryDirectory(prefix="anchors-ingest-") as tmp:
        work = Path(tmp)
        docs = work / "scifact"
        docs.mkdir()
        n_docs = write_corpus(corpus, docs, args.limit)
        print(
            f"corpus: SciFact, {n_docs} documents in {docs}; model {model}; ours on {args.backend} "
            f"(quantize {args.quantize}); CPU {cpu_model()} ({reported_features()}), {os.cpu_count()} cores; load "
            f"{os.getloadavg()}",
            flush=True,
        )
        job_args = ["--docs", str(docs), "--model", str(model), "--backend", args.backend, "--quantize", args.quantize]
        if args.embed_batch_size is not None:
            job_args += ["--embed-batch-size", str(args.embed_batch_size)]
        for number, order in enumerate(rounds(systems, args.repeat)):
            for system in order:
                python = sys.executable if system == "ours" else args.anchors_python
                result = run_system(system, python, work / f"{system}-{number}", job_args)
                if result is not None:
                    runs[system].append(result)

    print(
        f"\nSciFact {n_docs} documents, recursive {CHUNK_SIZE}/{CHUNK_OVERLAP}, {MODEL_NAME}, Milvus Lite, COSINE; "
        "clock: opening the store and reading the files to the flushed last write (imports and model loading excluded)"
    )
    lines = report(runs, n_docs)
    print("\n".join(lines))
    if args.json is not None:
        payload = {
            "documents": n_docs,
            "limit": args.limit,
            "cores": os.cpu_count(),
            "model": str(model),
            "repeat": args.repeat,
            "embed_batch_size": args.embed_batch_size,
            "runs": {name: [asdict(r) for r in rs] for name, rs in runs.items()},
            "report": lines,
        }
        args.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
