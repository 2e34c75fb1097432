"""Parsing in worker processes with a time and memory cap per document.

Parsers are the stage most likely to hang or blow up on one file (unstructured #2129: >10 GB on a
23 MB PDF). Each document is parsed in a worker process; the parent watches the clock and the
worker's resident memory and kills a worker that passes either cap, records the document as
failed, and starts a fresh worker. A background thread feeds the workers, so parsing runs while
the main thread embeds the previous batch; the parsed documents waiting for the consumer are
bounded in number and in characters, so memory stays flat on corpora of long documents too.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import queue
import threading
import time
import traceback
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from connectors.base import ParseFailure, Parser
from core.errors import ParserStartupError
from core.types import Element, ElementTable, ParsedDocument, SourceDocument

log = logging.getLogger("rag_pipeline.parse")

_POLL_S = 0.25
_READY = "ready"  # a worker's first message: its parser is built, so a document's clock can start
_STARTUP_TIMEOUT_S = 300.0  # a worker that cannot even import its parser is broken, not slow
_STARTUP_ATTEMPTS = 3  # fresh workers in a row that exit before they are ready: the parser cannot start
# A parsed document comes back in parts (see send_parsed) of at most this many characters of text
# or elements, so neither process ever holds the whole document pickled beside the document.
_TEXT_PIECE_CHARS = 1 << 23
_ELEMENT_BATCH = 4096


@dataclass
class ParseOutcome:
    source_id: str
    uri: str
    parsed: ParsedDocument | None
    error: str | None  # the reason, when parsed is None
    seconds: float
    stage: str = "parse"  # where the error happened: "read" failures pass through the pool unchanged

    @classmethod
    def of(
        cls, source: SourceDocument, parsed: ParsedDocument | None, error: str | None, seconds: float
    ) -> ParseOutcome:
        return cls(source.source_id, source.uri, parsed, error, seconds)

    @property
    def chars(self) -> int:
        return len(self.parsed.text) if self.parsed is not None else 0


def _build_parser(target: str, settings: dict[str, Any], base_dir: str) -> Parser:
    module_name, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    parser: Parser = cls.from_dict(settings)
    parser.base_dir = Path(base_dir)
    return parser


def _describe_exception(exc: BaseException) -> str:
    if isinstance(exc, ParseFailure):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "parser ran out of memory"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def parse_one(parser: Parser, source: SourceDocument) -> tuple[ParsedDocument | None, str | None]:
    try:
        return parser.parse(source), None
    except Exception as exc:  # a parser bug on one file must not end the run
        if not isinstance(exc, ParseFailure):
            log.debug("parser error on %s:\n%s", source.source_id, traceback.format_exc())
        return None, _describe_exception(exc)


def send_source(conn: Connection, source: SourceDocument) -> None:
    """Send a document to a worker: its identity pickled, its bytes raw. Pickling the bytes would
    copy them into the pickle on this side and out of it on the other (twice the file, each side)."""
    conn.send(without_content(source))
    conn.send_bytes(source.content)


def receive_source(conn: Connection) -> SourceDocument | None:
    """The next document sent with :func:`send_source`; None when the pool says stop."""
    identity: SourceDocument | None = conn.recv()
    if identity is None:
        return None
    return replace(identity, content=conn.recv_bytes())


def without_content(source: SourceDocument) -> SourceDocument:
    return replace(source, content=b"")


def send_parsed(conn: Connection, parsed: ParsedDocument | None, error: str | None) -> None:
    """Send a parse result: a header (the document without text and elements, the error, how many
    parts follow), then the text as UTF-8 pieces and the elements in batches. Pickled whole, a
    100 MB document of paragraphs is a 200 MB pickle (its text, and its elements' texts again) in
    this process and in the receiving one, on top of the document itself. Elements whose texts are
    their slices of the document text (what parsers make) travel as columns without their texts,
    and arrive as an :class:`ElementTable` that cuts each text from the document text when read."""
    if parsed is None:
        conn.send((None, error, 0, 0, False))
        return
    text = parsed.text
    elements = parsed.elements if isinstance(parsed.elements, ElementTable) else ElementTable.of(text, parsed.elements)
    columnar = isinstance(elements, ElementTable)
    pieces = range(0, len(text), _TEXT_PIECE_CHARS)
    batches = range(0, len(elements), _ELEMENT_BATCH)
    conn.send((replace(parsed, text="", elements=()), error, len(pieces), len(batches), columnar))
    for start in pieces:  # surrogatepass: any str round-trips, as it does through pickle
        conn.send_bytes(text[start : start + _TEXT_PIECE_CHARS].encode("utf-8", "surrogatepass"))
    for start in batches:
        stop = start + _ELEMENT_BATCH
        if isinstance(elements, ElementTable):
            conn.send(tuple(list(column[start:stop]) for column in _columns(elements)))
        else:
            conn.send(elements[start:stop])


def _columns(table: ElementTable) -> tuple[Sequence[Any], ...]:
    return (table.categories, table.starts, table.ends, table.pages, table.heading_paths, table.metadata)


def receive_parsed(
    conn: Connection, header: tuple[ParsedDocument | None, str | None, int, int, bool]
) -> tuple[ParsedDocument | None, str | None]:
    """The result whose header (see :func:`send_parsed`) was just received: the rest is read now."""
    document, error, pieces, batches, columnar = header
    if document is None:
        return None, error
    text = "".join(conn.recv_bytes().decode("utf-8", "surrogatepass") for _ in range(pieces))
    if not columnar:
        elements: Sequence[Element] = tuple(element for _ in range(batches) for element in conn.recv())
        return replace(document, text=text, elements=elements), error
    categories: list[str] = []
    starts, ends = array("q"), array("q")
    pages: list[int | None] = []
    heading_paths: list[tuple[str, ...]] = []
    metadata: list[dict[str, Any]] = []
    columns: tuple[Any, ...] = (categories, starts, ends, pages, heading_paths, metadata)
    for _ in range(batches):
        for column, part in zip(columns, conn.recv(), strict=True):
            column.extend(part)
    table = ElementTable(text, (categories, starts, ends, pages, heading_paths, metadata))
    return replace(document, text=text, elements=table), error


def _worker_main(conn: Connection, target: str, settings: dict[str, Any], base_dir: str) -> None:
    parser = _build_parser(target, settings, base_dir)
    conn.send(_READY)
    while True:
        try:
            source = receive_source(conn)
        except EOFError:
            return
        if source is None:
            return
        parsed, error = parse_one(parser, source)
        del source  # the bytes are parsed: free them before the result is sent
        send_parsed(conn, parsed, error)
        del parsed  # and the result before waiting for the next document


class _Worker:
    def __init__(self, ctx: Any, target: str, settings: dict[str, Any], base_dir: str):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, target, settings, base_dir), daemon=True)
        self.process.start()
        child.close()
        self.task: SourceDocument | None = None
        self.started = 0.0
        # A fresh worker spends seconds importing its parser (more on a loaded machine); that time
        # is not the document's, so its clock restarts when the worker says it is ready.
        self.ready = False

    def assign(self, source: SourceDocument) -> None:
        self.started = time.monotonic()
        self.task = source
        try:
            send_source(self.conn, source)
        except OSError:
            # The worker is gone already (BrokenPipeError), e.g. it died starting up: the document
            # stays here whole, and the poll loop meets the worker's end of file and handles it
            # like any worker that died (a fresh worker, or ParserStartupError).
            return
        # A ready worker has the bytes now; one still starting keeps them here until it is ready,
        # as a fresh worker gets the document again if this one dies first.
        self.task = without_content(source) if self.ready else source

    def became_ready(self, now: float) -> None:
        self.ready, self.started = True, now
        if self.task is not None:
            self.task = without_content(self.task)

    def resident_mb(self) -> float:
        try:
            import psutil

            resident: float = psutil.Process(self.process.pid).memory_info().rss / 2**20
            return resident
        except Exception:
            return 0.0

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()


class _CharBudget:
    """Characters of parsed text handed over and not yet done with (a document counts until the
    consumer asks for the next one). The feeder waits while taking another document would pass
    ``limit``; one document is always let through."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.pending = 0
        self.changed = threading.Condition()

    def take(self, chars: int, stop: threading.Event) -> bool:
        with self.changed:
            while self.limit is not None and self.pending and self.pending + chars > self.limit:
                if stop.is_set():
                    return False
                self.changed.wait(0.2)
            self.pending += chars
            return True

    def give_back(self, chars: int) -> None:
        with self.changed:
            self.pending -= chars
            self.changed.notify_all()


class ParserPool:
    """Parse documents in ``workers`` processes; ``workers=0`` parses in the calling thread (no caps).

    At most ``max_pending`` parsed documents, holding at most ``max_pending_chars`` characters of
    text (None: no limit), wait for the consumer while the workers parse ahead.
    """

    def __init__(
        self,
        parser: Parser,
        workers: int = 1,
        timeout_s: float = 120.0,
        memory_mb: int | None = None,
        max_pending: int = 64,
        max_pending_chars: int | None = None,
    ):
        self.parser = parser
        self.workers = workers
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.max_pending = max_pending
        self.max_pending_chars = max_pending_chars
        cls = type(parser)
        self._target = f"{cls.__module__}:{cls.__qualname__}"
        self._results: queue.Queue[Any] | None = None  # the running imap's outcomes, for pending()

    def pending(self) -> int:
        """Outcomes parsed and waiting for the consumer (0 when parsing in-process, or before imap starts)."""
        results = self._results
        return results.qsize() if results is not None else 0

    def imap(self, sources: Iterable[SourceDocument | ParseOutcome]) -> Iterator[ParseOutcome]:
        """Parse each source; outcomes come back in completion order.

        Items that are already a ParseOutcome (e.g. a read failure) pass through unchanged, so the
        caller keeps one stream of per-document outcomes.
        """
        if self.workers == 0:
            for item in sources:
                if not isinstance(item, ParseOutcome):
                    started = time.monotonic()
                    parsed, error = parse_one(self.parser, item)
                    # Rebound, not kept: the source's bytes are freed while its text is chunked.
                    item = ParseOutcome.of(item, parsed, error, time.monotonic() - started)
                    del parsed
                yield item
            return
        results: queue.Queue[Any] = queue.Queue(maxsize=self.max_pending)
        self._results = results
        budget = _CharBudget(self.max_pending_chars)
        stop = threading.Event()
        feeder = threading.Thread(
            target=self._run, args=(iter(sources), results, budget, stop), name="parser-pool", daemon=True
        )
        feeder.start()
        try:
            while True:
                item = results.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                chars = item.chars
                yield item
                # Counted until the consumer asks for the next one: it may still be working on this
                # one (a large document is embedded slice by slice), so nothing more is parsed into
                # memory beside it than the budget allows.
                budget.give_back(chars)
        finally:
            stop.set()
            # Unblock a feeder waiting on a full queue, then let it shut its workers down.
            while feeder.is_alive():
                try:
                    results.get(timeout=0.1)
                except queue.Empty:
                    pass
            feeder.join()

    # -- background thread -------------------------------------------------------------------

    def _run(
        self,
        sources: Iterator[SourceDocument | ParseOutcome],
        results: queue.Queue[Any],
        budget: _CharBudget,
        stop: threading.Event,
    ) -> None:
        ctx = multiprocessing.get_context("spawn")  # fork is unsafe once torch threads exist
        settings = self.parser.to_dict()
        base_dir = str(self.parser.base_dir)
        pool: list[_Worker] = []
        exhausted = False
        startup_exits = 0  # workers in a row that exited before they were ready

        def put(item: Any) -> bool:
            if isinstance(item, ParseOutcome) and not budget.take(item.chars, stop):
                return False
            while not stop.is_set():
                try:
                    results.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            pool = [_Worker(ctx, self._target, settings, base_dir) for _ in range(self.workers)]
            while not stop.is_set():
                for worker in pool:
                    while worker.task is None and not exhausted:
                        item = next(sources, None)
                        if item is None:
                            exhausted = True
                        elif isinstance(item, ParseOutcome):
                            if not put(item):
                                return
                        else:
                            worker.assign(item)
                            del item  # not held here while it is parsed: the worker owns the bytes now
                busy = [w for w in pool if w.task is not None]
                if not busy:
                    break
                ready = wait([w.conn for w in busy], timeout=_POLL_S)
                now = time.monotonic()
                for i, worker in enumerate(pool):
                    if worker.task is None:
                        continue
                    source, elapsed = worker.task, now - worker.started
                    if worker.conn in ready:
                        try:
                            message = worker.conn.recv()
                            if message == _READY:
                                worker.became_ready(now)
                                startup_exits = 0
                                continue
                            parsed, error = receive_parsed(worker.conn, message)
                        except (EOFError, OSError):
                            worker.process.join(1)
                            code = worker.process.exitcode
                            if not worker.ready:
                                # The worker never read the document, so it is not the document's
                                # fault: a fresh worker takes it, unless the parser cannot start.
                                worker.kill()
                                startup_exits += 1
                                if startup_exits >= _STARTUP_ATTEMPTS:
                                    raise ParserStartupError(
                                        _startup_failure(self._target, startup_exits, code)
                                    ) from None
                                pool[i] = _Worker(ctx, self._target, settings, base_dir)
                                pool[i].assign(source)
                                continue
                            reason: str | None = f"parser process died (exit code {code})"
                            if code is not None and code < 0:
                                reason = (
                                    f"parser process was killed by signal {-code} (often the system running out of "
                                    "memory)"
                                )
                            worker.kill()
                            pool[i] = _Worker(ctx, self._target, settings, base_dir)
                            parsed, error = None, reason
                        else:
                            worker.task = None
                        if not put(ParseOutcome.of(source, parsed, error, elapsed)):
                            return
                        continue
                    reason = None
                    if not worker.ready and elapsed > _STARTUP_TIMEOUT_S:
                        reason = f"the parser process did not start within {_STARTUP_TIMEOUT_S:g} s and was killed"
                    elif worker.ready and elapsed > self.timeout_s:
                        reason = f"parse timed out after {self.timeout_s:g} s; the parser process was killed"
                    elif self.memory_mb is not None and worker.resident_mb() > self.memory_mb:
                        reason = f"parser used more than {self.memory_mb} MB of memory; the parser process was killed"
                    if reason:
                        log.warning("%s: %s", source.source_id, reason)
                        worker.kill()
                        pool[i] = _Worker(ctx, self._target, settings, base_dir)
                        if not put(ParseOutcome.of(source, None, reason, elapsed)):
                            return
        except BaseException as exc:  # surface feeder errors (e.g. a source listing failure) to the consumer
            put(exc)
        finally:
            for worker in pool:
                if worker.task is None and worker.process.is_alive():
                    try:
                        worker.conn.send(None)
                    except OSError:
                        pass
                    worker.process.join(2)
                worker.kill()
            put(_DONE)


def _startup_failure(target: str, attempts: int, exit_code: int | None) -> str:
    return (
        f"parse: {attempts} parser worker processes in a row exited before their parser {target} was ready "
        f"(last exit code {exit_code}), so no document can be parsed; the workers' own error is on stderr above. "
        'A common cause: a Python script that runs the pipeline without an `if __name__ == "__main__":` guard. '
        "Workers start with the 'spawn' method, which imports the script again and so runs the pipeline again. "
        "Put the call under the guard, or set runner.parse_workers: 0 to parse in the calling process (no time or "
        "memory caps)."
    )


_DONE = object()
