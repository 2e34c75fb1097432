"""The data that flows between stages.

source (bytes + identity) -> parsed document (text + elements with offsets) -> chunks (exact spans
of the parsed text) -> vectors attached per chunk. Every offset is a character offset into
``ParsedDocument.text``; the invariant ``doc.text[c.start:c.end] == c.text`` holds for every chunk.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload


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


class ElementTable(Sequence[Element]):
    """A document's elements as columns, each :class:`Element` (its text a slice of the document
    text) made when it is read. A parsed document of many small elements keeps every element's text
    a second time beside the document text; this keeps the offsets and the rest, and cuts the
    texts from the one document text on demand. It reads, compares and pickles as the tuple of
    elements it stands for. Build it with :meth:`of`, which keeps the elements as they are unless
    each one's text is exactly its slice of ``text``."""

    def __init__(
        self,
        text: str,
        columns: tuple[
            Sequence[str],
            Sequence[int],
            Sequence[int],
            Sequence[int | None],
            Sequence[tuple[str, ...]],
            Sequence[dict[str, Any]],
        ],
    ):
        self.text = text
        self.categories, self.starts, self.ends, self.pages, self.heading_paths, self.metadata = columns

    @classmethod
    def of(cls, text: str, elements: Sequence[Element]) -> ElementTable | tuple[Element, ...]:
        if not all(text[e.start : e.end] == e.text for e in elements):
            return tuple(elements)
        return cls(
            text,
            (
                [e.category for e in elements],
                array("q", (e.start for e in elements)),
                array("q", (e.end for e in elements)),
                [e.page_number for e in elements],
                [e.heading_path for e in elements],
                [e.metadata for e in elements],
            ),
        )

    def __len__(self) -> int:
        return len(self.starts)

    @overload
    def __getitem__(self, index: int) -> Element: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Element, ...]: ...
    def __getitem__(self, index: int | slice) -> Element | tuple[Element, ...]:
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("element index out of range")
        start, end = self.starts[index], self.ends[index]
        return Element(
            self.text[start:end],
            self.categories[index],
            start,
            end,
            self.pages[index],
            self.heading_paths[index],
            self.metadata[index],
        )

    def __iter__(self) -> Iterator[Element]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (ElementTable, tuple, list)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # as unhashable as the elements' metadata dicts

    def __repr__(self) -> str:
        return f"ElementTable({len(self)} elements)"

    def __reduce__(self) -> tuple[Any, ...]:
        columns = (self.categories, list(self.starts), list(self.ends), self.pages, self.heading_paths, self.metadata)
        return (_element_table, (self.text, columns))


def _element_table(text: str, columns: Any) -> ElementTable:
    categories, starts, ends, pages, heading_paths, metadata = columns
    return ElementTable(text, (categories, array("q", starts), array("q", ends), pages, heading_paths, metadata))


@dataclass(frozen=True)
class ParsedDocument:
    source_id: str
    uri: str
    media_type: str
    content_hash: str
    text: str
    elements: Sequence[Element]  # a tuple, or an ElementTable (the same elements, texts cut on demand)
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
