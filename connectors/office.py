"""Office Open XML files repaired in memory before unstructured reads them, and legacy .doc/.ppt
files converted with LibreOffice.

unstructured reads DOCX, PPTX and XLSX through python-docx, python-pptx and openpyxl, which miss
two shapes of real documents:

* Strict OOXML (ISO/IEC 29500 Strict, Office's "Strict Open XML" formats): the same markup under
  other namespace URIs (``http://purl.oclc.org/ooxml/...``). python-docx finds no relationship of
  the Transitional type and raises ``KeyError``; python-pptx and openpyxl fail likewise. The
  Strict URIs are rewritten to their Transitional equivalents, part by part.
* text boxes and shapes with text in DOCX (``w:txbxContent``): python-docx reads only the body's
  own paragraphs, so a flyer or a form laid out in text boxes comes back empty. Their paragraphs
  are moved out to follow the paragraph the box is anchored in, which keeps document order. Word
  also writes a VML copy of each box for old readers (inside ``mc:Fallback``); that copy is left
  where it is, and python-docx ignores it, so no text appears twice.

Legacy binary formats (.doc, .ppt) have no Python reader; LibreOffice converts them to DOCX/PPTX.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import tempfile
import zipfile
from pathlib import Path

from connectors.base import ParseFailure

# -- Strict OOXML -----------------------------------------------------------------------------

# A Strict URI is http://purl.oclc.org/ooxml/<area>/<name>[/<relationship type>]; its Transitional
# twin is http://schemas.openxmlformats.org/<area>/2006/<name>[/<type>], where two names are
# hyphenated (extended-properties, custom-properties), as ISO/IEC 29500 names them.
_STRICT_URI = re.compile(rb"http://purl\.oclc\.org/ooxml/(\w+)/(\w+)(?:/(\w+))?")
_TRANSITIONAL_NAMES = {b"extendedProperties": b"extended-properties", b"customProperties": b"custom-properties"}


def _transitional_uri(match: re.Match[bytes]) -> bytes:
    area, name, relationship = match.groups()
    uri = b"http://schemas.openxmlformats.org/%s/2006/%s" % (area, _TRANSITIONAL_NAMES.get(name, name))
    if relationship:
        uri += b"/" + _TRANSITIONAL_NAMES.get(relationship, relationship)
    return uri


def strict_to_transitional(xml: bytes) -> bytes:
    return _STRICT_URI.sub(_transitional_uri, xml)


# -- text boxes -------------------------------------------------------------------------------

_NAMESPACES = {
    "w": "http://schemas.openxmlformats.org/wordprocessingml/2006/main",
    "mc": "http://schemas.openxmlformats.org/markup-compatibility/2006",
}


def lift_text_boxes(xml: bytes) -> bytes:
    """The part with each text box's paragraphs (and tables) moved to just after the paragraph
    that anchors the box; nested boxes end up after the paragraph that held them."""
    from lxml import etree

    root = etree.fromstring(xml, etree.XMLParser(resolve_entities=False, no_network=True))
    last_lifted: dict[etree._Element, etree._Element] = {}  # anchor paragraph -> what follows it now
    for box in root.xpath("//w:txbxContent[not(ancestor::mc:Fallback)]", namespaces=_NAMESPACES):
        anchor = next(box.iterancestors(f"{{{_NAMESPACES['w']}}}p"), None)
        if anchor is None:
            continue  # a box outside any paragraph has nowhere in the text flow to go
        cursor = last_lifted.get(anchor, anchor)
        for block in list(box):
            cursor.addnext(block)
            cursor = block
        last_lifted[anchor] = cursor
    document: bytes = etree.tostring(root, xml_declaration=True, encoding="UTF-8", standalone=True)
    return document


# -- the package ------------------------------------------------------------------------------


def repair_ooxml(content: bytes) -> tuple[bytes, list[str]]:
    """The DOCX/PPTX/XLSX with Strict namespaces made Transitional and (in a DOCX) text boxes
    lifted into the text, and the names of the repairs made; the content unchanged when none was
    needed, or when the package cannot be read: unstructured then reports it as corrupt, naming
    what its reader tripped on."""
    try:
        return _repaired(content)
    except Exception:  # zipfile, zlib and lxml raise many types on damaged packages
        return content, []


def _repaired(content: bytes) -> tuple[bytes, list[str]]:
    with zipfile.ZipFile(io.BytesIO(content)) as package:
        parts = {name: package.read(name) for name in package.namelist() if name.endswith((".xml", ".rels"))}
        repairs = []
        if any(b"http://purl.oclc.org/ooxml/" in data for data in parts.values()):
            parts = {name: strict_to_transitional(data) for name, data in parts.items()}
            repairs.append("strict-ooxml")
        # A DOCX's main document and its headers and footers; unstructured reads no other part.
        boxed = [name for name, data in parts.items() if name.startswith("word/") and b"txbxContent" in data]
        for name in boxed:
            parts[name] = lift_text_boxes(parts[name])
        if boxed:
            repairs.append("text-boxes")
        if not repairs:
            return content, []
        return _rezip(package, parts), repairs


def _rezip(package: zipfile.ZipFile, replaced: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for info in package.infolist():
            data = replaced.get(info.filename)
            target.writestr(info, data if data is not None else package.read(info))
    return out.getvalue()


# -- legacy formats through LibreOffice -------------------------------------------------------

LIBREOFFICE_INSTALL_HINT = (
    "install it with: bash scripts/install.sh --libreoffice "
    "(Debian/Ubuntu: apt-get install libreoffice-writer-nogui libreoffice-impress-nogui)"
)
# Below the runner's default parse timeout (120 s): a worker killed for time would leave
# LibreOffice running, while this timeout ends it with the worker still alive.
CONVERSION_TIMEOUT_S = 90.0


def libreoffice_command() -> str | None:
    """LibreOffice's command line on PATH: ``soffice``, or the ``libreoffice`` launcher some
    distributions install instead."""
    return shutil.which("soffice") or shutil.which("libreoffice")


def convert_with_libreoffice(content: bytes, kind: str, target: str) -> bytes:
    """A legacy file (``kind``: DOC, PPT) converted to ``target`` (docx, pptx); ParseFailure
    when LibreOffice is missing, fails or runs past CONVERSION_TIMEOUT_S."""
    command = libreoffice_command()
    if command is None:
        raise ParseFailure(
            f"legacy {kind} files need LibreOffice (soffice) to convert them, and it is not installed; "
            f"{LIBREOFFICE_INSTALL_HINT}"
        )
    with tempfile.TemporaryDirectory(prefix="rag-libreoffice-") as work:
        folder = Path(work)
        source = folder / f"document.{kind.lower()}"
        source.write_bytes(content)
        # A profile of its own: LibreOffice allows one running instance per profile, and parser
        # workers convert in parallel.
        arguments = [
            command,
            f"-env:UserInstallation={(folder / 'profile').as_uri()}",
            "--headless",
            "--norestore",
            "--convert-to",
            target,
            "--outdir",
            str(folder / "out"),
            str(source),
        ]
        returncode, output = _run_in_own_group(arguments, kind)
        converted = folder / "out" / f"document.{target}"
        if not converted.is_file():
            detail = output.strip().splitlines()[-1] if output.strip() else f"exit status {returncode}"
            raise ParseFailure(
                f"LibreOffice could not convert this {kind} file to {target.upper()} ({detail}); the file may be "
                "corrupt"
            )
        return converted.read_bytes()


def _run_in_own_group(arguments: list[str], kind: str) -> tuple[int, str]:
    """Run LibreOffice in a process group of its own, so a timeout ends its helper processes
    too (``soffice`` is a script that starts ``oosplash``, which starts ``soffice.bin``)."""
    with subprocess.Popen(
        arguments, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    ) as process:
        try:
            output, _ = process.communicate(timeout=CONVERSION_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise ParseFailure(
                f"LibreOffice did not convert this {kind} file within {CONVERSION_TIMEOUT_S:g} s"
            ) from None
    return process.returncode, output.decode(errors="replace")
