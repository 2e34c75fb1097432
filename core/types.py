"""The data that flows between stages.

source (bytes + identity) -> parsed document (text + elements with offsets) -> chunks (exact spans
of the parsed text) -> vectors attached per chunk. Every offset is a character offset into
``ParsedDocument.text``; the invariant ``doc.text[c.start:c.end] == c.text`` holds for every chunk.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any


def sha256_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class SourceRef:
    """A listed item, before its content is read: identity plus a cheap change signal."""

    source_id: str  # stable across runs and machines, e.g. "docs/guide/intro.md"
    uri: str  # where the bytes live, e.g. "file:///srv/docs/guide/intro.md"
    media_type: str  # e.g. "text/markdown"
    size: int
    change_signal: str  # cheap, connector-specific (size + mtime, ETag, blob hash)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SourceDocument:
    """A source whose bytes have been read."""

    source_id: str
    uri: str
    media_type: str
    content_hash: str  # sha256 of the bytes; two files with equal bytes keep distinct source ids
    content: bytes = field(repr=False)
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_ref(cls, ref: SourceRef, content: bytes) -> SourceDocument:
        return cls(
            source_id=ref.source_id,
            uri=ref.uri,
            media_type=ref.media_type,
            content_hash=sha256_hex(content),
            content=content,
            metadata=dict(ref.metadata),
        )


@dataclass(frozen=True)
class Element:
    """One structural piece of a parsed document (title, paragraph, table, list item ...)."""

    text: str
    category: str  # unstructured's category names: Title, NarrativeText, Table, ListItem, ...
    start: int  # offsets into ParsedDocument.text
    end: int
    page_number: int | None = None
    heading_path: tuple[str, ...] = ()  # enclosing headings, outermost first
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ParsedDocument:
    source_id: str
    uri: str
    media_type: str
    content_hash: str
    text: str
    elements: tuple[Element, ...]
    metadata: dict[str, Any] = field(default_factory=dict)  # file_name, language, ...

    def elements_between(self, start: int, end: int) -> list[Element]:
        """Elements overlapping the half-open character range [start, end)."""
        return [e for e in self.elements if e.start < end and e.end > start]


def chunk_id(source_id: str, index: int, start: int, text: str) -> str:
    """Deterministic chunk id: the same source, position and content give the same id on any run."""
    return sha256_hex(f"{source_id}\x1f{index}\x1f{start}\x1f{text}")[:32]


@dataclass
class Chunk:
    id: str
    source_id: str
    index: int  # position of the chunk within its document
    text: str
    start: int  # character span into ParsedDocument.text
    end: int
    metadata: dict[str, Any] = field(default_factory=dict)  # page_numbers, headings, file_name ...
    vectors: dict[str, Any] = field(default_factory=dict, repr=False)  # field name -> vector


@dataclass
class ChunkedDocument:
    """A parsed document together with its chunks: the unit the embed and store stages receive."""

    document: ParsedDocument
    chunks: list[Chunk]
