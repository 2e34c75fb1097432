"""Span-level retrieval evaluation: does retrieval return the excerpt that answers the question?

``python -m pipeline eval spec.yaml --excerpts questions.csv --corpus DIR [--k 5 10]``, or
:meth:`pipeline.Pipeline.evaluate_excerpts`. Relevance is a character span of a corpus file, not a
document (the protocol of Chroma's chunking evaluation, Smith & Troynikov 2024):

1. every corpus file of ``DIR`` a question names is ingested with the spec's own parser, chunker,
   embedder, sparse encoder and store, into a collection of its own
   (``<collection>_excerpts_<folder>``), so a production collection is never touched;
2. each question runs through the spec's query path in every mode (dense, bm25, sparse, hybrid,
   ``<mode>+rerank``) and keeps the top k chunks (k = 5 and 10 by default) from the whole index;
3. each retrieved chunk's span in its corpus file is compared with the question's reference spans.

Measures per question (Chroma's definitions): covered = reference characters inside retrieved chunks
of the question's corpus, each counted once; recall = covered / reference characters; precision =
covered / characters of the k retrieved chunks (chunks of another corpus count, and cover nothing);
IoU = covered / (retrieved characters + reference characters not covered). precision_omega is the
precision an oracle reaches by retrieving exactly the chunks that touch the references: what the
chunk boundaries alone allow, whatever the retrieval. Means and standard deviations over questions,
overall and per corpus; the mean chunk size in cl100k tokens, because chunkers only compare at
similar sizes and the same k.

Questions come as the benchmark's CSV (columns ``question``, ``references``: a JSON list of
``{content, start_index, end_index}``, ``corpus_id``: a file's name without its extension) or as
JSONL with the same keys per line. Offsets are characters of the decoded file. A reference whose
``content`` is not at its offsets but occurs in the corpus is moved to its first occurrence (spans
counted in bytes are a common slip), and counted; a question with a reference found nowhere, an
unknown corpus or a malformed row is skipped and reported by its row, never a crash.

Chunk offsets point into the *parsed* text, which the parser may change (collapsed whitespace,
Markdown markup stripped, blank lines between elements). :class:`OffsetMap` maps them back to the
file by aligning the two texts' words, so any parser the spec uses is measured fairly.
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import difflib
import glob
import io
import json
import math
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from connectors.base import ParseFailure
from connectors.parsing import decode_text
from pipeline.evaluate import RERANK_SUFFIX, EvaluationError, default_modes, evaluation_runner
from pipeline.query import MAX_LIMIT, QueryEngine, QueryInputError
from pipeline.spec import ComponentSpec, Spec

DEFAULT_KS = (5, 10)
SPAN_MEASURES = ("recall", "precision", "iou")
CSV_COLUMNS = ("question", "references", "corpus_id")

Range = tuple[int, int]


# -- ranges ------------------------------------------------------------------------------------


def merged(ranges: Iterable[Range]) -> list[Range]:
    """The union of half-open ranges as sorted, disjoint ranges (empty ones dropped)."""
    out: list[Range] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def total(ranges: Iterable[Range]) -> int:
    return sum(end - start for start, end in ranges)


def covered(chunks: Iterable[Range], references: Sequence[Range]) -> list[Range]:
    """The parts of ``references`` inside any of ``chunks``, as disjoint ranges."""
    return merged((max(c0, r0), min(c1, r1)) for c0, c1 in chunks for r0, r1 in references if c0 < r1 and r0 < c1)


def span_scores(
    retrieved: Sequence[tuple[str, Range]], corpus_id: str, references: Sequence[Range]
) -> dict[str, float]:
    """Recall, precision and IoU of the retrieved chunks ``(corpus id, span)`` for one question."""
    own = [span for corpus, span in retrieved if corpus == corpus_id]
    hit = total(covered(own, references))
    reference_chars = total(references)
    retrieved_chars = total(span for _, span in retrieved)
    missed = total(merged(references)) - hit
    return {
        "recall": hit / reference_chars if reference_chars else 0.0,
        "precision": hit / retrieved_chars if retrieved_chars else 0.0,
        "iou": hit / (retrieved_chars + missed) if retrieved_chars + missed else 0.0,
    }


def precision_omega(chunks: Sequence[Range], references: Sequence[Range]) -> float:
    """The precision of retrieving exactly the chunks (of the question's corpus) that touch a reference."""
    touching = [c for c in chunks if any(c[0] < r1 and r0 < c[1] for r0, r1 in references)]
    retrieved_chars = total(merged(touching))
    return total(covered(touching, references)) / retrieved_chars if retrieved_chars else 0.0


# -- from parsed offsets back to the file -------------------------------------------------------


class OffsetMap:
    """Maps character spans of a parsed text to spans of the file text it was parsed from.

    The words (runs of non-space characters) of both texts are aligned as sequences (difflib's
    longest matching blocks: a parser that drops markup, collapses whitespace or adds separators
    leaves the words themselves in order); a word the parser made up or changed stays unaligned.
    A span maps to the file span from its first aligned word to its last, exact wherever the parser
    kept the text as it was.
    """

    def __init__(self, parsed: str, source: str):
        self.identity = parsed == source
        self._parsed_starts: list[int] = []
        self._source_starts: list[int] = []
        self._lengths: list[int] = []
        if self.identity:
            return
        parsed_words = list(re.finditer(r"\S+", parsed))
        source_words = list(re.finditer(r"\S+", source))
        parsed_tokens = [w.group() for w in parsed_words]
        source_tokens = [w.group() for w in source_words]
        if parsed_tokens == source_tokens:  # only whitespace differs: no search needed
            pairs: Iterable[tuple[int, int]] = zip(range(len(parsed_tokens)), range(len(source_tokens)))
        else:
            # autojunk leaves out words commoner than 1% when seeding matches (so a long text aligns in
            # seconds, not hours) and still extends every match over them.
            matcher = difflib.SequenceMatcher(None, parsed_tokens, source_tokens, autojunk=True)
            pairs = ((a + i, b + i) for a, b, size in matcher.get_matching_blocks() for i in range(size))
        for i, j in pairs:
            self._parsed_starts.append(parsed_words[i].start())
            self._source_starts.append(source_words[j].start())
            self._lengths.append(len(parsed_tokens[i]))
        self._parsed_ends = [s + n for s, n in zip(self._parsed_starts, self._lengths)]

    @property
    def aligned_words(self) -> int:
        return len(self._parsed_starts)

    def span(self, start: int, end: int) -> Range | None:
        """The file span of parsed ``[start, end)``; None when no word of it was found in the file."""
        if self.identity:
            return (start, end)
        first = bisect.bisect_right(self._parsed_ends, start)  # first word ending after start
        last = bisect.bisect_left(self._parsed_starts, end) - 1  # last word starting before end
        if first > last:
            return None
        begin = self._source_starts[first] + max(0, start - self._parsed_starts[first])
        finish = self._source_starts[last] + min(self._lengths[last], end - self._parsed_starts[last])
        return (begin, finish)


def parsed_text_of(chunks: Iterable[tuple[int, int, str]]) -> str:
    """The parsed text as far as chunks ``(start, end, text)`` cover it, gaps as spaces: enough to
    align its words with the file, without parsing the file again."""
    pieces = sorted(chunks)
    length = max((end for _, end, _ in pieces), default=0)
    buffer = [" "] * length
    for start, end, text in pieces:
        buffer[start:end] = text
    return "".join(buffer)


# -- questions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExcerptQuestion:
    row: int  # the CSV row (1 = the first after the header) or JSONL line, for messages
    question: str
    corpus_id: str
    references: tuple[Range, ...]


@dataclass
class ExcerptSet:
    questions: list[ExcerptQuestion]
    corpus_files: dict[str, Path]  # corpus id -> file, only those a question names
    corpus_texts: dict[str, str]
    skipped: list[str] = field(default_factory=list)  # "row N: why"
    relocated: int = 0  # references found at their content's first occurrence, not at their offsets


def load_excerpts(questions_file: Path, corpus_dir: Path) -> ExcerptSet:
    """Read the questions (CSV or JSONL) and the corpus files they name, checking every reference."""
    rows = list(_question_rows(questions_file))
    if not corpus_dir.is_dir():
        raise EvaluationError(f"corpus folder {corpus_dir} does not exist")
    files = _corpus_files(corpus_dir)
    result = ExcerptSet([], {}, {})
    for row, record in rows:
        try:
            question = _question(row, record, files, result)
        except _RowProblem as problem:
            result.skipped.append(f"row {row}: {problem}")
            continue
        result.questions.append(question)
    if not result.questions:
        reasons = "; ".join(result.skipped[:3]) or "the file has no rows"
        raise EvaluationError(f"{questions_file}: no question can be evaluated ({reasons})")
    return result


class _RowProblem(Exception):
    pass


def _question_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise EvaluationError(f"questions file {path} does not exist") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        row = data[: exc.start].count(b"\n") + 1
        raise EvaluationError(f"{path}: not UTF-8 (line {row}, byte {exc.start}); save it as UTF-8") from None
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, {"_problem": f"not JSON ({exc.msg})"}
                continue
            yield number, record if isinstance(record, dict) else {"_problem": "not a JSON object"}
        return
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        found = ", ".join(reader.fieldnames or []) or "none"
        raise EvaluationError(f"{path}: missing column(s) {', '.join(missing)} (found: {found})")
    for number, record in enumerate(reader, start=1):
        references = record.get("references")
        try:
            record["references"] = json.loads(references) if references else None
        except json.JSONDecodeError as exc:
            record = {"_problem": f"references is not JSON ({exc.msg})"}
        yield number, record


def _corpus_files(folder: Path) -> dict[str, list[Path]]:
    files: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            files[path.stem].append(path)
    return files


def _question(row: int, record: dict[str, Any], files: dict[str, list[Path]], found: ExcerptSet) -> ExcerptQuestion:
    if "_problem" in record:
        raise _RowProblem(record["_problem"])
    question, corpus_id, references = record.get("question"), record.get("corpus_id"), record.get("references")
    if not isinstance(question, str) or not question.strip():
        raise _RowProblem("empty question")
    if not isinstance(corpus_id, str) or not corpus_id:
        raise _RowProblem("no corpus_id")
    if not isinstance(references, list) or not references:
        raise _RowProblem("no references (a JSON list of {content, start_index, end_index})")
    text = _corpus_text(corpus_id, files, found)
    spans = [_reference(i, reference, text, corpus_id, found) for i, reference in enumerate(references, start=1)]
    return ExcerptQuestion(row, question.strip(), corpus_id, tuple(spans))


def _corpus_text(corpus_id: str, files: dict[str, list[Path]], found: ExcerptSet) -> str:
    if corpus_id in found.corpus_texts:
        return found.corpus_texts[corpus_id]
    candidates = files.get(corpus_id, [])
    if len(candidates) != 1:
        why = "no file" if not candidates else f"{len(candidates)} files ({', '.join(p.name for p in candidates)})"
        raise _RowProblem(f"corpus {corpus_id!r}: {why} named {corpus_id}.* in the corpus folder")
    path = candidates[0]
    try:
        text, _ = decode_text(path.read_bytes())
    except (OSError, ParseFailure) as exc:
        raise EvaluationError(f"corpus file {path}: cannot be read as text ({exc})") from None
    if not text.strip():
        raise EvaluationError(f"corpus file {path} is empty")
    found.corpus_files[corpus_id], found.corpus_texts[corpus_id] = path, text
    return text


def _reference(number: int, reference: Any, text: str, corpus_id: str, found: ExcerptSet) -> Range:
    if not isinstance(reference, dict):
        raise _RowProblem(f"reference {number} is not an object")
    content, start, end = reference.get("content"), reference.get("start_index"), reference.get("end_index")
    span: Range | None = None
    if type(start) is int and type(end) is int:  # bool is an int subclass: refused with the rest
        if 0 <= start < end <= len(text):
            span = (start, end)
        elif not isinstance(content, str):
            raise _RowProblem(f"reference {number}: span {start}-{end} is outside {corpus_id} ({len(text)} characters)")
    if not isinstance(content, str) or not content:
        if span is None:
            raise _RowProblem(f"reference {number}: needs content or start_index < end_index")
        return span
    if span is not None and text[span[0] : span[1]] == content:
        return span
    at = text.find(content)
    if at < 0:
        raise _RowProblem(f"reference {number}: its content is not found verbatim in {corpus_id}")
    found.relocated += 1
    return (at, at + len(content))


# -- the report --------------------------------------------------------------------------------


@dataclass
class SpanResult:
    mode: str
    k: int
    overall: dict[str, tuple[float, float]]  # measure -> (mean, std)
    per_corpus: dict[str, dict[str, tuple[float, float]]]
    latency_ms: dict[str, float]


@dataclass
class ExcerptReport:
    questions_file: str
    corpus: str
    collection: str
    questions: int
    corpora: list[str]
    chunks: int
    mean_chunk_tokens: float
    ingest_seconds: float | None  # None when an existing index was reused
    stage_seconds: dict[str, float] | None = None
    index_reused: bool = False
    precision_omega: dict[str, tuple[float, float]] = field(default_factory=dict)  # "all" and per corpus
    results: list[SpanResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        ingest = (
            f"ingested in {self.ingest_seconds:.0f} s ({_stage_times(self.stage_seconds)})"
            if self.ingest_seconds is not None
            else "existing index reused"
        )
        omega = self.precision_omega.get("all", (0.0, 0.0))
        lines = [
            f"{self.questions} questions over {len(self.corpora)} corpora ({', '.join(self.corpora)}): {self.chunks} "
            f"chunks of {self.mean_chunk_tokens:.0f} cl100k tokens on average in {self.collection!r}, {ingest}",
            f"precision_omega {omega[0]:.4f} ± {omega[1]:.4f} (the best precision these chunk boundaries allow)",
            f"{'mode':<16}{'k':>4}" + "".join(f"{m:>18}" for m in SPAN_MEASURES) + f"{'p50 ms':>9}",
        ]
        for r in self.results:
            cells = "".join(f"{r.overall[m][0]:>10.4f} ± {r.overall[m][1]:.3f}" for m in SPAN_MEASURES)
            lines.append(f"{r.mode:<16}{r.k:>4}{cells}{r.latency_ms['p50']:>9.1f}")
        if len(self.corpora) > 1:
            lines.append("recall / IoU per corpus:")
            lines.append(f"{'mode':<16}{'k':>4}" + "".join(f"{c[:22]:>24}" for c in self.corpora))
            for r in self.results:
                cells = "".join(
                    f"{r.per_corpus[c]['recall'][0]:>15.3f} / {r.per_corpus[c]['iou'][0]:.3f}"
                    if c in r.per_corpus
                    else f"{'-':>24}"
                    for c in self.corpora
                )
                lines.append(f"{r.mode:<16}{r.k:>4}{cells}")
        notes = [f"note: {n}" for n in self.notes] + [f"skipped: {s}" for s in self.skipped[:20]]
        if len(self.skipped) > 20:
            notes.append(f"skipped: ... {len(self.skipped) - 20} more (--json lists them all)")
        return "\n".join(lines + notes)


def _stage_times(stage_seconds: dict[str, float] | None) -> str:
    return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in (stage_seconds or {}).items())


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    return (float(array.mean()), float(array.std())) if len(array) else (0.0, 0.0)


# -- running it --------------------------------------------------------------------------------


def excerpt_collection_name(collection: str, corpus_dir: Path) -> str:
    slug = re.sub(r"[^A-Za-z0-9_]", "_", corpus_dir.resolve().name)
    return f"{collection}_excerpts_{slug}"[:255]


def excerpt_spec(spec: Spec, excerpts: ExcerptSet, corpus_dir: Path, collection: str | None = None) -> Spec:
    """The spec with the named corpus files as its only source and a collection of its own."""
    from connectors.local import LocalDirectorySource

    production: str = spec.stage("store").config.collection  # type: ignore[attr-defined]
    name = collection or excerpt_collection_name(production, corpus_dir)
    config = LocalDirectorySource.Config(
        path=str(corpus_dir.resolve()),
        include=sorted(glob.escape(p.name) for p in excerpts.corpus_files.values()),
        recursive=False,
        namespace="corpus",
    )
    source = ComponentSpec("source", LocalDirectorySource.type_name, LocalDirectorySource, config)
    spec = spec.with_collection(name)
    runner = evaluation_runner(spec.runner, name)
    return dataclasses.replace(spec, stages={**spec.stages, "source": [source]}, runner=runner)


def evaluate_excerpts(
    pipeline: Any,
    excerpts: ExcerptSet,
    *,
    questions_file: Path,
    corpus_dir: Path,
    modes: Sequence[str] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    reuse_index: bool = False,
    max_queries: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExcerptReport:
    """Ingest the corpus with ``pipeline`` (built from :func:`excerpt_spec`) unless ``reuse_index``
    finds it ingested, then measure ``modes`` at each k. :meth:`pipeline.Pipeline.evaluate_excerpts`
    is the entry point."""
    if not ks or any(k < 1 or k > MAX_LIMIT for k in ks):
        raise EvaluationError(f"k must be between 1 and {MAX_LIMIT}: got {list(ks)}")
    store = pipeline.store
    ingest_seconds, stage_seconds, notes = None, None, []
    reused = reuse_index and store.exists() and store.count() > 0
    if reused:
        if progress:
            progress(f"reusing {store.where} ({store.count()} chunks)")
    else:
        if progress:
            progress(f"ingesting {len(excerpts.corpus_files)} corpus files into {store.where}")
        summary = pipeline.ingest()
        ingest_seconds, stage_seconds = summary.seconds, dict(summary.stage_seconds)
        if summary.documents_failed:
            notes.append(f"{summary.documents_failed} corpus files failed to ingest (see {summary.failures_file})")
        notes.extend(summary.notes)
    index = _IndexSpans.read(store, excerpts)
    notes.extend(index.notes)
    if excerpts.relocated:
        notes.append(
            f"{excerpts.relocated} references were not at their offsets; each was measured at its content's first "
            "occurrence"
        )
    questions = excerpts.questions[:max_queries] if max_queries else excerpts.questions
    report = ExcerptReport(
        questions_file=str(questions_file),
        corpus=str(corpus_dir),
        collection=store.name,
        questions=len(questions),
        corpora=sorted(excerpts.corpus_files),
        chunks=index.chunks,
        mean_chunk_tokens=index.mean_tokens(),
        ingest_seconds=ingest_seconds,
        stage_seconds=stage_seconds,
        index_reused=reused,
        skipped=list(excerpts.skipped),
        notes=notes,
    )
    report.precision_omega = _precision_omega(questions, index)
    engine: QueryEngine = pipeline.query_engine
    engine.warm_up()
    chosen = list(modes) if modes else default_modes(engine)
    depth = max(ks)
    for mode in chosen:
        rankings, latencies = _retrieve(engine, questions, mode, depth, progress)
        for k in sorted(ks):
            report.results.append(_score(mode, k, questions, rankings, latencies, index))
        if progress:
            best = report.results[-1]
            progress(f"{mode}: recall@{best.k} {best.overall['recall'][0]:.4f}")
    return report


@dataclass
class _IndexSpans:
    """Every indexed chunk's span in its corpus file, from the store's rows."""

    by_id: dict[str, tuple[str, Range]]  # chunk id -> (corpus id, file span)
    by_corpus: dict[str, list[Range]]
    token_counts: list[int]
    notes: list[str]

    @property
    def chunks(self) -> int:
        return len(self.by_id)

    def mean_tokens(self) -> float:
        return float(np.mean(self.token_counts)) if self.token_counts else 0.0

    @classmethod
    def read(cls, store: Any, excerpts: ExcerptSet) -> _IndexSpans:
        from core.tiktoken_data import get_encoding

        corpus_of = {f"corpus/{path.name}": corpus_id for corpus_id, path in excerpts.corpus_files.items()}
        rows: dict[str, list[tuple[str, int, int, str]]] = defaultdict(list)
        for row in store.rows(["source_id", "text", "metadata"]):
            metadata = row.get("metadata") or {}
            corpus_id = corpus_of.get(str(row.get("source_id")))
            if corpus_id is None or "start" not in metadata or "end" not in metadata:
                continue
            rows[corpus_id].append((str(row["id"]), int(metadata["start"]), int(metadata["end"]), str(row["text"])))
        encoding = get_encoding("cl100k_base")
        spans = cls({}, defaultdict(list), [], [])
        for corpus_id, chunks in rows.items():
            source = excerpts.corpus_texts[corpus_id]
            offsets = OffsetMap(parsed_text_of((start, end, text) for _, start, end, text in chunks), source)
            unmapped = 0
            for chunk_id, start, end, text in chunks:
                span = offsets.span(start, end)
                if span is None:
                    unmapped += 1
                    continue
                spans.by_id[chunk_id] = (corpus_id, span)
                spans.by_corpus[corpus_id].append(span)
                spans.token_counts.append(len(encoding.encode(text, disallowed_special=())))
            if unmapped:
                spans.notes.append(f"{unmapped} chunks of {corpus_id} have no word found in the file: not measured")
        missing = sorted(set(excerpts.corpus_files) - set(rows))
        if missing:
            spans.notes.append(f"no chunks indexed for {', '.join(missing)}: their questions score 0")
        return spans


def _precision_omega(questions: Sequence[ExcerptQuestion], index: _IndexSpans) -> dict[str, tuple[float, float]]:
    values: dict[str, list[float]] = defaultdict(list)
    for q in questions:
        value = precision_omega(index.by_corpus.get(q.corpus_id, []), q.references)
        values["all"].append(value)
        values[q.corpus_id].append(value)
    return {name: _mean_std(v) for name, v in values.items()}


def _retrieve(
    engine: QueryEngine,
    questions: Sequence[ExcerptQuestion],
    mode: str,
    depth: int,
    progress: Callable[[str], None] | None,
) -> tuple[list[list[str]], list[float]]:
    base, reranked = (mode[: -len(RERANK_SUFFIX)], True) if mode.endswith(RERANK_SUFFIX) else (mode, False)
    if reranked and engine.reranker is None:
        raise EvaluationError(f"mode {mode!r} needs a reranker: add query.reranker to the spec")
    rankings, latencies = [], []
    for number, q in enumerate(questions, start=1):
        began = time.perf_counter()
        try:
            result = engine.query(q.question, top_k=depth, mode=base, rerank=reranked)  # type: ignore[arg-type]
        except QueryInputError as exc:
            raise EvaluationError(f"mode {mode!r}: {exc}") from None
        latencies.append(time.perf_counter() - began)
        rankings.append([hit.id for hit in result.hits])
        if progress and number % 100 == 0:
            progress(f"{mode}: {number}/{len(questions)} questions")
    return rankings, latencies


def _score(
    mode: str,
    k: int,
    questions: Sequence[ExcerptQuestion],
    rankings: Sequence[Sequence[str]],
    latencies: Sequence[float],
    index: _IndexSpans,
) -> SpanResult:
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for q, ranking in zip(questions, rankings):
        retrieved = [index.by_id[chunk_id] for chunk_id in ranking[:k] if chunk_id in index.by_id]
        for measure, value in span_scores(retrieved, q.corpus_id, q.references).items():
            values["all"][measure].append(value)
            values[q.corpus_id][measure].append(value)
    summary = {name: {m: _mean_std(v) for m, v in measures.items()} for name, measures in values.items()}
    milliseconds = np.asarray(latencies) * 1000
    return SpanResult(
        mode=mode,
        k=k,
        overall=summary.pop("all", {m: (0.0, 0.0) for m in SPAN_MEASURES}),
        per_corpus=summary,
        latency_ms={
            "p50": float(np.percentile(milliseconds, 50)) if len(milliseconds) else math.nan,
            "p95": float(np.percentile(milliseconds, 95)) if len(milliseconds) else math.nan,
        },
    )
