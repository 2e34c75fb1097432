"""Large documents: chunked, embedded and written slice by slice, with the same chunks as before.

A document with more than ``runner.slice_chunks`` chunks is embedded and upserted a slice at a
time; its stale chunks are deleted and its record marked indexed only after the last slice. The
tests use slices of a few chunks, so a document of a few dozen lines spans many of them.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import re
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from chunkers.base import ElementIndex, build_chunks
from chunkers.recursive import RecursiveChunker
from core.records import MemoryRecords
from core.types import Element, ElementTable, ParsedDocument
from pipeline import Pipeline
from tests.plugins.components import PLUGINS, base_spec

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "bees hive honey comb queen worker drone nectar pollen frame smoke entrance winter spring swarm colony brood wax "
    "the of and to in is that for it as was with"
).split()
SLICE = 4  # chunks per slice in these tests


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def long_text(seed: int = 1, lines: int = 40) -> str:
    rng = random.Random(seed)
    return "\n".join(words(rng, rng.randint(8, 30)) for _ in range(lines))


def make(documents: dict[str, str], embedder: dict | None = None, **runner) -> Pipeline:
    """The test components with the real recursive chunker (small chunks, so one document has dozens)."""
    spec = base_spec()
    spec["stages"]["source"]["documents"] = dict(documents)
    spec["stages"]["chunker"] = {"type": "recursive", "chunk_size": 60, "chunk_overlap": 10}
    spec["stages"]["embedder"].update(embedder or {})
    spec["runner"].update(runner)
    return Pipeline(spec, allowed_modules=PLUGINS)


def rows(pipeline: Pipeline) -> dict[str, tuple[str, str, bytes]]:
    return {cid: (row["source_id"], row["text"], row["dense"].tobytes()) for cid, row in pipeline.store.table.items()}


def ids_of(pipeline: Pipeline, source_id: str) -> set[str]:
    return {cid for cid, row in pipeline.store.table.items() if row["source_id"] == source_id}


class StoreLog:
    """What the store and the record were asked, in order, per source: the ids upserted, the ids kept
    by a stale deletion, the statuses recorded."""

    def __init__(self, pipeline: Pipeline, records: MemoryRecords):
        self.events: list[tuple[str, str, object]] = []
        store = pipeline.store
        upsert, delete_stale, put = store.upsert, store.delete_stale, records.put

        def logged_upsert(chunks):
            by_source: dict[str, list[str]] = {}
            for chunk in chunks:
                by_source.setdefault(chunk.source_id, []).append(chunk.id)
            self.events.extend(("upsert", source_id, ids) for source_id, ids in by_source.items())
            return upsert(chunks)

        def logged_delete_stale(keep):
            self.events.extend(("delete_stale", source_id, list(ids)) for source_id, ids in keep.items())
            delete_stale(keep)

        def logged_put(batch):
            self.events.extend(("record", r.source_id, r.status) for r in batch)
            put(batch)

        store.upsert, store.delete_stale, records.put = logged_upsert, logged_delete_stale, logged_put

    def of(self, source_id: str) -> list[tuple[str, object]]:
        return [(kind, detail) for kind, source, detail in self.events if source == source_id]

    def kinds(self, source_id: str) -> list[str]:
        return [f"record {detail}" if kind == "record" else kind for kind, detail in self.of(source_id)]


# -- chunks and ids are those of an unsliced run -----------------------------------------------


def test_a_sliced_document_gets_the_chunks_ids_and_vectors_of_an_unsliced_run():
    docs = {"big.txt": long_text(), "small.txt": "one short line"}
    sliced, whole = make(docs, slice_chunks=SLICE), make(docs, slice_chunks=10_000)
    summary, expected = sliced.ingest(), whole.ingest()
    big = ids_of(whole, "mem/big.txt")
    assert len(big) > 5 * SLICE  # the document spans several slices
    assert rows(sliced) == rows(whole)
    counts = ("documents_seen", "documents_indexed", "documents_failed", "chunks_written")
    assert [getattr(summary, c) for c in counts] == [getattr(expected, c) for c in counts] == [2, 2, 0, len(big) + 1]
    assert set(summary.stage_seconds) >= {"chunk", "embed", "write"}


def test_chunks_built_a_range_at_a_time_are_the_chunks_built_at_once():
    document = paragraphs_document()
    plan = RecursiveChunker(chunk_size=300, chunk_overlap=50).plan(document)
    whole = plan.chunks()
    pieces = [chunk for start in range(0, len(plan), 7) for chunk in plan.chunks(start, start + 7)]
    assert [(c.id, c.index, c.start, c.end, c.text, c.metadata) for c in pieces] == [
        (c.id, c.index, c.start, c.end, c.text, c.metadata) for c in whole
    ]
    assert all(document.text[c.start : c.end] == c.text for c in whole)


def paragraphs_document() -> ParsedDocument:
    rng = random.Random(11)
    parts, elements, cursor = [], [], 0
    for number in range(400):
        heading = number % 25 == 0
        text = words(rng, 3).title() if heading else words(rng, rng.randint(5, 120)) + "."
        category = "Title" if heading else "NarrativeText"
        elements.append(
            Element(
                text,
                category,
                cursor,
                cursor + len(text),
                page_number=1 + number // 40,
                heading_path=(text,) if heading else (),
            )
        )
        parts.append(text)
        cursor += len(text) + 2
    return ParsedDocument(
        "docs/paragraphs.txt",
        "file:///docs/paragraphs.txt",
        "text/plain",
        "h",
        "\n\n".join(parts),
        tuple(elements),
        {"file_name": "paragraphs.txt"},
    )


def single_line_document() -> ParsedDocument:
    text = words(random.Random(12), 12000)
    return ParsedDocument(
        "docs/single.txt",
        "file:///docs/single.txt",
        "text/plain",
        "h",
        text,
        (Element(text, "NarrativeText", 0, len(text)),),
        {"file_name": "single.txt"},
    )


@pytest.mark.parametrize(
    ("document", "settings", "count", "digest"),
    [
        (paragraphs_document, {}, 170, "d07056da982992f9"),
        (
            paragraphs_document,
            {"chunk_size": 300, "chunk_overlap": 50, "respect_elements": True, "split_on_headings": True},
            621,
            "483a9555368f9e11",
        ),
        (single_line_document, {}, 78, "8d7405e1c17e48a5"),
        (
            single_line_document,
            {"chunk_size": 300, "chunk_overlap": 50, "respect_elements": True, "split_on_headings": True},
            250,
            "278295c64b911b0b",
        ),
    ],
)
def test_chunk_ids_and_spans_are_those_existing_indexes_hold(document, settings, count, digest):
    """Digests of ids and spans computed with the chunker before it streamed its pieces and built
    chunks by range: a change here would re-embed every indexed document."""
    chunks = RecursiveChunker(**settings).chunk(document())
    assert len(chunks) == count
    assert hashlib.sha256("\n".join(f"{c.id} {c.start} {c.end}" for c in chunks).encode()).hexdigest()[:16] == digest


def test_element_index_finds_what_a_scan_of_every_element_finds():
    rng = random.Random(5)
    elements = []
    for _ in range(300):  # overlapping, nested, empty and out-of-order elements included
        start = rng.randint(0, 5000)
        elements.append(
            Element("x", rng.choice(["Title", "NarrativeText"]), start, start + rng.choice([0, 1, 10, 80, 900]))
        )
    document = ParsedDocument("s", "u", "text/plain", "h", "x" * 6000, tuple(elements))
    index = ElementIndex(document.elements)
    for _ in range(500):
        start = rng.randint(0, 5990)
        end = start + rng.randint(1, 400)
        assert [document.elements[i] for i in index.between(start, end)] == document.elements_between(start, end)


def test_a_parse_result_crosses_the_worker_pipe_in_parts_and_arrives_unchanged(monkeypatch):
    from multiprocessing import Pipe

    from pipeline import parse_pool

    monkeypatch.setattr(parse_pool, "_TEXT_PIECE_CHARS", 7)  # many pieces, some cut inside a run of non-ASCII
    monkeypatch.setattr(parse_pool, "_ELEMENT_BATCH", 3)
    text = "Bees 🐝 and 茶叶 in spring; a lone surrogate \ud800 survives. " * 5
    elements = tuple(
        Element(text[i : i + 9], "NarrativeText", i, i + 9, page_number=i % 3, heading_path=("h",), metadata={"n": i})
        for i in range(0, 200, 9)
    )
    parsed = ParsedDocument("s/1", "file:///s/1", "text/plain", "hash", text, elements, {"file_name": "1.txt"})
    sending, receiving = Pipe()
    parse_pool.send_parsed(sending, parsed, None)
    parse_pool.send_parsed(sending, None, "corrupt file")
    received, error = parse_pool.receive_parsed(receiving, receiving.recv())
    assert (received, error) == (parsed, None)
    # The elements came as columns: each text is cut from the document text when read, not held twice.
    assert isinstance(received.elements, ElementTable) and list(received.elements) == list(elements)
    assert parse_pool.receive_parsed(receiving, receiving.recv()) == (None, "corrupt file")
    # A parser whose element texts are not their slices of the text: the elements travel as they are.
    odd = replace(parsed, elements=(replace(elements[0], text="not the slice"),))
    parse_pool.send_parsed(sending, odd, None)
    received, _ = parse_pool.receive_parsed(receiving, receiving.recv())
    assert received == odd and isinstance(received.elements, tuple)


def test_an_element_table_reads_compares_and_pickles_as_its_elements():
    text = "Title\n\nFirst paragraph.\n\nSecond one."
    elements = (
        Element("Title", "Title", 0, 5, page_number=1),
        Element("First paragraph.", "NarrativeText", 7, 23, page_number=1, heading_path=("Title",), metadata={"a": 1}),
        Element("Second one.", "NarrativeText", 25, 36, page_number=2, heading_path=("Title",)),
    )
    table = ElementTable.of(text, elements)
    assert isinstance(table, ElementTable) and len(table) == 3
    assert table == elements and tuple(table) == elements and table[-1] == elements[-1] and table[1:] == elements[1:]
    with pytest.raises(IndexError):
        table[3]
    document = ParsedDocument("s", "u", "text/plain", "h", text, table)
    assert pickle.loads(pickle.dumps(document)) == document == replace(document, elements=elements)
    assert build_chunks(document, [(0, 23), (25, 36)]) == build_chunks(
        replace(document, elements=elements), [(0, 23), (25, 36)]
    )


# -- write order and failures -------------------------------------------------------------------


def test_stale_chunks_are_deleted_and_the_record_marked_indexed_only_after_the_last_slice():
    pipeline, records = make({"big.txt": long_text()}, slice_chunks=SLICE), MemoryRecords()
    pipeline.reindex(records=records)
    edit(pipeline, {"big.txt": "an edited first line\n" + long_text()})
    log = StoreLog(pipeline, records)
    summary = pipeline.reindex(records=records)
    chunks = summary.chunks_written
    slices = -(-chunks // SLICE)
    assert summary.documents_indexed == 1 and slices > 5
    assert log.kinds("mem/big.txt") == ["record pending", *["upsert"] * slices, "delete_stale", "record indexed"]
    (kept,) = [ids for kind, ids in log.of("mem/big.txt") if kind == "delete_stale"]
    written = [cid for kind, ids in log.of("mem/big.txt") if kind == "upsert" for cid in ids]
    assert kept == written and ids_of(pipeline, "mem/big.txt") == set(written)  # the first version's chunks are gone
    assert records.records["mem/big.txt"].chunk_count == chunks


def test_an_embed_failure_in_a_later_slice_fails_the_document_and_keeps_its_previous_version():
    docs = {"big.txt": long_text(), "small.txt": "one short line"}
    pipeline, records = make(docs, embedder={"fail_on": "POISON"}, slice_chunks=SLICE), MemoryRecords()
    pipeline.reindex(records=records)
    first_version = ids_of(pipeline, "mem/big.txt")
    lines = long_text(seed=2).splitlines()
    lines[-3] = "POISON " + lines[-3]  # near the end: several slices are written before it
    edit(pipeline, {"big.txt": "\n".join(lines), "small.txt": "another short line"})
    log = StoreLog(pipeline, records)
    summary = pipeline.reindex(records=records)
    (failure,) = summary.failures
    assert (failure.source_id, failure.stage) == ("mem/big.txt", "embed")
    assert (
        "cannot embed text containing 'POISON'" in failure.reason
        and "its previous version stays searchable" in failure.reason
    )
    assert re.search(r"\(slice (\d+) of (\d+), chunks \d+-\d+ of \d+;", failure.reason)
    assert log.kinds("mem/big.txt").count("upsert") >= 3  # the slices before the failing one were written ...
    assert "delete_stale" not in log.kinds("mem/big.txt")  # ... and nothing of the first version was deleted
    assert first_version <= ids_of(pipeline, "mem/big.txt")
    record = records.records["mem/big.txt"]
    assert (record.status, record.stage) == ("failed", "embed") and "POISON" in record.reason
    assert records.records["mem/small.txt"].status == "indexed" and summary.documents_indexed == 1
    # Fixed: the next run writes it whole, and the first version and the partial second one go.
    lines[-3] = lines[-3].replace("POISON ", "")
    edit(pipeline, {"big.txt": "\n".join(lines)})
    assert pipeline.reindex(records=records).documents_failed == 0
    fixed = make({"big.txt": "\n".join(lines)}, slice_chunks=10_000)
    fixed.ingest()
    assert ids_of(pipeline, "mem/big.txt") == ids_of(fixed, "mem/big.txt")
    assert records.records["mem/big.txt"].status == "indexed"


def test_a_write_failure_in_a_later_slice_fails_the_document_and_writes_none_of_its_later_slices():
    docs = {"big.txt": long_text(), "small.txt": "one short line"}
    pipeline, records = make(docs, slice_chunks=SLICE), MemoryRecords()
    pipeline.reindex(records=records)
    first_version = ids_of(pipeline, "mem/big.txt")
    lines = long_text(seed=3).splitlines()
    lines[len(lines) // 2] = "WRITEFAIL " + lines[len(lines) // 2]
    edit(pipeline, {"big.txt": "\n".join(lines)})
    log = StoreLog(pipeline, records)
    upsert = pipeline.store.upsert

    def refuse_marked_chunks(chunks):
        if any("WRITEFAIL" in c.text for c in chunks):
            log.events.append(("refused", "mem/big.txt", [c.id for c in chunks]))
            raise RuntimeError("the store refused the request")
        return upsert(chunks)

    pipeline.store.upsert = refuse_marked_chunks
    summary = pipeline.reindex(records=records)
    (failure,) = summary.failures
    assert (failure.source_id, failure.stage) == ("mem/big.txt", "write")
    assert re.search(
        r"RuntimeError: the store refused the request \(writing slice \d+ of \d+; its previous version stays "
        r"searchable\)",
        failure.reason,
    )
    kinds = log.kinds("mem/big.txt")
    assert kinds.count("refused") == 1 and kinds.index("refused") > 1 and "upsert" in kinds
    assert kinds[kinds.index("refused") + 1 :] == ["record failed"]  # no later slice was written, nothing deleted
    assert first_version <= ids_of(pipeline, "mem/big.txt")
    assert records.records["mem/big.txt"].status == "failed"


def edit(pipeline: Pipeline, documents: dict[str, str]) -> None:
    """Change the in-memory source's documents between runs."""
    pipeline.spec.sources[0].config.documents.update(documents)
    pipeline._components.pop("sources")


# -- memory ---------------------------------------------------------------------------------------

MEGABYTES = 24
MEMORY_SCRIPT = """
import json, random, sys, threading
from dataclasses import replace
from pathlib import Path
sys.path.insert(0, {repo!r})
import psutil
from pipeline.runner import LocalRunner, RunPlan
from pipeline.spec import RunnerConfig
from connectors.local import LocalDirectorySource
from connectors.parsing import UnstructuredParser
from chunkers.recursive import RecursiveChunker
from stores.base import Store
from tests.plugins.components import HashEmbedder


class CountingStore(Store):
    # Keeps nothing but a count, so what is measured is the pipeline, not the index.
    # It never searches: the run only writes.
    def prepare(self, schema): pass
    def check(self, schema): return []
    def exists(self): return True
    def branches(self): return ("dense",)
    def search(self, request, filters=None, *, search_params=None): return []
    def hybrid_search(self, requests, fusion, limit, filters=None): return []
    def chunk_ids_of(self, source_ids): return dict()
    def rows(self, output_fields): return iter(())
    def upsert(self, chunks):
        self.written = getattr(self, "written", 0) + len(chunks)
        return len(chunks)
    def delete_stale(self, keep): pass
    def delete_sources(self, source_ids): pass
    def count(self): return self.written


def peak_mib(pid):
    # The kernel's high-water mark of the process. Not getrusage: after fork and exec, its maxrss
    # starts from the forking process's, here a pytest process that may hold a model.
    try:
        with open(f"/proc/{{pid}}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except OSError:
        return 0.0


worker_peak, done = [0.0], threading.Event()


def watch_worker():
    while not done.wait(0.05):
        for child in psutil.Process().children():
            worker_peak[0] = max(worker_peak[0], peak_mib(child.pid))


folder = Path(sys.argv[1])
rng = random.Random(7)
words = "bees hive honey comb queen worker drone nectar pollen frame smoke entrance the of and to in is".split()
with (folder / "document.txt").open("w") as out:  # one line, no paragraph break: cut at spaces
    for _ in range({megabytes} * 1000):
        out.write(" ".join(rng.choice(words) for _ in range(180))[:999] + " ")
threading.Thread(target=watch_worker, daemon=True).start()
store = CountingStore()
runner = LocalRunner(RunPlan(
    [LocalDirectorySource(path=str(folder))], UnstructuredParser(),
    RecursiveChunker(chunk_size=1000, chunk_overlap=200),
    HashEmbedder(dimension=384), store, RunnerConfig(parse_workers=1, progress="never"),
))
summary = runner.run()
done.set()
print(json.dumps({{
    "chunks": store.written, "failed": summary.documents_failed,
    "main_mib": peak_mib("self"), "worker_mib": worker_peak[0],
}}))
"""


def test_a_large_single_line_document_is_processed_in_bounded_memory(tmp_path):
    """24 MB with no newline (28,500 chunks of up to 1,000 characters, 384-dim vectors), with a
    parser worker, in a fresh process. Before slicing and the streaming splitter the main process
    peaked at 1.5 GB on this (the splitter listed 4 million words; every chunk and vector was held
    at once); the bound leaves room for the interpreter, numpy, the text and its chunk spans.

    The embedder is the hashing plumbing one: the shipped MiniLM would take an hour for 30,000
    chunks on two cores, and the model's own memory is the same for every document.
    """
    script = MEMORY_SCRIPT.format(repo=str(REPO), megabytes=MEGABYTES)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["failed"] == 0 and result["chunks"] > 25_000
    assert result["main_mib"] < 250, result  # 129 MiB measured; 1,554 MiB before slicing and the streaming splitter
    assert result["worker_mib"] < 200, result  # 119 MiB measured: the bytes, the text and the parser's own work
