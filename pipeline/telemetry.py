"""Metrics and traces of runs and queries, recorded by the runners and :meth:`pipeline.Pipeline.query`.

The stages know nothing of this module: the runners tell the run's :class:`RunTelemetry` what
they tell the run's book (documents seen, indexed and failed, chunks written, stage seconds) plus
queue depths and one span per batch and per batch step; the pipeline opens a run (:meth:`Telemetry.run`)
around each ingest and a query span around each query.

Two optional back ends, each imported only when installed, so the base install is unaffected:

* **Prometheus** (``pip install 'rag-pipeline[metrics]'``): counters, gauges and histograms in a
  ``prometheus_client.CollectorRegistry``, the service's (exposed at ``/metrics``) or one of the
  pipeline's own when the spec's ``runner.metrics`` names a node-exporter textfile or a
  Pushgateway, written or pushed after every run. Without a registry nothing is counted.
* **OpenTelemetry** (``pip install 'rag-pipeline[tracing]'``): spans through the global tracer
  provider, or the one given; :func:`configure_tracing_from_env` sets up OTLP export from the
  standard ``OTEL_*`` variables for the command line and the service. Without the API, no spans.

Spans and labels carry counts, stage and mode names, exception types and collection names only:
never a document's or a query's text, a source id, a failure's message or a credential.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.component import require
from core.secrets import register_secret, scrub

if TYPE_CHECKING:
    from pipeline.query import QueryResult
    from pipeline.report import RunSummary
    from pipeline.spec import MetricsSettings

log = logging.getLogger("rag_pipeline")

TRACER_NAME = "rag_pipeline"
METRICS_EXTRA_HINT = "runner.metrics needs the metrics extra: pip install 'rag-pipeline[metrics]'"

# A read or parse step is one document (milliseconds); chunk, embed and write steps are a batch
# (seconds to minutes on a CPU).
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
RUN_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
QUERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# Failure reasons are free text (they name files and quote libraries); a label needs few values.
# The parser pool's and the runners' own reasons are recognised by how they start; an exception's
# reason starts with its type (pipeline.stages.describe_error), which is its class; what is left is
# a component's own refusal in its own words (a parser's ParseFailure: empty, binary, encrypted ...).
_REASON_PREFIXES = (
    ("parse timed out", "timeout"),
    ("parser used more than", "memory"),
    ("parser ran out of memory", "memory"),
    ("parser process died", "worker died"),
    ("parser process was killed", "worker killed"),
    ("the parser process did not start", "worker start"),
    ("source id collision", "source id collision"),
    ("lost in the Ray cluster", "lost"),
    ("no chunks", "no chunks"),
)
_EXCEPTION_TYPE = re.compile(r"([A-Z][A-Za-z0-9_]*)(?::|$)")


def reason_class(reason: str) -> str:
    """A failure reason's class, for the ``reason`` label: a known cause, the exception type, or ``refused``."""
    for prefix, name in _REASON_PREFIXES:
        if reason.startswith(prefix):
            return name
    match = _EXCEPTION_TYPE.match(reason)
    return match.group(1) if match else "refused"


# ---------------------------------------------------------------------------------------------
# Prometheus


def metrics_problems(settings: MetricsSettings) -> list[str]:
    """What stops a run from publishing its metrics as ``settings`` ask (for ``validate``)."""
    if (settings.textfile or settings.pushgateway) and importlib.util.find_spec("prometheus_client") is None:
        return [METRICS_EXTRA_HINT]
    return []


class PrometheusMetrics:
    """The metric families, registered in one registry; every one has a ``collection`` label."""

    def __init__(self, registry: Any):
        client = require("prometheus_client", extra="metrics", purpose="Prometheus metrics")
        self.registry = registry
        self._client = client
        by_collection = ("collection",)
        self.documents_seen = client.Counter(
            "rag_documents_seen",
            "Documents a run took in: listed and handed to the parser, or failed before it.",
            by_collection,
            registry=registry,
        )
        self.documents_indexed = client.Counter(
            "rag_documents_indexed",
            "Documents written to the index with all their chunks.",
            by_collection,
            registry=registry,
        )
        self.documents_failed = client.Counter(
            "rag_documents_failed",
            "Documents that failed, by the stage that failed them and the class of the reason.",
            (*by_collection, "stage", "reason"),
            registry=registry,
        )
        self.chunks_written = client.Counter(
            "rag_chunks_written", "Chunks written to the index.", by_collection, registry=registry
        )
        self.stage_seconds = client.Histogram(
            "rag_stage_seconds",
            "Seconds of one step of a stage: a document for read and parse, a batch (or a large document's slice) "
            "for chunk, embed and write; the waits are the runner's.",
            (*by_collection, "stage"),
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self.queue_depth = client.Gauge(
            "rag_queue_depth",
            "Items waiting in a run's queue at the last batch: parse (parsed documents waiting for the embedder), "
            "write (embedded batches waiting for the store writer); 0 between runs.",
            (*by_collection, "queue"),
            registry=registry,
        )
        self.runs = client.Counter(
            "rag_runs",
            "Runs by command and result: ok (every document indexed), partial (some failed), aborted (the run "
            "stopped).",
            (*by_collection, "command", "result"),
            registry=registry,
        )
        self.run_seconds = client.Histogram(
            "rag_run_seconds",
            "Seconds a run took, by command.",
            (*by_collection, "command"),
            buckets=RUN_BUCKETS,
            registry=registry,
        )
        self.last_run = client.Gauge(
            "rag_last_run_timestamp_seconds", "When the last run ended (Unix time).", by_collection, registry=registry
        )
        self.index_chunks = client.Gauge(
            "rag_index_chunks", "Chunks in the index after the last run.", by_collection, registry=registry
        )
        self.query_seconds = client.Histogram(
            "rag_query_seconds",
            "Seconds a query took, by the mode it ran (auto resolved).",
            (*by_collection, "mode"),
            buckets=QUERY_BUCKETS,
            registry=registry,
        )
        self.query_errors = client.Counter(
            "rag_query_errors", "Queries that raised, by exception type.", (*by_collection, "error"), registry=registry
        )
        # Registered on the first finished run only: an exposition without it (a process whose
        # runs all aborted) leaves a Pushgateway's previous value in place.
        self._last_success: Any = None

    def last_success(self, collection: str, when: float) -> None:
        """Record a finished run (exit code 0 or 1) at ``when``."""
        if self._last_success is None:
            self._last_success = self._client.Gauge(
                "rag_last_success_timestamp_seconds",
                "When the last run that finished ended (Unix time); documents may have failed in it.",
                ("collection",),
                registry=self.registry,
            )
        self._last_success.labels(collection).set(when)

    def has_last_success(self, collection: str) -> bool:
        if self._last_success is None:
            return False
        samples = (s for family in self._last_success.collect() for s in family.samples)
        return any(sample.labels.get("collection") == collection for sample in samples)

    def carry_last_success(self, collection: str, textfile: Path) -> None:
        """Keep the last success time an earlier process wrote to ``textfile``, when this process has none."""
        if self.has_last_success(collection) or not textfile.is_file():
            return
        from prometheus_client.parser import text_string_to_metric_families

        try:
            families = list(text_string_to_metric_families(textfile.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:  # not ours, or cut short: nothing to carry over
            log.debug("metrics: cannot read %s: %s", textfile, exc)
            return
        for family in families:
            if family.name == "rag_last_success_timestamp_seconds":
                for sample in family.samples:
                    if sample.labels.get("collection") == collection:
                        self.last_success(collection, sample.value)


# ---------------------------------------------------------------------------------------------
# OpenTelemetry


class _NoSpan:
    """Where a span would be without the OpenTelemetry API: attributes go nowhere."""

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        pass

    def set_attribute(self, key: str, value: Any) -> None:
        pass


NO_SPAN = _NoSpan()


def otel_tracer(tracer_provider: Any = None) -> Any:
    """A tracer from ``tracer_provider`` (default: the global one), or None without the OpenTelemetry API."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    return trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider)


def _fail_span(span: Any, exc: BaseException) -> None:
    """Mark ``span`` failed with the exception's type only: its message may quote a document or a server."""
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("error.type", type(exc).__name__)
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))


@contextmanager
def _span(tracer: Any, name: str, attributes: Mapping[str, Any], parent: Any = None) -> Iterator[Any]:
    """A current span named ``name`` under the current span (or ``parent``'s context when this thread has none)."""
    if tracer is None:
        yield NO_SPAN
        return
    from opentelemetry import trace

    context = parent if parent is not None and not trace.get_current_span().get_span_context().is_valid else None
    with tracer.start_as_current_span(
        name, context=context, attributes=attributes, record_exception=False, set_status_on_exception=False
    ) as span:
        try:
            yield span
        except BaseException as exc:
            _fail_span(span, exc)
            raise


@dataclass(frozen=True)
class StepTiming:
    """A step timed where no span could be opened (a Ray actor), replayed as a span by the driver."""

    stage: str
    started_ns: int  # wall clock (time.time_ns) of the worker's machine
    ended_ns: int
    attributes: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# A run


class RunTelemetry:
    """What a run reports beside its book: thread-safe, as the book is (the writer thread reports too).

    With neither back end each call returns at once.
    """

    def __init__(self, metrics: PrometheusMetrics | None, tracer: Any, collection: str, command: str):
        self.collection = collection
        self.command = command
        self._metrics = metrics
        self._tracer = tracer
        self.span: Any = NO_SPAN  # the run's span, once Telemetry.run opened it
        self._run_context: Any = None  # the run span's context, for spans opened in other threads
        self._stage_histograms: dict[str, Any] = {}
        if metrics is not None:
            self._seen = metrics.documents_seen.labels(collection)
            self._indexed = metrics.documents_indexed.labels(collection)
            self._chunks = metrics.chunks_written.labels(collection)

    @classmethod
    def off(cls) -> RunTelemetry:
        """Neither metrics nor spans (a run planned without a pipeline: tests, benchmarks)."""
        return cls(None, None, "", "")

    @property
    def tracing(self) -> bool:
        return self._tracer is not None

    def opened(self, span: Any) -> None:
        """The run's span is open: the batches' and steps' spans go under it, from any thread."""
        self.span = span
        if self._tracer is not None:
            from opentelemetry import trace

            self._run_context = trace.set_span_in_context(span)

    def seen(self, documents: int) -> None:
        if self._metrics is not None:
            self._seen.inc(documents)

    def indexed(self, documents: int, chunks: int) -> None:
        if self._metrics is not None:
            self._indexed.inc(documents)
            self._chunks.inc(chunks)

    def failed(self, stage: str, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.documents_failed.labels(self.collection, stage, reason_class(reason)).inc()

    def stage_time(self, stage: str, seconds: float) -> None:
        if self._metrics is None:
            return
        histogram = self._stage_histograms.get(stage)
        if histogram is None:  # a benign race: labels() returns the same child to both threads
            histogram = self._stage_histograms[stage] = self._metrics.stage_seconds.labels(self.collection, stage)
        histogram.observe(seconds)

    def queue_depth(self, queue: str, depth: int) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.labels(self.collection, queue).set(depth)

    def batch(self, number: int, documents: int, attributes: Mapping[str, Any] | None = None) -> Any:
        """The span of one batch (a context manager): its steps' spans opened in this thread nest in it."""
        return _span(
            self._tracer,
            "rag.batch",
            {"rag.batch.number": number, "rag.documents": documents, **(attributes or {})},
            self._run_context,
        )

    def step(self, stage: str) -> Any:
        """The span of one step of a stage on a batch (a context manager); in a thread without a
        current span (the store writer's) it is a child of the run's span."""
        return _span(self._tracer, f"rag.{stage.replace(' ', '_')}", {"rag.stage": stage}, self._run_context)

    def replay(self, steps: Sequence[StepTiming]) -> None:
        """Spans for steps timed on a Ray worker, under the current span (the driver's batch span)."""
        if self._tracer is None:
            return
        for step in steps:
            span = self._tracer.start_span(
                f"rag.{step.stage.replace(' ', '_')}",
                attributes={"rag.stage": step.stage, **step.attributes},
                start_time=step.started_ns,
            )
            span.end(end_time=step.ended_ns)

    def finished(self, summary: RunSummary, index_size: Callable[[], int]) -> None:
        """The run ended with ``summary``: its result, duration and the index's size after it."""
        self.span.set_attributes(
            {
                "rag.documents.seen": summary.documents_seen,
                "rag.documents.indexed": summary.documents_indexed,
                "rag.documents.failed": summary.documents_failed,
                "rag.chunks.written": summary.chunks_written,
            }
        )
        metrics = self._metrics
        if metrics is None:
            return
        now = time.time()
        metrics.runs.labels(self.collection, self.command, "ok" if summary.ok else "partial").inc()
        metrics.run_seconds.labels(self.collection, self.command).observe(summary.seconds)
        metrics.last_run.labels(self.collection).set(now)
        metrics.last_success(self.collection, now)
        try:
            metrics.index_chunks.labels(self.collection).set(index_size())
        except Exception as exc:  # the run is done and recorded; a size we cannot read is left out
            log.warning("metrics: cannot count the chunks in %s: %s", self.collection, scrub(str(exc)))

    def aborted(self, seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.runs.labels(self.collection, self.command, "aborted").inc()
            self._metrics.run_seconds.labels(self.collection, self.command).observe(seconds)
            self._metrics.last_run.labels(self.collection).set(time.time())

    def queues_drained(self) -> None:
        if self._metrics is not None:
            for queue in ("parse", "write"):
                self._metrics.queue_depth.labels(self.collection, queue).set(0)


# ---------------------------------------------------------------------------------------------
# The pipeline's telemetry


class Telemetry:
    """A pipeline's instruments: Prometheus metrics in ``registry`` (or in a registry of its own
    when ``settings`` name a textfile or a Pushgateway) and spans from ``tracer_provider`` (default:
    OpenTelemetry's global provider)."""

    def __init__(
        self,
        settings: MetricsSettings | None = None,
        *,
        registry: Any = None,
        tracer_provider: Any = None,
        base_dir: Path | None = None,
    ):
        self.settings = settings
        self.base_dir = base_dir or Path.cwd()
        self._registry = registry
        self._metrics: PrometheusMetrics | None = None
        self._tracer = otel_tracer(tracer_provider)

    @property
    def publishes(self) -> bool:
        """Whether runs write a textfile or push to a Pushgateway."""
        return self.settings is not None and bool(self.settings.textfile or self.settings.pushgateway)

    def metrics(self) -> PrometheusMetrics | None:
        """The metric families, registered on first use; None when nothing keeps them."""
        if self._metrics is None and (self._registry is not None or self.publishes):
            if self._registry is None:
                self._registry = require(
                    "prometheus_client", extra="metrics", purpose="runner.metrics"
                ).CollectorRegistry()
            self._metrics = PrometheusMetrics(self._registry)
        return self._metrics

    def textfile(self) -> Path | None:
        if self.settings is None or not self.settings.textfile:
            return None
        path = Path(self.settings.textfile).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    @contextmanager
    def run(self, command: str, collection: str, runner: str) -> Iterator[RunTelemetry]:
        """A run of ``command`` on ``collection``: its span and its metrics, published when it ends.

        The caller reports the summary with :meth:`RunTelemetry.finished`; a run left by an exception
        counts as aborted.
        """
        metrics = self.metrics()  # before the run: a missing extra stops it at once
        started = time.monotonic()
        run = RunTelemetry(metrics, self._tracer, collection, command)
        attributes = {"rag.command": command, "rag.collection": collection, "rag.runner": runner}
        try:
            with _span(self._tracer, "rag.run", attributes) as span:
                run.opened(span)
                try:
                    yield run
                except BaseException:
                    run.aborted(time.monotonic() - started)
                    raise
                finally:
                    run.queues_drained()
        finally:
            if metrics is not None:
                self.publish(metrics, collection)

    def publish(self, metrics: PrometheusMetrics, collection: str) -> None:
        """Write the textfile and push to the Pushgateway the settings name; a failure is logged, never raised
        (the run itself is over and recorded)."""
        settings = self.settings
        if settings is None:
            return
        textfile = self.textfile()
        if textfile is not None:
            try:
                from prometheus_client import write_to_textfile

                metrics.carry_last_success(collection, textfile)
                textfile.parent.mkdir(parents=True, exist_ok=True)
                write_to_textfile(str(textfile), metrics.registry)  # a temporary file, then a rename
            except Exception as exc:
                log.warning("metrics: cannot write %s: %s", textfile, scrub(str(exc)))
        if settings.pushgateway:
            try:
                push(metrics.registry, settings, collection)
            except Exception as exc:
                log.warning("metrics: cannot push to %s: %s", settings.pushgateway, scrub(str(exc)))

    @contextmanager
    def query(
        self, collection: str, mode: str | None, top_k: int | None, rerank: bool | None, filters: Mapping[str, Any]
    ) -> Iterator[Callable[[QueryResult], None]]:
        """A query's span and latency; the caller hands the result to the function this yields."""
        # Never the import metrics() may fail on: a spec that publishes runs must not stop queries
        # on an install without the extra (and a process that only queries publishes nothing).
        metrics = self.metrics() if self._registry is not None else self._metrics
        attributes: dict[str, Any] = {"rag.collection": collection, "rag.query.mode": mode or "default"}
        if top_k is not None:
            attributes["rag.query.top_k"] = top_k
        if rerank is not None:
            attributes["rag.query.rerank"] = rerank
        if filters:
            attributes["rag.query.filters"] = sorted(filters)  # the keys: their values may be private
        started = time.perf_counter()
        with _span(self._tracer, "rag.query", attributes) as span:

            def done(result: QueryResult) -> None:
                span.set_attributes(
                    {
                        "rag.query.mode.resolved": result.mode,
                        "rag.query.branches": list(result.branches),
                        "rag.query.reranked": result.reranked,
                        "rag.query.hits": len(result.hits),
                        **{f"rag.query.seconds.{phase}": seconds for phase, seconds in result.seconds.items()},
                    }
                )
                if metrics is not None:
                    metrics.query_seconds.labels(collection, result.mode).observe(time.perf_counter() - started)

            try:
                yield done
            except Exception as exc:
                if metrics is not None:
                    metrics.query_errors.labels(collection, type(exc).__name__).inc()
                raise


def push(registry: Any, settings: MetricsSettings, collection: str) -> None:
    """Push ``registry`` to the Pushgateway, grouped by job and collection; basic auth from the environment.

    POST (``pushadd``): the families this push lacks keep the values an earlier push gave them.
    """
    from prometheus_client import pushadd_to_gateway
    from prometheus_client.exposition import basic_auth_handler, default_handler

    credentials = os.environ.get(settings.basic_auth_env, "")
    username, _, password = credentials.partition(":")
    register_secret(credentials, password)

    def handler(url: str, method: str, timeout: float | None, headers: list[tuple[str, str]], data: bytes) -> Any:
        if not credentials:
            return default_handler(url, method, timeout, headers, data)
        return basic_auth_handler(url, method, timeout, headers, data, username, password)

    pushadd_to_gateway(
        str(settings.pushgateway),
        job=settings.job,
        registry=registry,
        grouping_key={"collection": collection},
        timeout=settings.timeout_s,
        handler=handler,
    )


# ---------------------------------------------------------------------------------------------
# OTLP export from the environment


def configure_tracing_from_env(environ: Mapping[str, str] | None = None) -> Callable[[], None] | None:
    """Install an OpenTelemetry SDK tracer provider exporting as the standard variables say; returns its
    shutdown (which flushes the spans still queued), or None when the variables ask for no export.

    Export is on when ``OTEL_TRACES_EXPORTER`` names ``otlp`` or ``console`` (stderr), or, without it,
    when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set;
    ``OTEL_SDK_DISABLED=true`` turns it off. The exporter itself reads the endpoint, headers,
    timeout and ``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`` (``http/protobuf``, the default, or ``grpc``
    with the gRPC exporter installed); ``OTEL_SERVICE_NAME`` names the service (default rag-pipeline).
    """
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    named = env.get("OTEL_TRACES_EXPORTER")
    if named is None:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        exporters = ["otlp"] if endpoint else []
    else:
        exporters = [name.strip() for name in named.split(",") if name.strip() and name.strip() != "none"]
    if not exporters:
        return None
    unknown = sorted(set(exporters) - {"otlp", "console"})
    if unknown:
        raise ValueError(f"OTEL_TRACES_EXPORTER: {', '.join(unknown)} is not supported here (otlp, console, none)")
    require("opentelemetry.sdk.trace", extra="tracing", purpose="exporting traces (OTEL_* variables are set)")
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    named_service = "OTEL_SERVICE_NAME" in env or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    provider = TracerProvider(resource=Resource.create({} if named_service else {"service.name": "rag-pipeline"}))
    for exporter in exporters:
        if exporter == "console":  # stdout carries the command's own output
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
        else:
            provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(env)))
    trace.set_tracer_provider(provider)
    return provider.shutdown


def _otlp_exporter(env: Mapping[str, str]) -> Any:
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    if protocol.strip() == "grpc":
        module = require(
            "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
            purpose="OTLP over gRPC (or set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf)",
        )
    else:
        module = require(
            "opentelemetry.exporter.otlp.proto.http.trace_exporter", extra="tracing", purpose="OTLP trace export"
        )
    return module.OTLPSpanExporter()
