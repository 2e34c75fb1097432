"""The object a backend service holds: built once from a spec, models and clients reused per call."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

from chunkers.base import Chunker
from connectors.base import Parser, Source
from core.leases import ClaimStore
from core.records import RecordStore
from embedders.base import Embedder
from embedders.sparse import SparseEncoder
from pipeline.evaluate import EvalProtocol, EvalReport, eval_spec, evaluate_dataset, load_beir
from pipeline.excerpts import DEFAULT_KS, ExcerptReport, evaluate_excerpts, excerpt_spec, load_excerpts
from pipeline.incremental import ChangeTracker, stage_fingerprint
from pipeline.languages import language_notes, sample_languages
from pipeline.lease import DEFAULT_TTL_S, Lease, index_lock
from pipeline.query import Mode, QueryEngine, QueryResult
from pipeline.report import Progress, RunSummary
from pipeline.runner import LocalRunner, RunPlan, index_schema
from pipeline.spec import Spec, load_spec, parse_spec
from pipeline.telemetry import Telemetry, metrics_problems
from rerankers.base import Reranker
from stores.base import Rebuild, Store


class Pipeline:
    """``Pipeline.from_yaml("spec.yaml").ingest()`` or ``Pipeline({...spec mapping...})``.

    Components are built on first use and kept, so a long-running service pays model loading
    once. ``ingest`` calls are serialised per pipeline object.

    Runs and queries are measured into ``metrics_registry`` (a ``prometheus_client.CollectorRegistry``,
    e.g. the one a service exposes at ``/metrics``; by default one of the pipeline's own when the
    spec's ``runner.metrics`` writes a textfile or pushes) and traced through ``tracer_provider``
    (default: OpenTelemetry's global provider); see :mod:`pipeline.telemetry`.
    """

    def __init__(
        self,
        spec: Spec | dict[str, Any],
        *,
        base_dir: str | os.PathLike[str] | None = None,
        allowed_modules: Iterable[str] = (),
        metrics_registry: Any = None,
        tracer_provider: Any = None,
    ):
        if not isinstance(spec, Spec):
            spec = parse_spec(spec, allowed_modules=allowed_modules, base_dir=Path(base_dir) if base_dir else None)
        elif base_dir is not None:
            spec.base_dir = Path(base_dir)
        self.spec = spec
        self._components: dict[str, Any] = {}
        self._build_lock = threading.Lock()
        self._ingest_lock = threading.Lock()
        self._query_lock = threading.Lock()
        self._query_engine: QueryEngine | None = None
        self.telemetry = Telemetry(
            spec.runner.metrics, registry=metrics_registry, tracer_provider=tracer_provider, base_dir=spec.base_dir
        )

    @classmethod
    def from_yaml(
        cls,
        path: str | os.PathLike[str],
        *,
        allowed_modules: Iterable[str] = (),
        metrics_registry: Any = None,
        tracer_provider: Any = None,
    ) -> Pipeline:
        return cls(
            load_spec(path, allowed_modules=allowed_modules),
            metrics_registry=metrics_registry,
            tracer_provider=tracer_provider,
        )

    # -- components ----------------------------------------------------------------------------

    def _component(self, name: str) -> Any:
        with self._build_lock:
            if name not in self._components:
                if name == "sources":
                    self._components[name] = [s.build(self.spec.base_dir) for s in self.spec.sources]
                elif name == "reranker":
                    reranker = self.spec.reranker
                    self._components[name] = reranker.build(self.spec.base_dir) if reranker is not None else None
                elif name == "sparse" and self.spec.stages.get("sparse") is None:
                    self._components[name] = None
                else:
                    self._components[name] = self.spec.stage(name).build(self.spec.base_dir)
            return self._components[name]

    @property
    def sources(self) -> list[Source]:
        sources: list[Source] = self._component("sources")
        return sources

    @property
    def parser(self) -> Parser:
        parser: Parser = self._component("parser")
        return parser

    @property
    def chunker(self) -> Chunker:
        chunker: Chunker = self._component("chunker")
        return chunker

    @property
    def embedder(self) -> Embedder:
        embedder: Embedder = self._component("embedder")
        return embedder

    @property
    def store(self) -> Store:
        store: Store = self._component("store")
        return store

    @property
    def sparse(self) -> SparseEncoder | None:
        """The learned sparse encoder (``stages.sparse``), or None."""
        sparse: SparseEncoder | None = self._component("sparse")
        return sparse

    @property
    def reranker(self) -> Reranker | None:
        """The reranker (``query.reranker``), or None."""
        reranker: Reranker | None = self._component("reranker")
        return reranker

    @property
    def query_engine(self) -> QueryEngine:
        """The query path, built once; it shares this pipeline's embedder, sparse encoder and store."""
        with self._query_lock:  # not _build_lock: building the components takes that one
            if self._query_engine is None:
                self._query_engine = QueryEngine(
                    self.store, self.embedder, self.spec.query, sparse=self.sparse, reranker=self.reranker
                )
            return self._query_engine

    # -- the failures file -------------------------------------------------------------------------

    def failures_path(self) -> Path | None:
        configured = self.spec.runner.failures_file
        if configured == "":
            return None
        name = configured or f"{self.spec.name or 'pipeline'}.failures.jsonl"
        path = Path(name).expanduser()
        return path if path.is_absolute() else self.spec.base_dir / path

    # -- the re-index lock ------------------------------------------------------------------------

    def lease(self, ttl_s: float = DEFAULT_TTL_S) -> AbstractContextManager[Lease | None]:
        """Hold the collection's re-index lock for a block of calls (see :mod:`pipeline.lease`).

        ``ingest``, ``reindex``, ``full_rebuild`` and ``reconcile`` take it themselves for one
        call; pass the held lease (``lease=``) to run several under one hold. Raises
        :class:`core.errors.LockHeldError` when another live run holds it. Yields None for a
        store that keeps no lock (no index record).
        """
        claims = self._claims()
        return index_lock(claims, ttl_s) if claims is not None else nullcontext()

    def _claims(self) -> ClaimStore | None:
        claims: ClaimStore | None = self.store.lock_claims()
        return claims

    def _records(self) -> RecordStore:
        record: RecordStore | None = self.store.index_record()
        if record is None:
            raise TypeError(f"{type(self.store).__name__} keeps no index record; pass a RecordStore (records=)")
        return record

    @contextmanager
    def _locked(self, lease: Lease | None) -> Iterator[Lease | None]:
        if lease is not None:
            lease.ensure_held()
            yield lease
        else:
            with self.lease() as held:
                yield held

    # -- work ----------------------------------------------------------------------------------

    def ingest(self, *, progress: Progress | None = None, lease: Lease | None = None) -> RunSummary:
        """Index every document the sources list; returns the run summary (never raises per document).

        Every listed document is processed, none skipped and no unlisted one removed (that is
        :meth:`reindex`); where the store keeps an index record (Milvus), the run is recorded in
        it, so a later reindex skips what this run indexed, and holds the re-index lock.
        """
        with self._locked(lease) as held:
            tracker = None
            record = self.store.index_record()
            if record is not None:
                tracker = ChangeTracker(
                    record, self.store, self._fingerprint(), "none", skip_unchanged=False, fence=_fence(held)
                )
            return self._run("ingest", self.store, tracker, progress)

    def _run(self, command: str, store: Store, tracker: ChangeTracker | None, progress: Progress | None) -> RunSummary:
        """Run the stages into ``store`` under the run's telemetry (labelled with the served collection's name)."""
        with self._ingest_lock, self.telemetry.run(command, self.store.name, self.spec.runner.type) as telemetry:
            runner_class: type[Any] = LocalRunner
            if self.spec.runner.type == "ray":
                from pipeline.ray_runner import (
                    RayRunner,  # ray itself is imported only when the run starts
                )

                runner_class = RayRunner
            plan = RunPlan(
                self.sources,
                self.parser,
                self.chunker,
                self.embedder,
                store,
                self.spec.runner,
                failures_path=self.failures_path(),
                sparse=self.sparse,
                tracker=tracker,
                telemetry=telemetry,
            )
            runner = runner_class(plan)
            summary: RunSummary = runner.run(progress)
            summary.notes.extend(language_notes(summary.languages, self.embedder, store))
            telemetry.finished(summary, store.count)
            return summary

    def _fingerprint(self) -> str:
        return stage_fingerprint([self.parser, self.chunker, self.embedder, self.sparse])

    def reindex(
        self, *, progress: Progress | None = None, records: RecordStore | None = None, lease: Lease | None = None
    ) -> RunSummary:
        """Bring the index up to the sources: skip unchanged sources, redo changed ones, drop removed ones.

        ``records`` defaults to the store's own record (``<collection>_records`` for Milvus).
        Holds the re-index lock (``lease``, or one taken for the call).
        """
        with self._locked(lease) as held:
            records = records if records is not None else self._records()
            tracker = ChangeTracker(
                records, self.store, self._fingerprint(), self.spec.runner.cleanup, fence=_fence(held)
            )
            return self._run("reindex", self.store, tracker, progress)

    def full_rebuild(
        self, *, progress: Progress | None = None, records: RecordStore | None = None, lease: Lease | None = None
    ) -> RunSummary:
        """Build the whole index anew beside the served one, then switch queries over to it at once.

        On a Milvus server (and Milvus Lite 3) the build is a new collection and the collection
        name is an alias that is moved to it in one step; on Milvus Lite 2.5, which has no
        aliases, the build is a new database file that replaces the served file in one rename.
        Queries read the old index until the switch; the old collection and its record are
        dropped after it. The switch is not made, and the build is dropped, when it would lose
        indexed data: a source listing failed, or a source that has chunks in the served index
        failed in the build (the summary says which). ``records`` is the serving record.
        """
        with self._locked(lease) as held:
            serving_records = records if records is not None else self._records()
            build = self.store.start_rebuild(serving_records, time.strftime("%Y%m%dT%H%M%S", time.gmtime()))
            if build is None:
                raise TypeError(
                    f"{type(self.store).__name__} cannot build an index beside the served one and switch to it"
                )
            summary, switchable = self._build(build, progress, _fence(held))
            if switchable:
                summary.notes.append(build.switch())
            return summary

    def _build(self, build: Rebuild, progress: Progress | None, fence: Callable[[], None]) -> tuple[RunSummary, bool]:
        """Run the build; drop it (the summary says why) when switching to it would lose indexed data."""
        record = build.store.index_record()
        if record is None:
            raise TypeError(f"{type(build.store).__name__} keeps no index record, which a full rebuild writes")
        tracker = ChangeTracker(record, build.store, self._fingerprint(), "full", fence=fence)
        try:
            summary = self._run("full-rebuild", build.store, tracker, progress)
            kept = [f"listing of {scope!r}" for scope in tracker.failed_listings()]
            failed = {f.source_id for f in summary.failures if f.source_id not in tracker.failed_listings()}
            kept += sorted(build.served_sources_with_chunks(sorted(failed)))
        except BaseException:
            build.discard()
            raise
        if kept:
            build.discard()
            summary.notes.append(
                f"full rebuild not switched: {build.name!r} keeps serving {build.serving!r}, because the build "
                f"failed for what that index holds: {', '.join(kept[:5])}{' ...' if len(kept) > 5 else ''}"
            )
            return summary, False
        return summary, True

    def reconcile(self, *, records: RecordStore | None = None, repair: bool = True, lease: Lease | None = None) -> Any:
        """Compare the record with the chunks in the collection and repair drift (see pipeline.reconcile).

        Orphan chunks are deleted; sources whose record does not match their chunks are marked for
        redo, which the next :meth:`reindex` does. A repair holds the re-index lock. Returns a
        ReconcileReport.
        """
        from pipeline.reconcile import reconcile

        records = records if records is not None else self._records()
        if not repair:
            return reconcile(records, self.store, repair=False)
        with self._locked(lease):
            return reconcile(records, self.store, repair=True)

    def query(
        self,
        text: str,
        *,
        top_k: int | None = None,
        filters: dict[str, Any] | None = None,
        mode: Mode | None = None,
        rerank: bool | None = None,
    ) -> QueryResult:
        """The best chunks for ``text`` (see :meth:`pipeline.query.QueryEngine.query`); thread-safe."""
        engine = self.query_engine
        with self.telemetry.query(self.store.name, mode, top_k, rerank, filters or {}) as record:
            result = engine.query(text, top_k=top_k, filters=filters, mode=mode, rerank=rerank)
            record(result)
        return result

    def evaluate(
        self,
        beir_dir: str | os.PathLike[str],
        *,
        split: str = "test",
        modes: Sequence[str] | None = None,
        collection: str | None = None,
        reuse_index: bool = False,
        max_queries: int | None = None,
        measures: Sequence[str] | None = None,
        protocol: EvalProtocol = "chunks",
        progress: Callable[[str], None] | None = None,
    ) -> EvalReport:
        """Ingest a BEIR dataset with this spec's stages into a collection of its own
        (``<collection>_beir_<dataset>``, ``..._documents`` for ``protocol="documents"``, or ``collection``)
        and measure every retrieval mode on it by ``measures``, ir-measures names (see :mod:`pipeline.evaluate`).
        ``reuse_index`` skips the ingest when that collection has chunks."""
        dataset = load_beir(Path(beir_dir), split)
        evaluation = Pipeline(eval_spec(self.spec, dataset, collection, protocol))
        try:
            return evaluate_dataset(
                evaluation,
                dataset,
                split=split,
                modes=modes,
                reuse_index=reuse_index,
                max_queries=max_queries,
                measures=measures,
                protocol=protocol,
                progress=progress,
            )
        finally:
            evaluation.close()

    def evaluate_excerpts(
        self,
        questions: str | os.PathLike[str],
        corpus: str | os.PathLike[str],
        *,
        modes: Sequence[str] | None = None,
        ks: Sequence[int] = DEFAULT_KS,
        collection: str | None = None,
        reuse_index: bool = False,
        max_queries: int | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> ExcerptReport:
        """Span-level evaluation: ingest the corpus files the ``questions`` (CSV or JSONL with
        reference excerpts as character spans) name from the folder ``corpus`` with this spec's
        stages, into ``<collection>_excerpts_<folder>`` (or ``collection``), and measure recall,
        precision, IoU and precision_omega of every retrieval mode at each k (see :mod:`pipeline.excerpts`)."""
        questions_file, corpus_dir = Path(questions), Path(corpus)
        excerpts = load_excerpts(questions_file, corpus_dir)
        evaluation = Pipeline(excerpt_spec(self.spec, excerpts, corpus_dir, collection))
        try:
            return evaluate_excerpts(
                evaluation,
                excerpts,
                questions_file=questions_file,
                corpus_dir=corpus_dir,
                modes=modes,
                ks=ks,
                reuse_index=reuse_index,
                max_queries=max_queries,
                progress=progress,
            )
        finally:
            evaluation.close()

    def validate(self, purpose: Literal["ingest", "eval"] = "ingest") -> list[str]:
        """Problems that would stop a run, found without running it (the spec itself is already valid).

        ``purpose="eval"`` checks a spec for :meth:`evaluate`, which replaces the spec's sources with
        the dataset's corpus: the sources are not checked.
        """
        from pipeline.ray_runner import runner_problems

        problems: list[str] = [f"runner: {p}" for p in runner_problems(self.spec.runner)]
        problems.extend(metrics_problems(self.spec.runner.metrics))
        if purpose == "ingest":
            for source in self.sources:
                problems.extend(f"stages.source ({source.type_name}): {p}" for p in source.check())
            problems.extend(overlapping_scopes(self.sources))
        problems.extend(f"stages.parser: {p}" for p in self.parser.check())
        try:
            schema = index_schema(self.embedder, self.sparse)
        except Exception as exc:
            return problems + [f"stages.embedder: cannot load model: {exc}"]
        try:
            problems.extend(f"stages.store: {p}" for p in self.store.check(schema))
        except Exception as exc:
            problems.append(f"stages.store: cannot reach the store: {exc}")
        return problems

    def validation_warnings(self, purpose: Literal["ingest", "eval"] = "ingest") -> list[str]:
        """What would make retrieval poor without stopping a run: the languages of the first documents the
        sources list (up to 20, parsed here with the spec's parser) that the embedder's model or the BM25
        analyzer does not fit (see :mod:`pipeline.languages`). Meant after :meth:`validate` found no
        problem; ``purpose="eval"`` has no sources to sample, so no warning."""
        if purpose != "ingest":
            return []
        languages = sample_languages(self.sources, self.parser)
        return language_notes(languages, self.embedder, self.store, of="sampled documents")

    def to_dict(self) -> dict[str, Any]:
        return self.spec.to_dict()

    def close(self) -> None:
        store = self._components.get("store")
        if store is not None:
            store.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def overlapping_scopes(sources: list[Any]) -> list[str]:
    """Sources whose ids could collide: one's scope (id prefix) equals or starts another's.

    Cleanup and change tracking are per scope, and two documents with one id overwrite each
    other's chunks; a run fails such documents (:class:`pipeline.stages.SourceIdGuard`), but the
    spec is wrong before any run, so ``validate`` says so.
    """
    problems = []
    for i, first in enumerate(sources):
        for j in range(i + 1, len(sources)):
            a, b = first.scope, sources[j].scope
            if a.startswith(b) or b.startswith(a):
                problems.append(
                    f"stages.source[{i}] ({first.type_name}) and stages.source[{j}] ({sources[j].type_name}) give "
                    f"source ids with overlapping prefixes {a!r} and {b!r}, so their documents can overwrite each "
                    "other: give each source its own namespace (or id_prefix)"
                )
    return problems


def _fence(lease: Lease | None) -> Callable[[], None]:
    """What a run calls before each write: raises once the lease is lost (nothing for a store without a lock)."""
    return lease.ensure_held if lease is not None else (lambda: None)
