"""OpenDocument presentations (.odp) and spreadsheets (.ods), read from their content.xml.

unstructured reads OpenDocument text (.odt) only, by converting it with pandoc, which has no
reader for the other two. Both are a zip package whose ``content.xml`` holds every slide or
sheet (ODF 1.2 Part 1), so the standard library reads them:

* a presentation gives its slides' text in document order, ``page_number`` = slide number; a
  frame of class ``title`` is the slide's heading, list paragraphs are list items. Speaker notes
  are left out, as unstructured leaves out PPTX notes by default.
* a spreadsheet gives one Table element per sheet: rows on lines, cells separated by tabs, its
  HTML in ``text_as_html`` (as for XLSX), ``page_number`` = sheet number.
"""

from __future__ import annotations

import html
import io
import zipfile
import zlib
from collections.abc import Iterator
from typing import Literal
from xml.etree import ElementTree

from connectors.base import ParseFailure
from connectors.blocks import TABLE_HTML_MAX_CHARS, Block

Kind = Literal["presentation", "spreadsheet"]
EXTENSIONS: dict[str, Kind] = {"odp": "presentation", "otp": "presentation", "ods": "spreadsheet", "ots": "spreadsheet"}
_LABELS = {"presentation": "ODP", "spreadsheet": "ODS"}
_MEDIA_TYPE_PREFIX = b"application/vnd.oasis.opendocument."

_OFFICE = "{urn:oasis:names:tc:opendocument:xmlns:office:1.0}"
_TEXT = "{urn:oasis:names:tc:opendocument:xmlns:text:1.0}"
_TABLE = "{urn:oasis:names:tc:opendocument:xmlns:table:1.0}"
_DRAW = "{urn:oasis:names:tc:opendocument:xmlns:drawing:1.0}"
_PRESENTATION = "{urn:oasis:names:tc:opendocument:xmlns:presentation:1.0}"
_PARAGRAPHS = (f"{_TEXT}p", f"{_TEXT}h")

# A cell or row repeated a million times is how spreadsheets pad a sheet, so repeats are
# expanded only between filled cells; these caps stop a small crafted file from asking for
# billions of filled cells.
MAX_FILLED_CELLS = 2_000_000
_MAX_SPACES = 1_000  # text:s c="..." (a run of spaces)


def opendocument_kind(content: bytes, extension: str) -> Kind | None:
    """presentation or spreadsheet, from the package's own ``mimetype`` entry (which the format
    puts first and uncompressed, at a fixed offset) or else from the file extension."""
    if content.startswith(b"PK\x03\x04") and content[30:38] == b"mimetype":
        declared = content[38:120]
        for kind in ("presentation", "spreadsheet"):
            if declared.startswith(_MEDIA_TYPE_PREFIX + kind.encode()):
                return kind
    return EXTENSIONS.get(extension)


def opendocument_blocks(content: bytes, kind: Kind, keep_html: bool) -> list[Block]:
    label = _LABELS[kind]
    body = _content_body(content, label).find(f"{_OFFICE}{kind}")
    if body is None:
        raise ParseFailure(f"corrupt {label}: content.xml holds no {kind}")
    if kind == "presentation":
        return [
            block for number, page in enumerate(body.findall(f"{_DRAW}page"), start=1) for block in _slide(page, number)
        ]
    return [
        _sheet_block(table, number, keep_html) for number, table in enumerate(body.findall(f"{_TABLE}table"), start=1)
    ]


def _content_body(content: bytes, label: str) -> ElementTree.Element:
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as package:
            names = set(package.namelist())
            if "META-INF/manifest.xml" in names and b"encryption-data" in package.read("META-INF/manifest.xml"):
                raise ParseFailure(f"encrypted {label}: it needs a password to open")
            if "content.xml" not in names:
                raise ParseFailure(f"corrupt {label}: the package has no content.xml")
            xml = package.read("content.xml")
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # no zip, or a damaged entry
        raise ParseFailure(f"corrupt {label}: not a valid zip container ({exc})") from exc
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as exc:
        raise ParseFailure(f"corrupt {label}: content.xml is not well-formed XML ({exc})") from exc
    body = root.find(f"{_OFFICE}body")
    if body is None:
        raise ParseFailure(f"corrupt {label}: content.xml has no office:body")
    return body


# -- text -------------------------------------------------------------------------------------


def _count(element: ElementTree.Element, attribute: str, cap: int) -> int:
    try:
        return max(1, min(int(element.get(attribute, "1")), cap))
    except ValueError:
        return 1


def _paragraphs(element: ElementTree.Element) -> Iterator[ElementTree.Element]:
    """The paragraphs inside an element (in lists too), in order; not those of comments."""
    for child in element:
        if child.tag in _PARAGRAPHS:
            yield child
        elif child.tag != f"{_OFFICE}annotation":
            yield from _paragraphs(child)


def _inline_text(element: ElementTree.Element) -> str:
    """A paragraph's text: spans and links flattened, ODF's space/tab/line-break elements
    written out, footnotes and comments (which sit inside the paragraph) left out."""
    parts = [element.text or ""]
    for child in element:
        if child.tag == f"{_TEXT}s":
            parts.append(" " * _count(child, f"{_TEXT}c", _MAX_SPACES))
        elif child.tag == f"{_TEXT}tab":
            parts.append("\t")
        elif child.tag == f"{_TEXT}line-break":
            parts.append("\n")
        elif child.tag not in (f"{_TEXT}note", f"{_OFFICE}annotation"):
            parts.append(_inline_text(child))
        parts.append(child.tail or "")
    return "".join(parts)


# -- presentations ----------------------------------------------------------------------------


def _slide(page: ElementTree.Element, number: int) -> Iterator[Block]:
    for frame_or_text, category in _slide_paragraphs(page, "NarrativeText"):
        if category == "Title":
            text = " ".join(" ".join(_inline_text(p).split()) for p in _paragraphs(frame_or_text))
            yield Block(text, "Title", page_number=number, heading_level=0, heading_markup=True)
        else:
            yield Block(_inline_text(frame_or_text), category, page_number=number)


def _slide_paragraphs(element: ElementTree.Element, category: str) -> Iterator[tuple[ElementTree.Element, str]]:
    """(paragraph, its category) in document order, or (title frame, "Title") for a slide title."""
    for child in element:
        if child.tag == f"{_PRESENTATION}notes":
            continue
        if child.tag == f"{_DRAW}frame" and child.get(f"{_PRESENTATION}class") == "title":
            yield child, "Title"
        elif child.tag in _PARAGRAPHS:
            yield child, category
        else:
            yield from _slide_paragraphs(child, "ListItem" if child.tag == f"{_TEXT}list" else category)


# -- spreadsheets -----------------------------------------------------------------------------


def _rows(element: ElementTree.Element) -> Iterator[ElementTree.Element]:
    """table:table-row elements, also those grouped in header-rows, row-groups and rows."""
    for child in element:
        if child.tag == f"{_TABLE}table-row":
            yield child
        elif child.tag in (f"{_TABLE}table-header-rows", f"{_TABLE}table-row-group", f"{_TABLE}table-rows"):
            yield from _rows(child)


def _cell_text(cell: ElementTree.Element) -> str:
    paragraphs = [_inline_text(p) for p in _paragraphs(cell)]
    if paragraphs:
        return "\n".join(paragraphs).strip()
    # Some writers store only the value; LibreOffice always writes the displayed text as well.
    for attribute in ("value", "date-value", "time-value", "boolean-value", "string-value"):
        if (value := cell.get(f"{_OFFICE}{attribute}")) is not None:
            return value
    return ""


def _too_large(sheet: str) -> ParseFailure:
    return ParseFailure(f"spreadsheet too large: sheet {sheet!r} has over {MAX_FILLED_CELLS:,} cells")


def _row_cells(row: ElementTree.Element, sheet: str) -> list[str]:
    """The row's cells up to its last filled one; repeated empty cells only as gaps."""
    cells: list[str] = []
    pending_empty = 0
    for cell in row:
        if cell.tag not in (f"{_TABLE}table-cell", f"{_TABLE}covered-table-cell"):
            continue
        repeat = _count(cell, f"{_TABLE}number-columns-repeated", MAX_FILLED_CELLS)
        text = _cell_text(cell)
        if not text:
            pending_empty += repeat
            continue
        if len(cells) + pending_empty + repeat > MAX_FILLED_CELLS:  # checked before the lists are built
            raise _too_large(sheet)
        cells.extend([""] * pending_empty + [text] * repeat)
        pending_empty = 0
    return cells


def _sheet_rows(table: ElementTree.Element, sheet: str) -> list[list[str]]:
    rows: list[list[str]] = []
    filled = 0
    for row in _rows(table):
        cells = _row_cells(row, sheet)
        if not cells:
            continue  # empty rows, including the padding out to the sheet's last row
        repeat = _count(row, f"{_TABLE}number-rows-repeated", MAX_FILLED_CELLS)
        filled += len(cells) * repeat
        if filled > MAX_FILLED_CELLS:
            raise _too_large(sheet)
        rows.extend([cells] * repeat)  # the same row object repeated: no copies
    return rows


def _sheet_block(table: ElementTree.Element, number: int, keep_html: bool) -> Block:
    name = table.get(f"{_TABLE}name", "")
    rows = _sheet_rows(table, name)
    metadata: dict[str, object] = {"sheet_name": name}
    if keep_html and rows:
        table_html = _table_html(rows)
        if len(table_html) <= TABLE_HTML_MAX_CHARS:
            metadata["text_as_html"] = table_html
    text = "\n".join("\t".join(cells) for cells in rows)
    return Block(text, "Table", page_number=number, metadata=metadata)


def _table_html(rows: list[list[str]]) -> str:
    width = max(len(cells) for cells in rows)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells + [""] * (width - len(cells))) + "</tr>"
        for cells in rows
    )
    return f"<table>{body}</table>"
