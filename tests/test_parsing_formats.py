"""UnstructuredParser on the shapes of real documents an outside tester found it losing: text PDFs
that unstructured takes for vector drawings, Strict OOXML and text boxes in DOCX, OpenDocument
presentations and spreadsheets, and legacy .doc/.ppt with and without LibreOffice.

Every input is built in memory by tests/document_builders.py.
"""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
import zipfile
from pathlib import Path

import docx
import pytest

import pipeline  # noqa: F401  (imports the package in its supported order)
from connectors.base import ParseFailure
from connectors.parsing import TABLE_HTML_MAX_CHARS, UnstructuredParser
from tests.document_builders import (
    add_text_box,
    blank_pdf,
    compound_file,
    docx_bytes,
    image_only_pdf,
    odf_package,
    odp,
    ods,
    ods_cell,
    strict_ooxml,
    text_pdf,
)
from tests.test_parsing import assert_offsets_exact, source


@pytest.fixture(scope="module")
def parser() -> UnstructuredParser:
    return UnstructuredParser()


# -- PDFs unstructured returns empty -----------------------------------------------------------

SURVEY = [f"Drainage survey note {i}: the culvert under plot {i} needs clearing before the rains." for i in range(12)]


def test_text_pdf_that_unstructured_takes_for_a_drawing_is_read_by_pdfminer(parser: UnstructuredParser) -> None:
    from unstructured.partition.pdf import is_pdf_too_complex

    # 6,000 stroked segments are 18,000 drawing operators on page 1, under a page of text.
    pdf = text_pdf([SURVEY, ["Page two lists the pumps: two diesel, one electric."]], drawing_segments=[6000])
    assert is_pdf_too_complex(file=pdf), "the input no longer trips unstructured's vector-drawing heuristic"

    doc = parser.parse(source("survey.pdf", pdf))
    assert doc.metadata["parser"] == "pdfminer"
    assert "10,000 drawing operations" in doc.metadata["fallback_reason"]
    assert_offsets_exact(doc)
    assert all(line in doc.text for line in SURVEY)
    assert {e.page_number for e in doc.elements if "culvert" in e.text} == {1}
    assert [e.page_number for e in doc.elements if "diesel" in e.text] == [2]
    assert doc.metadata["page_count"] == 2


def test_an_ordinary_text_pdf_still_goes_through_unstructured(parser: UnstructuredParser) -> None:
    doc = parser.parse(source("notes.pdf", text_pdf([SURVEY])))
    assert doc.metadata["parser"] == "unstructured"
    assert "culvert under plot 11" in doc.text


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (image_only_pdf, r"no text layer in this PDF, only images \(a scan\); strategy auto or ocr_only"),
        (blank_pdf, r"neither a text layer nor images"),
    ],
)
def test_a_pdf_without_text_says_whether_it_is_a_scan(parser: UnstructuredParser, build, reason: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ParseFailure, match=reason):
        parser.parse(source("page.pdf", build()))


# -- DOCX that python-docx misreads ------------------------------------------------------------


def _report() -> docx.Document:  # type: ignore[valid-type]
    document = docx.Document()
    document.add_heading("Annual Report", 0)
    document.add_heading("Finances", 1)
    document.add_paragraph("Income rose by four percent over the year.")
    table = document.add_table(rows=2, cols=2)
    for row, cells in zip(table.rows, (("Quarter", "Income"), ("Q4", "1.2 million"))):
        for cell, text in zip(row.cells, cells):
            cell.text = text
    return document


def test_strict_ooxml_docx_parses_like_its_transitional_twin(parser: UnstructuredParser) -> None:
    strict = strict_ooxml(docx_bytes(_report()))
    document_xml = zipfile.ZipFile(io.BytesIO(strict)).read("word/document.xml")
    assert b"http://purl.oclc.org/ooxml/wordprocessingml/main" in document_xml
    with pytest.raises(KeyError):  # what unstructured's reader, python-docx, makes of it
        docx.Document(io.BytesIO(strict))

    doc = parser.parse(source("report.docx", strict))
    transitional = parser.parse(source("report.docx", docx_bytes(_report())))
    assert doc.metadata["repairs"] == ["strict-ooxml"]
    assert "repairs" not in transitional.metadata
    assert [(e.category, e.text, e.heading_path) for e in doc.elements] == [
        (e.category, e.text, e.heading_path) for e in transitional.elements
    ]
    income = next(e for e in doc.elements if "four percent" in e.text)
    assert income.heading_path == ("Annual Report", "Finances")
    assert "1.2 million" in next(e for e in doc.elements if e.category == "Table").metadata["text_as_html"]


def _deck() -> bytes:
    import pptx

    deck = pptx.Presentation()
    slide = deck.slides.add_slide(deck.slide_layouts[1])
    slide.shapes.title.text = "Quarterly Review"
    slide.placeholders[1].text = "Revenue grew in the north."
    out = io.BytesIO()
    deck.save(out)
    return out.getvalue()


def _workbook() -> bytes:
    import openpyxl

    workbook = openpyxl.Workbook()
    workbook.active.title = "Stock"
    workbook.active.append(["Item", "Count"])
    workbook.active.append(["Bolts", 40])
    out = io.BytesIO()
    workbook.save(out)
    return out.getvalue()


@pytest.mark.parametrize(("name", "build"), [("review.pptx", _deck), ("stock.xlsx", _workbook)])
def test_strict_ooxml_presentations_and_workbooks_parse(parser: UnstructuredParser, name: str, build) -> None:  # type: ignore[no-untyped-def]
    doc = parser.parse(source(name, strict_ooxml(build())))
    transitional = parser.parse(source(name, build()))
    assert doc.metadata["repairs"] == ["strict-ooxml"]
    assert doc.text == transitional.text and doc.text.strip()


def test_a_docx_of_only_a_text_box_gives_its_text_once(parser: UnstructuredParser) -> None:
    document = docx.Document()
    add_text_box(document.add_paragraph(), ["Garden open day", "Saturday from ten until four."])
    doc = parser.parse(source("flyer.docx", docx_bytes(document)))
    assert [e.text for e in doc.elements] == ["Garden open day", "Saturday from ten until four."]
    assert doc.metadata["repairs"] == ["text-boxes"]


def test_text_boxes_keep_document_order(parser: UnstructuredParser) -> None:
    document = docx.Document()
    document.add_paragraph("Before the boxes.")
    anchor = document.add_paragraph("The anchor paragraph.")
    add_text_box(anchor, ["First box, line one.", "First box, line two."], shape_id=1)
    add_text_box(anchor, ["Second box."], shape_id=2)
    document.add_paragraph("After the boxes.")
    doc = parser.parse(source("layout.docx", docx_bytes(document)))
    assert [e.text for e in doc.elements] == [
        "Before the boxes.",
        "The anchor paragraph.",
        "First box, line one.",
        "First box, line two.",
        "Second box.",
        "After the boxes.",
    ]
    assert_offsets_exact(doc)


def test_a_damaged_docx_with_a_text_box_fails_with_a_reason(parser: UnstructuredParser) -> None:
    document = docx.Document()
    add_text_box(document.add_paragraph(), ["Cut short."])
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(docx_bytes(document))) as whole, zipfile.ZipFile(out, "w") as damaged:
        for info in whole.infolist():
            data = whole.read(info)
            damaged.writestr(info, data[: len(data) // 2] if info.filename == "word/document.xml" else data)
    with pytest.raises(ParseFailure, match=r"could not parse this DOCX: XMLSyntaxError"):
        parser.parse(source("cut.docx", out.getvalue()))


# -- OpenDocument presentations and spreadsheets -----------------------------------------------

DECK = [
    ("Why Compost", ["Less waste to landfill", "Better soil"], "Speaker: mention the council scheme."),
    ("Getting Started", ["Pick a shady corner"], "Speaker: show the bin photo."),
]


@pytest.mark.parametrize("name", ["compost.odp", "compost.zip"])  # the package's mimetype decides, not the name
def test_odp_gives_slide_text_with_slide_numbers(parser: UnstructuredParser, name: str) -> None:
    doc = parser.parse(source(name, odp(DECK)))
    assert doc.metadata["parser"] == "native-opendocument"
    assert_offsets_exact(doc)
    assert [(e.category, e.text, e.page_number) for e in doc.elements] == [
        ("Title", "Why Compost", 1),
        ("ListItem", "Less waste to landfill", 1),
        ("ListItem", "Better soil", 1),
        ("Title", "Getting Started", 2),
        ("ListItem", "Pick a shady corner", 2),
    ]
    assert doc.elements[-1].heading_path == ("Getting Started",)
    assert "Speaker" not in doc.text  # notes are left out, as for PPTX
    assert doc.metadata["page_count"] == 2


def test_ods_gives_one_table_per_sheet(parser: UnstructuredParser) -> None:
    value_only = '<table:table-cell office:value-type="float" office:value="0.75"/>'
    spaced = (
        '<table:table-cell office:value-type="string"><text:p>net<text:s text:c="2"/>weight</text:p></table:table-cell>'
    )
    content = ods(
        [
            (
                "Prices",
                [
                    ods_cell("Fruit") + ods_cell("", 3) + ods_cell("Price"),
                    ods_cell("Plum") + ods_cell("", 3) + value_only,
                ],
            ),
            ("Notes", [spaced, ods_cell("")]),  # a row of one empty cell is dropped
        ]
    )
    doc = parser.parse(source("prices.ods", content))
    assert_offsets_exact(doc)
    prices, notes = doc.elements
    assert (prices.category, prices.page_number, prices.metadata["sheet_name"]) == ("Table", 1, "Prices")
    assert prices.text == "Fruit\t\t\t\tPrice\nPlum\t\t\t\t0.75"
    assert prices.metadata["text_as_html"] == (
        "<table><tr><td>Fruit</td><td></td><td></td><td></td><td>Price</td></tr>"
        "<tr><td>Plum</td><td></td><td></td><td></td><td>0.75</td></tr></table>"
    )
    assert (notes.text, notes.page_number, notes.metadata["sheet_name"]) == ("net  weight", 2, "Notes")


def test_ods_table_html_is_dropped_when_too_long_or_turned_off() -> None:
    rows = [ods_cell(f"item {i}") + ods_cell("x" * 40) for i in range(TABLE_HTML_MAX_CHARS // 40)]
    big = UnstructuredParser().parse(source("big.ods", ods([("Inventory", rows)])))
    assert "text_as_html" not in big.elements[0].metadata and "item 300" in big.text
    small = ods([("One", [ods_cell("a") + ods_cell("b")])])
    assert (
        "text_as_html" not in UnstructuredParser(table_html=False).parse(source("one.ods", small)).elements[0].metadata
    )


@pytest.mark.parametrize(
    "row",
    [
        f'<table:table-row table:number-rows-repeated="1000000">{ods_cell("0", 1000)}</table:table-row>',
        f"<table:table-row>{(ods_cell('', 1_000_000) + ods_cell('0', 1_000_000)) * 1000}</table:table-row>",
    ],
)
def test_repeated_filled_cells_are_capped_not_expanded_without_end(parser: UnstructuredParser, row: str) -> None:
    body = f'<office:spreadsheet><table:table table:name="Bomb">{row}</table:table></office:spreadsheet>'
    with pytest.raises(ParseFailure, match="spreadsheet too large: sheet 'Bomb'"):
        parser.parse(source("bomb.ods", odf_package("application/vnd.oasis.opendocument.spreadsheet", body)))


def _encrypted_ods() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(ods([("S", [ods_cell("a")])]))) as plain, zipfile.ZipFile(out, "w") as package:
        package.writestr("mimetype", plain.read("mimetype"))
        package.writestr("content.xml", b"\x8f\x02 ciphertext, not XML")
        package.writestr(
            "META-INF/manifest.xml",
            plain.read("META-INF/manifest.xml").replace(
                b'manifest:media-type="text/xml"/>',
                b'manifest:media-type="text/xml"><manifest:encryption-data/></manifest:file-entry>',
            ),
        )
    return out.getvalue()


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("sheet.ods", b"this is not a zip file at all", "corrupt ODS: not a valid zip container"),
        (
            "deck.odp",
            odf_package("application/vnd.oasis.opendocument.presentation", "<office:text/>"),
            "corrupt ODP: content.xml holds no presentation",
        ),
        ("secret.ods", _encrypted_ods(), "encrypted ODS"),
    ],
)
def test_bad_opendocument_files_fail_with_a_reason(
    parser: UnstructuredParser, name: str, content: bytes, reason: str
) -> None:
    with pytest.raises(ParseFailure, match=reason):
        parser.parse(source(name, content))


# -- legacy .doc and .ppt ----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "stream"), [("minutes.doc", "WordDocument"), ("pitch.ppt", "PowerPoint Document")])
def test_legacy_office_without_libreoffice_names_the_tool_and_the_install_flag(
    name: str, stream: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no soffice, no libreoffice
    parser = UnstructuredParser()
    kind = name.rsplit(".", 1)[1].upper()
    with pytest.raises(
        ParseFailure, match=rf"legacy {kind} files need LibreOffice \(soffice\).*bash scripts/install.sh --libreoffice"
    ):
        parser.parse(source(name, compound_file(stream, b"legacy content")))
    with caplog.at_level(logging.WARNING, logger="rag_pipeline.parser"):
        assert parser.check() == []  # other formats still parse: not a problem that stops the run
    assert "LibreOffice (soffice) is not installed" in caplog.text and "--libreoffice" in caplog.text


def _saved_as(content: bytes, suffix: str, target: str, folder: Path) -> bytes:
    source_file = folder / f"original.{suffix}"
    source_file.write_bytes(content)
    subprocess.run(
        [
            "soffice",
            f"-env:UserInstallation={(folder / 'profile').as_uri()}",
            "--headless",
            "--convert-to",
            target,
            "--outdir",
            str(folder),
            str(source_file),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return (folder / f"original.{target}").read_bytes()


@pytest.mark.skipif(
    shutil.which("soffice") is None,
    reason="LibreOffice (soffice) is not installed; bash scripts/install.sh --libreoffice installs it",
)
def test_legacy_doc_and_ppt_are_converted_with_libreoffice(parser: UnstructuredParser, tmp_path: Path) -> None:
    doc_file = _saved_as(docx_bytes(_report()), "docx", "doc", tmp_path)
    doc = parser.parse(source("report.doc", doc_file))
    assert doc.metadata["converted_from"] == "DOC"
    assert next(e for e in doc.elements if "four percent" in e.text).heading_path == ("Annual Report", "Finances")

    ppt = parser.parse(source("review.ppt", _saved_as(_deck(), "pptx", "ppt", tmp_path)))
    assert ppt.metadata["converted_from"] == "PPT"
    assert [e.text for e in ppt.elements] == ["Quarterly Review", "Revenue grew in the north."]

    with pytest.raises(ParseFailure, match="LibreOffice could not convert this DOC file to DOCX"):
        parser.parse(source("hollow.doc", compound_file("WordDocument", b"not a Word document")))


@pytest.mark.skipif(
    shutil.which("soffice") is None,
    reason="LibreOffice (soffice) is not installed; bash scripts/install.sh --libreoffice installs it",
)
def test_a_conversion_past_its_time_limit_fails_with_a_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from connectors import office

    doc_file = _saved_as(docx_bytes(_report()), "docx", "doc", tmp_path)
    monkeypatch.setattr(office, "CONVERSION_TIMEOUT_S", 0.2)  # LibreOffice takes seconds to start
    with pytest.raises(ParseFailure, match=r"LibreOffice did not convert this DOC file within 0.2 s"):
        UnstructuredParser().parse(source("report.doc", doc_file))
