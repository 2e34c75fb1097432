"""Late versus naive chunk embeddings at the same chunk boundaries, with the packaged MiniLM.

    python benchmarks/late_chunking.py [--only scifact|sec] [--scifact-limit N] [--datasets DIR]
                                       [--window-tokens W] [--overlap-tokens O] [--cache-dir DIR]

* SciFact (BEIR test split, 300 queries): documents are title + text, as BEIR joins them; nDCG@10
  where a document scores its best chunk. ``--scifact-limit N`` keeps every judged document plus
  a seeded sample of the others, N in all (fewer distractors: figures are then above full-corpus
  ones, but naive and late see the same corpus).
* SEC 10-Q (20 filings as PDF, 195 questions): the filings are parsed with the project's
  UnstructuredParser (``fast`` strategy; parses are cached in ``--cache-dir``); a question is
  answered when a gold "Source Docs" filing (a glob such as ``*AAPL*``) ranks in the top 5 / 10.
  Recall@k below is that hit rate; the fraction of all gold filings found is printed too.

Both sides use the project's RecursiveChunker, so every chunk has the same span for naive and late
embedding; naive embeds each chunk's text alone (HuggingFaceEmbedder), late pools the chunk's
tokens from one encoding of the whole document (LateChunkingEmbedder). Queries are embedded the
same way for both. Retrieval is exact cosine search with numpy over every chunk vector (no ANN
index), so the comparison is about the embeddings alone. Metrics come from ir-measures (trec_eval).
Embedding time is measured batch by batch, alternating which embedder goes first, so a busy shared
machine slows both sides alike.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import fnmatch
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from chunkers.recursive import RecursiveChunker  # noqa: E402
from core.component import require  # noqa: E402
from core.types import (  # noqa: E402
    ChunkedDocument,
    Element,
    ParsedDocument,
    SourceDocument,
    sha256_hex,
)
from embedders.base import Embedder  # noqa: E402
from embedders.huggingface import HuggingFaceEmbedder  # noqa: E402
from embedders.late import LateChunkingEmbedder  # noqa: E402

DEFAULT_DATASETS = Path(os.environ.get("RAG_PIPELINE_DATASETS", ROOT.parent / "shared" / "datasets"))
EMBED_BATCH_DOCUMENTS = 32  # documents per embed() call, as the runner's default batch


@dataclass
class Corpus:
    """Chunked documents, queries and relevance judgements (qrels: query id -> document id -> grade)."""

    documents: list[ChunkedDocument]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


@dataclass
class Embedded:
    vectors: np.ndarray  # one row per chunk, documents in corpus order
    seconds: float


# -- SciFact ------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as lines:
        for row in csv.DictReader(lines, delimiter="\t"):
            qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    return qrels


def scifact_document(record: dict) -> ParsedDocument:
    title, body = record["title"].strip(), record["text"].strip()
    text = f"{title}\n\n{body}" if title else body
    elements = [Element(text=body, category="NarrativeText", start=len(text) - len(body), end=len(text))]
    if title:
        elements.insert(0, Element(text=title, category="Title", start=0, end=len(title)))
    return ParsedDocument(
        source_id=record["_id"],
        uri=f"scifact:{record['_id']}",
        media_type="text/plain",
        content_hash=sha256_hex(text),
        text=text,
        elements=tuple(elements),
    )


def load_scifact(folder: Path, chunker: RecursiveChunker, limit: int | None, seed: int) -> tuple[Corpus, str]:
    qrels = _read_qrels(folder / "qrels" / "test.tsv")
    queries = {q["_id"]: q["text"] for q in _read_jsonl(folder / "queries.jsonl") if q["_id"] in qrels}
    records = _read_jsonl(folder / "corpus.jsonl")
    total = len(records)
    description = f"full corpus of {total:,} documents"
    if limit is not None and limit < total:
        judged = {doc for judgements in qrels.values() for doc in judgements}
        others = [r["_id"] for r in records if r["_id"] not in judged]
        sampled = set(random.Random(seed).sample(others, max(limit - len(judged), 0)))
        records = [r for r in records if r["_id"] in judged or r["_id"] in sampled]
        description = (
            f"{len(records):,} of {total:,} documents: all {len(judged)} judged + {len(sampled):,} sampled (seed "
            f"{seed})"
        )

    documents = [scifact_document(r) for r in records]
    return Corpus(_chunk(chunker, documents), queries, qrels), description


# -- SEC 10-Q -----------------------------------------------------------------------------------------


def parse_filing(path: Path, cache_dir: Path) -> ParsedDocument:
    """The filing parsed by the project's UnstructuredParser, cached by content and parser settings."""
    from connectors.parsing import UnstructuredParser

    parser = UnstructuredParser()
    content = path.read_bytes()
    settings = json.dumps(parser.to_dict(), sort_keys=True)
    key = hashlib.sha256(content + settings.encode()).hexdigest()[:24]
    cached = cache_dir / f"{key}.json"
    if cached.is_file():
        data = json.loads(cached.read_text(encoding="utf-8"))
        elements = tuple(Element(**{**e, "heading_path": tuple(e["heading_path"])}) for e in data["elements"])
        return ParsedDocument(**{**data, "elements": elements})
    source = SourceDocument(
        source_id=path.name,
        uri=path.resolve().as_uri(),
        media_type="application/pdf",
        content_hash=sha256_hex(content),
        content=content,
        metadata={"file_name": path.name},
    )
    parsed = parser.parse(source)
    cache_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "source_id": parsed.source_id,
        "uri": parsed.uri,
        "media_type": parsed.media_type,
        "content_hash": parsed.content_hash,
        "text": parsed.text,
        "metadata": parsed.metadata,
        "elements": [
            {
                "text": e.text,
                "category": e.category,
                "start": e.start,
                "end": e.end,
                "page_number": e.page_number,
                "heading_path": list(e.heading_path),
                "metadata": {},
            }
            for e in parsed.elements
        ],
    }
    cached.write_text(json.dumps(record), encoding="utf-8")
    return parsed


def load_sec(folder: Path, chunker: RecursiveChunker, cache_dir: Path) -> tuple[Corpus, str]:
    filings = sorted((folder / "docs").glob("*.pdf"))
    started = time.perf_counter()
    documents = []
    for path in filings:
        parsed = parse_filing(path, cache_dir)
        # Rank by filing name without the extension: the questions' globs name "2023 Q3 NVDA".
        documents.append(dataclasses.replace(parsed, source_id=path.stem))
    parse_seconds = time.perf_counter() - started
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    with (folder / "qna_data.csv").open(encoding="utf-8-sig") as rows:
        for number, row in enumerate(csv.DictReader(rows)):
            patterns = [p.strip() for p in row["Source Docs"].split(",") if p.strip()]
            gold = {d.source_id for d in documents if any(fnmatch.fnmatchcase(d.source_id, p) for p in patterns)}
            if not gold:
                raise ValueError(f"question {number}: no filing matches {row['Source Docs']!r}")
            queries[str(number)] = row["Question"]
            qrels[str(number)] = dict.fromkeys(gold, 1)
    characters = sum(len(d.text) for d in documents)
    description = (
        f"{len(documents)} filings, {characters:,} characters parsed in {parse_seconds:.0f} s (cached in {cache_dir})"
    )
    return Corpus(_chunk(chunker, documents), queries, qrels), description


# -- embedding, search, metrics ----------------------------------------------------------------------


def _chunk(chunker: RecursiveChunker, documents: Sequence[ParsedDocument]) -> list[ChunkedDocument]:
    return [ChunkedDocument(d, chunks) for d in documents if (chunks := chunker.chunk(d))]


def _collect(documents: Sequence[ChunkedDocument]) -> np.ndarray:
    return np.stack([chunk.vectors.pop("dense") for d in documents for chunk in d.chunks])


def embed_both(naive: Embedder, late: Embedder, documents: Sequence[ChunkedDocument]) -> tuple[Embedded, Embedded]:
    """Both embeddings of every chunk, timing each embedder over the same batches in alternating order."""
    parts: dict[str, list[np.ndarray]] = {"naive": [], "late": []}
    seconds = {"naive": 0.0, "late": 0.0}
    for number, start in enumerate(range(0, len(documents), EMBED_BATCH_DOCUMENTS)):
        batch = documents[start : start + EMBED_BATCH_DOCUMENTS]
        order = [("naive", naive), ("late", late)]
        for name, embedder in order if number % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            embedder.embed(batch)
            seconds[name] += time.perf_counter() - started
            parts[name].append(_collect(batch))
        print(
            f"\r  embedded {min(start + EMBED_BATCH_DOCUMENTS, len(documents)):,}/{len(documents):,} documents",
            end="",
            file=sys.stderr,
            flush=True,
        )
    print(file=sys.stderr)
    return (
        Embedded(np.concatenate(parts["naive"]), seconds["naive"]),
        Embedded(np.concatenate(parts["late"]), seconds["late"]),
    )


def rank_documents(
    embedder: Embedder, corpus: Corpus, chunk_vectors: np.ndarray, depth: int
) -> dict[str, dict[str, float]]:
    """Exact cosine search: every query against every chunk; a document scores its best chunk."""
    query_ids = list(corpus.queries)
    queries = np.stack([embedder.embed_query(corpus.queries[q]) for q in query_ids])
    chunk_scores = queries @ chunk_vectors.T  # both sides are L2-normalised: dot product = cosine
    first_chunks = np.cumsum([0] + [len(d.chunks) for d in corpus.documents[:-1]])
    document_scores = np.maximum.reduceat(chunk_scores, first_chunks, axis=1)
    document_ids = [d.document.source_id for d in corpus.documents]
    run = {}
    for row, query_id in enumerate(query_ids):
        top = np.argsort(-document_scores[row], kind="stable")[:depth]
        run[query_id] = {document_ids[i]: float(document_scores[row, i]) for i in top}
    return run


def measure(
    names: Sequence[str], qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]
) -> dict[str, float]:
    ir_measures = require("ir_measures", purpose="the late-chunking benchmark's metrics (pip install ir-measures)")
    measures = [ir_measures.parse_measure(name) for name in names]
    results = ir_measures.calc_aggregate(measures, qrels, run)
    return {str(m): float(results[m]) for m in measures}


def compare(
    label: str, corpus: Corpus, naive: HuggingFaceEmbedder, late: LateChunkingEmbedder, metrics: Sequence[str]
) -> dict:
    chunks = sum(len(d.chunks) for d in corpus.documents)
    print(f"{label}: {len(corpus.documents):,} documents, {chunks:,} chunks, {len(corpus.queries)} queries", flush=True)
    warm_up = corpus.documents[:2]
    for embedder in (naive, late):  # loads the model and pays first-call costs outside the timing
        embedder.embed(warm_up)
        _collect(warm_up)
    notes_before = {"naive": naive.run_notes(), "late": late.run_notes()}
    naive_vectors, late_vectors = embed_both(naive, late, corpus.documents)
    scores = {}
    for side, embedder, embedded in (("naive", naive, naive_vectors), ("late", late, late_vectors)):
        run = rank_documents(embedder, corpus, embedded.vectors, depth=100)
        scores[side] = measure(metrics, corpus.qrels, run)
    for metric in metrics:
        print(f"{label} {_display(metric)} naive {scores['naive'][metric]:.3f} vs late {scores['late'][metric]:.3f}")
    ratio = late_vectors.seconds / naive_vectors.seconds
    print(
        f"{label} embedding time late {late_vectors.seconds:.1f} s vs naive {naive_vectors.seconds:.1f} s: ratio "
        f"{ratio:.2f}"
    )
    for side, embedder in (("naive", naive), ("late", late)):
        for note in embedder.run_notes():
            if note not in notes_before[side]:
                print(f"{label} {side} note: {note}")
    return {
        "documents": len(corpus.documents),
        "chunks": chunks,
        "queries": len(corpus.queries),
        "scores": scores,
        "seconds": {"naive": naive_vectors.seconds, "late": late_vectors.seconds},
    }


def _display(metric: str) -> str:
    """ir-measures names in the figures' words: Success@k is the hit rate called Recall@k here."""
    if metric.startswith("Success@"):
        return f"Recall@{metric.split('@')[1]} (a gold filing in the top {metric.split('@')[1]})"
    if metric.startswith("R@"):
        return f"fraction of gold filings in the top {metric.split('@')[1]}"
    return metric


# -- main --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=Path, default=DEFAULT_DATASETS)
    parser.add_argument("--only", choices=["scifact", "sec"], help="run one benchmark (default: both)")
    parser.add_argument("--scifact-limit", type=int, help="SciFact documents to embed (all judged ones are kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scifact-chunk-size", type=int, default=500, help="characters per chunk (RecursiveChunker)")
    parser.add_argument("--sec-chunk-size", type=int, default=1000, help="characters per chunk (RecursiveChunker)")
    parser.add_argument("--chunk-overlap", type=int, default=0, help="characters shared by consecutive chunks")
    parser.add_argument("--window-tokens", type=int, help="late chunking window (default: the model's 256)")
    parser.add_argument("--overlap-tokens", type=int, help="late chunking window overlap (default: a quarter window)")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "rag-pipeline-benchmarks")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if not args.datasets.is_dir():
        parser.error(f"datasets folder {args.datasets} not found (set --datasets or RAG_PIPELINE_DATASETS)")

    naive = HuggingFaceEmbedder(device="cpu")
    late = LateChunkingEmbedder(device="cpu", window_tokens=args.window_tokens, overlap_tokens=args.overlap_tokens)
    print(
        f"model {naive.model_id}; late chunking windows of {late.window_size()} tokens, {late.overlap_size()} shared; "
        f"retrieval: exact numpy cosine search over all chunk vectors, a document scores its best chunk; "
        f"torch threads {require('torch').get_num_threads()}",
        flush=True,
    )
    figures: dict[str, dict] = {}
    if args.only in (None, "scifact"):
        chunker = RecursiveChunker(chunk_size=args.scifact_chunk_size, chunk_overlap=args.chunk_overlap)
        corpus, description = load_scifact(args.datasets / "scifact", chunker, args.scifact_limit, args.seed)
        print(
            f"SciFact: BEIR test split, {description}; RecursiveChunker {args.scifact_chunk_size} chars, overlap "
            f"{args.chunk_overlap}"
        )
        figures["scifact"] = {"corpus": description, **compare("SciFact", corpus, naive, late, ["nDCG@10"])}
    if args.only in (None, "sec"):
        chunker = RecursiveChunker(chunk_size=args.sec_chunk_size, chunk_overlap=args.chunk_overlap)
        corpus, description = load_sec(args.datasets / "sec-10-q", chunker, args.cache_dir / "sec-10-q-parsed")
        print(f"SEC 10-Q: {description}; RecursiveChunker {args.sec_chunk_size} chars, overlap {args.chunk_overlap}")
        figures["sec"] = {
            "corpus": description,
            **compare("SEC", corpus, naive, late, ["Success@5", "Success@10", "R@5", "R@10", "Success@1"]),
        }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
