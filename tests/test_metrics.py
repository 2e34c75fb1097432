"""Prometheus metrics of runs and queries (pipeline.telemetry): scraped from the service's /metrics,
written as a node-exporter textfile by the command line, and pushed to a Pushgateway.

Runs are real ingests into Milvus Lite: the service with the shipped MiniLM, the others with the test
plugins' parser and hash embedder, whose failing documents give known failure counts.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from core.errors import SpecError  # noqa: E402
from core.secrets import scrub  # noqa: E402
from pipeline import Pipeline, parse_spec  # noqa: E402
from pipeline.cli import main  # noqa: E402
from pipeline.report import RunSummary  # noqa: E402
from pipeline.spec import MetricsSettings  # noqa: E402
from pipeline.telemetry import Telemetry, reason_class  # noqa: E402
from tests.plugins.components import PLUGINS, base_spec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def samples(exposition: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


# -- failure reasons as label values ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("parse timed out after 120 s; the parser process was killed", "timeout"),
        ("parser used more than 4096 MB of memory; the parser process was killed", "memory"),
        ("parser process died (exit code 7)", "worker died"),
        ("source id collision: more than one document listed in this run has the id 'a'", "source id collision"),
        ("PermissionError: mem/x.txt: permission denied", "PermissionError"),
        ("MilvusException: <code=1100> (slice 2 of 3, chunks 1024-2047 of 3000; kept)", "MilvusException"),
        ("TimeoutError", "TimeoutError"),
        ("binary content, not text: cannot detect a text encoding", "refused"),
        ("PDF files need pdfminer.six, not installed", "refused"),
    ],
)
def test_a_failure_reason_is_classed_by_its_cause_or_exception_type(reason, expected):
    assert reason_class(reason) == expected


# -- the spec's runner.metrics -------------------------------------------------------------------


def test_metrics_settings_round_trip_through_the_spec():
    spec = base_spec()
    spec["runner"]["metrics"] = {"textfile": "metrics/rag.prom", "pushgateway": "https://push.example:9091", "job": "j"}
    parsed = parse_spec(spec, allowed_modules=PLUGINS)
    assert parsed.runner.metrics == MetricsSettings(
        textfile="metrics/rag.prom", pushgateway="https://push.example:9091", job="j"
    )
    again = parse_spec(parsed.to_dict(), allowed_modules=PLUGINS)
    assert again.runner.metrics == parsed.runner.metrics
    assert "metrics" not in parse_spec(base_spec(), allowed_modules=PLUGINS).to_dict().get("runner", {})


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ({"textfile": "rag.txt"}, "only files ending in .prom"),
        ({"pushgateway": "push.example:9091"}, "not an http:// or https:// address"),
        ({"pushgateway": "https://user:secret@push.example"}, "must not carry credentials"),
        ({"basic_auth_env": "user:password"}, "the *name* of an environment variable"),
        ({"pushgateway_url": "http://push.example"}, "unknown key"),
    ],
)
def test_wrong_metrics_settings_are_spec_errors_naming_the_key(metrics, message):
    spec = base_spec()
    spec["runner"]["metrics"] = metrics
    with pytest.raises(SpecError) as caught:
        parse_spec(spec, allowed_modules=PLUGINS)
    assert "runner.metrics" in str(caught.value) and message in str(caught.value)


# -- a run written as a node-exporter textfile by the command line -------------------------------------


def failing_corpus() -> dict[str, str]:
    """Two good documents (three chunks: one per line), one the parser refuses, one unreadable."""
    return {"a.txt": "alpha\nbeta", "b.txt": "gamma", "bad.txt": "<corrupt>", "locked.txt": "<unreadable>"}


def plugin_spec(tmp_path: Path, **metrics: str) -> dict:
    spec = base_spec(name="textfile")
    spec["stages"]["source"]["documents"] = failing_corpus()
    spec["stages"]["store"] = {"type": "milvus", "uri": str(tmp_path / "index.db"), "collection": "docs"}
    spec["runner"]["batch_size"] = 2
    spec["runner"]["metrics"] = metrics
    return spec


def test_the_command_line_writes_the_runs_counts_to_the_textfile_and_keeps_the_last_success(tmp_path, capsys):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(plugin_spec(tmp_path, textfile="node/rag.prom")))
    before = time.time()
    code = main(["ingest", str(spec_path), "--json", "--allow-module", "tests.plugins"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 1 and summary["documents_failed"] == 2

    first = samples((tmp_path / "node" / "rag.prom").read_text())
    assert value(first, "rag_documents_seen_total", collection="docs") == summary["documents_seen"] == 4
    assert value(first, "rag_documents_indexed_total", collection="docs") == summary["documents_indexed"] == 2
    assert value(first, "rag_chunks_written_total", collection="docs") == summary["chunks_written"] == 3
    assert value(first, "rag_documents_failed_total", collection="docs", stage="parse", reason="refused") == 1
    assert value(first, "rag_documents_failed_total", collection="docs", stage="read", reason="PermissionError") == 1
    assert value(first, "rag_runs_total", collection="docs", command="ingest", result="partial") == 1
    assert value(first, "rag_index_chunks", collection="docs") == 3
    assert value(first, "rag_stage_seconds_count", collection="docs", stage="embed") == 2  # a step per batch
    assert value(first, "rag_stage_seconds_count", collection="docs", stage="parse") == 2  # a step per parsed one
    assert value(first, "rag_queue_depth", collection="docs", queue="write") == 0
    succeeded = value(first, "rag_last_success_timestamp_seconds", collection="docs")
    assert succeeded is not None and before <= succeeded <= time.time()

    # The next run stops (the collection holds 8-dimensional vectors, this embedder makes 16): a new
    # process, so a new registry; the textfile says so and still has the time of the last success.
    aborting = plugin_spec(tmp_path, textfile="node/rag.prom")
    aborting["stages"]["embedder"]["dimension"] = 16
    spec_path.write_text(yaml.safe_dump(aborting))
    assert main(["ingest", str(spec_path), "--allow-module", "tests.plugins"]) == 3
    second = samples((tmp_path / "node" / "rag.prom").read_text())
    assert value(second, "rag_runs_total", collection="docs", command="ingest", result="aborted") == 1
    assert value(second, "rag_runs_total", collection="docs", command="ingest", result="partial") is None
    assert value(second, "rag_documents_seen_total", collection="docs") == 0
    assert value(second, "rag_last_success_timestamp_seconds", collection="docs") == succeeded
    assert value(second, "rag_last_run_timestamp_seconds", collection="docs") > succeeded


def test_an_evaluation_ingest_publishes_nothing(tmp_path):
    from pipeline.evaluate import evaluation_runner

    settings = parse_spec(plugin_spec(tmp_path, textfile="rag.prom"), allowed_modules=PLUGINS).runner
    assert evaluation_runner(settings, "docs_beir_scifact").metrics == MetricsSettings()


# -- a Pushgateway ---------------------------------------------------------------------------------


class Pushgateway(BaseHTTPRequestHandler):
    """Takes pushes as a Pushgateway does and keeps them for the test."""

    received: list[tuple[str, str, dict[str, str], str]] = []

    def _take(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        type(self).received.append((self.command, self.path, dict(self.headers), body))
        self.send_response(200)
        self.end_headers()

    do_POST = do_PUT = _take

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def pushgateway() -> Iterator[type[Pushgateway]]:
    Pushgateway.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Pushgateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Pushgateway.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield Pushgateway
    server.shutdown()
    server.server_close()


def test_each_run_is_pushed_with_basic_auth_from_the_environment(tmp_path, pushgateway, monkeypatch):
    password = "pg-secret-9f3c2a71"
    monkeypatch.setenv("RAG_TEST_PUSH_AUTH", f"robot:{password}")
    spec = plugin_spec(tmp_path, pushgateway=pushgateway.url, job="nightly", basic_auth_env="RAG_TEST_PUSH_AUTH")
    with Pipeline(spec, allowed_modules=PLUGINS) as pipeline:
        summary = pipeline.ingest()
    ((method, path, headers, body),) = pushgateway.received
    assert (method, path) == ("POST", "/metrics/job/nightly/collection/docs")
    assert headers["Authorization"] == "Basic " + base64.b64encode(f"robot:{password}".encode()).decode()
    pushed = samples(body)
    assert value(pushed, "rag_documents_seen_total", collection="docs") == summary.documents_seen == 4
    assert value(pushed, "rag_chunks_written_total", collection="docs") == summary.chunks_written == 3
    assert scrub(f"push failed for robot:{password}") == "push failed for ***"


def test_an_aborted_run_pushes_no_last_success_so_the_gateway_keeps_the_previous_one(pushgateway):
    telemetry = Telemetry(MetricsSettings(pushgateway=pushgateway.url))
    with pytest.raises(ConnectionError), telemetry.run("reindex", "docs", "local") as run:
        run.seen(5)
        raise ConnectionError("store unreachable")
    ((_, _, _, body),) = pushgateway.received
    pushed = samples(body)
    assert value(pushed, "rag_runs_total", collection="docs", command="reindex", result="aborted") == 1
    assert value(pushed, "rag_documents_seen_total", collection="docs") == 5
    assert "rag_last_success_timestamp_seconds" not in body

    with telemetry.run("reindex", "docs", "local") as run:
        run.finished(RunSummary(documents_seen=1, documents_indexed=1, seconds=0.5), index_size=lambda: 42)
    pushed = samples(pushgateway.received[-1][3])
    assert value(pushed, "rag_index_chunks", collection="docs") == 42
    assert value(pushed, "rag_last_success_timestamp_seconds", collection="docs") is not None


# -- the service's /metrics after an ingest and a query ---------------------------------------------


def test_the_service_metrics_show_the_ingest_and_the_query(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    import httpx

    from tests.test_service_example import TOKEN, load_app_module, serve

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "bees.md").write_text("# Bees\n\nThe hive entrance should face south-east, into the morning sun.\n")
    (docs / "compost.txt").write_text("Compost needs green and brown material, kept as moist as a wrung-out sponge.\n")
    (docs / "noise.txt").write_bytes(bytes(range(256)) * 2)  # binary: the parser refuses it
    spec = {
        "name": "metrics-service",
        "stages": {
            "source": {"type": "local", "path": "docs"},
            "parser": {"type": "unstructured"},
            "chunker": {"type": "recursive", "chunk_size": 800, "chunk_overlap": 100},
            "embedder": {"type": "huggingface", "model": "all-MiniLM-L6-v2"},
            "store": {"type": "milvus", "uri": "index.db", "collection": "served"},
        },
        "runner": {"parse_workers": 0, "progress": "never"},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    app = load_app_module().create_app(tmp_path / "spec.yaml", ingest_token=TOKEN)
    with serve(app) as url, httpx.Client(base_url=url, timeout=120, trust_env=False) as client:
        ingest = client.post("/ingest", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ingest.status_code == 200, ingest.text
        summary = ingest.json()
        assert summary["documents_seen"] == 3 and summary["documents_failed"] == 1

        scraped = client.get("/metrics")
        assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
        found = samples(scraped.text)
        assert value(found, "rag_documents_seen_total", collection="served") == 3
        assert value(found, "rag_documents_indexed_total", collection="served") == summary["documents_indexed"] == 2
        assert value(found, "rag_chunks_written_total", collection="served") == summary["chunks_written"]
        assert value(found, "rag_documents_failed_total", collection="served", stage="parse", reason="refused") == 1
        assert value(found, "rag_runs_total", collection="served", command="reindex", result="partial") == 1
        assert value(found, "rag_index_chunks", collection="served") == summary["chunks_written"]

        answer = client.get("/query", params={"q": "Which way should the hive entrance face?", "mode": "dense"})
        assert answer.status_code == 200 and answer.json()["hits"][0]["source_id"] == "docs/bees.md"
        assert client.get("/query", params={"q": "x", "mode": "sparse"}).status_code == 400  # no sparse field
        found = samples(client.get("/metrics").text)
        assert value(found, "rag_query_seconds_count", collection="served", mode="dense") == 1
        assert value(found, "rag_query_errors_total", collection="served", error="QueryInputError") == 1
