"""The onnx backend (core.onnx_models) runs the same models as torch: same vectors in fp32, close
ones in int8, same late-chunking vectors and cross-encoder scores; it falls back to torch when no
graph can be made, and rebuilds a cached graph that no longer loads."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from core import onnx_models
from core.cpu import has_native_bf16
from core.models import CACHE_DIR_ENV
from embedders.huggingface import HuggingFaceEmbedder
from embedders.late import LateChunkingEmbedder
from rerankers.cross_encoder import CrossEncoderReranker
from tests.test_late_chunking import chunked, cut_into, vectors_of
from tests.test_rerankers import fine_tune_cross_encoder

TEXTS = [
    "Milvus stores dense and sparse vectors for retrieval-augmented generation.",
    "A longer document about proteins: " + "the enzyme binds its substrate and releases the product. " * 12,
    "x",
    "Ships carry containers across the ocean between ports, " * 40,  # past 256 tokens: truncated
]
QUERIES = ["which database stores vectors?", "enzyme substrate binding"]


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """One graph cache for the module (exports are slow), and no sessions from other modules."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path_factory.getbasetemp() / "onnx-cache"))
    monkeypatch.setattr(onnx_models, "_modules", {})


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_fp32_graph_gives_torchs_vectors_with_prefixes_truncation_and_batches(minilm):
    settings = {"device": "cpu", "query_prefix": "query: ", "document_prefix": "passage: ", "batch_size": 2}
    on_torch = HuggingFaceEmbedder(**settings)
    on_onnx = HuggingFaceEmbedder(**settings, backend="onnx")
    expected, actual = on_torch.embed_documents(TEXTS), on_onnx.embed_documents(TEXTS)
    assert cosines(actual, expected).min() > 1 - 1e-4
    for query in QUERIES:  # batch of one, no padding
        assert cosines(on_onnx.embed_query(query)[None], on_torch.embed_query(query)[None])[0] > 1 - 1e-4
    assert on_onnx.truncated_texts == on_torch.truncated_texts == 1
    assert any("ran on onnx float32" in note for note in on_onnx.run_notes())
    # fp32 onnx makes the same vectors: switching backend must not re-embed an index.
    assert on_onnx.fingerprint_settings() == on_torch.fingerprint_settings()


def test_int8_graph_gives_close_vectors_that_rank_alike_and_a_fingerprint_of_its_own(minilm):
    on_int8 = HuggingFaceEmbedder(device="cpu", backend="onnx", quantize="int8")
    expected, actual = minilm.embed_documents(TEXTS), on_int8.embed_documents(TEXTS)
    close = cosines(actual, expected)
    assert close.min() > 0.95 and close.max() < 1 - 1e-6  # quantized: close, not equal
    for query in QUERIES:
        assert np.argmax(similarities(on_int8, query)) == np.argmax(similarities(minilm, query))
    assert any("ran on onnx int8" in note for note in on_int8.run_notes())
    assert on_int8.fingerprint_settings() != minilm.fingerprint_settings()


def similarities(embedder: HuggingFaceEmbedder, query: str) -> np.ndarray:
    result: np.ndarray = embedder.embed_documents(TEXTS) @ embedder.embed_query(query)
    return result


def test_late_chunking_vectors_are_the_same_on_the_graph():
    text = " ".join(f"Sentence {i} tells about topic {i % 5} in some detail." for i in range(60))
    on_torch, on_onnx = LateChunkingEmbedder(device="cpu"), LateChunkingEmbedder(device="cpu", backend="onnx")
    expected, actual = chunked(text, cut_into(text, 6)), chunked(text, cut_into(text, 6))
    on_torch.embed([expected])
    on_onnx.embed([actual])
    assert on_onnx.runtime_description == "onnx float32"
    assert cosines(vectors_of(actual), vectors_of(expected)).min() > 1 - 1e-4


def test_cross_encoder_scores_are_the_same_on_the_graph(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fine_tune_cross_encoder(tmp_path)
    finally:
        torch.set_num_threads(threads)
    passages = ["Enzymes bind substrates.", "Ships carry containers across the ocean. " * 10, "Proteins fold."]
    on_torch = CrossEncoderReranker(model=str(tmp_path), max_length=64)
    on_onnx = CrossEncoderReranker(model=str(tmp_path), max_length=64, backend="onnx")
    expected, actual = (
        on_torch.score("what binds substrates", passages),
        on_onnx.score("what binds substrates", passages),
    )
    assert on_onnx.runtime == "onnx float32"
    assert np.allclose(actual, expected, atol=1e-3)
    assert on_onnx.truncated_pairs == on_torch.truncated_pairs == 1


def test_a_model_that_cannot_be_exported_runs_with_torch_and_says_why(minilm, monkeypatch, caplog):
    def unsupported(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::custom_op' to ONNX opset version 17 is not supported")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    monkeypatch.setenv(CACHE_DIR_ENV, str(onnx_models.cache_dir() / "fresh"))  # nothing cached to reuse
    embedder = HuggingFaceEmbedder(device="cpu", backend="onnx")
    with caplog.at_level(logging.WARNING):
        vectors = embedder.embed_documents(TEXTS[:2])
    assert cosines(vectors, minilm.embed_documents(TEXTS[:2])).min() > 1 - 1e-6
    assert any("runs with torch" in r.message and "aten::custom_op" in r.message for r in caplog.records)
    assert any("ran on torch float32" in note for note in embedder.run_notes())


def test_a_corrupt_cached_graph_is_rebuilt(minilm, caplog):
    HuggingFaceEmbedder(device="cpu", backend="onnx").warm_up()
    graphs = list((onnx_models.cache_dir() / "onnx").glob(f"*/{onnx_models.GRAPH_FILE}"))
    assert graphs
    for graph in graphs:
        graph.write_bytes(b"not a protobuf" * 100)
    onnx_models._modules.clear()  # as a new process would
    embedder = HuggingFaceEmbedder(device="cpu", backend="onnx")
    with caplog.at_level(logging.WARNING):
        vectors = embedder.embed_documents(TEXTS[:2])
    assert any("building it again" in r.message for r in caplog.records)
    assert embedder.runtime_description == "onnx float32"
    assert cosines(vectors, minilm.embed_documents(TEXTS[:2])).min() > 1 - 1e-4


def test_auto_times_both_backends_once_per_machine_and_keeps_the_choice(minilm):
    embedder = HuggingFaceEmbedder(device="cpu", backend="auto")
    embedder.warm_up()
    records = list((onnx_models.cache_dir() / "onnx").glob(f"*/{onnx_models.CHOICE_FILE}"))
    assert len(records) == 1
    choices = json.loads(records[0].read_text())
    (machine, chosen), *_ = choices.items()
    assert embedder.runtime_description == f"{chosen} float32"
    # The recorded choice decides from now on, without timing again.
    flipped = "torch" if chosen == "onnx" else "onnx"
    records[0].write_text(json.dumps({machine: flipped}))
    onnx_models._modules.clear()
    again = HuggingFaceEmbedder(device="cpu", backend="auto")
    again.warm_up()
    assert again.runtime_description == f"{flipped} float32"


def test_bfloat16_runs_natively_where_the_cpu_has_it_and_in_float32_elsewhere(minilm, caplog):
    embedder = HuggingFaceEmbedder(device="cpu", dtype="bfloat16")
    with caplog.at_level(logging.WARNING):
        vectors = embedder.embed_documents(TEXTS)
    close = cosines(vectors, minilm.embed_documents(TEXTS))
    if has_native_bf16():
        assert embedder.runtime_description == "torch bfloat16"
        assert close.min() > 0.99
    else:
        assert embedder.runtime_description == "torch float32"
        assert any("native bf16" in r.message for r in caplog.records)
        assert close.min() > 1 - 1e-6


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"quantize": "int8"}, "set backend: onnx"),
        ({"backend": "onnx", "dtype": "bfloat16"}, "runs float32 or int8"),
        ({"device": "cpu", "dtype": "float16"}, "float16 is supported on CUDA devices only"),
        ({"device": "mps", "dtype": "bfloat16"}, "CUDA devices and CPUs only"),
    ],
)
def test_settings_that_cannot_run_are_refused(settings, message):
    with pytest.raises(ValidationError, match=message):
        HuggingFaceEmbedder(**settings)
    if "quantize" in settings:
        with pytest.raises(ValidationError, match=message):
            CrossEncoderReranker(model="any", **settings)
