"""Parser isolation with the real unstructured parser and real hostile files.

A file crafted to make the parser allocate without bound, or to keep it busy far past any sane
time, must be killed at the runner's cap and recorded as failed at stage ``parse``, while the
ordinary files beside it are indexed into Milvus Lite.

Hostile files tried against unstructured 0.27 (one parse each, on a busy 2-core machine):

* XML "billion laughs" (10 nested entities x 10): libxml2 refuses it at once ("Maximum entity
  amplification factor exceeded"): an ordinary parse failure, no cap needed.
* HTML "billion laughs": the HTML parser ignores the internal DTD and keeps ``&lol9;`` as text.
* HTML nested 200,000 ``<div>`` deep: lxml stops at its depth limit; "no text", quickly.
* XLSX whose sheet inflates to 512 MB of inline-string cells (3.9 MB on disk): still parsing
  after 180 s, but openpyxl streams it, so memory stayed near 470 MB: a hang, not a bomb.
* Markdown that is one long paragraph: unstructured's narrative-text heuristics run spaCy's whole
  pipeline over it, three times. Time grows with its length and memory by ~3.5 KB per character:
  100 KB took 51 s and 700 MB, 400 KB 142 s and 1.5 GB, 5.7 MB over 180 s and 3 GB. Used below
  as the file that outlasts the time cap.
* DOCX zip bomb: 1.7 MB on disk, ``word/document.xml`` inflates to 256 MiB of tiny paragraphs;
  python-docx reads it and lxml builds the tree: over 5 GB and still going after 300 s. Used
  below as the file that breaks the memory cap.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.records import SourceRecord
from pipeline import Pipeline
from pipeline.report import RunSummary

TIMEOUT_REASON = "parse timed out after {:g} s; the parser process was killed"
MEMORY_REASON = "parser used more than {} MB of memory; the parser process was killed"

ORDINARY_TEXT = (
    "Release notes\n\nThe ingestion service now parses every document in a worker process. "
    "A worker that runs too long or uses too much memory is stopped, and the document is recorded as failed.\n"
)
ORDINARY_MARKDOWN = (
    "# Operator guide\n\n## Restarting the indexer\n\n"
    "Stop the service, wait for the writer to drain its queue, then start it again. "
    "Documents that failed are retried on the next run.\n"
)

_WORD_NS = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
_CONTENT_TYPES = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
    '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
    '<Default Extension="xml" ContentType="application/xml"/>'
    '<Override PartName="/word/document.xml" '
    'ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>'
)
_PACKAGE_RELATIONSHIPS = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
    '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
    '<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" '
    'Target="word/document.xml"/></Relationships>'
)


def write_docx_bomb(path: Path, inflated_mib: int = 256) -> None:
    """A valid-looking DOCX whose body is ``inflated_mib`` MiB of one-letter paragraphs.

    The paragraphs compress about 150:1, so the file stays small on disk; lxml turns every 35
    bytes of them into three tree nodes, so parsing needs many times the inflated size.
    """
    paragraph = b"<w:p><w:r><w:t>x</w:t></w:r></w:p>"
    block = paragraph * (2**20 // len(paragraph))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as package:
        package.writestr("[Content_Types].xml", _CONTENT_TYPES)
        package.writestr("_rels/.rels", _PACKAGE_RELATIONSHIPS)
        with package.open("word/document.xml", "w", force_zip64=True) as body:
            body.write(
                (
                    f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><w:document xmlns:w="{_WORD_NS}"><w:body>'
                ).encode()
            )
            for _ in range(inflated_mib):
                body.write(block)
            body.write(b"</w:body></w:document>")


def write_wall_of_text(path: Path, characters: int = 1_000_000) -> None:
    """Markdown that is one heading and one paragraph of ``characters`` characters."""
    sentence = "The indexer reads every file in the folder and writes its chunks to the store. "
    path.write_text("# Notes\n\n" + sentence * (characters // len(sentence)) + "\n", encoding="utf-8")


@dataclass
class IsolationRun:
    """What one ingest left behind: its summary, the store's chunks, the index record, the failures file."""

    summary: RunSummary
    chunks: dict[str, list[str]]  # chunk ids by source id
    records: dict[str, SourceRecord]
    logged: list[dict[str, Any]]

    def assert_isolated(self, hostile: str, ordinary: set[str], reason: str) -> None:
        """The hostile file failed at parse for ``reason`` everywhere it is recorded; the others are indexed."""
        assert [(f.source_id, f.stage, f.reason) for f in self.summary.failures] == [(hostile, "parse", reason)]
        assert [(entry["source_id"], entry["stage"], entry["reason"]) for entry in self.logged] == [
            (hostile, "parse", reason)
        ]
        failed = self.records[hostile]
        assert (failed.status, failed.stage, failed.reason) == ("failed", "parse", reason)
        assert self.summary.documents_seen == len(ordinary) + 1 and self.summary.documents_indexed == len(ordinary)
        assert set(self.chunks) == ordinary and all(self.chunks[s] for s in ordinary)
        assert all(self.records[s].status == "indexed" for s in ordinary)


def ingest(tmp_path: Path, documents: Path, **caps: Any) -> IsolationRun:
    """Ingest ``documents`` into Milvus Lite with one parser worker under ``caps``."""
    failures_file = tmp_path / "failures.jsonl"
    spec = {
        "name": "isolation",
        "stages": {
            "source": {"type": "local", "path": str(documents)},
            "parser": {"type": "unstructured"},
            "chunker": {"type": "recursive", "chunk_size": 400, "chunk_overlap": 0},
            "embedder": {"type": "huggingface", "model": "all-MiniLM-L6-v2"},
            "store": {"type": "milvus", "uri": str(tmp_path / "index.db"), "collection": "isolation"},
        },
        "runner": {"parse_workers": 1, "progress": "never", "failures_file": str(failures_file), **caps},
    }
    with Pipeline(spec, base_dir=tmp_path) as pipeline:
        summary = pipeline.ingest()
        chunks = pipeline.store.chunk_ids_by_source()
        records = {r.source_id: r for r in pipeline.store.index_record().all()}
    logged = (
        [json.loads(line) for line in failures_file.read_text(encoding="utf-8").splitlines()]
        if failures_file.exists()
        else []
    )
    return IsolationRun(summary, chunks, records, logged)


def test_zip_bomb_is_killed_at_the_memory_cap_and_the_other_files_are_indexed(tmp_path):
    documents = tmp_path / "docs"
    documents.mkdir()
    (documents / "guide.md").write_text(ORDINARY_MARKDOWN, encoding="utf-8")
    (documents / "notes.txt").write_text(ORDINARY_TEXT, encoding="utf-8")
    write_docx_bomb(documents / "report.docx")
    assert (documents / "report.docx").stat().st_size < 4 * 2**20  # small on disk, 256 MiB inflated

    # The time cap is generous (a fresh worker's first import of unstructured takes up to ~30 s
    # on a busy machine): only the memory cap can stop this file in time.
    run = ingest(tmp_path, documents, parse_timeout_s=180, parse_memory_mb=1024)

    run.assert_isolated("docs/report.docx", {"docs/guide.md", "docs/notes.txt"}, MEMORY_REASON.format(1024))


def test_endless_parse_is_killed_at_the_time_cap_and_the_other_files_are_indexed(tmp_path):
    documents = tmp_path / "docs"
    documents.mkdir()
    (documents / "notes.txt").write_text(ORDINARY_TEXT, encoding="utf-8")
    (documents / "readme.txt").write_text(ORDINARY_TEXT.replace("Release notes", "Read me first"), encoding="utf-8")
    write_wall_of_text(documents / "wall.md")

    # Plain text takes the native route (no unstructured import), so the ordinary files finish
    # well inside the time cap even on a busy machine. The wall of text would take minutes; in
    # 20 s it stays far below the memory cap, so only the clock can stop it.
    timeout_s = 20
    run = ingest(tmp_path, documents, parse_timeout_s=timeout_s, parse_memory_mb=4096)

    run.assert_isolated("docs/wall.md", {"docs/notes.txt", "docs/readme.txt"}, TIMEOUT_REASON.format(timeout_s))
