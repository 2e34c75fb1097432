"""The Store contract, run against every store: Milvus Lite, the in-memory plugin store, and a
Milvus server when the server tier is on (dense only there when its version lacks BM25 and
sparse vectors).

What the orchestration relies on: prepare refuses another model, writes are idempotent and all
or nothing, deletions touch only what they name, searches return higher-is-better hits with the
same fields, filters passed as data select the same chunks everywhere, and hybrid search fuses
filtered branches. A store that passes this suite can stand under the runners and the query path.
"""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import StoreSchemaError
from core.filters import Filter
from core.leases import LockClaim
from core.records import SourceRecord
from core.search import RRFFusion, SearchRequest, WeightedFusion
from core.types import Chunk
from stores.base import HIT_FIELDS, IndexSchema, Store
from stores.milvus import MilvusStore
from tests.plugins.memory_store import MemoryStore

DIM = 8
MODEL = "test/contract-model"
SPARSE_MODEL = "test/contract-splade"
SPARSE_FIELD = "learned"
HOSTILE_SOURCE = 'x" or source_id != "'

TEXTS = {
    "cats.md": ["Cats chase the red laser dot", "A cat sleeps in the sun"],
    "dogs.md": ["Dogs fetch sticks in the park", "The dog barks at the mailman"],
    HOSTILE_SOURCE: ["Birds sing at dawn"],
}


@pytest.fixture(params=["memory", "lite", "server"])
def build_store(request, tmp_path):
    """A factory of stores of one kind, all on the same index; full (BM25 + learned sparse) unless
    the engine lacks them."""
    kind = request.param
    stores: list[Store] = []

    def build() -> Store:
        if kind == "memory":
            if stores:
                return stores[0]  # the memory index lives in its one object
            store: Store = MemoryStore(bm25=True, sparse_field=SPARSE_FIELD, keep_record=True)
        elif kind == "lite":
            store = MilvusStore(
                uri=str(tmp_path / "contract.db"),
                collection="contract",
                bm25={"analyzer": "english"},
                learned_sparse={"field": SPARSE_FIELD},
            )
        else:
            server = request.getfixturevalue("milvus_server")
            collection = request.getfixturevalue("server_collection")
            from stores.server_features import BM25_FUNCTION, SPARSE_VECTORS, supports

            full = supports(server.version, SPARSE_VECTORS) and supports(server.version, BM25_FUNCTION)
            extra = {"bm25": {"analyzer": "english"}, "learned_sparse": {"field": SPARSE_FIELD}} if full else {}
            store = MilvusStore(uri=server.uri, collection=collection, **extra)
        stores.append(store)
        return store

    yield build
    for store in stores:
        store.close()


def schema_for(store: Store, model: str = MODEL) -> IndexSchema:
    sparse = "sparse" in store.branches()
    return IndexSchema(DIM, model, SPARSE_MODEL if sparse else None, sparse_field=SPARSE_FIELD if sparse else None)


def unit(i: int) -> np.ndarray:
    vector = np.full(DIM, 0.05, dtype=np.float32)
    vector[i % DIM] = 1.0
    return vector / np.linalg.norm(vector)


def corpus(store: Store) -> list[Chunk]:
    chunks, position = [], 0
    for source_id, texts in TEXTS.items():
        for index, text in enumerate(texts):
            vectors = {"dense": unit(position)}
            if "sparse" in store.branches():
                vectors[SPARSE_FIELD] = {position: 1.0, 100: 0.1}
            metadata = {"page_numbers": [index + 1], "media_type": "text/markdown", "headings": [source_id]}
            chunks.append(Chunk(f"{source_id}#{index}", source_id, index, text, 0, len(text), metadata, vectors))
            position += 1
    return chunks


@pytest.fixture
def filled(build_store) -> tuple[Store, list[Chunk]]:
    store = build_store()
    store.prepare(schema_for(store))
    chunks = corpus(store)
    assert store.upsert(chunks) == len(chunks)
    return store, chunks


def ids(hits) -> list[str]:
    return [h.id for h in hits]


# -- schema --------------------------------------------------------------------------------------


def test_prepare_creates_once_and_refuses_another_model(build_store):
    store = build_store()
    assert store.check(schema_for(store)) == []
    store.prepare(schema_for(store))
    assert store.exists()
    store.prepare(schema_for(store))  # the same schema again is fine
    assert store.check(schema_for(store, "test/another-model"))
    with pytest.raises(StoreSchemaError):
        build_store().prepare(schema_for(store, "test/another-model"))


def test_prepare_refuses_a_vector_field_the_store_does_not_keep(build_store):
    store = build_store()
    with pytest.raises(ValueError, match="vector field"):
        store.prepare(IndexSchema(DIM, MODEL, vector_field="elsewhere", sparse_field=schema_for(store).sparse_field))


# -- writes and deletions ------------------------------------------------------------------------


def test_upsert_is_idempotent_and_all_or_nothing(filled):
    store, chunks = filled
    assert store.count() == len(chunks)
    store.upsert(chunks)
    assert store.count() == len(chunks)
    broken = Chunk("new#0", "new", 0, "text", 0, 4, {}, {"dense": np.ones(DIM + 1, dtype=np.float32)})
    fine = Chunk("new#1", "new", 1, "text", 0, 4, {}, dict(chunks[0].vectors))
    with pytest.raises(ValueError):
        store.upsert([fine, broken])
    assert store.count() == len(chunks)  # not even the valid chunk of the refused call


def test_deletions_touch_only_what_they_name(filled):
    store, chunks = filled
    store.delete_stale({"cats.md": ["cats.md#1"], HOSTILE_SOURCE: [f"{HOSTILE_SOURCE}#0"]})
    left = {h.id for h in store.search(SearchRequest("dense", unit(0), 50))}
    assert left == {c.id for c in chunks} - {"cats.md#0"}
    store.delete_sources([HOSTILE_SOURCE])  # a hostile id deletes its own chunks and nothing more
    left = {h.id for h in store.search(SearchRequest("dense", unit(0), 50))}
    assert left == {"cats.md#1", "dogs.md#0", "dogs.md#1"}
    assert store.count() == 3


# -- search --------------------------------------------------------------------------------------


def test_dense_search_ranks_higher_is_better_with_every_field(filled):
    store, chunks = filled
    hits = store.search(SearchRequest("dense", unit(2), 3))
    assert hits[0].id == chunks[2].id
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert set(HIT_FIELDS) <= set(hits[0].fields)
    assert hits[0].fields["source_id"] == "dogs.md" and hits[0].fields["chunk_index"] == 0
    assert hits[0].fields["text"] == chunks[2].text and hits[0].fields["metadata"]["page_numbers"] == [1]


FILTER_CASES = [
    ({"source_id": "dogs.md"}, {"dogs.md#0", "dogs.md#1"}),
    ({"source_id": HOSTILE_SOURCE}, {f"{HOSTILE_SOURCE}#0"}),
    ({"source_id": ["cats.md", HOSTILE_SOURCE]}, {"cats.md#0", "cats.md#1", f"{HOSTILE_SOURCE}#0"}),
    ({"chunk_index": {"gte": 1}}, {"cats.md#1", "dogs.md#1"}),
    ({"source_id": {"ne": "cats.md"}, "chunk_index": 0}, {"dogs.md#0", f"{HOSTILE_SOURCE}#0"}),
    ({"page": 2}, {"cats.md#1", "dogs.md#1"}),
    ({"page": {"gte": 2, "lte": 9}}, {"cats.md#1", "dogs.md#1"}),
    ({"headings": {"contains": "dogs.md"}}, {"dogs.md#0", "dogs.md#1"}),
    ({"media_type": "text/markdown", "source_id": "cats.md"}, {"cats.md#0", "cats.md#1"}),
    ({"media_type": "text/html"}, set()),
    ({"source_id": 'cats.md" or source_id != "'}, set()),
]


@pytest.mark.parametrize(("conditions", "expected"), FILTER_CASES)
def test_filters_passed_as_data_select_the_same_chunks(filled, conditions, expected):
    store, _ = filled
    hits = store.search(SearchRequest("dense", unit(0), 50), Filter.parse(conditions))
    assert set(ids(hits)) == expected


def test_a_branch_the_store_does_not_serve_is_refused(filled):
    store, _ = filled
    missing = [b for b in ("bm25", "sparse") if b not in store.branches()]
    if not missing:
        pytest.skip("this store serves every branch")
    with pytest.raises(ValueError, match="cannot search branch"):
        store.search(SearchRequest(missing[0], "laser", 3))


def test_bm25_and_sparse_branches(filled):
    store, chunks = filled
    if store.branches() != ("dense", "bm25", "sparse"):
        pytest.skip(f"this store serves only {', '.join(store.branches())}")
    bm25 = store.search(SearchRequest("bm25", "laser dot", 5))
    assert ids(bm25)[:1] == ["cats.md#0"] and bm25[0].score > 0
    assert ids(store.search(SearchRequest("bm25", "laser", 5), Filter.parse({"source_id": "dogs.md"}))) == []
    sparse = store.search(SearchRequest("sparse", {3: 1.0, 100: 1.0}, 2))
    assert ids(sparse)[0] == chunks[3].id and sparse[0].score > sparse[1].score


def test_hybrid_search_fuses_filtered_branches(filled):
    store, chunks = filled
    if "bm25" not in store.branches():
        pytest.skip(f"this store serves only {', '.join(store.branches())}")
    requests = [SearchRequest("dense", unit(2), 1), SearchRequest("bm25", "laser", 1)]
    fused = store.hybrid_search(requests, RRFFusion(k=60), 3)
    assert {"dogs.md#0", "cats.md#0"} <= set(ids(fused)) and fused[0].score == pytest.approx(1 / 61)
    assert store.hybrid_search(requests, WeightedFusion((1.0, 0.0)), 1)[0].id == "dogs.md#0"
    only_cats = store.hybrid_search(requests, RRFFusion(), 5, Filter.parse({"source_id": "cats.md"}))
    assert ids(only_cats)[:1] == ["cats.md#0"] and {h.fields["source_id"] for h in only_cats} == {"cats.md"}
    with pytest.raises(ValueError, match="one weight per branch"):
        store.hybrid_search(requests, WeightedFusion((1.0,)), 2)


# -- the index record and the lock claims ---------------------------------------------------------


def test_the_record_and_the_claims_round_trip(filled):
    store, _ = filled
    record, claims = store.index_record(), store.lock_claims()
    assert record is not None and claims is not None
    kept = SourceRecord("cats.md", "scope", "hash-1", "signal-1", "fingerprint", 2, "digest", "indexed", updated_at=1.0)
    record.put([kept])
    assert record.get(["cats.md", "nothing"]) == {"cats.md": kept}
    assert [r.source_id for r in record.in_scope("scope")] == ["cats.md"]
    record.delete(["cats.md"])
    assert record.get(["cats.md"]) == {}
    claim = LockClaim("run-1", "host", "machine", 1, "started", 1.0, 2.0)
    claims.put(claim)
    assert [c.owner for c in claims.claims()] == ["run-1"]
    claims.delete("run-1")
    assert claims.claims() == []


# -- the orchestration on the second store ---------------------------------------------------------


def test_the_pipeline_ingests_reindexes_and_queries_through_the_contract_alone(tmp_path):
    from pipeline.pipeline import Pipeline
    from tests.plugins.components import PLUGINS, base_spec

    spec = base_spec()
    spec["stages"]["source"]["documents"] = {"a.txt": "alpha beta\ngamma delta", "b.txt": "epsilon zeta"}
    spec["stages"]["store"] = {"type": "tests.plugins.components:MemoryStore", "bm25": True, "keep_record": True}
    with Pipeline(spec, base_dir=tmp_path, allowed_modules=PLUGINS) as pipeline:
        assert pipeline.ingest().documents_indexed == 2
        again = pipeline.reindex()  # the store keeps a record, so nothing changed is redone
        assert again.documents_indexed == 0 and again.changes is not None and again.changes.unchanged == 2
        result = pipeline.query("epsilon")
        assert result.mode == "hybrid"  # auto: the store serves dense and BM25
        assert result.hits[0].source_id == "mem/b.txt"
        filtered = pipeline.query("epsilon", mode="bm25", filters={"source_id": "mem/a.txt"})
        assert filtered.hits == []
        report = pipeline.reconcile(repair=False)
        assert report.sources_recorded == 2 and report.sources_with_chunks == 2 and report.clean


def test_reconcile_compares_the_record_in_batches_and_finds_drift_in_each(monkeypatch):
    import pipeline.reconcile as reconciling
    from core.records import MemoryRecords, SourceRecord, chunk_digest

    monkeypatch.setattr(reconciling, "_SOURCES_PER_COMPARE", 3)  # 10 indexed sources: four batches
    store = MemoryStore()
    store.prepare(IndexSchema(DIM, MODEL))
    records = MemoryRecords()
    for i in range(10):
        source = f"s/{i}"
        ids = [f"{source}#0", f"{source}#1"]
        store.upsert([Chunk(cid, source, n, "text", 0, 4, {}, {"dense": unit(i)}) for n, cid in enumerate(ids)])
        digest = chunk_digest(ids if i % 4 else ids[:1])  # sources 0, 4 and 8 recorded with one chunk only
        records.put([SourceRecord(source, "s/", chunk_count=2 if i % 4 else 1, chunk_digest=digest, status="indexed")])
    store.upsert([Chunk("orphan#0", "orphan", 0, "text", 0, 4, {}, {"dense": unit(0)})])
    report = reconciling.reconcile(records, store, repair=True)
    assert report.drifted_sources == ["s/0", "s/4", "s/8"] and report.orphan_sources == ["orphan"]
    assert {r.status for r in records.get(["s/0", "s/4", "s/8"]).values()} == {"pending"}
    assert store.count() == 20
