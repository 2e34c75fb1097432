"""The Ray runner: the local runner's stages on Ray Data, so parsing and embedding scale out over a cluster.

Where each part of a run happens, and why:

* the driver (this process) lists and reads the sources and asks the change tracker what to skip,
  as the local runner does, so the record's decisions stay in one place; it streams the documents
  to the cluster through a bounded feed actor (:class:`DocumentFeed`);
* parse tasks (Ray Data map tasks, one CPU each) take documents from the feed and parse them in a
  capped parser process (:class:`pipeline.parse_pool.ParserPool`): a parse that passes the time or
  memory cap is killed and recorded as a ``parse`` failure, and the task goes on with the next one;
* embed actors (a Ray Data actor pool, one per GPU when there are GPUs) hold the chunker and the
  embedder, built once per actor from the components' settings, and chunk and embed a batch at a
  time with the local runner's own step (:func:`pipeline.runner.chunk_and_embed`); a document with
  more than ``runner.slice_chunks`` chunks comes back a slice per row, in order;
* the driver takes the embedded batches as they come, replays their failures, stage times and
  documents by language into the run's book and writes them through
  :class:`pipeline.stages.BatchWriter` (slices through :class:`pipeline.stages.SliceWriter`) in a
  writer thread:
  Milvus Lite is a local file that one process may open, and the record must follow the write order.

Why a feed rather than a dataset of documents: the document stream exists only in the driver, which
lists and reads lazily and consults the tracker on the way; a dataset built from it (``from_items``)
would hold the corpus in memory and start parsing only after the last read. The dataset's rows are
therefore the parse tasks themselves, and each task pulls documents until the driver closes the feed.

Documents and results cross Ray Data as pickled objects in a binary column: the pipeline's
dataclasses (a ParsedDocument with its elements, chunks with numpy vectors) round-trip exactly,
with no columnar schema to keep in step with :mod:`core.types`.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import pickle
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, cast

from chunkers.base import Chunker
from connectors.base import Parser
from core.component import Component, MissingDependencyError, require
from core.types import ChunkedDocument, SourceDocument
from embedders.base import Embedder
from embedders.sparse import SparseEncoder
from pipeline.parse_pool import ParseOutcome, ParserPool
from pipeline.report import FailureLog, Progress, RunSummary
from pipeline.runner import (
    RunBook,
    RunPlan,
    StoreWrites,
    WriteBehind,
    WriteUnit,
    batched,
    chunk_and_embed,
    finish_run,
    prepare_store,
    read_sources,
    record_run,
    slices_of,
    step_attributes,
)
from pipeline.spec import RaySettings, RunnerConfig
from pipeline.stages import (
    BatchWriter,
    ChunkAndEmbed,
    DocumentFailure,
    DocumentSlice,
    StageResult,
)
from pipeline.telemetry import StepTiming

log = logging.getLogger("rag_pipeline")

RAY_EXTRA_HINT = "runner type ray needs the ray extra: pip install '.[ray]'"

OUTCOMES = "outcome"  # parse tasks -> embed actors: one pickled ParseOutcome per row
BATCHES = "batch"  # embed actors -> driver: one pickled EmbeddedBatch per row
_PICKLE = pickle.HIGHEST_PROTOCOL


def import_ray() -> Any:
    """The ``ray`` module with Ray Data, or MissingDependencyError with the install command."""
    try:
        require("ray.data", extra="ray", purpose="the Ray runner")
    except MissingDependencyError as exc:
        raise MissingDependencyError(f"{RAY_EXTRA_HINT} ({exc.__cause__})") from exc
    import ray

    return ray


def runner_problems(config: RunnerConfig) -> list[str]:
    """What stops the configured runner from starting on this machine (for ``validate``)."""
    if config.type != "ray":
        return []
    try:
        import_ray()
    except MissingDependencyError:
        return [RAY_EXTRA_HINT]
    return []


# ---------------------------------------------------------------------------------------------
# What travels to the workers


@dataclass(frozen=True)
class ComponentRecipe:
    """How a worker builds a component again: its class, its spec settings and the folder relative paths start from."""

    target: str  # "package.module:ClassName"
    settings: dict[str, Any]
    base_dir: str

    @classmethod
    def of(cls, component: Component) -> ComponentRecipe:
        kind = type(component)
        return cls(f"{kind.__module__}:{kind.__qualname__}", component.to_dict(), str(component.base_dir))

    def build(self) -> Component:
        module_name, _, name = self.target.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as exc:
            raise ImportError(
                f"{self.target} cannot be loaded on this Ray worker ({exc}); every worker needs the project and the "
                "spec's plugins installed"
            ) from exc
        component: Component = cls.from_dict(self.settings)
        component.base_dir = Path(self.base_dir)
        return component


@dataclass(frozen=True)
class ParseCaps:
    """The local runner's parse limits, applied inside each parse task."""

    in_process: bool  # runner.parse_workers 0: parse in the task itself, without caps, as the local runner does
    timeout_s: float
    memory_mb: int | None

    @classmethod
    def of(cls, config: RunnerConfig) -> ParseCaps:
        return cls(config.parse_workers == 0, config.parse_timeout_s, config.parse_memory_mb)


@dataclass
class BatchLedger:
    """A batch's stage times, failures, documents by language and timed steps, kept on the embed actor
    and replayed into the run's book (and its steps as spans) by the driver."""

    seconds: dict[str, float] = field(default_factory=dict)
    failures: list[DocumentFailure] = field(default_factory=list)
    languages: dict[str, int] = field(default_factory=dict)
    steps: list[StepTiming] = field(default_factory=list)

    def time(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def fail(self, failure: DocumentFailure) -> None:
        self.failures.append(failure)

    def language(self, language: str, documents: int = 1) -> None:
        self.languages[language] = self.languages.get(language, 0) + documents

    def step(self, stage: str, action: Callable[[], StageResult]) -> StageResult:
        started, started_ns = time.monotonic(), time.time_ns()
        result = action()
        self.time(stage, time.monotonic() - started)
        self.steps.append(StepTiming(stage, started_ns, time.time_ns(), step_attributes(result)))
        self.failures.extend(result.failures)
        return result

    def replay(self, book: RunBook) -> None:
        for stage, seconds in self.seconds.items():
            book.time(stage, seconds)
        for failure in self.failures:
            book.fail(failure)
        for language, documents in self.languages.items():
            book.language(language, documents)
        book.telemetry.replay(self.steps)


@dataclass
class EmbeddedBatch:
    """What an embed actor hands back for a batch of parse outcomes: one for the documents that fit
    one slice, then one per slice of each larger document (:class:`pipeline.stages.DocumentSlice`)."""

    source_ids: list[str]  # the documents this one completes, embedded or failed (a large one: with its last slice)
    documents: list[ChunkedDocument]  # the embedded ones, ready to write
    ledger: BatchLedger
    actor_id: str
    notes: list[str]  # the actor's embedder notes for this run so far (e.g. truncation counts)
    part: DocumentSlice | None = None  # a slice of a large document instead of documents
    truncated: int | None = None  # the actor's chunk texts cut to the model's window so far; None: not counted

    def unit(self) -> WriteUnit:
        return self.part if self.part is not None else self.documents


# ---------------------------------------------------------------------------------------------
# Remote parts: the feed actor, the parse task and the embed actor


class DocumentFeed:
    """A bounded queue of documents from the driver to the parse tasks (runs as an async Ray actor)."""

    def __init__(self, capacity: int):
        self._capacity = capacity
        self._items: deque[SourceDocument | ParseOutcome] = deque()
        self._closed = False
        self._changed = asyncio.Condition()

    async def put(self, items: list[SourceDocument | ParseOutcome]) -> None:
        """Add documents; waits while the feed is full (the driver reads no further ahead than that)."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self._items) < self._capacity)
            self._items.extend(items)
            self._changed.notify_all()

    async def take(self, limit: int) -> list[SourceDocument | ParseOutcome] | None:
        """Up to ``limit`` documents; waits while the feed is empty; None once it is closed and drained."""
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._items) or self._closed)
            if not self._items:
                return None
            taken = [self._items.popleft() for _ in range(min(limit, len(self._items)))]
            self._changed.notify_all()
            return taken

    async def close(self) -> None:
        async with self._changed:
            self._closed = True
            self._changed.notify_all()


def parse_from_feed(
    _slot: Any, *, feed: Any, parser: ComponentRecipe, caps: ParseCaps, block_size: int
) -> Iterator[Any]:
    """A parse task: parse documents from the feed until it closes, handing on ``block_size`` outcomes at a time.

    Read failures arrive as outcomes already and pass through the pool unchanged.
    """
    import pyarrow as pa
    import ray

    pool = ParserPool(
        cast(Parser, parser.build()),
        workers=0 if caps.in_process else 1,
        timeout_s=caps.timeout_s,
        memory_mb=caps.memory_mb,
        max_pending=block_size,
    )

    def documents() -> Iterator[SourceDocument | ParseOutcome]:
        while (items := ray.get(feed.take.remote(block_size))) is not None:
            yield from items

    block: list[bytes] = []
    for outcome in pool.imap(documents()):
        block.append(pickle.dumps(outcome, protocol=_PICKLE))
        if len(block) == block_size:
            yield pa.table({OUTCOMES: pa.array(block, type=pa.large_binary())})
            block = []
    if block:
        yield pa.table({OUTCOMES: pa.array(block, type=pa.large_binary())})


class EmbedActor:
    """One model holder of the Ray Data actor pool: chunks, embeds and sparse-embeds batches of parse outcomes."""

    def __init__(
        self, chunker: ComponentRecipe, embedder: ComponentRecipe, sparse: ComponentRecipe | None, slice_chunks: int
    ):
        import ray

        self.models = ChunkAndEmbed(
            cast(Chunker, chunker.build()),
            cast(Embedder, embedder.build()),
            cast(SparseEncoder, sparse.build()) if sparse is not None else None,
            slice_chunks=slice_chunks,
        )
        self.actor_id = ray.get_runtime_context().get_actor_id() or ""
        self.models.embedder.begin_run()  # actors live for one run, so their notes cover that run
        try:  # load the model now, while the parse tasks work on the first documents
            self.models.embedder.warm_up()
        except Exception:  # the first embed call reports the same problem, per document
            log.debug("embedder warm-up failed", exc_info=True)

    def __call__(self, batch: Any) -> Iterator[Any]:
        """One row for the documents that fit a slice, then one row per slice of each larger document,
        in order (the driver writes a document's slices in the order they come)."""
        outcomes: list[ParseOutcome] = [pickle.loads(data) for data in batch.column(OUTCOMES).to_pylist()]
        ledger = BatchLedger()
        documents, large = chunk_and_embed(self.models, outcomes, ledger)
        sliced = {plan.document.source_id for plan in large}
        yield self._row(
            EmbeddedBatch(
                [o.source_id for o in outcomes if o.source_id not in sliced], documents, ledger, self.actor_id, []
            )
        )
        del documents, outcomes
        ledger = BatchLedger()  # each slice's row carries the times of that slice (read by time_slice below)

        def time_slice(stage: str, seconds: float) -> None:
            ledger.time(stage, seconds)  # the current slice's ledger: rebound after each slice

        for part in slices_of(self.models, large, time_slice, lambda source_id: False):
            done = [part.document.source_id] if part.last or part.failure is not None else []
            yield self._row(EmbeddedBatch(done, [], ledger, self.actor_id, [], part))
            ledger = BatchLedger()

    def _row(self, result: EmbeddedBatch) -> Any:
        import pyarrow as pa

        result.notes = self.models.embedder.run_notes()
        result.truncated = self.models.embedder.texts_truncated()  # the actor's embedder is made for this run
        return pa.table({BATCHES: pa.array([pickle.dumps(result, protocol=_PICKLE)], type=pa.large_binary())})


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass(frozen=True)
class ClusterPlan:
    """How many of each worker a run asks Ray for, from the settings and what the cluster has."""

    embed_actors: int
    gpus_per_actor: float
    parse_tasks: int

    @classmethod
    def for_cluster(cls, settings: RaySettings, resources: dict[str, float], embedder: Embedder) -> ClusterPlan:
        """The plan, or ValueError when the cluster cannot hold it (Ray would wait for resources forever)."""
        gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
        per_actor = settings.gpus_per_actor
        if per_actor is None:
            per_actor = 1.0 if gpus >= 1 and _may_use_gpu(embedder) else 0.0
        actors = settings.embed_actors or (max(1, int(gpus // per_actor)) if per_actor else 1)
        if actors * per_actor > gpus:
            raise ValueError(
                f"ray: {actors} embed actors with {per_actor:g} GPU each need {actors * per_actor:g} GPUs; the cluster "
                f"has {gpus:g}"
            )
        if actors * settings.embed_cpus + 1 > cpus:
            raise ValueError(
                f"ray: {actors} embed actors with {settings.embed_cpus:g} CPUs each and one parse task need "
                f"{actors * settings.embed_cpus + 1:g} CPUs; the cluster has {cpus:g}"
            )
        spare_cpus = cpus - actors * settings.embed_cpus
        return cls(actors, per_actor, settings.parse_concurrency or max(1, int(spare_cpus)))


def _may_use_gpu(embedder: Embedder) -> bool:
    device = getattr(getattr(embedder, "config", None), "device", None)
    return isinstance(device, str) and (device == "auto" or device.startswith("cuda"))


def connect(ray: Any, settings: RaySettings) -> None:
    """Use the Ray instance this process is already attached to, else the configured cluster, else a new local instance.

    The connection stays open for later runs (a service pays Ray's start once); Ray closes it when the process exits.
    """
    if ray.is_initialized():
        return
    # "local" rather than None: None would attach to whatever cluster was last started on this machine.
    address = settings.address or os.environ.get("RAY_ADDRESS") or "local"
    options: dict[str, Any] = {"address": address, "logging_level": logging.WARNING}
    if address == "local":
        options.update(num_cpus=settings.num_cpus, include_dashboard=False)
    log.info("connecting to Ray at %s", address)
    ray.init(**options)


class Feeder:
    """The driver's feeder thread: lists and reads the sources into the feed (tracker decisions included),
    and remembers what is out in the cluster, so a document lost with a dead worker is still recorded."""

    def __init__(self, ray: Any, feed: Any, documents: Iterator[SourceDocument | ParseOutcome], put_size: int):
        self._ray = ray
        self._feed = feed
        self._documents = documents
        self._put_size = put_size
        self._outstanding: dict[str, str] = {}  # source id -> uri, from the feed until its batch comes back
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ray-feeder", daemon=True)
        self._thread.start()

    def returned(self, source_ids: Sequence[str]) -> None:
        with self._lock:
            for source_id in source_ids:
                self._outstanding.pop(source_id, None)

    def finish(self) -> list[DocumentFailure]:
        """After the last batch: raise the feeder's own error, if any; else the documents that never came back."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        with self._lock:
            lost, self._outstanding = self._outstanding, {}
        # Ray retries a task whose worker died, but the documents that task had taken, and results it
        # had not yet handed on, do not come back; the next reindex redoes them.
        reason = "lost in the Ray cluster: a worker that held it died before its result reached the driver"
        return [DocumentFailure(source_id, uri, "parse", reason) for source_id, uri in lost.items()]

    def stop(self, timeout_s: float = 10.0) -> None:
        """After the feed actor is gone (its pending put then fails): let the thread end."""
        self._thread.join(timeout_s)

    def _run(self) -> None:
        try:
            for items in batched(self._documents, self._put_size):
                with self._lock:
                    self._outstanding.update((item.source_id, item.uri) for item in items)
                self._ray.get(self._feed.put.remote(items))
        except BaseException as exc:  # raised again in the driver by finish()
            self._error = exc
        finally:
            try:
                self._ray.get(self._feed.close.remote())
            except Exception:  # the feed is gone: the run is being torn down
                log.debug("feed already closed", exc_info=True)


class EmbedderNotes:
    """The embed actors' run notes and truncation counts; each actor reports its own so far with every
    batch it returns."""

    def __init__(self) -> None:
        self._by_actor: dict[str, list[str]] = {}
        self._truncated_by_actor: dict[str, int | None] = {}

    def update(self, batch: EmbeddedBatch) -> None:
        self._by_actor[batch.actor_id] = batch.notes
        self._truncated_by_actor[batch.actor_id] = batch.truncated

    def truncated(self) -> int | None:
        """Chunk texts truncated in the run, over every actor; None when no actor's embedder counts them."""
        counts = [count for count in self._truncated_by_actor.values() if count is not None]
        return sum(counts) if counts else None

    def merged(self) -> list[str]:
        reporting = [notes for notes in self._by_actor.values() if notes]
        if len(reporting) <= 1:  # one actor's counts are the run's counts
            return [note for notes in reporting for note in notes]
        return [f"embed actor {i}: {note}" for i, notes in enumerate(reporting, 1) for note in notes]


class RayRunner:
    """Runs the stages on Ray Data; same inputs, failure handling, record and summary as
    :class:`pipeline.runner.LocalRunner`."""

    def __init__(self, plan: RunPlan):
        self.plan = plan
        self.writer = BatchWriter(plan.store, plan.config.cleanup, plan.tracker)

    def run(self, progress: Progress | None = None) -> RunSummary:
        ray = import_ray()  # before anything is read: a missing extra fails the run at once
        config = self.plan.config
        summary = self.plan.summary()
        failures = FailureLog(self.plan.failures_path)
        book = RunBook(summary, failures, self.plan.tracker, self.plan.telemetry)
        progress = progress or Progress(config.progress)
        notes = EmbedderNotes()
        started = time.monotonic()
        try:
            prepare_store(self.plan.store, self.plan.embedder, self.plan.sparse)
            documents = read_sources(self.plan.sources, self.plan.tracker, book, self.writer.guard)
            first = next(documents, None)
            if first is not None:  # when nothing changed, no workers start and no model loads anywhere
                self._stream(ray, chain([first], documents), book, progress, notes)
            if self.plan.tracker is not None:
                record_run(self.plan.tracker, summary, started)
        finally:
            finish_run(summary, progress, failures, started)
        summary.notes.extend(notes.merged())
        summary.chunks_truncated = notes.truncated()
        return summary

    def _stream(
        self,
        ray: Any,
        documents: Iterator[SourceDocument | ParseOutcome],
        book: RunBook,
        progress: Progress,
        notes: EmbedderNotes,
    ) -> None:
        """Feed the documents to the cluster and write the embedded batches as they come back."""
        config = self.plan.config
        summary = book.summary
        telemetry = book.telemetry
        connecting = time.monotonic()
        connect(ray, config.ray)
        book.time("ray start", time.monotonic() - connecting)
        plan = ClusterPlan.for_cluster(config.ray, ray.cluster_resources(), self.plan.embedder)
        log.info(
            "ray: %d parse tasks, %d embed actors (%g GPU each)",
            plan.parse_tasks,
            plan.embed_actors,
            plan.gpus_per_actor,
        )
        feed = self._start_feed(ray, plan)
        feeder = Feeder(ray, feed, documents, config.ray.parse_batch_size)
        writer = WriteBehind(StoreWrites(self.writer, book).write, config.write_queue_depth)
        try:
            waited = time.monotonic()
            for number, row in enumerate(self._dataset(ray, feed, plan).iter_rows(), 1):
                book.time("ray wait", time.monotonic() - waited)
                batch: EmbeddedBatch = pickle.loads(row[BATCHES])
                feeder.returned(batch.source_ids)
                book.seen(len(batch.source_ids))
                with telemetry.batch(number, len(batch.source_ids), {"rag.ray.actor": batch.actor_id}):
                    batch.ledger.replay(book)
                    notes.update(batch)
                    waited = time.monotonic()
                    writer.submit(batch.unit())
                    book.time("write wait", time.monotonic() - waited)
                telemetry.queue_depth("write", writer.depth())
                progress.update(summary, len(batch.source_ids))
                waited = time.monotonic()
            for lost in feeder.finish():
                book.seen(1)
                book.fail(lost)
        finally:
            ray.kill(feed)
            feeder.stop()
            writer.close()

    def _start_feed(self, ray: Any, plan: ClusterPlan) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # Every document passes through the feed: keep it on the driver's node, and a few blocks deep per parse task.
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
        capacity = max(2 * self.plan.config.ray.parse_batch_size * plan.parse_tasks, self.plan.config.batch_size)
        return ray.remote(DocumentFeed).options(num_cpus=0, scheduling_strategy=here).remote(capacity)

    def _dataset(self, ray: Any, feed: Any, plan: ClusterPlan) -> Any:
        settings = self.plan.config.ray
        slots = ray.data.range(plan.parse_tasks, override_num_blocks=plan.parse_tasks)
        slots.context.enable_progress_bars = (
            False  # the run's own Progress reports; this context belongs to this dataset
        )
        parsed = slots.map_batches(
            parse_from_feed,
            batch_size=1,
            compute=ray.data.TaskPoolStrategy(size=plan.parse_tasks),
            num_cpus=1,
            # A parse task lasts the whole run; its worker process then exits and returns its memory.
            # Being a task-only setting, it also keeps Ray Data from fusing the parse tasks into the
            # embed actors (it fuses a task pool into an actor pool of the same size), which would
            # run parsing and embedding one after the other in the same process.
            max_calls=1,
            fn_kwargs={
                "feed": feed,
                "parser": ComponentRecipe.of(self.plan.parser),
                "caps": ParseCaps.of(self.plan.config),
                "block_size": settings.parse_batch_size,
            },
        )
        return parsed.map_batches(
            EmbedActor,
            batch_size=self.plan.config.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=plan.embed_actors),
            num_cpus=settings.embed_cpus,
            num_gpus=plan.gpus_per_actor or None,
            fn_constructor_kwargs={
                "chunker": ComponentRecipe.of(self.plan.chunker),
                "embedder": ComponentRecipe.of(self.plan.embedder),
                "sparse": ComponentRecipe.of(self.plan.sparse) if self.plan.sparse is not None else None,
                "slice_chunks": self.plan.config.slice_chunks,
            },
        )
