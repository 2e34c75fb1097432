"""The object a backend service holds: built once from a spec, models and clients reused per call."""

from __future__ import annotations

import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from pipeline.incremental import ChangeTracker, stage_fingerprint
from pipeline.lease import DEFAULT_TTL_S, Lease, index_lock
from pipeline.query import Mode, QueryEngine, QueryResult
from pipeline.report import Progress, RunSummary
from pipeline.runner import LocalRunner
from pipeline.spec import Spec, load_spec, parse_spec
from stores.milvus import REBUILD_INFIX, MilvusStore
from stores.leases import ClaimStore, claims_for
from stores.records import MilvusRecords, RecordStore, records_for


class Pipeline:
    """``Pipeline.from_yaml("spec.yaml").ingest()`` or ``Pipeline({...spec mapping...})``.

    Components are built on first use and kept, so a long-running service pays model loading
    once. ``ingest`` calls are serialised per pipeline object.
    """

    def __init__(
        self,
        spec: Spec | dict[str, Any],
        *,
        base_dir: str | os.PathLike[str] | None = None,
        allowed_modules: Iterable[str] = (),
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

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], *, allowed_modules: Iterable[str] = ()) -> "Pipeline":
        return cls(load_spec(path, allowed_modules=allowed_modules))

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
    def sources(self) -> list[Any]:
        return self._component("sources")

    @property
    def parser(self) -> Any:
        return self._component("parser")

    @property
    def chunker(self) -> Any:
        return self._component("chunker")

    @property
    def embedder(self) -> Any:
        return self._component("embedder")

    @property
    def store(self) -> Any:
        return self._component("store")

    @property
    def sparse(self) -> Any:
        """The learned sparse encoder (``stages.sparse``), or None."""
        return self._component("sparse")

    @property
    def reranker(self) -> Any:
        """The reranker (``query.reranker``), or None."""
        return self._component("reranker")

    @property
    def query_engine(self) -> QueryEngine:
        """The query path, built once; it shares this pipeline's embedder, sparse encoder and store."""
        with self._query_lock:  # not _build_lock: building the components takes that one
            if self._query_engine is None:
                self._query_engine = QueryEngine(self.store, self.embedder, self.spec.query, sparse=self.sparse, reranker=self.reranker)
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
        :class:`pipeline.errors.LockHeldError` when another live run holds it. Yields None for a
        store that keeps no lock (no index record).
        """
        claims = self._claims()
        return index_lock(claims, ttl_s) if claims is not None else nullcontext()

    def _claims(self) -> ClaimStore | None:
        return claims_for(self.store) if isinstance(self.store, MilvusStore) else None

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
            if isinstance(self.store, MilvusStore):
                tracker = ChangeTracker(
                    records_for(self.store), self.store, self._fingerprint(), "none", skip_unchanged=False, fence=_fence(held)
                )
            return self._run(self.store, tracker, progress)

    def _run(self, store: Any, tracker: ChangeTracker | None, progress: Progress | None) -> RunSummary:
        with self._ingest_lock:
            runner_class: type[Any] = LocalRunner
            if self.spec.runner.type == "ray":
                from pipeline.ray_runner import RayRunner  # ray itself is imported only when the run starts

                runner_class = RayRunner
            runner = runner_class(
                self.sources,
                self.parser,
                self.chunker,
                self.embedder,
                store,
                self.spec.runner,
                failures_path=self.failures_path(),
                sparse=self.sparse,
                tracker=tracker,
            )
            return runner.run(progress)

    def _fingerprint(self) -> str:
        return stage_fingerprint([self.parser, self.chunker, self.embedder, self.sparse])

    def reindex(self, *, progress: Progress | None = None, records: RecordStore | None = None, lease: Lease | None = None) -> RunSummary:
        """Bring the index up to the sources: skip unchanged sources, redo changed ones, drop removed ones.

        ``records`` defaults to the store's own record (``<collection>_records`` for Milvus).
        Holds the re-index lock (``lease``, or one taken for the call).
        """
        with self._locked(lease) as held:
            records = records if records is not None else records_for(self.store)
            tracker = ChangeTracker(records, self.store, self._fingerprint(), self.spec.runner.cleanup, fence=_fence(held))
            return self._run(self.store, tracker, progress)

    def full_rebuild(self, *, progress: Progress | None = None, records: RecordStore | None = None, lease: Lease | None = None) -> RunSummary:
        """Build the whole index anew beside the served one, then switch queries over to it at once.

        On a Milvus server (and Milvus Lite 3) the build is a new collection and the collection
        name is an alias that is moved to it in one step; on Milvus Lite 2.5, which has no
        aliases, the build is a new database file that replaces the served file in one rename.
        Queries read the old index until the switch; the old collection and its record are
        dropped after it. The switch is not made, and the build is dropped, when it would lose
        indexed data: a source listing failed, or a source that has chunks in the served index
        failed in the build (the summary says which). ``records`` is the serving record.
        """
        store = self.store
        if not isinstance(store, MilvusStore):
            raise TypeError(f"a full rebuild switches a Milvus index (alias or Lite database file); {type(store).__name__} is not one")
        with self._locked(lease) as held:
            serving_records = records if records is not None else records_for(store)
            if isinstance(serving_records, MilvusRecords):
                serving_records.bind()  # the record of what is served now, dropped after the switch
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            if store.has_aliases:
                build: _Build = _CollectionBuild(store, stamp)
            else:
                build = _FileBuild(store, stamp)
            summary, switchable = self._build(store, build, progress, _fence(held))
            if switchable:
                summary.notes.append(build.switch(serving_records))
            return summary

    def _build(self, store: MilvusStore, build: "_Build", progress: Progress | None, fence: Callable[[], None]) -> tuple[RunSummary, bool]:
        """Run the build; drop it (the summary says why) when switching to it would lose indexed data."""
        tracker = ChangeTracker(MilvusRecords(build.store), build.store, self._fingerprint(), "full", fence=fence)
        try:
            summary = self._run(build.store, tracker, progress)
            kept = [f"listing of {scope!r}" for scope in tracker.failed_listings()]
            failed = {f.source_id for f in summary.failures if f.source_id not in tracker.failed_listings()}
            kept += sorted(store.sources_with_chunks(sorted(failed)))
        except BaseException:
            build.discard()
            raise
        if kept:
            build.discard()
            summary.notes.append(
                f"full rebuild not switched: {store.config.collection!r} keeps serving {build.serving!r}, because the build "
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

        records = records if records is not None else records_for(self.store)
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
        return self.query_engine.query(text, top_k=top_k, filters=filters, mode=mode, rerank=rerank)

    def evaluate(self, beir_dir: str | os.PathLike[str], **options: Any) -> Any:
        """Ingest a BEIR dataset with this spec's stages and measure every retrieval mode on it.

        See :func:`pipeline.evaluate.evaluate_beir` for the options; returns its EvalReport.
        """
        from pipeline.evaluate import evaluate_beir

        return evaluate_beir(self.spec, Path(beir_dir), **options)

    def validate(self) -> list[str]:
        """Problems that would stop a run, found without running it (the spec itself is already valid)."""
        from pipeline.ray_runner import runner_problems

        problems: list[str] = [f"runner: {p}" for p in runner_problems(self.spec.runner)]
        for source in self.sources:
            problems.extend(f"stages.source ({source.type_name}): {p}" for p in source.check())
        problems.extend(overlapping_scopes(self.sources))
        problems.extend(f"stages.parser: {p}" for p in self.parser.check())
        try:
            dimension, model_id = self.embedder.dimension, self.embedder.model_id
        except Exception as exc:
            return problems + [f"stages.embedder: cannot load model: {exc}"]
        try:
            sparse = {"sparse_model_id": self.sparse.model_id} if self.sparse is not None else {}
            problems.extend(f"stages.store: {p}" for p in self.store.check(dimension, model_id, **sparse))
        except Exception as exc:
            problems.append(f"stages.store: cannot reach the store: {exc}")
        return problems

    def to_dict(self) -> dict[str, Any]:
        return self.spec.to_dict()

    def close(self) -> None:
        store = self._components.get("store")
        if store is not None:
            store.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


SWITCH_GRACE_S = 5.0  # how long a rebuild's old collection outlives the switch of its alias


class _Build(ABC):
    """Where a full rebuild writes, and how queries are switched over to it."""

    store: MilvusStore  # the build's store
    serving: str | None  # what the configured name serves before the switch

    @abstractmethod
    def switch(self, serving_records: RecordStore) -> str:
        """Make the build the served index; returns a note for the summary."""

    @abstractmethod
    def discard(self) -> None:
        """Drop the build, which is not switched in."""


class _CollectionBuild(_Build):
    """A new collection ``<name>__rebuild_<time>``; the name becomes an alias of it."""

    def __init__(self, served: MilvusStore, stamp: str):
        self.served = served
        self.serving = served.serving_collection()
        for leftover in served.build_collections():  # from a rebuild that crashed before its switch
            if leftover != self.serving:
                _drop_collection(served.with_collection(leftover))
        self.store = served.with_collection(f"{served.config.collection}{REBUILD_INFIX}{stamp}")

    def switch(self, serving_records: RecordStore) -> str:
        try:
            previous = self.served.switch_to(self.store.config.collection)
        finally:
            self.store.close()
        if previous is not None and previous != self.served.config.collection:  # a real collection of that name went in switch_to
            # Searches routed to the old collection just before the switch (a server's proxies cache
            # aliases) still run on it: dropped at once, it answered such a search with nothing.
            time.sleep(SWITCH_GRACE_S)
            _drop_collection(self.served.with_collection(previous), records=False)
        if isinstance(serving_records, MilvusRecords):
            serving_records.drop()
        return f"full rebuild: {self.served.config.collection!r} now serves {self.store.config.collection!r} (was {previous!r})"

    def discard(self) -> None:
        _drop_collection(self.store)


class _FileBuild(_Build):
    """A new Milvus Lite 2.5 database file beside the served one, moved over it by one rename."""

    def __init__(self, served: MilvusStore, stamp: str):
        self.served = served
        self.serving = served.serving_collection()
        for leftover in served.lite_build_files():  # from a rebuild that crashed before its switch
            served.with_lite_path(leftover).delete_lite_file()
        self.store = served.with_lite_path(served.lite_build_path(stamp))

    def switch(self, serving_records: RecordStore) -> str:
        # The served file's record goes with it: the build's own record, written under the same
        # name, is the record of what is served now.
        built = self.store.endpoint.lite_path
        self.served.replace_lite_file(self.store)
        return f"full rebuild: {self.served.endpoint.lite_path} replaced by the rebuilt database (built as {built.name})"

    def discard(self) -> None:
        self.store.delete_lite_file()


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
                    f"stages.source[{i}] ({first.type_name}) and stages.source[{j}] ({sources[j].type_name}) give source ids "
                    f"with overlapping prefixes {a!r} and {b!r}, so their documents can overwrite each other: give each "
                    "source its own namespace (or id_prefix)"
                )
    return problems


def _fence(lease: Lease | None) -> Callable[[], None]:
    """What a run calls before each write: raises once the lease is lost (nothing for a store without a lock)."""
    return lease.ensure_held if lease is not None else (lambda: None)


def _drop_collection(store: MilvusStore, records: bool = True) -> None:
    """Drop a collection that no name serves any more (and its record, unless dropped apart)."""
    try:
        if records:
            MilvusRecords(store).drop()
        store.drop()
    finally:
        store.close()
