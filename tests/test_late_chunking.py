"""LateChunkingEmbedder: span pooling checked against direct model calls, windows, coverage, config.

Quality of the vectors is checked with the shipped MiniLM; tiny randomly initialised models built
from a config are used only where plumbing matters (windows, 20,000-token coverage, CLS pooling).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from chunkers.base import build_chunks
from chunkers.recursive import RecursiveChunker
from core import registry
from core.types import ChunkedDocument, ParsedDocument
from embedders.huggingface import HuggingFaceEmbedder
from embedders.late import (
    LateChunkingEmbedder,
    plan_windows,
    tokenize_document,
    window_inputs,
)

ENGLISH = (
    "Berlin is the capital and largest city of Germany, both by area and by population. "
    "Its more than 3.85 million inhabitants make it the European Union's most populous city. "
    "The city is also one of the states of Germany, and is the third smallest state in the country by area."
)
CHINESE = (
    "柏林是德国首都，也是德国最大的城市。它拥有超过三百八十五万居民，是欧盟人口最多的城市。"
    "这座城市也是德国的一个州，按面积计算是第三小的州。"
)
MIXED = "Milvus 是一个向量数据库。It stores embeddings for retrieval-augmented generation，支持混合检索。"


def document(text: str, source_id: str = "doc") -> ParsedDocument:
    return ParsedDocument(
        source_id=source_id,
        uri=f"file:///{source_id}",
        media_type="text/plain",
        content_hash="0",
        text=text,
        elements=(),
    )


def chunked(text: str, spans: list[tuple[int, int]], source_id: str = "doc") -> ChunkedDocument:
    parsed = document(text, source_id)
    return ChunkedDocument(parsed, build_chunks(parsed, spans))


def vectors_of(doc: ChunkedDocument) -> np.ndarray:
    return np.stack([chunk.vectors["dense"] for chunk in doc.chunks])


def cut_into(text: str, pieces: int) -> list[tuple[int, int]]:
    """Equal character spans: the cuts fall inside words (and tokens) on purpose."""
    bounds = np.linspace(0, len(text), pieces + 1).astype(int)
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


@pytest.fixture(scope="module")
def direct(minilm_folder):
    """The tokenizer and model loaded straight from transformers, bypassing the project's loader."""
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_folder), AutoModel.from_pretrained(minilm_folder).eval()


@pytest.fixture(scope="module")
def late() -> LateChunkingEmbedder:
    return LateChunkingEmbedder(device="cpu")


def reference_vectors(
    direct, text: str, spans: list[tuple[int, int]], prefix: str = "", normalize: bool = True
) -> np.ndarray:
    """Span means from one direct model call, with the token rule written out token by token.

    A text token belongs to each span holding its middle character (the left one of two); [CLS]
    and the prefix tokens join the first span, [SEP] the last.
    """
    tokenizer, model = direct
    encoded = tokenizer(prefix + text, return_offsets_mapping=True, return_tensors="pt")
    offsets = encoded.pop("offset_mapping")[0].tolist()
    with torch.inference_mode():
        hidden = (
            model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
            .last_hidden_state[0]
            .double()
            .numpy()
        )
    last = len(offsets) - 1
    members: list[list[int]] = [[] for _ in spans]
    for position, (start, end) in enumerate(offsets):
        if position in (0, last):
            continue
        middle = start + (end - start - 1) // 2 - len(prefix)
        if middle < 0:
            members[0].append(position)
            continue
        for index, (span_start, span_end) in enumerate(spans):
            if span_start <= middle < span_end:
                members[index].append(position)
    members[0].append(0)
    members[-1].append(last)
    means = np.stack([hidden[sorted(positions)].mean(axis=0) for positions in members])
    if normalize:
        means /= np.linalg.norm(means, axis=1, keepdims=True)
    return means


# -- span pooling against a direct model call (shipped MiniLM) -----------------------------------------


@pytest.mark.parametrize("text", [ENGLISH, CHINESE, MIXED], ids=["english", "chinese", "mixed"])
def test_chunk_vector_is_the_mean_over_exactly_its_tokens(late, direct, text):
    spans = cut_into(text, 5)  # cuts inside words: tokens straddle chunk boundaries
    doc = chunked(text, spans)
    late.embed([doc])
    ours = vectors_of(doc)
    assert ours.dtype == np.float32 and ours.shape == (5, 384)
    np.testing.assert_allclose(ours, reference_vectors(direct, text, spans), atol=2e-5)
    # Not the same as embedding each chunk alone.
    naive = HuggingFaceEmbedder(device="cpu").embed_documents([c.text for c in doc.chunks])
    assert np.max(np.abs(ours - naive)) > 0.05


def test_boundary_tokens_go_to_the_chunk_holding_their_middle_character(late, direct):
    text = "Internationalization matters."
    offsets = direct[0](text, return_offsets_mapping=True)["offset_mapping"]
    assert (13, 20) in offsets, "'##ization' must be one token spanning characters 13-20 for this test to mean anything"
    # Cut at 15: "##ization" starts in the first chunk, but its middle character (16) is in the second.
    spans = [(0, 15), (15, len(text))]
    doc = chunked(text, spans)
    late.embed([doc])
    np.testing.assert_allclose(vectors_of(doc), reference_vectors(direct, text, spans), atol=2e-5)
    # Assigning by first character would put "##ization" in the first chunk (as a cut at 17 does).
    by_first_character = reference_vectors(direct, text, [(0, 17), (17, len(text))])
    assert np.max(np.abs(vectors_of(doc) - by_first_character)) > 1e-3


def test_overlapping_chunks_share_the_tokens_of_their_overlap(late, direct):
    spans = [(0, 120), (80, 200), (160, len(ENGLISH))]
    doc = chunked(ENGLISH, spans)
    late.embed([doc])
    np.testing.assert_allclose(vectors_of(doc), reference_vectors(direct, ENGLISH, spans), atol=2e-5)


def test_document_prefix_tokens_join_the_first_chunk(direct):
    prefixed = LateChunkingEmbedder(device="cpu", document_prefix="passage: ")
    spans = cut_into(ENGLISH, 3)
    doc = chunked(ENGLISH, spans)
    prefixed.embed([doc])
    np.testing.assert_allclose(
        vectors_of(doc), reference_vectors(direct, ENGLISH, spans, prefix="passage: "), atol=2e-5
    )


def test_a_chunk_inside_one_token_or_without_tokens_still_gets_a_vector_and_is_reported():
    embedder = LateChunkingEmbedder(device="cpu")
    text = "Internationalization \u200b\u200b done."
    spans = [(0, 3), (3, 20), (21, 23), (23, len(text))]  # "Int" lies inside a token; "\u200b\u200b" has none
    doc = chunked(text, spans)
    embedder.embed([doc])
    vectors = vectors_of(doc)
    assert np.isfinite(vectors).all() and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert (embedder.chunks_inside_a_token, embedder.chunks_without_tokens) == (1, 1)
    notes = " ".join(embedder.run_notes())
    assert "1 chunk inside a single token" in notes and "1 chunk of only characters the tokenizer drops" in notes


def test_queries_are_embedded_normally(late):
    query = "How many people live in Berlin?"
    np.testing.assert_allclose(late.embed_query(query), HuggingFaceEmbedder(device="cpu").embed_query(query), atol=1e-6)


# -- windows -----------------------------------------------------------------------------------------


def test_a_document_that_fits_one_window_gives_the_same_vectors_through_the_windowed_path(direct):
    spans = cut_into(ENGLISH, 4)
    expected = reference_vectors(direct, ENGLISH, spans)
    for window in (80, 256, 512):  # the document has 75 tokens
        doc = chunked(ENGLISH, spans)
        embedder = LateChunkingEmbedder(device="cpu", window_tokens=window, overlap_tokens=16)
        embedder.embed([doc])
        np.testing.assert_allclose(vectors_of(doc), expected, atol=2e-5)
        assert embedder.windowed_documents == 0


def test_windowed_vectors_stay_closer_to_one_pass_than_naive_ones(direct):
    """64-token windows versus one 300-token pass: the windows keep most of the document context."""
    text = " ".join([ENGLISH] * 4)
    spans = cut_into(text, 12)
    one_pass = reference_vectors(direct, text, spans)
    windowed = LateChunkingEmbedder(device="cpu", window_tokens=64, overlap_tokens=32)
    doc = chunked(text, spans)
    windowed.embed([doc])
    naive = HuggingFaceEmbedder(device="cpu").embed_documents([c.text for c in doc.chunks])
    windowed_similarity = np.sum(vectors_of(doc) * one_pass, axis=1)
    naive_similarity = np.sum(naive * one_pass, axis=1)
    assert (windowed_similarity > naive_similarity).all() and windowed_similarity.min() > 0.8
    assert windowed.windowed_documents == 1
    assert "1 document longer than one 64-token window" in " ".join(windowed.run_notes())
    windowed.begin_run()  # the next run of a long-lived embedder reports only its own documents
    assert windowed.windowed_documents == 0 and not any("late chunking" in note for note in windowed.run_notes())


def _best_window_by_brute_force(token: int, bounds: list[tuple[int, int]], text_count: int) -> int:
    """The window where ``token`` has most context on its thinner side; the earliest on ties."""
    best, best_depth = -1, -1.0
    for index, (start, end) in enumerate(bounds):
        if not start <= token < end:
            continue
        left = token - start if start > 0 else float("inf")
        right = end - 1 - token if end < text_count else float("inf")
        if min(left, right) > best_depth:
            best, best_depth = index, min(left, right)
    return best


@pytest.mark.parametrize("capacity", [4, 7, 10, 16])
def test_window_plan_covers_every_token_once_from_its_best_window(capacity):
    for overlap in range(capacity):
        for text_count in range(0, 5 * capacity):
            windows = plan_windows(text_count, capacity, overlap)
            bounds = [(w.start, w.end) for w in windows]
            owner = np.full(text_count, -1)
            for index, window in enumerate(windows):
                assert window.start <= window.own_start <= window.own_end <= window.end
                assert len(windows) == 1 or window.end - window.start == capacity
                assert (owner[window.own_start : window.own_end] == -1).all(), "a token is owned twice"
                owner[window.own_start : window.own_end] = index
            assert (owner >= 0).all(), f"tokens left out: {np.flatnonzero(owner < 0)}"
            assert all(b[0] < a[1] - overlap + 1 for a, b in zip(bounds, bounds[1:])), (
                "windows share fewer than overlap tokens"
            )
            expected = [_best_window_by_brute_force(t, bounds, text_count) for t in range(text_count)]
            assert owner.tolist() == expected


def test_window_plan_refuses_an_overlap_as_large_as_the_window():
    with pytest.raises(ValueError, match="more than the overlap"):
        plan_windows(100, 8, 8)


# -- tiny random models (plumbing only) ----------------------------------------------------------------


def _save_tiny(folder: Path, model, tokenizer_folder: str, model_max_length: int = 512) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    tokenizer.model_max_length = model_max_length
    tokenizer.save_pretrained(folder)
    return folder


def _tiny_bert(layers: int = 2, hidden: int = 32):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    return BertModel(config).eval()


@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory, minilm_folder) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny") / "tiny-bert", _tiny_bert(), minilm_folder)


@pytest.fixture(scope="module")
def context_free_folder(tmp_path_factory, minilm_folder) -> Path:
    """No layers, no position embeddings: a token's output depends on its id alone."""
    model = _tiny_bert(layers=0)
    with torch.no_grad():
        model.embeddings.position_embeddings.weight.zero_()
    return _save_tiny(tmp_path_factory.mktemp("tiny") / "context-free", model, minilm_folder)


@pytest.fixture(scope="module")
def position_only_folder(tmp_path_factory, minilm_folder) -> Path:
    """No layers, no word embeddings: a token's output tells its position in its window."""
    model = _tiny_bert(layers=0)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.zero_()
        model.embeddings.token_type_embeddings.weight.zero_()
    return _save_tiny(tmp_path_factory.mktemp("tiny") / "position-only", model, minilm_folder)


def test_stitched_windows_count_every_token_once(context_free_folder):
    """With a context-free model, any window plan must give exactly the one-pass vectors."""
    text = " ".join([ENGLISH, CHINESE] * 4)
    spans = cut_into(text, 9)
    one_pass = chunked(text, spans)
    LateChunkingEmbedder(model=str(context_free_folder), device="cpu", window_tokens=512).embed([one_pass])
    for window, overlap in [(12, 0), (12, 5), (16, 4), (33, 20)]:
        doc = chunked(text, spans)
        embedder = LateChunkingEmbedder(
            model=str(context_free_folder), device="cpu", window_tokens=window, overlap_tokens=overlap, batch_size=5
        )
        embedder.embed([doc])
        assert embedder.windowed_documents == 1
        np.testing.assert_allclose(vectors_of(doc), vectors_of(one_pass), atol=1e-5)


def test_each_token_keeps_its_embedding_from_the_window_where_it_has_most_context(position_only_folder):
    from transformers import AutoModel

    window, overlap = 16, 6
    words = [f"w{i}" for i in range(40)]
    text = " ".join(words)
    embedder = LateChunkingEmbedder(
        model=str(position_only_folder), device="cpu", window_tokens=window, overlap_tokens=overlap, normalize=False
    )
    tokens = tokenize_document(embedder.encoder.tokenizer, text)
    starts = tokens.text_starts.tolist()
    # One chunk per text token; first/last chunks also hold [CLS]/[SEP], so only the inner ones are read.
    spans = [(start, end) for start, end in zip(tokens.text_starts.tolist(), tokens.text_ends.tolist())]
    doc = chunked(text, spans)
    embedder.embed([doc])
    ours = vectors_of(doc)

    model = AutoModel.from_pretrained(position_only_folder).eval()
    with torch.inference_mode():
        by_position = model(input_ids=torch.zeros((1, window), dtype=torch.long)).last_hidden_state[0].numpy()
    windows = plan_windows(tokens.text_count, window - tokens.head - tokens.trail, overlap)
    bounds = [(w.start, w.end) for w in windows]
    assert len(windows) >= 3
    for token in range(1, len(starts) - 1):
        position = int(np.argmin(np.linalg.norm(by_position - ours[token], axis=1)))
        assert np.allclose(by_position[position], ours[token], atol=1e-5)
        chosen = [k for k, (start, _) in enumerate(bounds) if start == token - (position - tokens.head)]
        assert chosen == [_best_window_by_brute_force(token, bounds, tokens.text_count)], f"token {token}"


def test_a_20000_token_document_is_fully_covered(tiny_bert_folder):
    rng = random.Random(7)
    vocabulary = ENGLISH.split() + list(CHINESE)
    text = " ".join(rng.choice(vocabulary) for _ in range(19_000))
    parsed = document(text, "long.txt")
    doc = ChunkedDocument(parsed, RecursiveChunker(chunk_size=600, chunk_overlap=100).chunk(parsed))
    embedder = LateChunkingEmbedder(model=str(tiny_bert_folder), device="cpu", batch_size=16)
    tokens = tokenize_document(embedder.encoder.tokenizer, text)
    assert tokens.length > 20_000

    embedder.embed([doc])

    covered = np.zeros(len(text), dtype=bool)
    for chunk in doc.chunks:
        covered[chunk.start : chunk.end] = True
        vector = chunk.vectors["dense"]
        assert vector.shape == (32,) and np.isfinite(vector).all() and abs(np.linalg.norm(vector) - 1) < 1e-5
    uncovered = [i for i in np.flatnonzero(~covered) if not text[i].isspace()]
    assert not uncovered, f"characters outside every chunk: {uncovered[:10]}"
    # The last chunk's tokens lie ~20,000 positions in: truncation would leave them unembedded.
    assert doc.chunks[-1].end == len(text.rstrip())
    # Every position of the sequence is kept from exactly one window.
    windows = plan_windows(tokens.text_count, 512 - tokens.head - tokens.trail, 128)
    kept = np.zeros(tokens.length, dtype=int)
    for item in window_inputs(tokens, windows):
        kept[item.keep_start : item.keep_end] += 1
    assert (kept == 1).all()
    assert embedder.windowed_documents == 1 and embedder.overlap_size() == 128


def test_batching_several_documents_matches_one_at_a_time(tiny_bert_folder):
    texts = [ENGLISH * 9, CHINESE, MIXED, ENGLISH + CHINESE * 6, "Short one."]
    docs_together = [chunked(text, cut_into(text, 3), f"d{i}") for i, text in enumerate(texts)]
    embedder = LateChunkingEmbedder(model=str(tiny_bert_folder), device="cpu", window_tokens=96, batch_size=4)
    embedder.embed(docs_together)
    for i, text in enumerate(texts):
        alone = chunked(text, cut_into(text, 3), f"d{i}")
        LateChunkingEmbedder(model=str(tiny_bert_folder), device="cpu", window_tokens=96, batch_size=1).embed([alone])
        np.testing.assert_allclose(vectors_of(docs_together[i]), vectors_of(alone), atol=1e-5)


def test_cls_pooling_model_gets_cls_queries_and_span_mean_chunks(tmp_path, minilm_folder):
    from transformers import AutoModel, AutoTokenizer, ModernBertConfig, ModernBertModel

    torch.manual_seed(0)
    config = ModernBertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=8192,
        pad_token_id=0,
        bos_token_id=101,
        eos_token_id=102,
        cls_token_id=101,
        sep_token_id=102,
        global_attn_every_n_layers=1,
    )
    folder = _save_tiny(
        tmp_path / "tiny-modernbert", ModernBertModel(config).eval(), minilm_folder, model_max_length=8192
    )
    embedder = LateChunkingEmbedder(model=str(folder), pooling="cls", device="cpu")
    spans = cut_into(ENGLISH, 3)
    doc = chunked(ENGLISH, spans)
    embedder.embed([doc])

    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    expected = reference_vectors((tokenizer, model), ENGLISH, spans)
    np.testing.assert_allclose(vectors_of(doc), expected, atol=2e-5)
    query = tokenizer("where is berlin", return_tensors="pt")
    with torch.inference_mode():
        cls = (
            model(input_ids=query["input_ids"], attention_mask=query["attention_mask"]).last_hidden_state[0, 0].numpy()
        )
    np.testing.assert_allclose(embedder.embed_query("where is berlin"), cls / np.linalg.norm(cls), atol=2e-5)
    assert embedder.window_size() == 8192


def test_window_larger_than_the_model_allows_is_refused(tiny_bert_folder):
    embedder = LateChunkingEmbedder(model=str(tiny_bert_folder), device="cpu", window_tokens=1024)
    with pytest.raises(ValueError, match="window_tokens 1024 exceeds the 512 tokens"):
        embedder.embed([chunked(ENGLISH, cut_into(ENGLISH, 2))])


def test_a_prefix_that_leaves_no_room_names_the_document(tiny_bert_folder):
    embedder = LateChunkingEmbedder(
        model=str(tiny_bert_folder),
        device="cpu",
        window_tokens=12,
        overlap_tokens=3,
        document_prefix="represent this long scientific passage for retrieval: ",
    )
    with pytest.raises(ValueError, match=r"late chunking of reports/q3\.pdf: a 12-token window leaves"):
        embedder.embed([chunked(ENGLISH, cut_into(ENGLISH, 2), "reports/q3.pdf")])


# -- configuration and identity ------------------------------------------------------------------------


def test_registry_resolves_late_to_this_class():
    assert registry.resolve("embedder", "late") is LateChunkingEmbedder


def test_to_dict_from_dict_round_trip():
    embedder = LateChunkingEmbedder(window_tokens=256, overlap_tokens=32, batch_size=8, query_prefix="query: ")
    data = embedder.to_dict()
    assert data == {
        "type": "late",
        "window_tokens": 256,
        "overlap_tokens": 32,
        "batch_size": 8,
        "query_prefix": "query: ",
    }
    again = LateChunkingEmbedder.from_dict(data)
    assert again.config == embedder.config and again.to_dict() == data
    with pytest.raises(ValueError, match="type 'late'"):
        LateChunkingEmbedder.from_dict({**data, "type": "huggingface"})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"window_tokens": 64, "overlap_tokens": 64}, "must be smaller than window_tokens"),
        ({"window_tokens": 4}, "greater than or equal to 8"),
        ({"overlap_tokens": -1}, "greater than or equal to 0"),
        ({"window": 256}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_settings_are_refused(settings, message):
    with pytest.raises(ValidationError, match=message):
        LateChunkingEmbedder(**settings)


def test_model_id_and_fingerprint_tell_late_vectors_from_naive_ones():
    naive, late_default = HuggingFaceEmbedder(), LateChunkingEmbedder()
    assert late_default.model_id == f"{naive.model_id} [late chunking]"
    assert LateChunkingEmbedder(window_tokens=128, overlap_tokens=16).model_id.endswith(
        "[late chunking, window_tokens=128, overlap_tokens=16]"
    )
    assert late_default.fingerprint_settings() != naive.fingerprint_settings()
    assert LateChunkingEmbedder(batch_size=4).fingerprint_settings() == late_default.fingerprint_settings()
    assert LateChunkingEmbedder(window_tokens=128).fingerprint_settings() != late_default.fingerprint_settings()
