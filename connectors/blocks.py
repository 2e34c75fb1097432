"""Blocks: what a parsing route (unstructured, pdfminer, OpenDocument) produces, before the
parser gives them offsets into the document text and heading paths."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# A table's HTML can be megabytes for a spreadsheet; beyond this only its text is kept, so element
# metadata stays small enough to travel between processes and into chunk metadata.
TABLE_HTML_MAX_CHARS = 16_384


@dataclass
class Block:
    text: str
    category: str
    page_number: int | None = None
    depth: int | None = None  # unstructured's category_depth: heading level for Title, nesting for ListItem
    heading_level: int | None = None  # where a Title sits among headings (smaller = outer); None: depth or 0
    heading_markup: bool = False  # the format itself marks it as a heading (Markdown "#", DOCX style)
    metadata: dict[str, Any] = field(default_factory=dict)
