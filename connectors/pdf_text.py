"""A PDF's text layer read by pdfminer directly, page by page, for PDFs unstructured returns empty.

unstructured's ``fast`` strategy skips every page of a PDF in which one page has over 10,000
drawing operators (its ``is_pdf_too_complex`` heuristic for CAD drawings) and returns no
elements, although such a PDF may hold whole paragraphs of text: a report with a detailed chart,
a map with its legend. pdfminer reads those pages; slowly (roughly 30 s per million drawing
operators here), which the runner's parse timeout bounds.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

from pdfminer.converter import PDFPageAggregator
from pdfminer.layout import LAParams, LTImage, LTLayoutContainer, LTTextBox
from pdfminer.pdfinterp import PDFPageInterpreter, PDFResourceManager
from pdfminer.pdfpage import PDFPage

from connectors.blocks import Block


@dataclass
class PdfText:
    blocks: list[Block]  # one per pdfminer text box, in reading order, with its page number
    images: int  # pictures on the pages: pages of pictures and no text are a scan


def read_pdf_text(content: bytes) -> PdfText:
    """The text boxes of every page. Raises pdfminer's exceptions on a PDF it cannot read."""
    resources = PDFResourceManager()
    # all_texts: also lay out text inside form XObjects (figures), where some generators put it.
    device = PDFPageAggregator(resources, laparams=LAParams(all_texts=True))
    interpreter = PDFPageInterpreter(resources, device)
    found = PdfText([], 0)
    for number, page in enumerate(PDFPage.get_pages(io.BytesIO(content)), start=1):
        interpreter.process_page(page)
        for item in _leaves(device.get_result()):
            if isinstance(item, LTImage):
                found.images += 1
            elif text := " ".join(item.get_text().split()):
                found.blocks.append(Block(text, "NarrativeText", page_number=number))
    return found


def _leaves(container: LTLayoutContainer) -> Iterator[LTTextBox | LTImage]:
    """Text boxes and images, looking inside figures."""
    for item in container:
        if isinstance(item, (LTTextBox, LTImage)):
            yield item
        elif isinstance(item, LTLayoutContainer):
            yield from _leaves(item)
