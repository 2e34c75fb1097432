"""Which class a spec's ``type:`` names, without importing anything that is not allowed.

Three ways to name a component, checked in this order:
1. a built-in short name (``recursive``, ``milvus``);
2. a name registered by an installed package under the entry-point group ``rag_pipeline.<kind>s``
   (e.g. ``[project.entry-points."rag_pipeline.chunkers"] mine = "my_pkg.chunk:MyChunker"``);
3. an import path ``package.module:ClassName``, only when ``package.module`` (or a parent package)
   is in the caller's allow-list (``allowed_modules=`` / ``--allow-module`` /
   ``RAG_PIPELINE_ALLOWED_MODULES``). A spec cannot allow modules for itself.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from functools import cache
from importlib.metadata import entry_points
from typing import cast

from core.component import Component
from core.errors import ComponentNotFound

KINDS = ("source", "parser", "chunker", "embedder", "store", "sparse", "reranker")

BUILTINS: dict[str, dict[str, str]] = {
    "source": {
        "local": "connectors.local:LocalDirectorySource",
        "jsonl": "connectors.jsonl:JsonlSource",
        "object-store": "connectors.object_store:ObjectStoreSource",
        "web": "connectors.web:WebSource",
        "git": "connectors.git:GitSource",
    },
    "parser": {
        "unstructured": "connectors.parsing:UnstructuredParser",
    },
    "chunker": {
        "recursive": "chunkers.recursive:RecursiveChunker",
        "token": "chunkers.token:TokenChunker",
        "ppl": "chunkers.meta:PerplexityChunker",
        "margin": "chunkers.meta:MarginSamplingChunker",
    },
    "embedder": {
        "huggingface": "embedders.huggingface:HuggingFaceEmbedder",
        "late": "embedders.late:LateChunkingEmbedder",
        "openai": "embedders.api:OpenAIEmbedder",
        "cohere": "embedders.api:CohereEmbedder",
        "jina": "embedders.api:JinaEmbedder",
        "voyage": "embedders.api:VoyageEmbedder",
        "mixedbread": "embedders.api:MixedbreadEmbedder",
    },
    "store": {
        "milvus": "stores.milvus:MilvusStore",
    },
    "sparse": {
        "splade": "embedders.sparse:SpladeEncoder",
    },
    "reranker": {
        "cross-encoder": "rerankers.cross_encoder:CrossEncoderReranker",
        "query-likelihood": "rerankers.query_likelihood:QueryLikelihoodReranker",
    },
}

BASE_CLASSES = {
    "source": "connectors.base:Source",
    "parser": "connectors.base:Parser",
    "chunker": "chunkers.base:Chunker",
    "embedder": "embedders.base:Embedder",
    "store": "stores.base:Store",
    "sparse": "embedders.sparse:SparseEncoder",
    "reranker": "rerankers.base:Reranker",
}

ALLOWED_MODULES_ENV = "RAG_PIPELINE_ALLOWED_MODULES"


def _load(target: str) -> object:
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr)


@cache
def _entry_point_targets(kind: str) -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=f"rag_pipeline.{kind}s")}


def allowed_modules_from_env() -> list[str]:
    return [m.strip() for m in os.environ.get(ALLOWED_MODULES_ENV, "").split(",") if m.strip()]


def _is_allowed(module_name: str, allowed: Iterable[str]) -> bool:
    return any(module_name == a or module_name.startswith(a + ".") for a in allowed)


def known_names(kind: str) -> list[str]:
    return sorted(set(BUILTINS[kind]) | set(_entry_point_targets(kind)))


def resolve(kind: str, name: str, allowed_modules: Iterable[str] = ()) -> type[Component]:
    """The component class for ``name``; raises ComponentNotFound with the choices otherwise."""
    if kind not in KINDS:
        raise ComponentNotFound(f"unknown component kind {kind!r}; expected one of {', '.join(KINDS)}")
    if name in BUILTINS[kind]:
        target = BUILTINS[kind][name]
    elif name in _entry_point_targets(kind):
        target = _entry_point_targets(kind)[name]
    elif ":" in name:
        module_name = name.partition(":")[0]
        allowed = list(allowed_modules) + allowed_modules_from_env()
        if not _is_allowed(module_name, allowed):
            raise ComponentNotFound(
                f"{name!r} is an import path, and module {module_name!r} is not allowed; allow it with "
                f"--allow-module {module_name} (or {ALLOWED_MODULES_ENV}={module_name}), or register it "
                f"under the entry-point group rag_pipeline.{kind}s"
            )
        target = name
    else:
        raise ComponentNotFound(f"unknown {kind} type {name!r}; known: {', '.join(known_names(kind))}")
    try:
        cls = _load(target)
    except (ImportError, AttributeError) as exc:
        raise ComponentNotFound(f"{kind} type {name!r} ({target}) cannot be loaded: {exc}") from exc
    base = cast(type[Component], _load(BASE_CLASSES[kind]))  # every kind's base class is a Component
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ComponentNotFound(
            f"{kind} type {name!r} ({target}) is not a subclass of {base.__module__}.{base.__name__}"
        )
    return cls
