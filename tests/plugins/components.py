"""Minimal components for testing the spec machinery and the runner without heavy models.

Importable only through the allow-list (``allowed_modules=["tests.plugins"]``), which is itself
part of what the spec tests check.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from chunkers.base import Chunker
from connectors.base import ParseFailure, Parser, Source
from core.component import ComponentConfig
from core.types import Element, ParsedDocument, SourceDocument, SourceRef
from embedders.base import Embedder
from tests.plugins.memory_store import MemoryStore


class MemorySource(Source):
    """Documents given inline in the spec: {name: text}."""

    type_name = "memory"

    class Config(ComponentConfig):
        documents: dict[str, str] = Field(default_factory=dict)
        namespace: str = "mem"
        signal_suffix: str = ""  # changes every change signal without changing content (a "touch")
        fail_listing_after: int | None = None  # raise after listing this many documents

    def list(self) -> Iterator[SourceRef]:
        for position, name in enumerate(sorted(self.config.documents)):
            if position == self.config.fail_listing_after:
                raise ConnectionError("listing interrupted")
            data = self.config.documents[name].encode()
            signal = f"{hashlib.sha256(data).hexdigest()[:16]}{self.config.signal_suffix}"
            yield SourceRef(
                f"{self.scope}{name}", f"memory:{name}", "text/plain", len(data), signal, {"file_name": name}
            )

    def read(self, ref: SourceRef) -> bytes:
        name = ref.source_id[len(self.scope) :]
        text = self.config.documents[name]
        if text == "<unreadable>":
            raise PermissionError(f"{name}: permission denied")
        return text.encode()

    @property
    def scope(self) -> str:
        return f"{self.config.namespace}/"


class LineParser(Parser):
    """One element per non-empty line; special contents trigger failures for the runner tests."""

    type_name = "lines"

    class Config(ComponentConfig):
        mode: Literal["strict", "lenient"] = "strict"

    def parse(self, document: SourceDocument) -> ParsedDocument:
        text = document.content.decode()
        if text == "<corrupt>":
            raise ParseFailure("corrupt file: no lines could be read")
        if text == "<crash>":
            raise RuntimeError("parser bug")
        if text == "<hang>":
            time.sleep(600)
        if text == "<exit>":
            import os

            os._exit(7)
        lines = [line for line in text.splitlines() if line.strip()]
        joined, elements, cursor = "", [], 0
        for line in lines:
            if joined:
                joined += "\n\n"
                cursor += 2
            elements.append(Element(line, "NarrativeText", cursor, cursor + len(line)))
            joined += line
            cursor += len(line)
        return ParsedDocument(
            document.source_id,
            document.uri,
            document.media_type,
            document.content_hash,
            joined,
            tuple(elements),
            {"file_name": document.metadata.get("file_name", "")},
        )


class ElementChunker(Chunker):
    type_name = "elements"

    class Config(ComponentConfig):
        chunk_size: int = Field(100, ge=1)
        fail_on: str | None = None

    def split(self, document: ParsedDocument) -> list[tuple[int, int]]:
        if self.config.fail_on and self.config.fail_on in document.text:
            raise ValueError(f"cannot chunk text containing {self.config.fail_on!r}")
        return [(e.start, e.end) for e in document.elements]

    def split_batch(self, documents):
        self.batches = [*getattr(self, "batches", []), len(documents)]
        return super().split_batch(documents)


class HashEmbedder(Embedder):
    """Deterministic pseudo-embeddings from a hash: plumbing only, says nothing about quality."""

    type_name = "hash"

    class Config(ComponentConfig):
        dimension: int = Field(8, ge=2)
        fail_on: str | None = None
        languages: list[str] | None = None  # what the "model" claims to cover (core.language codes)

    @property
    def dimension(self) -> int:
        return self.config.dimension

    def languages(self) -> frozenset[str] | None:
        return frozenset(self.config.languages) if self.config.languages is not None else None

    @property
    def model_id(self) -> str:
        return f"hash-{self.config.dimension}"

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        if self.config.fail_on and any(self.config.fail_on in t for t in texts):
            raise ValueError(f"cannot embed text containing {self.config.fail_on!r}")
        return np.stack([self.embed_query(t) for t in texts])

    def embed_query(self, text: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        vector = np.random.default_rng(seed).standard_normal(self.config.dimension).astype(np.float32)
        return vector / np.linalg.norm(vector)


def base_spec(**overrides) -> dict:
    spec = {
        "version": 1,
        "name": "t",
        "stages": {
            "source": {"type": "tests.plugins.components:MemorySource", "documents": {"a.txt": "alpha\nbeta"}},
            "parser": {"type": "tests.plugins.components:LineParser"},
            "chunker": {"type": "tests.plugins.components:ElementChunker"},
            "embedder": {"type": "tests.plugins.components:HashEmbedder"},
            "store": {"type": "tests.plugins.components:MemoryStore"},
        },
        "runner": {"parse_workers": 0, "progress": "never", "failures_file": ""},
    }
    spec.update(overrides)
    return spec


PLUGINS = ["tests.plugins"]
__all__ = ["PLUGINS", "MemoryStore", "Path", "base_spec"]
