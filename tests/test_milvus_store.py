"""MilvusStore against a real Milvus Lite folder in tmp_path (8-d vectors: the model is irrelevant)."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from core.errors import StoreSchemaError
from core.filters import Filter
from core.types import Chunk, chunk_id
from stores import filters
from stores.base import IndexSchema
from stores.milvus import InvalidChunksError, MilvusStore, MilvusStoreError
from stores.milvus.connection import _lite_major_version

pytest.importorskip("milvus_lite")
LITE_MAJOR = _lite_major_version()  # 2: the default engine (one file, FLAT/IVF); 3: a folder, HNSW

REPO = Path(__file__).resolve().parents[1]
DIM = 8
MODEL = "test/model-a"


def make_chunk(source_id: str, index: int, text: str | None = None, axis: int | None = None) -> Chunk:
    text = f"chunk {index} of {source_id}" if text is None else text
    vector = np.zeros(DIM, dtype=np.float32)
    vector[index % DIM if axis is None else axis] = 1.0
    return Chunk(
        id=chunk_id(source_id, index, 0, text),
        source_id=source_id,
        index=index,
        text=text,
        start=0,
        end=len(text),
        metadata={"file_name": source_id.rsplit("/", 1)[-1], "headings": ("Intro", "Setup"), "score": np.float32(0.5)},
        vectors={"dense": vector},
    )


@pytest.fixture
def open_store(tmp_path):
    stores: list[MilvusStore] = []

    def build(**settings) -> MilvusStore:
        settings.setdefault("uri", str(tmp_path / "index.db"))
        settings.setdefault("collection", "docs")
        store = MilvusStore(settings)
        stores.append(store)
        return store

    yield build
    for store in stores:
        store.close()


def test_create_upsert_count_and_rerun_does_not_duplicate(open_store):
    store = open_store()
    store.prepare(IndexSchema(DIM, MODEL))
    chunks = [make_chunk("a.md", i) for i in range(3)] + [make_chunk("b.md", i) for i in range(2)]
    assert store.upsert(chunks) == 5
    assert store.count() == 5
    assert store.upsert(chunks, batch_size=2) == 5  # same ids, several batches
    assert store.count() == 5


def test_chunk_ids_of_many_sources_reads_them_in_batches_bounded_by_count_and_bytes(open_store, monkeypatch):
    import stores.milvus.store as store_module

    monkeypatch.setattr(store_module, "READ_FILTER_IDS", 50)
    monkeypatch.setattr(store_module, "READ_FILTER_BYTES", 3000)
    store = open_store()
    store.prepare(IndexSchema(DIM, MODEL))
    sources = [f"docs/{i:04d}.md" + ("-" + "x" * 1500 if i % 40 == 0 else "") for i in range(200)]
    store.upsert([make_chunk(source, index) for source in sources for index in range(2)])
    asked: list[list[str]] = []
    read = store._chunk_ids_of
    monkeypatch.setattr(store, "_chunk_ids_of", lambda client, ids: asked.append(list(ids)) or read(client, ids))
    found = store.chunk_ids_of([*sources, "docs/absent.md"])
    assert set(found) == set(sources) and all(len(ids) == 2 for ids in found.values())
    assert all(len(batch) <= 50 for batch in asked)
    assert all(len(batch) == 1 or sum(len(s) + 4 for s in batch) <= 3000 for batch in asked)
    assert sorted(s for batch in asked for s in batch) == sorted([*sources, "docs/absent.md"])  # each asked once


def test_delete_stale_keeps_only_the_listed_chunks_of_each_source(open_store):
    store = open_store()
    store.prepare(IndexSchema(DIM, MODEL))
    hostile = "dir/a\"b'c.md"
    old = (
        [make_chunk(hostile, i) for i in range(4)] + [make_chunk("b.md", i) for i in range(2)] + [make_chunk("c.md", 0)]
    )
    store.upsert(old)
    new = [make_chunk(hostile, 0, text="rewritten")]
    store.upsert(new)
    store.delete_stale({hostile: [new[0].id], "b.md": [old[4].id]})
    rows = store._ready()[0].query("docs", filter="", output_fields=["id", "source_id"], limit=100)
    assert sorted((r["source_id"], r["id"]) for r in rows) == sorted(
        [(hostile, new[0].id), ("b.md", old[4].id), ("c.md", old[6].id)]
    )


def test_changed_text_under_the_same_id_replaces_the_row(open_store):
    store = open_store()
    store.prepare(IndexSchema(DIM, MODEL))
    original = make_chunk("a.md", 0, text="old text")
    store.upsert([original])
    replacement = make_chunk("a.md", 0, text="new text")
    replacement.id = original.id
    store.upsert([replacement])
    assert store.count() == 1
    (hit,) = store.search_dense(original.vectors["dense"], top_k=5)
    assert hit.id == original.id
    assert hit.fields["text"] == "new text"
    assert hit.fields["metadata"]["end"] == len("new text")


@pytest.mark.parametrize(
    ("dimension", "model", "expected"),
    [
        (
            16,
            MODEL,
            [
                r"collection 'docs' at .*index\.db",
                "stores 8-d vectors from model test/model-a",
                "16-d vectors with model test/model-a",
            ],
        ),
        (DIM, "test/model-b", ["stores vectors from model test/model-a", "embedder is test/model-b", "not comparable"]),
    ],
)
def test_a_different_embedder_is_refused_and_the_collection_is_untouched(open_store, dimension, model, expected):
    first = open_store()
    first.prepare(IndexSchema(DIM, MODEL))
    first.upsert([make_chunk("a.md", 0), make_chunk("a.md", 1)])
    first.close()

    other = open_store()
    with pytest.raises(StoreSchemaError) as refused:
        other.prepare(IndexSchema(dimension, model))
    for pattern in expected:
        assert any(re.search(pattern, line) for line in str(refused.value).splitlines()), pattern
    assert other.check(IndexSchema(dimension, model)) == str(refused.value).splitlines()
    other.close()

    again = open_store()
    again.prepare(IndexSchema(DIM, MODEL))  # still the original collection, data intact
    assert again.count() == 2


def test_check_creates_nothing_and_reports_foreign_collections(open_store, tmp_path):
    missing = open_store(uri=str(tmp_path / "nested" / "new.db"))
    assert missing.check(IndexSchema(DIM, MODEL)) == []
    assert missing.count() == 0
    assert not (tmp_path / "nested").exists()

    # A collection this project did not create: wrong field types, no recorded model.
    from pymilvus import DataType, MilvusClient

    path = tmp_path / "foreign.db"
    client = MilvusClient(str(path))
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("source_id", DataType.INT64)
    schema.add_field("dense", DataType.FLOAT_VECTOR, dim=DIM)
    index = client.prepare_index_params()
    index.add_index("dense", index_type="FLAT", metric_type="L2")
    client.create_collection("docs", schema=schema, index_params=index)
    client.close()

    problems = open_store(uri=str(path)).check(IndexSchema(DIM, MODEL))
    text = "\n".join(problems)
    assert "field 'source_id' is INT64, the store writes VARCHAR" in text
    assert "has no field 'text'" in text and "has no field 'metadata'" in text
    assert "records no embedding model" in text
    assert "metric L2; the spec says COSINE" in text
    assert not (tmp_path / "index.db").exists()


def test_reopen_after_close_reads_the_persisted_collection(open_store, tmp_path):
    store = open_store()
    store.prepare(IndexSchema(DIM, MODEL))
    chunks = [make_chunk("a.md", i) for i in range(4)]
    store.upsert(chunks)
    store.close()

    # close() released the last client, so the Lite folder is unlocked and the next open reads
    # it back from disk (not loaded) instead of reusing a live in-process server.
    from stores.milvus.connection import _lite_database_locked_elsewhere

    assert not _lite_database_locked_elsewhere(tmp_path / "index.db")
    reopened = open_store()
    assert reopened.count() == 4  # loads the collection itself, without prepare
    assert reopened.search_dense(chunks[2].vectors["dense"], top_k=1)[0].id == chunks[2].id
    reopened.prepare(IndexSchema(DIM, MODEL))
    assert reopened.upsert(chunks) == 4
    assert reopened.count() == 4


def test_stores_on_the_same_folder_share_one_client(open_store):
    ingest = open_store()
    ingest.prepare(IndexSchema(DIM, MODEL))
    query = open_store()
    ingest.upsert([make_chunk("a.md", 0)])
    assert query.count() == 1
    ingest.close()
    assert query.count() == 1  # the shared client stays open while another store uses it


HOSTILE_SOURCE_IDS = [
    "a\"b'c.md",
    'x" or id != "',
    '" or 1==1 or "',
    "' or 1==1 or '",
    "dir\\sub\\file.md",
    "ends-with-backslash\\",
    "line\nbreak.md",
    "tab\tand\rreturn.md",
    "unicodé/文档/😀.md",
    "plain.md",
]


def test_filters_and_deletes_hit_exactly_the_hostile_source(open_store):
    store = open_store()
    store.prepare(IndexSchema(DIM, MODEL))
    chunks = [make_chunk(source_id, 0, axis=0) for source_id in HOSTILE_SOURCE_IDS]
    store.upsert(chunks)
    assert store.count() == len(HOSTILE_SOURCE_IDS)

    query = chunks[0].vectors["dense"]
    matchable = HOSTILE_SOURCE_IDS
    if LITE_MAJOR < 3:
        # Milvus Lite 2.5's filter parser reads no line break in any form: a search filter naming
        # one is refused, never a silent miss.
        matchable = [s for s in HOSTILE_SOURCE_IDS if "\n" not in s and "\r" not in s]
        for source_id in set(HOSTILE_SOURCE_IDS) - set(matchable):
            with pytest.raises(MilvusStoreError, match="cannot match text containing a line break"):
                store.search_dense(query, top_k=50, filter_expr=filters.eq("source_id", source_id))
        assert store.count() == len(HOSTILE_SOURCE_IDS)
    for source_id in matchable:
        hits = store.search_dense(query, top_k=50, filter_expr=filters.eq("source_id", source_id))
        assert [h.fields["source_id"] for h in hits] == [source_id]

    # Deleting a source and finding its chunks work for every id on every engine (on Lite 2.5, ids
    # with a line break are found by a prefix and matched exactly by the store).
    assert store.sources_with_chunks(HOSTILE_SOURCE_IDS + ["line"]) == set(HOSTILE_SOURCE_IDS)
    remaining = list(HOSTILE_SOURCE_IDS)
    for source_id in HOSTILE_SOURCE_IDS:
        store.delete_sources([source_id])
        remaining.remove(source_id)
        assert store.count() == len(remaining), source_id
        left = {h.fields["source_id"] for h in store.search_dense(query, top_k=50)}
        assert left == set(remaining)


def test_oversized_text_names_the_source_and_writes_nothing(open_store):
    store = open_store(text_max_length=16)
    store.prepare(IndexSchema(DIM, MODEL))
    fits = make_chunk("small.md", 0, text="short")
    # 10 characters but 20 bytes: Milvus limits VARCHAR in bytes, so this must be refused.
    too_long = make_chunk("docs/über.md", 3, text="é" * 10)
    with pytest.raises(InvalidChunksError) as refused:
        store.upsert([fits, too_long])
    assert refused.value.source_ids == ["docs/über.md"]
    message = str(refused.value)
    assert "docs/über.md" in message and "chunk 3" in message
    assert "text is 20 bytes of UTF-8, over the collection's limit of 16" in message
    assert isinstance(refused.value, ValueError)
    assert store.count() == 0  # nothing from the call was written, nothing truncated
    assert store.upsert([fits]) == 1


def test_bad_vectors_are_refused_per_document(open_store):
    store = open_store()
    store.prepare(IndexSchema(DIM, MODEL))
    missing = make_chunk("missing.md", 0)
    missing.vectors.clear()
    short = make_chunk("short.md", 0)
    short.vectors["dense"] = np.ones(DIM - 1, dtype=np.float32)
    nan = make_chunk("nan.md", 0)
    nan.vectors["dense"] = np.full(DIM, np.nan, dtype=np.float32)
    with pytest.raises(InvalidChunksError) as refused:
        store.upsert([missing, short, nan, make_chunk("ok.md", 0)])
    assert set(refused.value.source_ids) == {"missing.md", "short.md", "nan.md"}
    assert "is missing" in str(refused.value)
    assert "has 7 dimensions, the collection stores 8" in str(refused.value)
    assert "NaN" in str(refused.value)


def test_search_dense_returns_the_nearest_first(open_store):
    if LITE_MAJOR >= 3:
        index, search_params = (
            {"type": "HNSW", "metric": "COSINE", "params": {"M": 8, "efConstruction": 64}},
            {"ef": 32},
        )
    else:
        index, search_params = {"type": "IVF_FLAT", "metric": "COSINE", "params": {"nlist": 4}}, {"nprobe": 4}
    store = open_store(index=index)
    store.prepare(IndexSchema(DIM, MODEL))
    chunks = [make_chunk("a.md", i) for i in range(DIM)]
    store.upsert(chunks)
    query = chunks[5].vectors["dense"] + 0.2 * chunks[6].vectors["dense"]
    hits = store.search_dense(query, top_k=3, search_params=search_params)
    assert [h.id for h in hits[:2]] == [chunks[5].id, chunks[6].id]
    assert hits[0].score > hits[1].score > hits[2].score
    assert hits[0].fields["chunk_index"] == 5
    assert hits[0].fields["metadata"]["headings"] == ["Intro", "Setup"]
    with pytest.raises(ValueError, match="has 3 dimensions, the collection stores 8"):
        store.search_dense([1.0, 0.0, 0.0])


def test_rows_reads_every_row_back_with_wide_vectors(open_store):
    # 4,200 rows of 768-d vectors: one page of 4,096 of them (12.6 MB) stalled Milvus Lite 2.5
    # until the deadline; the store pages by vector size.
    store = open_store(timeout_s=20)
    dim = 768
    store.prepare(IndexSchema(dim, MODEL))
    rng = np.random.default_rng(0)
    chunks = []
    for index in range(4200):
        chunk = make_chunk(f"s{index % 7}.md", index)
        chunk.vectors = {"dense": rng.standard_normal(dim).astype(np.float32)}
        chunks.append(chunk)
    store.upsert(chunks)
    rows = {row["id"]: row for row in store.rows(["id", "source_id", "dense"])}
    assert len(rows) == 4200
    for chunk in chunks:
        assert rows[chunk.id]["source_id"] == chunk.source_id
        np.testing.assert_array_equal(np.asarray(rows[chunk.id]["dense"], dtype=np.float32), chunk.vectors["dense"])
    assert {source: sorted(ids) for source, ids in store.chunk_ids_by_source().items()} == {
        f"s{n}.md": sorted(c.id for c in chunks if c.source_id == f"s{n}.md") for n in range(7)
    }


def test_reading_rows_from_milvus_lite_logs_no_timestamp_warning(open_store, capfd):
    # pymilvus warns "failed to get mvccTs" for every query iterator on Milvus Lite, which has no
    # session timestamps; the store reads rows with one, so a reindex would warn on every run.
    # pymilvus logs through its own stderr handler (not propagated), hence capfd, not caplog.
    store = open_store()
    store.prepare(IndexSchema(DIM, MODEL))
    store.upsert([make_chunk("a.md", index) for index in range(3)])
    capfd.readouterr()
    assert len(list(store.rows(["id"]))) == 3
    assert "mvccTs" not in capfd.readouterr().err


def test_reads_of_a_missing_collection(open_store):
    store = open_store()
    assert store.count() == 0
    assert list(store.rows(["id", "dense"])) == []
    store.delete_sources(["a.md"])
    with pytest.raises(MilvusStoreError, match="does not exist; run an ingest first"):
        store.search_dense(np.ones(DIM))


def test_the_token_never_appears_in_errors_or_logs(open_store, monkeypatch, caplog):
    secret = "sk-test-0123456789-SECRET"
    monkeypatch.setenv("MILVUS_TOKEN", secret)
    store = open_store(uri="http://127.0.0.1:1", timeout_s=1, max_attempts=2, retry_max_wait_s=0.5)
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(MilvusStoreError) as failed:
            store.prepare(IndexSchema(DIM, MODEL))
        problems = store.check(IndexSchema(DIM, MODEL))
    assert time.monotonic() - started < 15
    assert "collection 'docs' at http://127.0.0.1:1" in str(failed.value)
    assert "connect failed" in str(failed.value)
    assert "retrying" in caplog.text  # a connection failure is transient: it was retried
    for text in (str(failed.value), repr(failed.value), caplog.text, *problems):
        assert secret not in text
    assert failed.value.__cause__ is None and failed.value.__suppress_context__


def test_only_transient_failures_are_retried():
    import grpc
    from pymilvus.exceptions import MilvusException, ParamError

    from stores.milvus.connection import _is_transient

    assert _is_transient(MilvusException(code=2, message="Fail connecting to server"))
    assert _is_transient(MilvusException(code=8, message="rate limit exceeded"))
    assert _is_transient(MilvusException(code=grpc.StatusCode.UNAVAILABLE, message="Retry timeout"))
    assert _is_transient(MilvusException(code=65535, message="busy", retriable=True))
    assert _is_transient(ConnectionResetError())
    assert not _is_transient(MilvusException(code=8, message="bad", is_input_error=True))
    assert not _is_transient(ParamError(message="invalid dim"))
    assert not _is_transient(MilvusException(code=1100, message="collection not found"))
    assert not _is_transient(ValueError("bad row"))


def test_an_error_that_echoes_the_token_is_scrubbed(monkeypatch):
    # Defence in depth: whatever a client library puts in its message, the token is cut out.
    secret = "zilliz-api-key-0123456789"
    monkeypatch.setenv("MY_TOKEN", secret)
    store = MilvusStore(uri="https://example.invalid", token_env="MY_TOKEN", max_attempts=1)

    def fails():
        raise RuntimeError(f"auth failed for token {secret}")

    with pytest.raises(MilvusStoreError) as failed:
        store.call("describe collection", fails)
    assert str(failed.value) == (
        "collection 'documents' at https://example.invalid: describe collection failed: RuntimeError: auth failed for "
        "token ***"
    )


def test_a_token_echoed_json_escaped_or_in_pieces_is_scrubbed(monkeypatch):
    secret = "zilliz-api-key-9876543210/abc"
    monkeypatch.setenv("MY_TOKEN", secret)
    store = MilvusStore(uri="https://example.invalid", token_env="MY_TOKEN", max_attempts=1)
    escaped = "".join(f"\\u{ord(c):04x}" for c in secret)

    def fails():
        raise RuntimeError(
            f'{{"detail": "bad token {escaped}", "seen": "{secret[:9]}", "url": "x?t={secret.replace("/", "%2F")}"}}'
        )

    with pytest.raises(MilvusStoreError) as failed:
        store.call("describe collection", fails)
    assert str(failed.value).endswith('RuntimeError: {"detail": "bad token ***", "seen": "***", "url": "x?t=***"}')


def test_a_folder_held_by_another_process_gets_a_clear_message(open_store, tmp_path):
    store = open_store()
    store.prepare(IndexSchema(DIM, MODEL))  # this process now holds the Lite folder
    script = textwrap.dedent(
        f"""
        from stores.milvus import MilvusStore
        try:
            MilvusStore(uri={str(tmp_path / "index.db")!r}, collection="docs").count()
        except Exception as exc:
            print(exc)
        """
    )
    child = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "is in use by another process (Milvus Lite allows one process per database)" in child.stdout


def test_an_idle_lite_connection_logs_no_grpc_errors(tmp_path):
    # Left at pymilvus's 10 s keepalive, Milvus Lite answers the third idle ping with GOAWAY
    # "too_many_pings", which gRPC logs as an error on stderr (seen during long embedding batches).
    script = textwrap.dedent(
        f"""
        import time
        from stores.base import IndexSchema
        from stores.milvus import MilvusStore
        store = MilvusStore(uri={str(tmp_path / "index.db")!r}, collection="docs")
        store.prepare(IndexSchema({DIM}, {MODEL!r}))
        time.sleep(40)
        print("rows", store.count())
        store.close()
        """
    )
    child = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert "rows 0" in child.stdout, child.stderr
    assert "too_many_pings" not in child.stderr and "GOAWAY" not in child.stderr, child.stderr


def test_a_database_of_the_other_milvus_lite_generation_is_explained(open_store, tmp_path):
    other = tmp_path / "other.db"
    if LITE_MAJOR >= 3:  # Lite 2.5 keeps a database in one file, Lite 3 in a folder
        other.write_bytes(b"SQLite format 3\x00")
        message = r"is a file, but Milvus Lite 3\.[\d.]+ keeps its data in a folder"
    else:
        (other / "collections").mkdir(parents=True)
        message = r"is a folder, but Milvus Lite 2\.[\d.]+ keeps its data in a single file"
    store = open_store(uri=str(other))
    with pytest.raises(MilvusStoreError, match=message):
        store.prepare(IndexSchema(DIM, MODEL))
    assert re.search(message, store.check(IndexSchema(DIM, MODEL))[0])


@pytest.mark.skipif(LITE_MAJOR >= 3, reason="Milvus Lite 3 builds HNSW")
def test_an_index_milvus_lite_cannot_build_is_refused_before_anything_is_created(open_store, tmp_path):
    store = open_store(index={"type": "HNSW", "metric": "COSINE"})
    message = r"Milvus Lite 2\.[\d.]+ builds only AUTOINDEX, FLAT, IVF_FLAT indexes, not HNSW"
    assert re.search(message, store.check(IndexSchema(DIM, MODEL))[0])
    with pytest.raises(MilvusStoreError, match=message):
        store.prepare(IndexSchema(DIM, MODEL))
    assert not (tmp_path / "index.db").exists()


def test_relative_uri_is_resolved_against_the_spec_folder(tmp_path):
    store = MilvusStore(uri="indexes/project.db")
    store.base_dir = tmp_path
    assert store.endpoint.lite_path == tmp_path / "indexes" / "project.db"
    try:
        store.prepare(IndexSchema(DIM, MODEL))
        assert (tmp_path / "indexes" / "project.db").exists()
    finally:
        store.close()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"collection": "my-docs"}, "not a valid Milvus name"),
        ({"collection": "1docs"}, "not a valid Milvus name"),
        ({"db_name": "a b"}, "not a valid Milvus name"),
        ({"uri": "./index"}, "must end in .db"),
        ({"uri": "https://user:pass@example.com"}, "must not carry credentials"),
        ({"token_env": "sk-abc:123"}, "name"),
        ({"vector_field": "text"}, "cannot be named"),
        ({"text_max_length": 70000}, "less than or equal to 65535"),
        ({"index": {"type": "DISKANN"}}, "AUTOINDEX"),
        ({"unknown": 1}, "Extra inputs are not permitted"),
    ],
)
def test_config_is_validated(settings, message):
    with pytest.raises(ValidationError, match=message):
        MilvusStore(settings)


def test_config_round_trips_and_fingerprint_ignores_speed_settings():
    store = MilvusStore(uri="./x.db", collection="docs", write_batch_size=64, index={"type": "HNSW"})
    assert store.to_dict() == {
        "type": "milvus",
        "uri": "./x.db",
        "collection": "docs",
        "write_batch_size": 64,
        "index": {"type": "HNSW"},
    }
    assert MilvusStore.from_dict(store.to_dict()).config == store.config
    assert "write_batch_size" not in store.fingerprint_settings()
    assert store.fingerprint_settings()["collection"] == "docs"


# -- sparse fields, BM25 and hybrid search -----------------------------------------------------

from core.search import RRFFusion, SearchRequest, WeightedFusion  # noqa: E402


def sparse_chunk(source_id: str, text: str, axis: int, sparse: dict, pages: list[int]) -> Chunk:
    chunk = make_chunk(source_id, 0, text=text, axis=axis)
    chunk.vectors["learned"] = sparse
    chunk.metadata["page_numbers"] = pages
    return chunk


@pytest.fixture
def sparse_store(open_store):
    store = open_store(bm25={"analyzer": "english"}, learned_sparse={"field": "learned"})
    store.prepare(IndexSchema(DIM, MODEL, sparse_model_id="test/splade-a", sparse_field="learned"))
    store.upsert(
        [
            sparse_chunk("cats.md", "Cats chase the red laser dot", 0, {10: 1.0, 11: 0.5}, [1]),
            sparse_chunk("dogs.md", "Dogs fetch sticks in the park", 1, {20: 2.0}, [2, 3]),
            sparse_chunk("birds.md", "Birds sing at dawn", 2, {10: 0.2, 30: 1.0}, [7]),
        ]
    )
    return store


def test_bm25_and_learned_sparse_search_with_higher_is_better_scores(sparse_store):
    bm25 = sparse_store.search(SearchRequest("bm25", "laser cats", 5))
    assert [h.fields["source_id"] for h in bm25] == ["cats.md"]  # Lite's BM25 comes back negative: flipped
    assert bm25[0].score > 0
    learned = sparse_store.search(SearchRequest("sparse", {10: 1.0}, 5))
    assert [h.fields["source_id"] for h in learned] == ["cats.md", "birds.md"] and learned[0].score == pytest.approx(
        1.0
    )
    dense = sparse_store.search(SearchRequest("dense", np.eye(DIM, dtype=np.float32)[1], 1))
    assert dense[0].fields["source_id"] == "dogs.md" and dense[0].score == pytest.approx(1.0)
    with pytest.raises(ValueError, match="cannot search branch 'nope'"):
        sparse_store.search(SearchRequest("nope", "x", 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty text"):
        sparse_store.search(SearchRequest("bm25", "  ", 1))


def test_hybrid_search_fuses_branches_and_applies_the_filter_to_each(sparse_store):
    requests = [SearchRequest("dense", np.eye(DIM, dtype=np.float32)[1], 1), SearchRequest("bm25", "laser", 1)]
    fused = sparse_store.hybrid_search(requests, RRFFusion(k=60), limit=3)
    assert {h.fields["source_id"] for h in fused} == {"dogs.md", "cats.md"}  # one from each branch
    assert fused[0].score == pytest.approx(1 / 61)
    weighted = sparse_store.hybrid_search(requests, WeightedFusion((1.0, 0.0)), limit=2)
    assert weighted[0].fields["source_id"] == "dogs.md"
    only_cats = sparse_store.hybrid_search(
        requests, RRFFusion(), limit=3, filters=Filter.parse({"source_id": "cats.md"})
    )
    assert [h.fields["source_id"] for h in only_cats] == ["cats.md"]
    with pytest.raises(ValueError, match="one weight per branch"):
        sparse_store.hybrid_search(requests, WeightedFusion((1.0,)), limit=2)


def test_page_filters_select_chunks_by_their_pages(sparse_store):
    query = SearchRequest("sparse", {10: 1.0, 20: 1.0, 30: 1.0}, 10)

    def found(conditions):
        return {h.fields["source_id"] for h in sparse_store.search(query, Filter.parse(conditions))}

    assert found({"page": 3}) == {"dogs.md"}
    assert found({"page": {"gte": 1, "lte": 2}}) == {"cats.md", "dogs.md"}
    assert found({"page": [7], "source_id": ["birds.md", "cats.md"]}) == {"birds.md"}


def test_sparse_vectors_are_validated_per_document(sparse_store):
    bad = sparse_chunk("bad.md", "x", 0, {-1: 1.0}, [])
    negative = sparse_chunk("negative.md", "x", 0, {1: -0.5}, [])
    missing = make_chunk("missing.md", 0)
    with pytest.raises(InvalidChunksError) as refused:
        sparse_store.upsert([bad, negative, missing])
    assert set(refused.value.source_ids) == {"bad.md", "negative.md", "missing.md"}
    assert "sparse vector is missing" in str(refused.value) and "non-negative" in str(refused.value)


def test_a_collection_without_the_sparse_side_or_with_another_analyzer_is_refused(open_store):
    plain = open_store()
    plain.prepare(IndexSchema(DIM, MODEL))
    plain.close()
    with pytest.raises(StoreSchemaError, match="has no BM25 field 'bm25'.*created without bm25"):
        open_store(bm25={}).prepare(IndexSchema(DIM, MODEL))
    with pytest.raises(StoreSchemaError, match="has no learned sparse field 'sparse'"):
        open_store(learned_sparse={}).prepare(IndexSchema(DIM, MODEL, sparse_field="sparse"))
    english = open_store(collection="english", bm25={"analyzer": "english"})
    english.prepare(IndexSchema(DIM, MODEL))
    english.close()
    problems = open_store(collection="english", bm25={"analyzer": "jieba"}).check(IndexSchema(DIM, MODEL))
    assert any("analyses text for BM25 with" in p and "jieba" in p for p in problems)


def test_sparse_field_names_are_validated():
    with pytest.raises(ValidationError, match="distinct names"):
        MilvusStore(bm25={"field": "dense"})
    with pytest.raises(ValidationError, match="cannot be named 'text'"):
        MilvusStore(learned_sparse={"field": "text"})
    with pytest.raises(ValidationError):
        MilvusStore(bm25={"analyzer": "klingon"})


# -- compact vector storage ----------------------------------------------------------------------


@pytest.mark.skipif(LITE_MAJOR >= 3, reason="Milvus Lite 3 stores only float32 vectors")
@pytest.mark.parametrize(("storage", "field_type"), [("float16", "FLOAT16_VECTOR"), ("binary", "BINARY_VECTOR")])
def test_compact_vector_storage_finds_the_nearest_and_keeps_its_field_type(open_store, storage, field_type):
    import dataclasses

    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((24, 16)).astype(np.float32)
    store = open_store(vector_storage=storage, bm25={})
    store.prepare(IndexSchema(16, MODEL))
    chunks = [dataclasses.replace(make_chunk("a.md", i), vectors={"dense": vectors[i]}) for i in range(24)]
    store.upsert(chunks)
    fields = {f["name"]: f["type"].name for f in store.client().describe_collection("docs")["fields"]}
    assert fields["dense"] == field_type

    for target in (3, 17):
        query = vectors[target] + 0.05 * rng.standard_normal(16).astype(np.float32)
        hits = store.search(SearchRequest("dense", query, 5))
        assert hits[0].id == chunks[target].id
        assert all(0 < hit.score <= 1.0 for hit in hits) and hits[0].score >= hits[-1].score
    fused = store.hybrid_search(
        [SearchRequest("dense", vectors[9], 5), SearchRequest("bm25", "chunk 9 of a.md", 5)], RRFFusion(), limit=3
    )
    assert fused[0].id == chunks[9].id

    with pytest.raises(StoreSchemaError, match=f"field 'dense' is {field_type}, the store writes FLOAT_VECTOR"):
        open_store(bm25={}).prepare(IndexSchema(16, MODEL))


def test_binary_storage_settings_are_checked(open_store):
    with pytest.raises(ValidationError, match="binary vectors are searched by Hamming distance"):
        MilvusStore(vector_storage="binary", index={"type": "IVF_FLAT"})
    with pytest.raises(ValidationError, match="leave index.type at AUTOINDEX or FLAT and index.metric unset"):
        MilvusStore(vector_storage="binary", index={"metric": "IP"})
    if LITE_MAJOR < 3:
        with pytest.raises(ValueError, match="12 is not a multiple of 8"):
            open_store(vector_storage="binary").prepare(IndexSchema(12, MODEL))
    else:
        assert (
            "stores only float32 vectors, not vector_storage binary"
            in open_store(vector_storage="binary").check(IndexSchema(16, MODEL))[0]
        )


def test_chinese_bm25_with_the_jieba_analyzer(open_store):
    store = open_store(bm25={"analyzer": "jieba"})
    store.prepare(IndexSchema(DIM, MODEL))
    tea = make_chunk("tea.md", 0, text="绿茶应该用八十摄氏度的水冲泡两分钟。")
    coffee = make_chunk("coffee.md", 0, text="咖啡豆需要先研磨再用热水萃取。")
    store.upsert([tea, coffee])
    hits = store.search(SearchRequest("bm25", "绿茶用多少度的水冲泡？", 5))
    assert hits[0].id == tea.id and hits[0].score > 0
    assert [h.id for h in store.search(SearchRequest("bm25", "研磨咖啡豆", 5))][:1] == [coffee.id]
