"""The parse stage: bytes in, text with structure out, using unstructured and a few native paths.

Routes, by file name (then by unstructured's own file-type detection):

* plain text (``.txt`` and other text/plain): a native paragraph splitter by default. Text is the
  commonest bulk format and unstructured classifies every paragraph with spaCy heuristics, which
  is slow; ``text_parser: unstructured`` opts back in.
* Markdown: unstructured's partitioner when its ``md`` extra is installed, else a native parser
  (headings, lists, code, tables) so Markdown works on a minimal install (``markdown_parser``).
* OpenDocument presentations and spreadsheets (``.odp``, ``.ods``), which unstructured cannot
  read: a native reader of their content.xml (:mod:`connectors.opendocument`).
* everything else (PDF, DOCX, PPTX, XLSX, HTML, EML, MSG, EPUB, ODT, RTF, CSV, JSON ...):
  unstructured, offline (see :mod:`connectors.unstructured_setup`), PDFs with the ``fast``
  (pdfminer) strategy by default. Around it: Office Open XML files are repaired in memory
  first (Strict OOXML, DOCX text boxes: :mod:`connectors.office`), legacy DOC/PPT files are
  converted by LibreOffice when it is installed, and a PDF that unstructured returns empty has
  its text layer read by pdfminer directly (:mod:`connectors.pdf_text`) before it is called a scan.

The parsed text is the elements' texts joined with a blank line, so every element has exact
offsets into it. ``heading_path`` comes from the headings above an element (itself included when
it is a heading). Which ``Title`` elements count as headings is decided by :class:`HeadingRule`:
unstructured's English heuristics also label whole Chinese paragraphs ``Title``, and letting those
open sections would give every paragraph its own "heading".

unstructured is imported lazily: this module is imported by the main process and by every parser
worker, and most of them never need it for plain text.
"""

from __future__ import annotations

import codecs
import importlib.util
import io
import logging
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import Field, field_validator

from connectors.base import EmptyDocument, ParseFailure, Parser, empty_document
from connectors.blocks import TABLE_HTML_MAX_CHARS, Block
from core.component import ComponentConfig, MissingDependencyError
from core.types import Element, ParsedDocument, SourceDocument

ELEMENT_SEPARATOR = "\n\n"
TEXT_EXTENSIONS = frozenset({"txt", "text", "log"})
MARKDOWN_EXTENSIONS = frozenset({"md", "markdown", "mdown", "mkd"})

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")
_CJK_SENTENCE_MARKS = re.compile(r"[。，；！？、]")
_SENTENCE_END = (".", ",", ";", "。", "，", "；", "、")

log = logging.getLogger("rag_pipeline.parser")


# -- headings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadingRule:
    """Which Title blocks open a section.

    A Title is a heading when the format marks it as one (a Markdown ``#``/setext heading, a DOCX
    "Heading N"/"Title" style), or when it *looks* like one: at most ``max_chars`` characters
    (a third of that when it contains CJK characters, which carry about a word each), not ending
    like a sentence (``.`` ``,`` ``;`` ``。`` ...) and, for CJK text, with no sentence punctuation
    (``。，；！？、``) anywhere. unstructured's Title heuristic is tuned for English and labels most
    Chinese paragraphs Title; those fail the shape test and become NarrativeText (their metadata
    keeps ``"demoted_from": "Title"``). ``?`` and ``:`` endings are allowed ("What is RAG?").
    """

    max_chars: int = 120

    def is_heading(self, text: str, markup: bool) -> bool:
        return markup or self.looks_like_heading(text)

    def looks_like_heading(self, text: str) -> bool:
        text = text.strip()
        if not text or text.endswith(_SENTENCE_END):
            return False
        if _CJK.search(text):
            return len(text) <= self.max_chars // 3 and not _CJK_SENTENCE_MARKS.search(text)
        return len(text) <= self.max_chars


class HeadingStack:
    """The enclosing headings while walking a document top to bottom."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, str]] = []

    def open(self, level: int, text: str) -> None:
        while self._stack and self._stack[-1][0] >= level:
            self._stack.pop()
        self._stack.append((level, " ".join(text.split())))

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(text for _, text in self._stack)


# -- assembling the parsed document ----------------------------------------------------------


def assemble(
    document: SourceDocument, blocks: Iterable[Block], rule: HeadingRule, metadata: dict[str, Any]
) -> ParsedDocument:
    """Join block texts with exact offsets, decide headings, and build the ParsedDocument."""
    parts: list[str] = []
    elements: list[Element] = []
    headings = HeadingStack()
    cursor = 0
    for block in blocks:
        text = block.text.strip()
        if not text:
            continue
        category, element_metadata = block.category, dict(block.metadata)
        if category == "Title":
            if rule.is_heading(text, block.heading_markup):
                level = block.heading_level if block.heading_level is not None else block.depth or 0
                headings.open(level, text)
            else:
                category, element_metadata["demoted_from"] = "NarrativeText", "Title"
        if block.depth is not None:
            element_metadata.setdefault("category_depth", block.depth)
        if parts:
            parts.append(ELEMENT_SEPARATOR)
            cursor += len(ELEMENT_SEPARATOR)
        parts.append(text)
        elements.append(
            Element(text, category, cursor, cursor + len(text), block.page_number, headings.path, element_metadata)
        )
        cursor += len(text)
    if not elements:
        raise ParseFailure("no text: the document is empty or contains only whitespace")
    pages = [e.page_number for e in elements if e.page_number is not None]
    if pages:
        metadata["page_count"] = max(pages)
    return ParsedDocument(
        source_id=document.source_id,
        uri=document.uri,
        media_type=document.media_type,
        content_hash=document.content_hash,
        text="".join(parts),
        elements=tuple(elements),
        metadata=metadata,
    )


# -- text decoding ----------------------------------------------------------------------------

_BOMS = (  # UTF-32 before UTF-16: the UTF-32-LE BOM starts with the UTF-16-LE one
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def _wide_encoding_without_bom(data: bytes) -> str | None:
    """UTF-16/32 without a BOM, told apart by where the zero bytes of ASCII characters fall."""
    sample = data[:4096]
    if len(sample) < 4 or b"\x00" not in sample:
        return None
    if len(data) % 4 == 0:
        quads = [sample[i : i + 4] for i in range(0, len(sample) - 3, 4)]
        if sum(q[1:] == b"\x00\x00\x00" for q in quads) > len(quads) / 2:
            return "utf-32-le"
        if sum(q[:3] == b"\x00\x00\x00" for q in quads) > len(quads) / 2:
            return "utf-32-be"
    if len(data) % 2 == 0:
        odd_zeros = sample[1::2].count(0)
        even_zeros = sample[0::2].count(0)
        half = len(sample) // 2
        if odd_zeros > half * 0.3 and even_zeros < half * 0.05:
            return "utf-16-le"
        if even_zeros > half * 0.3 and odd_zeros < half * 0.05:
            return "utf-16-be"
    return None


def decode_text(data: bytes, encoding: str | None = None) -> tuple[str, str]:
    """Decode text bytes; returns (text, encoding used). Raises ParseFailure when it cannot.

    With no ``encoding`` given: a byte-order mark, else strict UTF-8, else BOM-less UTF-16/32
    (recognised by their zero bytes), else charset-normalizer's best guess (cp1252, ISO-8859-x,
    GB18030, Shift-JIS ...).
    """
    if encoding:
        try:
            return data.decode(encoding), encoding
        except (UnicodeDecodeError, LookupError) as exc:
            raise ParseFailure(f"cannot decode the text as {encoding}: {exc}") from exc
    for bom, name in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(name), name
            except UnicodeDecodeError:
                break  # a BOM-like prefix on something else: keep detecting
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    wide = _wide_encoding_without_bom(data)
    if wide:
        try:
            return data.decode(wide), wide
        except UnicodeDecodeError:
            pass
    if b"\x00" in data[:8192]:
        raise ParseFailure("binary content, not text: cannot detect a text encoding")
    from charset_normalizer import from_bytes

    candidates = list(from_bytes(data))
    if not candidates:
        raise ParseFailure("cannot detect the text encoding; set the parser's `encoding` option")
    # On short Western European text, charset-normalizer often ranks a rare DOS or Baltic code
    # page (cp775, cp1257) above Windows-1252 although they decode the bytes equally cleanly.
    # Windows-1252 is by far the commonest legacy encoding, so it wins such ties.
    least_chaos = min(c.chaos for c in candidates)
    windows_1252 = [c for c in candidates if c.encoding == "cp1252" and c.chaos <= least_chaos + 0.01]
    chosen = windows_1252[0] if windows_1252 else candidates[0]
    return str(chosen), chosen.encoding


# unstructured's own guess picks windows-1250 for Windows-1252 HTML and ignores <meta charset>:
# for these text formats the encoding is decided here and handed to it.
DECODED_BY_US = frozenset({"HTML", "XML", "CSV", "TSV", "RST", "ORG", "JSON", "NDJSON"})
_DECLARED_CHARSET = re.compile(rb"""(?:charset|encoding)\s*=\s*["']?\s*([A-Za-z0-9._:-]+)""", re.IGNORECASE)


def markup_encoding(data: bytes) -> str:
    """The encoding of an HTML/XML/CSV file: a BOM, else a declared charset that decodes the
    bytes cleanly (``<meta charset>``, ``<?xml encoding?>``), else detection (decode_text)."""
    if not any(data.startswith(bom) for bom, _ in _BOMS):
        declared = _DECLARED_CHARSET.search(data[:4096])
        if declared:
            name = declared.group(1).decode("ascii")
            try:
                data.decode(name)
                return codecs.lookup(name).name
            except (LookupError, UnicodeDecodeError):
                pass  # a wrong or unknown declaration: detect instead
    return decode_text(data)[1]


# -- native routes ----------------------------------------------------------------------------

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\f\v]*\n")


_QUOTES = "\"'“”‘’«»「」『』()（）[]"
_PLAIN_TITLE_MAX_CHARS = 60


def _plain_text_title(paragraph: str, following: str, rule: HeadingRule) -> bool:
    """A short single line, followed by a longer paragraph, that is neither a sentence nor a line
    of dialogue: "CHAPTER I" and "Turning the Heap" are titles, '"Are you coming?"' is not."""
    if "\n" in paragraph or len(paragraph) > _PLAIN_TITLE_MAX_CHARS or len(following) <= len(paragraph):
        return False
    if paragraph[0] in _QUOTES or not any(c.isalpha() for c in paragraph):
        return False
    return not paragraph.rstrip(_QUOTES).endswith(("!", "?", ":", "…", "！", "？", "：")) and rule.looks_like_heading(
        paragraph
    )


def text_blocks(text: str, rule: HeadingRule) -> list[Block]:
    """Paragraphs split on blank lines; short heading-like lines become Titles, so plain-text
    documents still get sections (see _plain_text_title)."""
    paragraphs = [p.strip() for p in _PARAGRAPH_BREAK.split(text.replace("\r\n", "\n").replace("\r", "\n"))]
    paragraphs = [p for p in paragraphs if p]
    blocks = []
    for i, paragraph in enumerate(paragraphs):
        following = paragraphs[i + 1] if i + 1 < len(paragraphs) else ""
        title = _plain_text_title(paragraph, following, rule)
        blocks.append(Block(paragraph, "Title" if title else "NarrativeText", heading_level=0 if title else None))
    return blocks


class MarkdownBlocks:
    """A small line-based Markdown reader: ATX and setext headings, fenced code, lists, tables,
    paragraphs and YAML front matter (skipped). Used when unstructured's ``md`` extra is missing
    (or ``markdown_parser: native``), and to find which Titles are real headings."""

    _ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
    _SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
    _FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
    _LIST_ITEM = re.compile(r"^ {0,3}(?:[-*+]|\d{1,9}[.)])[ \t]+")
    _TABLE_ROW = re.compile(r"^ {0,3}\|")
    _RULE = re.compile(r"^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
    _INLINE = (
        (re.compile(r"!\[([^\]]*)\]\([^)]*\)"), r"\1"),  # image -> alt text
        (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),  # link -> link text
        (re.compile(r"(\*\*|__)(.+?)\1"), r"\2"),
        (re.compile(r"(?<![\w*])([*_])(?!\s)(.+?)(?<!\s)\1(?![\w*])"), r"\2"),
        (re.compile(r"`([^`]+)`"), r"\1"),
    )

    def __init__(self, text: str):
        self.lines = without_front_matter(text).split("\n")

    @classmethod
    def plain(cls, text: str) -> str:
        for pattern, replacement in cls._INLINE:
            text = pattern.sub(replacement, text)
        return " ".join(text.split())

    def blocks(self) -> list[Block]:
        return list(self._read())

    def heading_texts(self) -> set[str]:
        return {b.text for b in self._read() if b.category == "Title"}

    def _read(self) -> Iterator[Block]:
        lines, i = self.lines, 0
        paragraph: list[str] = []

        def flush() -> Iterator[Block]:
            if paragraph:
                yield Block(self.plain(" ".join(paragraph)), "NarrativeText")
                paragraph.clear()

        while i < len(lines):
            line = lines[i]
            if fence := self._FENCE.match(line):
                yield from flush()
                marker, code = fence.group(1), []
                i += 1
                while i < len(lines) and not lines[i].lstrip().startswith(marker):
                    code.append(lines[i])
                    i += 1
                yield Block("\n".join(code), "CodeSnippet")
            elif atx := self._ATX.match(line):
                yield from flush()
                level = len(atx.group(1)) - 1
                yield Block(
                    self.plain(atx.group(2) or ""), "Title", depth=level, heading_level=level, heading_markup=True
                )
            elif paragraph and (setext := self._SETEXT.match(line)) and not self._LIST_ITEM.match(line):
                text = self.plain(" ".join(paragraph))
                paragraph.clear()
                level = 0 if setext.group(1)[0] == "=" else 1
                yield Block(text, "Title", depth=level, heading_level=level, heading_markup=True)
            elif not line.strip() or self._RULE.match(line):
                yield from flush()
            elif self._TABLE_ROW.match(line):
                yield from flush()
                rows = []
                while i < len(lines) and self._TABLE_ROW.match(lines[i]):
                    rows.append(lines[i].strip())
                    i += 1
                yield Block("\n".join(r for r in rows if not set(r) <= set("|-: \t")), "Table")
                continue
            elif item := self._LIST_ITEM.match(line):
                yield from flush()
                parts = [line[item.end() :]]
                while i + 1 < len(lines) and self._continues_item(lines[i + 1]):
                    i += 1
                    parts.append(lines[i])
                yield Block(self.plain(" ".join(parts)), "ListItem")
            else:
                paragraph.append(line.strip())
            i += 1
        yield from flush()

    @classmethod
    def _continues_item(cls, line: str) -> bool:
        """An indented, non-blank line that is not itself a new item continues a list item."""
        return bool(line.strip()) and line.startswith((" ", "\t")) and not cls._LIST_ITEM.match(line)


def without_front_matter(markdown: str) -> str:
    """The Markdown with normalised newlines and without a leading YAML front-matter block."""
    lines = markdown.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[0].strip() == "---":
        for end in range(1, len(lines)):
            if lines[end].strip() in ("---", "..."):
                return "\n".join(lines[end + 1 :])
    return "\n".join(lines)


# -- the parser -------------------------------------------------------------------------------

Strategy = Literal["fast", "auto", "hi_res", "ocr_only"]


class UnstructuredParser(Parser):
    type_name = "unstructured"

    class Config(ComponentConfig):
        strategy: Strategy = Field(
            "fast",
            description=(
                "PDF/image strategy. fast: the PDF text layer (pdfminer), no models; auto: fast, "
                "falling back to OCR for pages without text; ocr_only: tesseract OCR (needs the "
                "tesseract binary); hi_res: layout model (needs its weights from the Hugging Face hub)"
            ),
        )
        languages: list[str] = Field(
            default_factory=lambda: ["eng"],
            description=(
                "document languages as ISO 639-3 codes (eng, deu, zho ...) or ['auto']; used for OCR "
                "and unstructured's text heuristics. A fixed list skips language detection (~30% faster)"
            ),
        )
        encoding: str | None = Field(
            None, description="text encoding; None detects it (BOM, UTF-8, UTF-16/32, charset-normalizer)"
        )
        text_parser: Literal["native", "unstructured"] = Field(
            "native", description="plain text: native paragraph split (fast) or unstructured's partition_text (spaCy)"
        )
        markdown_parser: Literal["auto", "native", "unstructured"] = Field(
            "auto",
            description="Markdown: auto uses unstructured when its md extra is installed, else the native reader",
        )
        max_heading_chars: int = Field(
            120, gt=0, description="a Title longer than this (a third for CJK) is not a heading"
        )
        table_html: bool = Field(True, description="keep a table's HTML (text_as_html) in its element metadata")
        email_attachments: bool = Field(
            False,
            description=(
                "also parse the attachments of .eml/.msg files into the email's text; off by default "
                "because one attachment that cannot be parsed (an image without OCR) fails the whole email"
            ),
        )

        @field_validator("languages")
        @classmethod
        def _languages_not_empty(cls, value: list[str]) -> list[str]:
            if not value or any(not v.strip() for v in value):
                raise ValueError("languages must list at least one language code (or 'auto')")
            return value

    config: Config

    @property
    def heading_rule(self) -> HeadingRule:
        return HeadingRule(self.config.max_heading_chars)

    def check(self) -> list[str]:
        """Problems that would fail every document of some type, found without parsing anything."""
        from connectors.unstructured_setup import spacy_model_name

        problems = []
        try:
            spacy_model_name()
        except MissingDependencyError as exc:
            problems.append(f"parser: {exc}")
        if self.config.strategy in ("ocr_only", "auto") and not shutil.which("tesseract"):
            what = "every PDF" if self.config.strategy == "ocr_only" else "scanned PDFs and images"
            problems.append(
                f"parser: strategy {self.config.strategy} needs tesseract for {what}; install tesseract-ocr"
            )
        if self.config.strategy == "hi_res":
            problems.append(
                "parser: strategy hi_res downloads its layout model from the Hugging Face hub on first use; "
                "without access (or a filled HF cache) every PDF fails after retries"
            )
        self._warn_without_libreoffice()
        return problems

    @staticmethod
    def _warn_without_libreoffice() -> None:
        """Say that .doc/.ppt files will fail. A warning, not a problem: a problem stops
        `validate` and the run, and most corpora have no legacy Office files at all."""
        from connectors.office import LIBREOFFICE_INSTALL_HINT, libreoffice_command

        if libreoffice_command() is None:
            log.warning(
                "parser: legacy .doc and .ppt files will fail: LibreOffice (soffice) is not installed; %s",
                LIBREOFFICE_INSTALL_HINT,
            )

    # -- parse -----------------------------------------------------------------------------

    def parse(self, document: SourceDocument) -> ParsedDocument:
        # imported here: these modules build on this one's Block
        from connectors.opendocument import opendocument_blocks, opendocument_kind

        file_name = _file_name(document)
        extension = PurePosixPath(file_name).suffix.lower().lstrip(".")
        # What the source knows (relative path, commit, ETag, URL ...) travels on to every chunk.
        metadata: dict[str, Any] = {**document.metadata, "file_name": file_name}
        try:
            if not document.content:
                raise EmptyDocument("empty file (0 bytes)")
            if extension in TEXT_EXTENSIONS or (not extension and document.media_type == "text/plain"):
                blocks = self._text(document.content, metadata)
            elif extension in MARKDOWN_EXTENSIONS or document.media_type == "text/markdown":
                blocks = self._markdown(document.content, file_name, metadata)
            elif (kind := opendocument_kind(document.content, extension)) is not None:
                metadata["parser"] = "native-opendocument"
                blocks = opendocument_blocks(document.content, kind, self.config.table_html)
            else:
                blocks = self._unstructured(document.content, file_name, metadata)
        except EmptyDocument as exc:  # indexed with no chunks, so an emptied file loses its old ones
            return empty_document(document, str(exc), metadata)
        return assemble(document, blocks, self.heading_rule, metadata)

    def _decode(self, content: bytes, metadata: dict[str, Any]) -> str:
        text, encoding = decode_text(content, self.config.encoding)
        metadata["encoding"] = encoding
        if not text.strip():
            raise EmptyDocument("no text: the document is empty or contains only whitespace")
        return text

    def _text(self, content: bytes, metadata: dict[str, Any]) -> list[Block]:
        text = self._decode(content, metadata)
        if self.config.text_parser == "native":
            metadata["parser"] = "native-text"
            return text_blocks(text, self.heading_rule)
        metadata["parser"] = "unstructured"
        return _UnstructuredCall(self.config, metadata["file_name"], content).text(text, metadata)

    def _markdown(self, content: bytes, file_name: str, metadata: dict[str, Any]) -> list[Block]:
        text = self._decode(content, metadata)
        mode = self.config.markdown_parser
        if mode == "auto":
            mode = "unstructured" if _unstructured_markdown_available() else "native"
        if mode == "native":
            metadata["parser"] = "native-markdown"
            return MarkdownBlocks(text).blocks()
        metadata["parser"] = "unstructured"
        return _UnstructuredCall(self.config, file_name, content).markdown(text, metadata)

    def _unstructured(self, content: bytes, file_name: str, metadata: dict[str, Any]) -> list[Block]:
        call = _UnstructuredCall(self.config, file_name, content)
        file_type = call.detect()
        if file_type == "TXT":
            return self._text(content, metadata)
        if file_type == "MD":
            return self._markdown(content, file_name, metadata)
        metadata["parser"] = "unstructured"
        return call.partition(metadata)


def _file_name(document: SourceDocument) -> str:
    name = document.metadata.get("file_name")
    if isinstance(name, str) and name:
        return name
    return PurePosixPath(document.source_id).name or document.source_id


def _unstructured_markdown_available() -> bool:
    return importlib.util.find_spec("unstructured") is not None and importlib.util.find_spec("markdown") is not None


# What unstructured's PDF path imports, measured module by module. Checked up front because
# without pikepdf unstructured silently returns no text, and `unstructured[pdf]` cannot be used:
# it pulls a CUDA torch through unstructured-inference -> timm/torchvision.
PDF_MODULES = (
    "pdfminer",
    "pikepdf",
    "pi_heif",
    "pdf2image",
    "pypdf",
    "unstructured_inference",
    "cv2",
    "onnx",
    "onnxruntime",
    "matplotlib",
    "scipy",
    "huggingface_hub",
    "pandas",
)
PDF_INSTALL_HINT = (
    "pip install --no-deps unstructured-inference==1.6.14 && pip install pdfminer.six pikepdf pi-heif pdf2image "
    "'pypdf<7' opencv-python-headless onnx onnxruntime matplotlib scipy huggingface_hub pandas torch==2.13.0"
)


# -- the unstructured side ------------------------------------------------------------------


class _UnstructuredCall:
    """One document's trip through unstructured: type checks, the partition call, error mapping."""

    def __init__(self, config: UnstructuredParser.Config, file_name: str, content: bytes):
        self.config = config
        self.file_name = file_name
        self.content = content
        self.file_type: Any = None
        self.damage: str | None = None  # why the file looks damaged, if it does

    @staticmethod
    def _prepare() -> None:
        from connectors.unstructured_setup import prepare_unstructured

        prepare_unstructured()

    def detect(self) -> str:
        """unstructured's file type name (PDF, DOCX, TXT ...); raises ParseFailure for unsupported ones."""
        self._prepare()
        from unstructured.file_utils.filetype import detect_filetype
        from unstructured.file_utils.model import FileType

        try:
            self.file_type = detect_filetype(file=io.BytesIO(self.content), metadata_file_path=self.file_name)
        except Exception as exc:  # detection reads magic numbers and zip directories: corrupt input lands here
            raise ParseFailure(f"cannot tell the file type: {_first_line(exc)}") from exc
        file_type = self.file_type
        if file_type == FileType.EMPTY:
            raise EmptyDocument("no text: the document is empty or contains only whitespace")
        if not file_type.is_partitionable or file_type.partitioner_shortname == "audio":
            kind = "unknown" if file_type == FileType.UNK else file_type.name
            named = FileType.from_extension(PurePosixPath(self.file_name).suffix.lower())
            if named is not None and named != file_type and named.is_partitionable:
                raise ParseFailure(f"corrupt or mislabelled {named.name} file: its content is {kind}, not {named.name}")
            raise ParseFailure(f"unsupported file type ({kind}); no parser for {self.file_name!r}")
        name: str = file_type.name
        return name

    def text(self, text: str, metadata: dict[str, Any]) -> list[Block]:
        self._prepare()
        from unstructured.partition.text import partition_text

        languages = self.config.languages
        return self._run(
            lambda: partition_text(text=text, metadata_filename=self.file_name, languages=languages), metadata
        )

    def markdown(self, text: str, metadata: dict[str, Any]) -> list[Block]:
        self._prepare()
        try:
            from unstructured.partition.md import partition_md
        except ImportError as exc:
            raise MissingDependencyError(
                f"unstructured's Markdown support is not installed ({exc}); run: pip install 'unstructured[md]'"
            ) from exc
        text = without_front_matter(text)
        headings = MarkdownBlocks(text).heading_texts()
        languages = self.config.languages
        blocks = self._run(
            lambda: partition_md(text=text, metadata_filename=self.file_name, languages=languages), metadata
        )
        for block in blocks:
            block.heading_markup = block.category == "Title" and " ".join(block.text.split()) in headings
        return blocks

    def partition(self, metadata: dict[str, Any]) -> list[Block]:
        from unstructured.partition.auto import partition

        strategy = self._strategy()
        self._check_requirements(strategy)
        self._prepare_office_file(metadata)
        options: dict[str, Any] = {}
        content = self.content
        if self.file_type.name == "PDF":
            self._check_pdf()
        if self.file_type.name in ("EML", "MSG"):
            options["process_attachments"] = self.config.email_attachments
        encoding = self.config.encoding
        if encoding is None and self.file_type.name in DECODED_BY_US:
            encoding = markup_encoding(content)
            metadata["encoding"] = encoding
        try:
            return self._run(
                lambda: partition(
                    file=io.BytesIO(content),
                    metadata_filename=self.file_name,
                    content_type=self.file_type.mime_type,
                    strategy=strategy,
                    languages=self.config.languages,
                    encoding=encoding,
                    **options,
                ),
                metadata,
            )
        except ParseFailure as failure:
            # A CSV with ragged rows defeats pandas, but its text is still worth indexing.
            if self.file_type.name not in ("CSV", "TSV") or failure.__cause__ is None:
                raise
            metadata["parser"] = "native-text"
            metadata["fallback_reason"] = str(failure)
            return text_blocks(decode_text(content, encoding)[0], HeadingRule(self.config.max_heading_chars))

    # -- requirements ------------------------------------------------------------------------

    def _strategy(self) -> str:
        # Images have no text layer: "fast" means nothing for them, OCR is the only way in.
        if self.file_type.partitioner_shortname == "image" and self.config.strategy in ("fast", "auto"):
            return "ocr_only"
        return self.config.strategy

    def _check_requirements(self, strategy: str) -> None:
        file_type = self.file_type
        if file_type.name == "PDF":
            missing = [m for m in PDF_MODULES if importlib.util.find_spec(m) is None]
            if missing:
                raise ParseFailure(f"PDF files need {', '.join(missing)}, not installed; run: {PDF_INSTALL_HINT}")
        missing = [m for m in file_type.importable_package_dependencies if importlib.util.find_spec(m) is None]
        if missing:
            extra = file_type.extra_name
            command = f"pip install 'unstructured[{extra}]'" if extra else f"pip install {' '.join(missing)}"
            raise ParseFailure(
                f"{file_type.name} files need {', '.join(missing)}, which is not installed; run: {command}"
            )
        is_image = file_type.partitioner_shortname == "image"
        if is_image or (strategy == "ocr_only" and file_type.name == "PDF"):
            what = "images (OCR)" if is_image else "OCR of PDFs"
            # PDFs are rendered to images by poppler's pdftoppm before OCR.
            tools = [t for t in ("tesseract",) + (() if is_image else ("pdftoppm",)) if not shutil.which(t)]
            if tools:
                raise ParseFailure(
                    f"{what} need {' and '.join(tools)}, not installed here (apt install tesseract-ocr poppler-utils)"
                )
            if importlib.util.find_spec("unstructured_pytesseract") is None:
                raise ParseFailure(f"{what} need unstructured-pytesseract; run: pip install unstructured-pytesseract")

    def _prepare_office_file(self, metadata: dict[str, Any]) -> None:
        """Legacy DOC/PPT converted to DOCX/PPTX by LibreOffice (unstructured would call it too,
        but one document at a time, without a timeout, and with failures only in its log), then
        an OOXML file repaired where python-docx/-pptx or openpyxl would misread it (see
        connectors.office)."""
        from unstructured.file_utils.model import FileType

        from connectors.office import convert_with_libreoffice, repair_ooxml

        if self.file_type.name in ("DOC", "PPT"):
            target = f"{self.file_type.name}X"
            self.content = convert_with_libreoffice(self.content, self.file_type.name, target.lower())
            metadata["converted_from"] = self.file_type.name
            self.file_type = FileType[target]
        if self.file_type.name in ("DOCX", "PPTX", "XLSX"):
            self.content, repairs = repair_ooxml(self.content)
            if repairs:
                metadata["repairs"] = repairs

    def _check_pdf(self) -> None:
        """Refuse encrypted PDFs with a clear reason, and note why a PDF looks damaged.

        unstructured's fast path logs such errors and returns no elements, which would read as
        'no text'. A PDF that pypdf cannot open may still be readable by pdfminer, so damage
        only becomes the failure reason when nothing could be extracted.
        """
        from pypdf import PdfReader

        try:
            reader = PdfReader(io.BytesIO(self.content))
            # An owner password alone (copy protection) opens with the empty user password.
            if reader.is_encrypted and not reader.decrypt(""):
                raise ParseFailure("encrypted PDF: it needs a password to open")
            if len(reader.pages) == 0:
                self.damage = "corrupt PDF: it has no pages"
        except ParseFailure:
            raise
        except Exception as exc:  # pypdf raises many types on damaged files
            self.damage = f"corrupt PDF ({_first_line(exc)})"

    # -- running and converting ----------------------------------------------------------

    def _run(self, call: Any, metadata: dict[str, Any]) -> list[Block]:
        try:
            elements = call()
        except (ParseFailure, MissingDependencyError):
            raise
        except Exception as exc:
            raise ParseFailure(_explain(exc, self.file_type, self.config.strategy)) from exc
        blocks = [self._block(e) for e in elements]
        languages = next((e.metadata.languages for e in elements if e.metadata.languages), None)
        metadata["languages"] = list(languages) if languages else list(self.config.languages)
        if not any(b.text.strip() for b in blocks):
            if self.file_type is not None and self.file_type.name == "PDF":
                return self._pdf_text_layer(metadata)
            raise ParseFailure(self._why_empty())
        return blocks

    def _block(self, element: Any) -> Block:
        meta = element.metadata
        block_metadata: dict[str, Any] = {}
        table_html = meta.text_as_html if element.category == "Table" and self.config.table_html else None
        if table_html and len(table_html) <= TABLE_HTML_MAX_CHARS:
            block_metadata["text_as_html"] = table_html
        if meta.page_name:
            block_metadata["sheet_name"] = meta.page_name
        style = getattr(meta, "style_name", None) or ""
        return Block(
            text=element.text or "",
            category=element.category,
            page_number=meta.page_number,
            depth=meta.category_depth if element.category in ("Title", "ListItem") else None,
            # DOCX gives depth 0 to both the "Title" style and "Heading 1"; the document title
            # encloses the top-level headings.
            heading_level=-1 if style == "Title" else None,
            heading_markup=element.category == "Title" and (style.startswith("Heading") or style == "Title"),
            metadata=block_metadata,
        )

    def _pdf_text_layer(self, metadata: dict[str, Any]) -> list[Block]:
        """unstructured found no text in a PDF: read its text layer with pdfminer directly (see
        connectors.pdf_text) and, when there is none either, say why."""
        from connectors.pdf_text import read_pdf_text

        try:
            found = read_pdf_text(self.content)
        except Exception as exc:  # pdfminer raises many types on damaged files
            raise ParseFailure(
                self.damage or f"cannot read the PDF's text layer (pdfminer: {_first_line(exc)})"
            ) from exc
        if not found.blocks:
            raise ParseFailure(self._why_no_pdf_text(found.images))
        metadata["parser"] = "pdfminer"
        metadata["fallback_reason"] = self._why_unstructured_missed_pdf_text()
        return found.blocks

    def _why_no_pdf_text(self, images: int) -> str:
        if self.damage:
            return self.damage
        if self.config.strategy != "fast":
            return "no text found, not even by OCR"
        if images:
            return (
                "no text layer in this PDF, only images (a scan); strategy auto or ocr_only can read it with "
                "tesseract installed"
            )
        return "no text: the PDF's pages have neither a text layer nor images (blank pages, or text drawn as outlines)"

    def _why_unstructured_missed_pdf_text(self) -> str:
        unexplained = "unstructured returned no text; the text layer was read with pdfminer"
        try:
            from unstructured.partition.pdf import is_pdf_too_complex
        except ImportError:  # an unstructured version without this heuristic (pyproject allows >=0.18)
            return unexplained
        if not is_pdf_too_complex(file=self.content):
            return unexplained
        return (
            "unstructured takes this PDF for a vector drawing (a page with over 10,000 drawing operations, "
            "or an oversized content stream) and skips it; its text layer was read with pdfminer"
        )

    def _why_empty(self) -> str:
        name = self.file_type.name if self.file_type is not None else ""
        if self.file_type is not None and self.file_type.partitioner_shortname == "image":
            return "no text found, not even by OCR"
        if name in ("EML", "MSG") and self._email_is_encrypted():
            return "encrypted email: its body cannot be read without the recipient's key"
        return "no text: the document has no extractable text"

    def _email_is_encrypted(self) -> bool:
        """PGP/MIME (multipart/encrypted) or S/MIME (pkcs7-mime), as the message headers declare."""
        try:
            if self.file_type.name == "EML":
                from email.parser import BytesHeaderParser

                content_type = BytesHeaderParser().parsebytes(self.content).get("Content-Type", "")
            else:
                from oxmsg import Message

                content_type = Message.load(io.BytesIO(self.content)).message_headers.get("Content-Type", "")
        except Exception:  # unreadable headers: not evidence of encryption
            return False
        return "encrypted" in content_type.lower() or "pkcs7-mime" in content_type.lower()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _explain(exc: BaseException, file_type: Any, strategy: str) -> str:
    """A reason a user can act on, for the errors unstructured and its libraries raise."""
    import zipfile

    kind = file_type.name if file_type is not None else "document"
    message = str(exc).lower()
    if strategy == "hi_res" and ("hub" in message or "huggingface" in message or "connection" in message):
        return (
            f"strategy hi_res needs its layout model from the Hugging Face hub, which cannot be reached "
            f"({_first_line(exc)}); use strategy fast or auto"
        )
    if isinstance(exc, zipfile.BadZipFile) or "not a zip file" in message or "package not found" in message:
        return f"corrupt {kind}: not a valid zip container ({_first_line(exc)})"
    if "encrypt" in message or "password" in message:
        return f"encrypted {kind}: it needs a password to open ({_first_line(exc)})"
    if isinstance(exc, UnicodeDecodeError):
        return f"cannot decode the text: {_first_line(exc)}; set the parser's `encoding` option"
    if isinstance(exc, ImportError):
        return f"{kind} files need a missing dependency: {_first_line(exc)}"
    return f"unstructured could not parse this {kind}: {_first_line(exc)}"
