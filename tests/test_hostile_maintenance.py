"""Index maintenance under inputs a hostile but fair user brings: many sources, odd ids, emptied files.

Each test reproduces a defect an outside tester met (large sources, ids with line breaks, ids
near the store's limits, colliding ids, emptied files) against real Milvus Lite, with the test
plugins' parser, chunker and hash embedder so that the store and the record dominate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import Pipeline
from pipeline.reindex_job import format_status
from tests.plugins.components import PLUGINS, base_spec

REPO = Path(__file__).resolve().parents[1]


def milvus_spec(tmp_path: Path, source: dict, **runner) -> dict:
    spec = base_spec()
    spec["stages"]["source"] = source
    spec["stages"]["store"] = {"type": "milvus", "uri": str(tmp_path / "index.db"), "collection": "docs"}
    spec["runner"].update(runner)
    return spec


def memory_source(documents: dict[str, str], namespace: str = "mem") -> dict:
    return {"type": "tests.plugins.components:MemorySource", "documents": dict(documents), "namespace": namespace}


def chunk_texts(pipeline: Pipeline) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for row in pipeline.store.rows(["source_id", "text"]):
        out.setdefault(row["source_id"], set()).add(row["text"])
    return out


def test_a_source_of_more_than_16384_documents_keeps_every_command_working(tmp_path):
    # Milvus refuses offset + limit above 16,384: the record must be read with an iterator.
    count = 16_500
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "text": f"document {i}"}) + "\n" for i in range(count)))
    spec = milvus_spec(tmp_path, {"type": "jsonl", "path": str(corpus)}, batch_size=2048)
    with Pipeline(spec, allowed_modules=PLUGINS) as pipeline:
        first = pipeline.ingest()
        assert first.ok and first.documents_indexed == count
        again = pipeline.reindex()
        assert again.ok and again.documents_seen == 0 and again.changes.unchanged == count
        status = format_status(pipeline.store.index_record(), pipeline.store.lock_claims())
        assert f"sources: {count} ({count} indexed, 0 pending, 0 failed)" in status
        report = pipeline.reconcile(repair=False)
        assert report.clean and report.sources_recorded == count == report.sources_with_chunks
        # One record gone from the file: the next reindex deletes exactly that source.
        corpus.write_text(
            "".join(json.dumps({"_id": f"d{i}", "text": f"document {i}"}) + "\n" for i in range(1, count))
        )
        removed = pipeline.reindex()
        assert removed.changes.deleted == 1 and removed.changes.unchanged == count - 1
        assert pipeline.store.count() == count - 1


def test_a_source_id_with_a_line_break_is_indexed_and_deleted_like_any_other(tmp_path):
    # Milvus Lite 2.5 cannot name such an id in a filter; it once failed at write with its chunks
    # stored, then blocked every later deletion.
    documents = {"line\nbreak.txt": "alpha", "tab\tand\rreturn.txt": "beta", "plain.txt": "gamma"}
    with Pipeline(milvus_spec(tmp_path, memory_source(documents)), allowed_modules=PLUGINS) as pipeline:
        summary = pipeline.reindex()
        assert summary.ok, summary.format()
        assert set(chunk_texts(pipeline)) == {"mem/line\nbreak.txt", "mem/tab\tand\rreturn.txt", "mem/plain.txt"}
        edited = dict(documents, **{"line\nbreak.txt": "alpha\nomega"})
        pipeline.sources[0].config.documents = edited
        assert pipeline.reindex().changes.updated == 1
        assert chunk_texts(pipeline)["mem/line\nbreak.txt"] == {"alpha", "omega"}
        pipeline.sources[0].config.documents = {"plain.txt": "gamma"}
        summary = pipeline.reindex()
        assert summary.ok and summary.changes.deleted == 2
        assert chunk_texts(pipeline) == {"mem/plain.txt": {"gamma"}}
        assert pipeline.reconcile(repair=False).clean


def test_a_source_id_at_the_store_limit_is_indexed_and_one_over_it_fails_alone(tmp_path):
    # A deep path of emoji: 4,040 bytes of UTF-8 (under the 4,096-byte source_id field), whose record
    # was once 12,406 characters of \\u escapes, over the record body's size, and aborted the run.
    deep = ("😀" * 24 + "/") * 41 + "😀" * 14 + ".txt"
    assert 4000 < len(f"mem/{deep}".encode()) <= 4096
    too_long = "x" * 4100 + ".txt"
    documents = {deep: "alpha", too_long: "beta", "plain.txt": "gamma"}
    with Pipeline(milvus_spec(tmp_path, memory_source(documents)), allowed_modules=PLUGINS) as pipeline:
        summary = pipeline.reindex()
        assert summary.documents_indexed == 2 and summary.documents_failed == 1
        (failure,) = summary.failures
        assert failure.source_id == f"mem/{too_long}" and failure.stage == "write"
        assert "source_id is 4108 bytes of UTF-8, over the collection's limit of 4096" in failure.reason
        assert set(chunk_texts(pipeline)) == {f"mem/{deep}", "mem/plain.txt"}
        record = pipeline.store.index_record().get([f"mem/{deep}"])[f"mem/{deep}"]
        assert record.status == "indexed"
        assert pipeline.reindex().changes.unchanged == 2


def test_two_sources_with_one_namespace_are_refused_instead_of_overwriting(tmp_path):
    for folder, text in (("a/docs", "from a"), ("b/docs", "from b")):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "same.txt").write_text(text)
    sources = [
        {"type": "local", "path": str(tmp_path / "a" / "docs")},
        {"type": "local", "path": str(tmp_path / "b" / "docs")},
    ]
    spec = milvus_spec(tmp_path, sources)
    spec["stages"]["parser"] = {"type": "unstructured"}
    with Pipeline(spec, allowed_modules=PLUGINS) as pipeline:
        problems = pipeline.validate()
        assert any("overlapping prefixes 'docs/' and 'docs/'" in p for p in problems), problems
        summary = pipeline.reindex()
        assert not summary.ok and summary.documents_indexed == 0
        assert [(f.source_id, f.stage) for f in summary.failures] == [
            ("docs/same.txt", "list"),
            ("docs/same.txt", "write"),
        ]
        assert all("source id collision" in f.reason for f in summary.failures)
        assert pipeline.store.count() == 0
        assert pipeline.store.index_record().get(["docs/same.txt"])["docs/same.txt"].status == "failed"


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse names that are not UTF-8")
def test_a_non_utf8_file_name_and_its_escaped_spelling_are_two_sources(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / os.fsdecode(b"caf\xe9.txt")).write_text("latin-1 name")
    (folder / "caf\\xe9.txt").write_text("a backslash in the name")
    spec = milvus_spec(tmp_path, {"type": "local", "path": str(folder)})
    spec["stages"]["parser"] = {"type": "unstructured"}
    with Pipeline(spec, allowed_modules=PLUGINS) as pipeline:
        summary = pipeline.reindex()
        assert summary.ok and summary.documents_indexed == 2, summary.format()
        texts = chunk_texts(pipeline)
        assert texts == {"docs/caf\\xe9.txt": {"latin-1 name"}, "docs/caf\\\\xe9.txt": {"a backslash in the name"}}


def test_an_emptied_file_loses_its_chunks_and_a_full_rebuild_still_switches(tmp_path):
    with Pipeline(
        milvus_spec(tmp_path, memory_source({"a.txt": "alpha", "b.txt": "beta"})), allowed_modules=PLUGINS
    ) as pipeline:
        pipeline.reindex()
        pipeline.sources[0].config.documents["a.txt"] = "  \n "
        summary = pipeline.reindex()
        assert summary.ok and summary.documents_empty == 1 and summary.changes.updated == 1
        assert chunk_texts(pipeline) == {"mem/b.txt": {"beta"}}
        record = pipeline.store.index_record().get(["mem/a.txt"])["mem/a.txt"]
        assert (record.status, record.chunk_count) == ("indexed", 0)
        assert pipeline.reindex().changes.unchanged == 2
        rebuilt = pipeline.full_rebuild()
        assert rebuilt.ok and not any("not switched" in note for note in rebuilt.notes), rebuilt.format()
        assert chunk_texts(pipeline) == {"mem/b.txt": {"beta"}}


def test_the_lite_lock_files_are_ignored_by_git(tmp_path):
    # Running the quickstart must leave a clone clean: Milvus Lite's and our lock files sit beside the database.
    for name in ("examples/.quickstart.db.rag-pipeline.lock", "examples/.quickstart.db.lock", "examples/quickstart.db"):
        result = subprocess.run(["git", "check-ignore", "-q", name], cwd=REPO)
        assert result.returncode == 0, f"{name} is not ignored"


def test_every_spec_problem_is_reported_at_once(tmp_path):
    spec = milvus_spec(tmp_path, memory_source({"a.txt": "alpha"}), batch_size=0)
    spec["stages"]["chunker"]["chunk_size"] = "big"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "validate", str(path), "--allow-module", "tests.plugins"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "runner.batch_size" in result.stderr and "stages.chunker.chunk_size" in result.stderr, result.stderr
