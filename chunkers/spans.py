"""Span arithmetic shared by the character and token chunkers.

A span is a half-open character range ``(start, end)`` into ``ParsedDocument.text``. Chunkers here
never assemble chunk text: they compute spans from positions in the document and the text is sliced
from it, so ``text[start:end]`` is the chunk by construction, however often a paragraph repeats.

The shared plan (:func:`plan_spans`):

1. ``split_on_headings``: cut the document into sections, one starting at each heading element, so
   no chunk spans two sections;
2. ``respect_elements``: within a section, treat each element as an unbreakable piece, merge
   consecutive small ones up to the chunk size, and hand only oversized elements to the chunker's
   own splitter; otherwise the splitter gets the whole section;
3. trim whitespace at both ends of every span (the span shrinks; its text is still exact).
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import groupby

from pydantic import Field, model_validator

from core.component import ComponentConfig
from core.types import ParsedDocument

Span = tuple[int, int]
# Size of text[start:end] in the chunker's unit (characters or tokens).
Measure = Callable[[int, int], int]
# A chunker's own way of cutting one region that is too large into spans.
RegionSplitter = Callable[[Span], Iterable[Span]]

# \S is exactly "not str.isspace()", so a span is blank for it exactly when its text strips to "".
_NON_SPACE = re.compile(r"\S")

# unstructured's category for headings; a new section starts at each of them.
HEADING_CATEGORIES = frozenset({"Title"})


class SpanChunkingConfig(ComponentConfig):
    """Settings every span chunker shares; subclasses set the defaults of the two sizes."""

    chunk_size: int = Field(gt=0, description="Largest chunk, in the chunker's unit.")
    chunk_overlap: int = Field(
        ge=0, description="How much of the end of a chunk the next one repeats, in the same unit."
    )
    strip_whitespace: bool = Field(
        True, description="Trim whitespace at both ends of each chunk (the span shrinks, it stays exact)."
    )
    respect_elements: bool = Field(
        False,
        description="Never cut inside a parsed element unless it alone exceeds chunk_size; small consecutive elements "
        "are merged.",
    )
    split_on_headings: bool = Field(
        False, description="Start a new chunk at every heading: no chunk spans two sections."
    )

    @model_validator(mode="after")
    def _overlap_smaller_than_size(self) -> SpanChunkingConfig:
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError(
                f"chunk_overlap ({self.chunk_overlap}) must be smaller than chunk_size ({self.chunk_size}); "
                "otherwise a chunk could repeat all of the previous one and the split would never advance"
            )
        return self


def char_length(start: int, end: int) -> int:
    return end - start


def merge_pieces(pieces: Iterable[Span], limit: int, overlap: int, measure: Measure) -> Iterator[Span]:
    """Greedily join consecutive pieces into spans no larger than ``limit``.

    When a piece no longer fits, the current span is emitted and the next one starts with the
    trailing pieces of it that together measure at most ``overlap`` (and still leave room for the
    new piece). This is the merge rule of LangChain's text splitters, applied to positions: the size
    of a run is measured on the real text between its first and last piece, separators included.
    Pieces are consumed as they come and spans yielded as they close, so a document of millions of
    words never has its words listed at once.
    """
    run: deque[Span] = deque()
    for piece in pieces:
        if run and measure(run[0][0], piece[1]) > limit:
            yield run[0][0], run[-1][1]
            while run and (measure(run[0][0], run[-1][1]) > overlap or measure(run[0][0], piece[1]) > limit):
                run.popleft()
        run.append(piece)
    if run:
        yield run[0][0], run[-1][1]


def pack_pieces(
    pieces: Iterable[Span], limit: int, overlap: int, measure: Measure, split_oversized: RegionSplitter
) -> Iterator[Span]:
    """Merge runs of pieces that fit; cut each piece that does not fit with ``split_oversized``."""
    for fits, run in groupby(pieces, key=lambda piece: measure(*piece) <= limit):
        if fits:
            yield from merge_pieces(run, limit, overlap, measure)
        else:
            for piece in run:
                yield from split_oversized(piece)


def checked_elements(document: ParsedDocument) -> list[Span]:
    """Element spans in text order, clipped so they do not overlap; bad offsets are an error."""
    length = len(document.text)
    spans: list[Span] = []
    for number, element in enumerate(document.elements):
        if not 0 <= element.start <= element.end <= length:
            raise ValueError(
                f"element {number} ({element.category}) of {document.source_id} has offsets "
                f"({element.start}, {element.end}) outside its text (length {length})"
            )
        spans.append((element.start, element.end))
    spans.sort()
    clipped: list[Span] = []
    for start, end in spans:
        start = max(start, clipped[-1][1]) if clipped else start
        if start < end:
            clipped.append((start, end))
    return clipped


def heading_sections(document: ParsedDocument) -> list[Span]:
    """The text cut at the start of every heading element: [0, h1), [h1, h2), ..., [hn, len)."""
    cuts = sorted(
        {e.start for e in document.elements if e.category in HEADING_CATEGORIES and 0 < e.start < len(document.text)}
    )
    bounds = [0, *cuts, len(document.text)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if a < b]


def element_blocks(text: str, elements: Sequence[Span], region: Span) -> list[Span]:
    """The unbreakable pieces of a region: its elements, plus any text no element covers.

    ``elements`` are non-overlapping spans in text order (see :func:`checked_elements`). Text
    between elements that is not whitespace (a parser may leave some out) becomes a block of its
    own, so respecting elements never drops text.
    """
    low, high = region
    blocks: list[Span] = []
    cursor = low
    # The first element that ends after the region starts; elements are sorted by start and end.
    first = bisect_right(elements, low, key=lambda span: span[1])
    for start, end in elements[first:]:
        if start >= high:
            break
        start, end = max(start, low), min(end, high)
        blocks.extend(_uncovered_text(text, cursor, start))
        blocks.append((start, end))
        cursor = end
    blocks.extend(_uncovered_text(text, cursor, high))
    return blocks


def _uncovered_text(text: str, start: int, end: int) -> list[Span]:
    """The gap between two elements as a block, without its surrounding whitespace; none if blank."""
    start, end = trim_whitespace(text, (start, end))
    return [(start, end)] if start < end else []


def trim_whitespace(text: str, span: Span) -> Span:
    start, end = span
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def plan_spans(
    document: ParsedDocument, config: SpanChunkingConfig, measure: Measure, split_region: RegionSplitter
) -> list[Span]:
    """The chunk spans of a document: sections, then elements, then the chunker's own splitter."""
    text = document.text
    regions = heading_sections(document) if config.split_on_headings else [(0, len(text))]
    elements = checked_elements(document) if config.respect_elements else []

    def region_spans() -> Iterator[Span]:
        for region in regions:
            if config.respect_elements:
                blocks = element_blocks(text, elements, region)
                yield from pack_pieces(blocks, config.chunk_size, config.chunk_overlap, measure, split_region)
            else:
                yield from split_region(region)

    # Spans are tidied as the splitter yields them: only the kept spans are ever listed.
    return tidy_spans(text, region_spans(), config.strip_whitespace)


def has_text(text: str, span: Span) -> bool:
    """Whether ``text[start:end]`` holds a non-whitespace character (searched in place, no copy)."""
    return _NON_SPACE.search(text, *span) is not None


def tidy_spans(text: str, spans: Iterable[Span], strip_whitespace: bool) -> list[Span]:
    """Trim (when asked), then drop spans that hold only whitespace or lie inside a neighbour.

    A chunk inside its neighbour adds no text. It happens when the overlap carried into a chunk is
    followed only by whitespace, or when trimming leaves a chunk that the next one starts alike.
    What remains has strictly increasing starts and ends.
    """
    tidy: list[Span] = []
    for span in spans:
        if strip_whitespace:
            span = trim_whitespace(text, span)
        start, end = span
        if not has_text(text, span):
            continue
        if tidy and tidy[-1][0] <= start and end <= tidy[-1][1]:
            continue
        while tidy and start <= tidy[-1][0] and tidy[-1][1] <= end:
            tidy.pop()
        tidy.append(span)
    return tidy
