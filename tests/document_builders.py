"""Builders for the parser tests' awkward inputs, made in memory so no test depends on a download.

Each builder writes the format by hand (or from python-docx's default document) just far enough to
reproduce one real-world shape: a text PDF that unstructured takes for a vector drawing, a Strict
OOXML document, a text box, OpenDocument presentations and spreadsheets.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Sequence
from xml.sax.saxutils import escape

# -- PDF --------------------------------------------------------------------------------------


def _pdf_string(text: str) -> str:
    return "(" + text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def _page_stream(lines: Sequence[str], drawing_segments: int) -> bytes:
    text = "".join(f"BT /F1 11 Tf 72 {740 - 16 * i} Td {_pdf_string(line)} Tj ET\n" for i, line in enumerate(lines))
    # A hatch of short strokes: three graphics operators (m, l, S) per segment, as a CAD export has.
    drawing = "".join(
        f"{50 + i % 500} {60 + i % 37} m {52 + i % 500} {70 + i % 37} l S\n" for i in range(drawing_segments)
    )
    return (drawing + text).encode("latin-1")


def text_pdf(pages: Sequence[Sequence[str]], drawing_segments: Sequence[int] = ()) -> bytes:
    """A PDF with one line of Helvetica text per string, and on page i ``drawing_segments[i]``
    stroked line segments drawn under the text (compressed, as real files are)."""
    objects: list[bytes] = []

    def add(body: bytes) -> int:
        objects.append(body)
        return len(objects)

    catalog = add(b"")  # filled in once the page tree's number is known
    font = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    page_ids = []
    tree_id = len(objects) + 1 + 2 * len(pages)
    for i, lines in enumerate(pages):
        segments = drawing_segments[i] if i < len(drawing_segments) else 0
        data = zlib.compress(_page_stream(lines, segments))
        stream = add(b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(data) + data + b"\nendstream")
        page_ids.append(
            add(
                b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 612 792] /Contents %d 0 R "
                b"/Resources << /Font << /F1 %d 0 R >> >> >>" % (tree_id, stream, font)
            )
        )
    kids = b" ".join(b"%d 0 R" % p for p in page_ids)
    assert add(b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, len(page_ids))) == tree_id
    objects[catalog - 1] = b"<< /Type /Catalog /Pages %d 0 R >>" % tree_id
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out.write(b"".join(b"%010d 00000 n \n" % offset for offset in offsets))
    out.write(b"trailer\n<< /Size %d /Root %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, catalog, xref))
    return out.getvalue()


def image_only_pdf() -> bytes:
    """What a scanner produces: a page that is one picture, no text layer."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (400, 200), "white")
    ImageDraw.Draw(image).rectangle((40, 40, 360, 160), outline="black", width=4)
    out = io.BytesIO()
    image.save(out, format="PDF")
    return out.getvalue()


def blank_pdf() -> bytes:
    from pypdf import PdfWriter

    writer = PdfWriter()
    writer.add_blank_page(width=612, height=792)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


# -- DOCX -------------------------------------------------------------------------------------


def docx_bytes(document) -> bytes:  # type: ignore[no-untyped-def]
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


# The Transitional namespaces python-docx, python-pptx and openpyxl documents use, and their
# ISO/IEC 29500 Strict names (Part 1, Annex A). Relationship types follow their namespace.
STRICT_NAMESPACES = {
    b"http://schemas.openxmlformats.org/spreadsheetml/2006/main": b"http://purl.oclc.org/ooxml/spreadsheetml/main",
    b"http://schemas.openxmlformats.org/presentationml/2006/main": b"http://purl.oclc.org/ooxml/presentationml/main",
    b"http://schemas.openxmlformats.org/wordprocessingml/2006/main": b"http://purl.oclc.org/ooxml/wordprocessingml/main",
    b"http://schemas.openxmlformats.org/officeDocument/2006/relationships": b"http://purl.oclc.org/ooxml/officeDocument/relationships",
    b"http://schemas.openxmlformats.org/drawingml/2006/main": b"http://purl.oclc.org/ooxml/drawingml/main",
    b"http://schemas.openxmlformats.org/drawingml/2006/wordprocessingDrawing": b"http://purl.oclc.org/ooxml/drawingml/wordprocessingDrawing",
    b"http://schemas.openxmlformats.org/officeDocument/2006/math": b"http://purl.oclc.org/ooxml/officeDocument/math",
    b"http://schemas.openxmlformats.org/officeDocument/2006/extended-properties": b"http://purl.oclc.org/ooxml/officeDocument/extendedProperties",
    b"http://schemas.openxmlformats.org/officeDocument/2006/docPropsVTypes": b"http://purl.oclc.org/ooxml/officeDocument/docPropsVTypes",
    b"http://schemas.openxmlformats.org/schemaLibrary/2006/main": b"http://purl.oclc.org/ooxml/schemaLibrary/main",
}


def strict_ooxml(transitional: bytes) -> bytes:
    """The same document saved as Strict OOXML, as Office's "Strict Open XML" formats do."""
    source = zipfile.ZipFile(io.BytesIO(transitional))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith((".xml", ".rels")):
                # relationship types first: the Transitional name of this one is hyphenated
                data = data.replace(
                    b"http://schemas.openxmlformats.org/officeDocument/2006/relationships/extended-properties",
                    b"http://purl.oclc.org/ooxml/officeDocument/relationships/extendedProperties",
                )
                for old, new in STRICT_NAMESPACES.items():
                    data = data.replace(old, new)
                data = data.replace(b"<w:document ", b'<w:document w:conformance="strict" ', 1)
            target.writestr(info.filename, data)
    return out.getvalue()


_TEXT_BOX_RUN = """<w:r xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"
  xmlns:mc="http://schemas.openxmlformats.org/markup-compatibility/2006"
  xmlns:wp="http://schemas.openxmlformats.org/drawingml/2006/wordprocessingDrawing"
  xmlns:a="http://schemas.openxmlformats.org/drawingml/2006/main"
  xmlns:wps="http://schemas.microsoft.com/office/word/2010/wordprocessingShape"
  xmlns:v="urn:schemas-microsoft-com:vml">
 <mc:AlternateContent>
  <mc:Choice Requires="wps">
   <w:drawing>
    <wp:anchor distT="0" distB="0" distL="114300" distR="114300" simplePos="0" relativeHeight="251659264"
        behindDoc="0" locked="0" layoutInCell="1" allowOverlap="1">
     <wp:simplePos x="0" y="0"/>
     <wp:positionH relativeFrom="column"><wp:posOffset>0</wp:posOffset></wp:positionH>
     <wp:positionV relativeFrom="paragraph"><wp:posOffset>0</wp:posOffset></wp:positionV>
     <wp:extent cx="2743200" cy="914400"/>
     <wp:effectExtent l="0" t="0" r="0" b="0"/>
     <wp:wrapSquare wrapText="bothSides"/>
     <wp:docPr id="{id}" name="Text Box {id}"/>
     <wp:cNvGraphicFramePr/>
     <a:graphic>
      <a:graphicData uri="http://schemas.microsoft.com/office/word/2010/wordprocessingShape">
       <wps:wsp>
        <wps:cNvSpPr txBox="1"/>
        <wps:spPr><a:xfrm><a:off x="0" y="0"/><a:ext cx="2743200" cy="914400"/></a:xfrm>
         <a:prstGeom prst="rect"><a:avLst/></a:prstGeom></wps:spPr>
        <wps:txbx><w:txbxContent>{paragraphs}</w:txbxContent></wps:txbx>
        <wps:bodyPr rot="0" vert="horz" wrap="square"/>
       </wps:wsp>
      </a:graphicData>
     </a:graphic>
    </wp:anchor>
   </w:drawing>
  </mc:Choice>
  <mc:Fallback>
   <w:pict>
    <v:shape id="Text Box {id}" type="#_x0000_t202" style="width:216pt;height:72pt">
     <v:textbox><w:txbxContent>{paragraphs}</w:txbxContent></v:textbox>
    </v:shape>
   </w:pict>
  </mc:Fallback>
 </mc:AlternateContent>
</w:r>"""


def add_text_box(paragraph, lines: Sequence[str], shape_id: int = 1) -> None:  # type: ignore[no-untyped-def]
    """Anchor a Word 2010 text box (DrawingML, with the VML copy Word writes for older readers)
    holding one paragraph per line to a python-docx paragraph."""
    from docx.oxml import parse_xml

    paragraphs = "".join(f"<w:p><w:r><w:t>{escape(line)}</w:t></w:r></w:p>" for line in lines)
    paragraph._p.append(parse_xml(_TEXT_BOX_RUN.replace("{id}", str(shape_id)).replace("{paragraphs}", paragraphs)))


# -- OpenDocument -----------------------------------------------------------------------------

ODF_NAMESPACES = (
    'xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0" '
    'xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0" '
    'xmlns:table="urn:oasis:names:tc:opendocument:xmlns:table:1.0" '
    'xmlns:draw="urn:oasis:names:tc:opendocument:xmlns:drawing:1.0" '
    'xmlns:presentation="urn:oasis:names:tc:opendocument:xmlns:presentation:1.0" '
    'xmlns:svg="urn:oasis:names:tc:opendocument:xmlns:svg-compatible:1.0"'
)


def odf_package(mimetype: str, body: str) -> bytes:
    """An OpenDocument zip: the mimetype entry first and stored (uncompressed), then the content
    and the manifest, as the specification (ODF 1.2 Part 3, 3.3) requires."""
    content = (
        f'<?xml version="1.0" encoding="UTF-8"?><office:document-content {ODF_NAMESPACES} '
        f'office:version="1.2"><office:body>{body}</office:body></office:document-content>'
    )
    manifest = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<manifest:manifest xmlns:manifest="urn:oasis:names:tc:opendocument:xmlns:manifest:1.0" manifest:version="1.2">'
        f'<manifest:file-entry manifest:full-path="/" manifest:media-type="{mimetype}"/>'
        '<manifest:file-entry manifest:full-path="content.xml" manifest:media-type="text/xml"/>'
        "</manifest:manifest>"
    )
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as package:
        package.writestr(zipfile.ZipInfo("mimetype"), mimetype, compress_type=zipfile.ZIP_STORED)
        package.writestr("content.xml", content, compress_type=zipfile.ZIP_DEFLATED)
        package.writestr("META-INF/manifest.xml", manifest, compress_type=zipfile.ZIP_DEFLATED)
    return out.getvalue()


def _text_box(presentation_class: str, inner: str) -> str:
    return f'<draw:frame presentation:class="{presentation_class}"><draw:text-box>{inner}</draw:text-box></draw:frame>'


def odp(slides: Sequence[tuple[str, Sequence[str], str]]) -> bytes:
    """A presentation; each slide is (title, bullet points, speaker notes)."""
    pages = []
    for number, (title, bullets, notes) in enumerate(slides, start=1):
        items = "".join(f"<text:list-item><text:p>{escape(b)}</text:p></text:list-item>" for b in bullets)
        pages.append(
            f'<draw:page draw:name="page{number}">'
            + _text_box("title", f"<text:p>{escape(title)}</text:p>")
            + _text_box("outline", f"<text:list>{items}</text:list>")
            + f"<presentation:notes>{_text_box('notes', f'<text:p>{escape(notes)}</text:p>')}</presentation:notes>"
            + "</draw:page>"
        )
    return odf_package(
        "application/vnd.oasis.opendocument.presentation",
        f"<office:presentation>{''.join(pages)}</office:presentation>",
    )


def ods_cell(text: str, repeat: int = 1) -> str:
    repeated = f' table:number-columns-repeated="{repeat}"' if repeat > 1 else ""
    if not text:
        return f"<table:table-cell{repeated}/>"
    return f'<table:table-cell office:value-type="string"{repeated}><text:p>{escape(text)}</text:p></table:table-cell>'


def ods(sheets: Sequence[tuple[str, Sequence[str]]]) -> bytes:
    """A spreadsheet; each sheet is (name, rows), a row being table-cell XML (see ods_cell).
    Like LibreOffice, every sheet ends with a run of empty rows out to the sheet's last row."""
    tables = []
    for name, rows in sheets:
        body = "".join(f"<table:table-row>{row}</table:table-row>" for row in rows)
        padding = f'<table:table-row table:number-rows-repeated="1048000">{ods_cell("", 1024)}</table:table-row>'
        tables.append(f'<table:table table:name="{escape(name)}">{body}{padding}</table:table>')
    return odf_package(
        "application/vnd.oasis.opendocument.spreadsheet", f"<office:spreadsheet>{''.join(tables)}</office:spreadsheet>"
    )


# -- legacy Office (Compound File Binary) ---------------------------------------------------

_FREE, _END_OF_CHAIN, _FAT_SECTOR, _NO_STREAM = 0xFFFFFFFF, 0xFFFFFFFE, 0xFFFFFFFD, 0xFFFFFFFF


def _directory_entry(name: str, kind: int, child: int, start: int, size: int) -> bytes:
    encoded = (name + "\0").encode("utf-16-le") if name else b""
    return (
        encoded.ljust(64, b"\0")
        + struct.pack("<HBB3I", len(encoded), kind, 1, _NO_STREAM, _NO_STREAM, child)
        + bytes(16 + 4 + 16)  # class id, state bits, creation and modification times
        + struct.pack("<IQ", start, size)
    )


def compound_file(stream_name: str, data: bytes) -> bytes:
    """A version-3 Compound File (the container of .doc/.ppt/.xls, MS-CFB) holding one stream:
    enough for file-type detection, which looks for "WordDocument" or "PowerPoint Document",
    though no Office reader would find a document in it."""
    data = data.ljust(4096, b"\0")  # 4096 bytes and up live in regular sectors, not the mini stream
    data_sectors = -(-len(data) // 512)
    header = (
        b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
        + bytes(16)
        + struct.pack("<HHHHH6xIIIIIIIII", 0x3E, 3, 0xFFFE, 9, 6, 0, 1, 1, 0, 4096, _END_OF_CHAIN, 0, _END_OF_CHAIN, 0)
        + struct.pack("<I", 0)
        + struct.pack("<I", _FREE) * 108  # the DIFAT: the FAT is sector 0
    )
    # sector 0: the FAT; sector 1: the directory; sectors 2..: the stream, chained in order
    fat = [_FAT_SECTOR, _END_OF_CHAIN] + [3 + i for i in range(data_sectors - 1)] + [_END_OF_CHAIN]
    fat_sector = struct.pack(f"<{len(fat)}I", *fat).ljust(512, b"\xff")
    directory = (
        _directory_entry("Root Entry", 5, 1, _END_OF_CHAIN, 0)
        + _directory_entry(stream_name, 2, _NO_STREAM, 2, len(data))
        + (bytes(64) + struct.pack("<HBB3I", 0, 0, 0, _NO_STREAM, _NO_STREAM, _NO_STREAM) + bytes(48)) * 2
    )
    return header + fat_sector + directory + data.ljust(data_sectors * 512, b"\0")
