"""The README's main command, end to end: CLI ingest of examples/ into Milvus Lite, then a search."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

QUERIES = [
    ("Which direction should the beehive entrance face?", "docs/beekeeping-guide.md", "south-east"),
    ("How often should I re-wax the cargo bike chain?", "docs/cargo-bike-maintenance.pdf", "Re-wax the chain"),
    ("What is the hotel price limit per night for business trips?", "docs/travel-policy.docx", "160 euros"),
    ("What ratio should I feed my sourdough starter?", "docs/sourdough-starter.html", "1:5:5"),
    ("How often should I turn my compost heap?", "docs/home-composting.txt", "every two weeks"),
    ("绿茶应该用多少度的水冲泡？", "docs/tea-brewing-zh.md", "八十摄氏度"),
]


@pytest.fixture(scope="module")
def quickstart_index(tmp_path_factory):
    db = tmp_path_factory.mktemp("quickstart") / "quickstart.db"
    env = dict(os.environ, RAG_MILVUS_URI=str(db))

    def ingest():
        return subprocess.run(
            [sys.executable, "-m", "pipeline", "ingest", "examples/quickstart.yaml", "--json"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    first = ingest()
    assert first.returncode == 0, first.stderr[-3000:]
    return db, first, ingest


def test_quickstart_indexes_every_example(quickstart_index):
    import json

    _, first, _ = quickstart_index
    summary = json.loads(first.stdout)
    assert summary["documents_seen"] == 6 and summary["documents_indexed"] == 6 and summary["documents_failed"] == 0
    assert summary["chunks_written"] >= 6


def open_store(db):
    from stores.milvus import MilvusStore

    # The store releases Milvus Lite's folder lock on close, so the CLI subprocess can open it next.
    return MilvusStore(uri=str(db), collection="quickstart")


def test_rerun_leaves_the_rows_unchanged(quickstart_index):
    db, _, ingest = quickstart_index

    def rows():
        store = open_store(db)
        try:
            client = store._ready()[0]
            return sorted(r["id"] for r in client.query("quickstart", filter="", output_fields=["id"], limit=1000))
        finally:
            store.close()

    before = rows()
    again = ingest()
    assert again.returncode == 0, again.stderr[-3000:]
    assert rows() == before


@pytest.mark.parametrize("question,source,phrase", QUERIES)
def test_search_finds_the_expected_example_chunk(quickstart_index, question, source, phrase):
    from embedders.huggingface import HuggingFaceEmbedder

    db, _, _ = quickstart_index
    vector = HuggingFaceEmbedder(model="all-MiniLM-L6-v2").embed_query(question)
    store = open_store(db)
    try:
        (best,) = store.search_dense(vector, top_k=1, output_fields=["source_id", "text"])
    finally:
        store.close()
    assert best.fields["source_id"] == source
    assert phrase in best.fields["text"]
