"""HuggingFaceEmbedder against the real shipped MiniLM, plus tiny random models for pooling plumbing."""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from core.cpu import reported_features
from core.models import ModelFilesError, read_sentence_transformers_settings, resolve_model_path
from embedders import huggingface
from embedders.huggingface import HuggingFaceEmbedder, ModelLoadError
from embedders.pooling import cls_pool, last_token_pool, max_pool, mean_pool

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"

TEXTS = [
    "Milvus is a vector database.",
    "short",
    "",
    "Late chunking embeds the whole document once and pools token vectors per chunk. " * 3,
    "Ein deutscher Satz über Vektorsuche und Einbettungen.",
    "向量数据库用于检索增强生成。",
    "The quick brown fox jumps over the lazy dog, again and again, until the dog finally wakes up. "
    * 12,  # > 256 tokens
    "RAG",
    "Batched inference pads every text to the longest one in its batch.",
    "x " * 40,
]


@pytest.fixture(scope="module")
def minilm_tokenizer(minilm_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_folder)


@pytest.fixture(scope="module")
def minilm_vectors(minilm) -> np.ndarray:
    """TEXTS embedded with the defaults (one batch: 10 texts of at most 256 tokens fit the CPU's 4,096)."""
    return minilm.embed_documents(TEXTS)


def sentence_transformers_reference(folder: str, texts: list[str]) -> np.ndarray:
    """What the model's own library returns; computed by hand when sentence-transformers is absent."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        from transformers import AutoModel, AutoTokenizer

        tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
        batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(mean, dim=-1).numpy()
    return SentenceTransformer(folder, device="cpu").encode(texts, normalize_embeddings=True, convert_to_numpy=True)


# -- the shipped MiniLM ---------------------------------------------------------------------------


def test_vectors_match_sentence_transformers(minilm, minilm_vectors, minilm_folder):
    ours = minilm_vectors
    reference = sentence_transformers_reference(minilm_folder, TEXTS)
    assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    np.testing.assert_allclose(minilm.embed_query(TEXTS[0]), reference[0], atol=1e-5)


def test_length_sorted_batches_return_input_order(minilm_vectors):
    order = list(range(len(TEXTS)))
    random.Random(7).shuffle(order)
    got = HuggingFaceEmbedder(device="cpu", batch_size=3).embed_documents([TEXTS[i] for i in order])
    np.testing.assert_allclose(got, minilm_vectors[order], atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_batch_size_does_not_change_vectors(minilm_vectors, batch_size):
    got = HuggingFaceEmbedder(device="cpu", batch_size=batch_size).embed_documents(TEXTS)
    np.testing.assert_allclose(got, minilm_vectors, atol=1e-5)


def test_token_budget_batches_keep_both_limits_and_cover_every_text():
    lengths = [5, 300, 40, 40, 41, 7, 7, 7, 7, 7, 1]
    batches = huggingface.token_budget_batches(lengths, max_texts=4, max_tokens=100)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert batches[0] == [1]  # longer than the budget: alone
    for batch in batches:
        assert len(batch) <= 4
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 100
    flat = [lengths[i] for batch in batches for i in batch]
    assert flat == sorted(flat, reverse=True)  # longest first: each batch pads little
    assert [len(b) for b in batches] == [1, 2, 2, 4, 2]


def test_max_batch_tokens_bounds_every_forward_pass(minilm_vectors, minilm_tokenizer, monkeypatch):
    passes: list[list[str]] = []
    real_embed = huggingface.LoadedEncoder.embed

    def spy(self, texts, **options):
        passes.append(list(texts))
        return real_embed(self, texts, **options)

    monkeypatch.setattr(huggingface.LoadedEncoder, "embed", spy)
    got = HuggingFaceEmbedder(device="cpu", max_batch_tokens=64).embed_documents(TEXTS)
    np.testing.assert_allclose(got, minilm_vectors, atol=1e-5)
    assert sorted(text for batch in passes for text in batch) == sorted(TEXTS)
    for batch in passes:
        tokens = [len(ids) for ids in minilm_tokenizer(batch, truncation=True, max_length=256)["input_ids"]]
        assert len(batch) == 1 or len(batch) * max(tokens) <= 64, (batch, tokens)
    assert len(passes) > 2


def test_prefixes_reach_the_model(minilm_tokenizer):
    embedder = HuggingFaceEmbedder(device="cpu", query_prefix="query: ", document_prefix="passage: ")
    seen: list[list[int]] = []

    def record_inputs(module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        seen.extend(row[row_mask.bool()].tolist() for row, row_mask in zip(ids, mask, strict=True))

    handle = embedder.encoder.model.register_forward_pre_hook(record_inputs, with_kwargs=True)
    try:
        query = embedder.embed_query("what is milvus")
        document = embedder.embed_documents(["what is milvus"])[0]
    finally:
        handle.remove()  # the model is shared process-wide
    assert seen == [
        minilm_tokenizer("query: what is milvus")["input_ids"],
        minilm_tokenizer("passage: what is milvus")["input_ids"],
    ]
    assert not np.allclose(query, document, atol=1e-3)
    plain = HuggingFaceEmbedder(device="cpu")
    np.testing.assert_allclose(query, plain.embed_documents(["query: what is milvus"])[0], atol=1e-5)


def test_truncation_is_counted_and_warned_once(caplog):
    embedder = HuggingFaceEmbedder(device="cpu", max_length=16)
    fits = "word " * 14  # 14 tokens + [CLS] + [SEP] = exactly 16: not truncated
    too_long = "word " * 15
    with caplog.at_level(logging.WARNING, logger="rag_pipeline.embed"):
        embedder.embed_documents([fits, too_long, "short", too_long + "more"])
        assert embedder.truncated_texts == 2
        embedder.embed_documents([too_long, fits])
    assert embedder.truncated_texts == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of 4 texts" in warnings[0].getMessage() and "16 tokens" in warnings[0].getMessage()
    assert embedder.run_notes() == [
        f"{MINILM_HUB_ID} ran on torch float32 (CPU features: {reported_features()})",
        f"3 texts longer than {MINILM_HUB_ID}'s 16 tokens were truncated",
    ]
    # A truncated text embeds as its first 16 tokens.
    np.testing.assert_allclose(
        embedder.embed_documents([too_long])[0], embedder.embed_documents(["word " * 14])[0], atol=1e-5
    )


def test_default_max_length_is_the_trained_length(minilm):
    assert minilm.encoder.max_length == 256  # sentence_bert_config.json, not the 512 positions


def test_dimension_and_model_id_without_loading_weights(monkeypatch):
    import transformers  # noqa: F401  (imported up front so the timing below measures our work only)

    def no_loading(*args, **kwargs):
        raise AssertionError("dimension/model_id must not load the model")

    monkeypatch.setattr(huggingface, "load_encoder", no_loading)
    embedder = HuggingFaceEmbedder()
    started = time.monotonic()
    assert embedder.dimension == 384
    assert embedder.model_id == MINILM_HUB_ID
    assert time.monotonic() - started < 2.0
    assert embedder.embed_documents([]).shape == (0, 384)


def test_model_id_names_the_model_not_the_machine(minilm_folder):
    assert HuggingFaceEmbedder(model=MINILM_HUB_ID).model_id == MINILM_HUB_ID
    assert HuggingFaceEmbedder(model=minilm_folder).model_id == MINILM_HUB_ID  # the shipped folder by path
    changed = HuggingFaceEmbedder(pooling="cls", normalize=False, max_length=128, document_prefix="passage: ")
    assert (
        changed.model_id
        == f'{MINILM_HUB_ID} (pooling=cls, normalize=false, max_length=128, document_prefix="passage: ")'
    )
    # Spelling out the model's own conventions, or changing the query side, keeps the identity.
    assert (
        HuggingFaceEmbedder(pooling="mean", normalize=True, max_length=256, query_prefix="q: ").model_id
        == MINILM_HUB_ID
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback of device: auto")
def test_half_precision_falls_back_to_float32_when_auto_finds_no_cuda(minilm_vectors, caplog):
    with caplog.at_level(logging.WARNING, logger="rag_pipeline.embed"):
        got = HuggingFaceEmbedder(dtype="float16").embed_documents(TEXTS)
    assert any("runs in float32" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(got, minilm_vectors, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_vectors_agree_with_cpu(minilm_vectors, dtype):
    got = HuggingFaceEmbedder(device="cuda", dtype=dtype).embed_documents(TEXTS)
    assert got.dtype == np.float32
    cosines = (got * minilm_vectors).sum(axis=1)
    assert cosines.min() > (0.9999 if dtype == "float32" else 0.99)


# -- configuration ----------------------------------------------------------------------------------


def test_to_dict_from_dict_round_trip():
    assert HuggingFaceEmbedder().to_dict() == {"type": "huggingface"}
    embedder = HuggingFaceEmbedder(
        model="all-MiniLM-L6-v2",
        pooling="cls",
        normalize=False,
        max_length=128,
        query_prefix="query: ",
        document_prefix="passage: ",
        batch_size=8,
        device="cpu",
        num_threads=1,
    )
    data = embedder.to_dict()
    assert data == {
        "type": "huggingface",
        "pooling": "cls",
        "normalize": False,
        "max_length": 128,
        "query_prefix": "query: ",
        "document_prefix": "passage: ",
        "batch_size": 8,
        "device": "cpu",
        "num_threads": 1,
    }
    rebuilt = HuggingFaceEmbedder.from_dict(data)
    assert rebuilt.config == embedder.config and rebuilt.to_dict() == data


def test_fingerprint_ignores_speed_and_query_settings():
    base = HuggingFaceEmbedder().fingerprint_settings()
    assert base == {"type": "huggingface", "model": MINILM_HUB_ID}
    assert (
        HuggingFaceEmbedder(
            batch_size=2, max_batch_tokens=512, device="cpu", num_threads=1, query_prefix="q: "
        ).fingerprint_settings()
        == base
    )
    assert HuggingFaceEmbedder(document_prefix="passage: ").fingerprint_settings() != base
    assert HuggingFaceEmbedder(max_length=64).fingerprint_settings() != base


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"device": "cpu", "dtype": "float16"}, "CUDA"),
        ({"pooling": "median"}, "pooling"),
        ({"device": "gpu"}, "device"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_batch_tokens": 0}, "max_batch_tokens"),
        ({"model_name": "x"}, "model_name"),
    ],
)
def test_invalid_settings_are_refused(settings, message):
    with pytest.raises(ValidationError, match=message):
        HuggingFaceEmbedder(**settings)


# -- finding models ---------------------------------------------------------------------------------


def test_missing_local_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "models" / "my-encoder"
    with pytest.raises(ModelLoadError, match="no folder at .*my-encoder"):
        _ = HuggingFaceEmbedder(model=str(missing)).dimension


def test_unknown_hub_id_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no retries
    with pytest.raises(ModelLoadError) as raised:
        _ = HuggingFaceEmbedder(model="nobody/no-such-encoder").dimension
    message = str(raised.value)
    assert "'nobody/no-such-encoder'" in message
    assert "hub may be unreachable" in message
    assert "local folder" in message and "hf download nobody/no-such-encoder" in message


def test_sentence_transformers_modules_it_cannot_apply_are_refused(tmp_path, minilm_folder):
    folder = tmp_path / "with-dense"
    folder.mkdir()
    shutil.copy(Path(minilm_folder) / "config.json", folder / "config.json")
    (folder / "modules.json").write_text(
        '[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},'
        ' {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},'
        ' {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]'
    )
    with pytest.raises(ModelLoadError, match="Dense"):
        _ = HuggingFaceEmbedder(model=str(folder)).dimension


# -- pooling with tiny random models ----------------------------------------------------------------


def _save_tiny_model(folder: Path, config, padding_side: str, **tokenizer_settings) -> Path:
    """A randomly initialised model from ``config`` next to MiniLM's tokenizer, saved as a model folder."""
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path("all-MiniLM-L6-v2"), padding_side=padding_side, **tokenizer_settings
    )
    tokenizer.save_pretrained(folder)
    return folder


def _tiny_bert(folder: Path, tokenizer, padding_side: str = "right") -> Path:
    from transformers import BertConfig

    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return _save_tiny_model(folder, config, padding_side)


def _tiny_gpt2(folder: Path, tokenizer, padding_side: str) -> Path:
    # GPT-2 has absolute positions, so left padding goes wrong unless positions skip the pads.
    from transformers import GPT2Config

    config = GPT2Config(
        vocab_size=tokenizer.vocab_size,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Decoder tokenizers give no token_type_ids (GPT-2 would add them to its input embeddings).
    return _save_tiny_model(folder, config, padding_side, model_input_names=["input_ids", "attention_mask"])


def _alone(folder: Path, texts: list[str], position: int) -> np.ndarray:
    """Each text's token state at ``position``, encoded on its own (no padding at all)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    rows = []
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            rows.append(model(input_ids=ids).last_hidden_state[0, position].numpy())
    return np.stack(rows)


POOLING_TEXTS = ["hi", "a somewhat longer sentence with many more words in it", "three words here", "one two"]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_cls_pooling_picks_the_first_real_token(tmp_path, minilm_tokenizer, padding_side, capfd):
    folder = _tiny_bert(tmp_path / "tiny-bert", minilm_tokenizer, padding_side)
    embedder = HuggingFaceEmbedder(model=str(folder), pooling="cls", normalize=False, batch_size=4, device="cpu")
    capfd.readouterr()
    got = embedder.embed_documents(POOLING_TEXTS)
    assert "Loading weights" not in capfd.readouterr().err  # no progress bar when stderr is not a terminal
    np.testing.assert_allclose(got, _alone(folder, POOLING_TEXTS, 0), atol=1e-5)
    mean = HuggingFaceEmbedder(model=str(folder), pooling="mean", normalize=False, device="cpu").embed_documents(
        POOLING_TEXTS
    )
    assert not np.allclose(got, mean, atol=1e-3)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_last_token_pooling_on_a_decoder(tmp_path, minilm_tokenizer, padding_side):
    folder = _tiny_gpt2(tmp_path / "tiny-gpt2", minilm_tokenizer, padding_side)
    embedder = HuggingFaceEmbedder(model=str(folder), pooling="last", batch_size=4, device="cpu")
    assert embedder.encoder.tokenizer.padding_side == padding_side
    got = embedder.embed_documents(POOLING_TEXTS)
    expected = _alone(folder, POOLING_TEXTS, -1)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_local_model_id_is_machine_independent(tmp_path, minilm_tokenizer):
    first = _tiny_bert(tmp_path / "machine-a" / "tiny-bert", minilm_tokenizer)
    second = tmp_path / "machine-b" / "tiny-bert"
    shutil.copytree(first, second)
    embedder = HuggingFaceEmbedder(model="tiny-bert")
    embedder.base_dir = tmp_path / "machine-a"  # relative model paths are read from the spec's folder
    model_id = embedder.model_id
    assert model_id.startswith("tiny-bert@") and str(tmp_path) not in model_id
    assert HuggingFaceEmbedder(model=str(second)).model_id == model_id
    config = second / "config.json"
    config.write_text(config.read_text().replace('"num_attention_heads": 4', '"num_attention_heads": 2'))
    assert HuggingFaceEmbedder(model=str(second)).model_id != model_id


# -- pooling functions on hand-made tensors -----------------------------------------------------------


def _padded(side: str) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Two texts of 3 and 1 real tokens, padded to 3 on ``side``; also the unpadded states."""
    real = [torch.tensor([[1.0, -2.0], [3.0, 0.0], [-1.0, 5.0]]), torch.tensor([[4.0, -4.0]])]
    pad = torch.full((2, 2), 99.0)
    short = torch.cat([real[1], pad]) if side == "right" else torch.cat([pad, real[1]])
    hidden = torch.stack([real[0], short])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]] if side == "right" else [[1, 1, 1], [0, 0, 1]])
    return hidden, mask, real


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize(
    "pooler, by_hand",
    [
        (mean_pool, lambda states: states.mean(dim=0)),
        (max_pool, lambda states: states.max(dim=0).values),
        (cls_pool, lambda states: states[0]),
        (last_token_pool, lambda states: states[-1]),
    ],
)
def test_pooling_ignores_padding_on_either_side(pooler, by_hand, side):
    hidden, mask, real = _padded(side)
    pooled = pooler(hidden, mask)
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled, torch.stack([by_hand(states) for states in real]))


@pytest.mark.parametrize(
    ("filename", "content"),
    [
        ("1_Pooling/config.json", "[1, 2]"),
        ("sentence_bert_config.json", '"max_seq_length"'),
        ("config_sentence_transformers.json", "[]"),
        ("modules.json", '["Pooling"]'),
    ],
)
def test_a_model_settings_file_of_the_wrong_shape_is_named_not_an_attribute_error(tmp_path, filename, content):
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert read_sentence_transformers_settings(str(tmp_path)).pooling == "mean"
    (tmp_path / filename).write_text(content)
    with pytest.raises(ModelFilesError, match=filename.split("/")[-1]):
        read_sentence_transformers_settings(str(tmp_path))
