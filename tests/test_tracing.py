"""OpenTelemetry spans of runs, batches, their steps and queries (pipeline.telemetry), caught by the SDK's
in-memory exporter, and exported over OTLP/HTTP by the command line when OTEL_* variables ask for it.

The runs are real ingests into Milvus Lite with the test plugins' parser and hash embedder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import StatusCode  # noqa: E402

from pipeline import Pipeline  # noqa: E402
from pipeline.query import QueryInputError  # noqa: E402
from pipeline.telemetry import configure_tracing_from_env  # noqa: E402
from tests.plugins.components import PLUGINS, base_spec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Text that must never reach a span: document contents, a source name, the question.
DOCUMENTS = {
    "apiary.txt": "zanzibar honeycomb ledger\nquokka pollen census",
    "orchard.txt": "marzipan pruning almanac",
    "broken.txt": "<corrupt>",
}
QUESTION = "which quokka counts the pollen"


def spec(tmp_path: Path) -> dict:
    spec = base_spec(name="traced")
    spec["stages"]["source"]["documents"] = DOCUMENTS
    spec["stages"]["store"] = {"type": "milvus", "uri": str(tmp_path / "index.db"), "collection": "traced"}
    spec["runner"]["batch_size"] = 2
    return spec


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def test_a_run_has_a_span_with_a_span_per_batch_and_per_step(tmp_path, provider, exporter):
    with Pipeline(spec(tmp_path), allowed_modules=PLUGINS, tracer_provider=provider) as pipeline:
        summary = pipeline.ingest()
    spans = exporter.get_finished_spans()
    (run,) = named(spans, "rag.run")
    assert run.parent is None and run.status.status_code == StatusCode.UNSET
    assert dict(run.attributes) == {
        "rag.command": "ingest",
        "rag.collection": "traced",
        "rag.runner": "local",
        "rag.documents.seen": 3,
        "rag.documents.indexed": 2,
        "rag.documents.failed": 1,
        "rag.chunks.written": summary.chunks_written,
    }
    assert summary.chunks_written == 3
    assert {span.context.trace_id for span in spans} == {run.context.trace_id}

    # apiary.txt and broken.txt, then orchard.txt: one span per batch, under the run.
    batches = sorted(named(spans, "rag.batch"), key=lambda span: span.attributes["rag.batch.number"])
    assert [(b.attributes["rag.batch.number"], b.attributes["rag.documents"]) for b in batches] == [(1, 2), (2, 1)]
    assert [b.attributes["rag.documents.parse_failed"] for b in batches] == [1, 0]
    assert all(b.parent.span_id == run.context.span_id for b in batches)

    # Chunk and embed run in the batch's thread, under its span; writes in the writer thread, under the run.
    batch_ids = [b.context.span_id for b in batches]
    for stage in ("rag.chunk", "rag.embed"):
        steps = sorted(named(spans, stage), key=lambda span: batch_ids.index(span.parent.span_id))
        assert [s.attributes["rag.documents"] for s in steps] == [1, 1], stage
        assert [s.attributes["rag.chunks"] for s in steps] == [2, 1], stage
        assert all(batch.start_time <= s.start_time <= s.end_time <= batch.end_time for s, batch in zip(steps, batches))
    writes = named(spans, "rag.write")
    assert all(w.parent.span_id == run.context.span_id for w in writes)
    assert sum(w.attributes["rag.chunks"] for w in writes) == summary.chunks_written
    assert sum(w.attributes["rag.documents.failed"] for w in writes) == 0
    assert_no_text(spans)


def test_a_query_has_a_span_with_its_mode_branches_and_hits(tmp_path, provider, exporter):
    with Pipeline(spec(tmp_path), allowed_modules=PLUGINS, tracer_provider=provider) as pipeline:
        pipeline.ingest()
        exporter.clear()
        result = pipeline.query(QUESTION, top_k=2, filters={"source_id": "mem/apiary.txt"})
        with pytest.raises(QueryInputError):
            pipeline.query(QUESTION, top_k=100_000)
    ok, refused = named(exporter.get_finished_spans(), "rag.query")
    assert ok.attributes["rag.query.mode"] == "default" and ok.attributes["rag.query.mode.resolved"] == result.mode
    assert ok.attributes["rag.query.top_k"] == 2 and ok.attributes["rag.query.hits"] == len(result.hits) == 2
    assert list(ok.attributes["rag.query.branches"]) == result.branches == ["dense"]
    assert ok.attributes["rag.query.filters"] == ("source_id",)  # the filter's keys, not its values
    assert ok.attributes["rag.query.seconds.total"] == result.seconds["total"]
    assert ok.status.status_code == StatusCode.UNSET
    assert refused.status.status_code == StatusCode.ERROR and refused.attributes["error.type"] == "QueryInputError"
    assert_no_text(exporter.get_finished_spans())


def test_an_aborted_run_span_says_error_by_type_only(tmp_path, provider, exporter):
    with Pipeline(spec(tmp_path), allowed_modules=PLUGINS) as pipeline:
        pipeline.ingest()
    wider = spec(tmp_path)
    wider["stages"]["embedder"]["dimension"] = 16  # the collection holds 8-dimensional vectors
    with (
        Pipeline(wider, allowed_modules=PLUGINS, tracer_provider=provider) as pipeline,
        pytest.raises(Exception) as exc,
    ):
        pipeline.ingest()
    (run,) = named(exporter.get_finished_spans(), "rag.run")
    assert run.status.status_code == StatusCode.ERROR
    assert (
        run.attributes["error.type"] == type(exc.value).__name__
        and run.status.description == run.attributes["error.type"]
    )
    assert not run.events  # no recorded exception: its message may quote a server or a document


def assert_no_text(spans: tuple[ReadableSpan, ...]) -> None:
    words = [word for text in DOCUMENTS.values() for word in text.split()] + QUESTION.split() + ["apiary", "orchard"]
    words = [word for word in words if len(word) > 5]  # distinctive ones; "which" could be anywhere
    for span in spans:
        values = [span.name, *map(str, span.attributes.values()), *(event.name for event in span.events)]
        leaked = [word for word in words if any(word in value for value in values)]
        assert not leaked, (span.name, leaked)


# -- OTLP export from the standard environment variables ---------------------------------------------


def test_without_otel_variables_nothing_is_exported():
    assert configure_tracing_from_env({}) is None
    assert configure_tracing_from_env({"OTEL_TRACES_EXPORTER": "none"}) is None
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert configure_tracing_from_env({**endpoint, "OTEL_SDK_DISABLED": "true"}) is None
    with pytest.raises(ValueError, match="zipkin"):
        configure_tracing_from_env({"OTEL_TRACES_EXPORTER": "zipkin"})


class Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP trace receiver: keeps each export request's body."""

    bodies: list[bytes] = []

    def do_POST(self) -> None:
        if self.path == "/v1/traces":
            type(self).bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_the_command_line_exports_its_spans_to_the_collector_the_environment_names(tmp_path):
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    Collector.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec(tmp_path)))
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
        "OTEL_SERVICE_NAME": "indexer-test",
        "PYTHONPATH": str(REPO),
        "NO_PROXY": "127.0.0.1",
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "-q", "ingest", str(spec_path), "--allow-module", "tests.plugins"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 1, done.stderr  # broken.txt failed; the spans were flushed at exit all the same
    spans, services = [], set()
    for body in Collector.bodies:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            services.add(attributes.get("service.name"))
            spans += [span for scope in resource_spans.scope_spans for span in scope.spans]
    assert services == {"indexer-test"}
    names = sorted(span.name for span in spans)
    assert names.count("rag.run") == 1 and names.count("rag.batch") == 2 and "rag.embed" in names, names
    (run,) = [span for span in spans if span.name == "rag.run"]
    run_attributes = {a.key: a.value for a in run.attributes}
    assert run_attributes["rag.documents.indexed"].int_value == 2
