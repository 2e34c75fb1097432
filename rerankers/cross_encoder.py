"""Cross-encoder reranking with any Hugging Face sequence-classification model.

``model`` is a hub id (``cross-encoder/ms-marco-MiniLM-L-6-v2``, ``BAAI/bge-reranker-v2-m3``) or a
local folder (relative to the spec) holding a model saved with ``save_pretrained``. The query and
the passage are encoded together; passages longer than ``max_length`` tokens (with the query) are
cut from their end, never the query, and counted.

Scores: the logit for single-output models (the usual cross-encoder head); for two-class models,
the log-probability of the last class ("relevant"). Both are higher-is-better.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from core.component import require
from core.onnx_models import Backend, Quantization, runtime_model
from rerankers.base import Reranker, RerankerConfig, RerankerError


class CrossEncoderConfig(RerankerConfig):
    model: str = Field(
        ..., min_length=1, description="Hub id or local folder of a sequence-classification cross-encoder."
    )
    max_length: int = Field(512, ge=16, description="Tokens per (query, passage) pair; passages are truncated to fit.")
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with the weights (only for models you trust)."
    )
    backend: Backend = Field(
        "torch",
        description="torch, onnx (ONNX Runtime on a graph exported once into the cache; CPU only) or auto (the "
        "faster of the two, timed once per machine). A model that cannot be exported runs with torch.",
    )
    quantize: Quantization = Field(
        "none", description="int8: the linear layers' weights in int8 (onnx backend); scores change slightly."
    )

    @model_validator(mode="after")
    def _int8_needs_onnx(self) -> CrossEncoderConfig:
        if self.quantize == "int8" and self.backend == "torch":
            raise ValueError("quantize: int8 runs on the onnx backend; set backend: onnx (or auto)")
        return self


@dataclass(frozen=True)
class _LoadedCrossEncoder:
    tokenizer: Any
    model: Any  # the torch model or its ONNX graph (core.onnx_models), called alike
    tokenizer_lock: threading.Lock  # fast tokenizers mutate their truncation state per call
    runtime: str  # "torch float32", "onnx int8", ...


_models: dict[tuple[Any, ...], _LoadedCrossEncoder] = {}
# Pairs traced to export a graph (different lengths, so the batch holds padding), and timed by backend: auto.
_EXPORT_PAIRS = (("a query", "A short passage."), ("a longer query here", "A longer passage, so that the batch pads."))
_TIMING_PAIR = ("what do retrieval systems embed", " ".join(["Retrieval systems embed each passage."] * 20))
_models_lock = threading.Lock()


class CrossEncoderReranker(Reranker):
    type_name = "cross-encoder"
    Config = CrossEncoderConfig
    config: CrossEncoderConfig

    def __init__(self, config: CrossEncoderConfig | dict[str, Any] | None = None, /, **settings: Any):
        super().__init__(config, **settings)
        self.truncated_pairs = 0
        self._loaded: _LoadedCrossEncoder | None = None
        self._lock = threading.Lock()

    def model_location(self) -> str:
        local = self.resolve_path(self.config.model)
        return str(local.resolve()) if local.is_dir() else self.config.model

    @property
    def model_id(self) -> str:
        location = self.model_location()
        return Path(location).name if Path(location).is_dir() else location

    def _model(self) -> _LoadedCrossEncoder:
        with self._lock:
            if self._loaded is None:
                config = self.config
                key = (self.model_location(), config.device, config.trust_remote_code, config.backend, config.quantize)
                with _models_lock:
                    if key not in _models:
                        _models[key] = self._load(*key)
                    self._loaded = _models[key]
            return self._loaded

    @property
    def runtime(self) -> str:
        """What runs the model ("torch float32", "onnx int8", ...); loads it."""
        return self._model().runtime

    def _load(
        self, location: str, device: str, trust_remote_code: bool, backend: Backend, quantize: Quantization
    ) -> _LoadedCrossEncoder:
        transformers = require("transformers", purpose="cross-encoder reranking")
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                location, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as exc:
            reason = " ".join(str(exc).split())[:300]
            where = (
                "local folder"
                if Path(location).is_dir()
                else "Hugging Face hub id (the hub may be unreachable from here)"
            )
            raise RerankerError(
                f"cross-encoder {self.config.model!r} cannot be loaded as a {where}: {reason}. Download it where the "
                f"hub is reachable (hf download {self.config.model} --local-dir <folder>) and set model: to that folder"
            ) from exc
        model.to(device).eval()

        def pairs(examples: Sequence[tuple[str, str]]) -> dict[str, Any]:
            queries, passages = zip(*examples, strict=True)
            batch = tokenizer(list(queries), list(passages), padding=True, return_tensors="pt")
            return dict(batch)

        runner, runtime = runtime_model(
            model,
            backend=backend,
            quantize=quantize,
            cache_key=(location, "sequence-classification", trust_remote_code),
            sample_inputs=lambda: pairs(_EXPORT_PAIRS),
            timing_inputs=lambda: pairs([_TIMING_PAIR] * 8),
            torch_only="" if device == "cpu" else f"the onnx backend runs on a CPU, and this model runs on {device}",
            label=f"cross-encoder {self.config.model!r}",
        )
        return _LoadedCrossEncoder(tokenizer, runner, threading.Lock(), runtime)

    def score(self, query: str, passages: Sequence[str]) -> list[float]:
        if not passages:
            return []
        torch = require("torch", purpose="cross-encoder reranking")
        loaded = self._model()
        scores: list[float] = []
        for start in range(0, len(passages), self.config.batch_size):
            batch = list(passages[start : start + self.config.batch_size])
            with loaded.tokenizer_lock:
                full = loaded.tokenizer([query] * len(batch), batch, truncation=False)["input_ids"]
                # Cut passages, not the query; only a query that fills half the window is cut too.
                query_tokens = len(loaded.tokenizer(query, truncation=False)["input_ids"])
                strategy = "only_second" if query_tokens <= self.config.max_length // 2 else "longest_first"
                inputs = loaded.tokenizer(
                    [query] * len(batch),
                    batch,
                    padding=True,
                    truncation=strategy,
                    max_length=self.config.max_length,
                    return_tensors="pt",
                )
            truncated = sum(len(ids) > self.config.max_length for ids in full)
            self.truncated_pairs += truncated
            inputs = {name: tensor.to(self.config.device) for name, tensor in inputs.items()}
            with torch.inference_mode():
                logits = loaded.model(**inputs)[0].float()  # the logits, from torch and ONNX alike
            if logits.shape[-1] == 1:
                scores.extend(logits[:, 0].tolist())
            else:
                scores.extend(torch.log_softmax(logits, dim=-1)[:, -1].tolist())
        return scores
