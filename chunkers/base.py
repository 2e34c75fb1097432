"""Chunkers cut a parsed document into spans; the base turns spans into chunks with metadata.

Runners chunk through :meth:`Chunker.plan_batch`: the spans of a document are computed (and
checked) at once, but its :class:`Chunk` objects are built on demand, a range at a time, so a
document with a hundred thousand chunks never has all their texts and metadata in memory.
"""

from __future__ import annotations

from abc import abstractmethod
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import replace
from itertools import accumulate

from chunkers.spans import Span, has_text
from core.component import Component
from core.types import Chunk, Element, ElementTable, ParsedDocument, chunk_id


class Chunker(Component):
    kind = "chunker"

    @abstractmethod
    def split(self, document: ParsedDocument) -> list[tuple[int, int]]:
        """Return half-open character spans [start, end) into ``document.text``, in order."""

    def split_batch(self, documents: Sequence[ParsedDocument]) -> list[list[Span]]:
        """Spans of several documents; model-driven chunkers override it to batch their model work."""
        return [self.split(document) for document in documents]

    def plan(self, document: ParsedDocument) -> ChunkPlan:
        return ChunkPlan(document, self.split(document))

    def plan_batch(self, documents: Sequence[ParsedDocument]) -> list[ChunkPlan]:
        return [
            ChunkPlan(document, spans) for document, spans in zip(documents, self.split_batch(documents), strict=True)
        ]

    def chunk(self, document: ParsedDocument) -> list[Chunk]:
        return self.plan(document).chunks()

    def chunk_batch(self, documents: Sequence[ParsedDocument]) -> list[list[Chunk]]:
        return [plan.chunks() for plan in self.plan_batch(documents)]


class ChunkPlan:
    """A document's chunks as checked spans; :meth:`chunks` builds the Chunk objects of a range.

    Spans that hold only whitespace are dropped here, so chunk ``i`` (its index, id and metadata)
    is the same however the chunks are built: ``chunks(0, n) == chunks(0, k) + chunks(k, n)``.
    The plan keeps what chunk metadata needs of the elements (:class:`ElementIndex`), not the
    elements: their texts are a second copy of the document's, 100 MB for a 100 MB text.
    """

    def __init__(self, document: ParsedDocument, spans: Iterable[tuple[int, int]]):
        text = document.text
        self.spans: list[Span] = []
        for start, end in spans:
            if not (0 <= start < end <= len(text)):
                raise ValueError(
                    f"span ({start}, {end}) lies outside the text of {document.source_id} (length {len(text)})"
                )
            if has_text(text, (start, end)):
                self.spans.append((start, end))
        self.elements = ElementIndex(document.elements)
        self.document = replace(document, elements=())

    def __len__(self) -> int:
        return len(self.spans)

    def chunks(self, start: int = 0, stop: int | None = None) -> list[Chunk]:
        """Chunks ``start`` to ``stop`` (exclusive; default: to the end), each inheriting the page
        numbers and headings of the elements it covers; ``document.text[c.start:c.end] == c.text``."""
        stop = len(self.spans) if stop is None else min(stop, len(self.spans))
        return [self._chunk(index) for index in range(start, stop)]

    def _chunk(self, index: int) -> Chunk:
        document, elements = self.document, self.elements
        start, end = self.spans[index]
        piece = document.text[start:end]
        covered = elements.between(start, end)
        pages = sorted({page for i in covered if (page := elements.pages[i]) is not None})
        # The heading path of the first element the chunk covers says where the chunk starts.
        headings = list(elements.headings[covered[0]]) if covered else []
        metadata = {
            **document.metadata,  # the source's and the parser's facts about the whole document
            "file_name": document.metadata.get("file_name", ""),
            "media_type": document.media_type,
            "page_numbers": pages,
            "headings": headings,
            "categories": sorted({elements.categories[i] for i in covered}),
        }
        return Chunk(
            id=chunk_id(document.source_id, index, start, piece),
            source_id=document.source_id,
            index=index,
            text=piece,
            start=start,
            end=end,
            metadata=metadata,
        )


class ElementIndex:
    """The elements' spans, page numbers, categories and heading paths (what chunk metadata takes
    from them), with the elements overlapping a span found by bisection: scanning every element
    for every chunk, as :meth:`ParsedDocument.elements_between` does, is quadratic (15 s for a
    10 MB text of 20,000 paragraphs)."""

    def __init__(self, elements: Sequence[Element]):
        # Offsets in arrays of 64-bit integers: a Python int in a list costs 36 bytes, not 8.
        if isinstance(elements, ElementTable):  # its columns, without making an Element each
            starts: Sequence[int] = elements.starts
            self.ends = array("q", elements.ends)
            self.pages: Sequence[int | None] = elements.pages
            self.categories: Sequence[str] = elements.categories
            self.headings: Sequence[tuple[str, ...]] = elements.heading_paths
        else:
            starts = array("q", (e.start for e in elements))
            self.ends = array("q", (e.end for e in elements))
            self.pages = [e.page_number for e in elements]
            self.categories = [e.category for e in elements]
            self.headings = [e.heading_path for e in elements]
        self.order = array("q", sorted(range(len(starts)), key=starts.__getitem__))
        self.starts = array("q", (starts[i] for i in self.order))
        # The largest end among the elements up to each position (in start order): every element
        # before the first position whose reach passes a span's start ends at or before it.
        self.reach = array("q", accumulate((self.ends[i] for i in self.order), max))

    def between(self, start: int, end: int) -> list[int]:
        """Positions of the elements overlapping [start, end), in the document's element order."""
        first = bisect_right(self.reach, start)
        last = bisect_left(self.starts, end)
        return sorted(i for i in self.order[first:last] if self.ends[i] > start)


def build_chunks(document: ParsedDocument, spans: Iterable[tuple[int, int]]) -> list[Chunk]:
    """All chunks of the given spans (see :class:`ChunkPlan`); spans of only whitespace are dropped."""
    return ChunkPlan(document, spans).chunks()
