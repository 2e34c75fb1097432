"""Chunkers cut a parsed document into spans; the base turns spans into chunks with metadata."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Sequence

from pipeline.component import Component
from pipeline.types import Chunk, ParsedDocument, chunk_id


class Chunker(Component):
    kind = "chunker"

    @abstractmethod
    def split(self, document: ParsedDocument) -> list[tuple[int, int]]:
        """Return half-open character spans [start, end) into ``document.text``, in order."""

    def chunk(self, document: ParsedDocument) -> list[Chunk]:
        return build_chunks(document, self.split(document))

    def chunk_batch(self, documents: Sequence[ParsedDocument]) -> list[list[Chunk]]:
        """Chunks of several documents; model-driven chunkers override it to batch their model work."""
        return [self.chunk(document) for document in documents]


def build_chunks(document: ParsedDocument, spans: Iterable[tuple[int, int]]) -> list[Chunk]:
    """Chunks for the given spans, each inheriting page numbers and headings of the elements it covers.

    Spans that hold only whitespace are dropped; the rest keep their exact text, so
    ``document.text[c.start:c.end] == c.text`` for every chunk returned.
    """
    text = document.text
    chunks: list[Chunk] = []
    for start, end in spans:
        if not (0 <= start < end <= len(text)):
            raise ValueError(f"span ({start}, {end}) lies outside the text of {document.source_id} (length {len(text)})")
        piece = text[start:end]
        if not piece.strip():
            continue
        index = len(chunks)
        covered = document.elements_between(start, end)
        pages = sorted({e.page_number for e in covered if e.page_number is not None})
        # The heading path of the first element the chunk covers says where the chunk starts.
        headings = list(covered[0].heading_path) if covered else []
        metadata = {
            **document.metadata,  # the source's and the parser's facts about the whole document
            "file_name": document.metadata.get("file_name", ""),
            "media_type": document.media_type,
            "page_numbers": pages,
            "headings": headings,
            "categories": sorted({e.category for e in covered}),
        }
        chunks.append(
            Chunk(
                id=chunk_id(document.source_id, index, start, piece),
                source_id=document.source_id,
                index=index,
                text=piece,
                start=start,
                end=end,
                metadata=metadata,
            )
        )
    return chunks
