"""``--log-format json``: one JSON object per log line from the command line and the service example
(pipeline.logs), scrubbed of secrets, with the active span's ids."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from core.secrets import SecretFilter, SecretRegistry
from pipeline.logs import JsonFormatter
from tests.plugins.components import base_spec

REPO = Path(__file__).resolve().parents[1]


def record(message: str, *args: object, level: int = logging.WARNING, exc_info: object = None) -> logging.LogRecord:
    return logging.LogRecord("rag_pipeline", level, __file__, 1, message, args, exc_info)


def test_a_record_is_one_json_object_with_time_level_logger_and_message():
    line = JsonFormatter().format(record("%s: parse failed: %s", "docs/a.pdf", "encrypted PDF"))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "WARNING" and entry["logger"] == "rag_pipeline"
    assert entry["message"] == "docs/a.pdf: parse failed: encrypted PDF"
    assert entry["time"].endswith("+00:00") and "T" in entry["time"]
    assert "exception" not in entry and "trace_id" not in entry


def test_a_traceback_is_one_field_and_secrets_are_scrubbed_before_formatting():
    secrets = SecretRegistry()
    secrets.register("tok-4b1d9e77c2")
    try:
        raise ConnectionError("refused for token tok-4b1d9e77c2")
    except ConnectionError:
        entry_record = record("store said %s", "tok-4b1d9e77c2", level=logging.ERROR, exc_info=sys.exc_info())
    assert SecretFilter(secrets).filter(entry_record)
    line = JsonFormatter().format(entry_record)
    entry = json.loads(line)
    assert "tok-4b1d9e77c2" not in line
    assert entry["message"] == "store said ***"
    assert entry["exception"].startswith("Traceback") and "ConnectionError: refused for token ***" in entry["exception"]


def test_a_record_inside_a_span_carries_its_trace_and_span_ids():
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider()
    with provider.get_tracer("test").start_as_current_span("rag.run") as span:
        entry = json.loads(JsonFormatter().format(record("inside")))
    context = span.get_span_context()
    assert entry["trace_id"] == f"{context.trace_id:032x}" and entry["span_id"] == f"{context.span_id:016x}"
    provider.shutdown()


def json_lines(stderr: str) -> list[dict]:
    """Every stderr line as JSON; fails on a line that is not."""
    entries = []
    for line in stderr.splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON log line: {line!r}")
    return entries


def test_the_command_line_logs_json_lines(tmp_path):
    spec = base_spec(name="logged")
    spec["stages"]["source"]["documents"] = {"a.txt": "alpha", "bad.txt": "<corrupt>"}
    spec["stages"]["store"] = {"type": "milvus", "uri": str(tmp_path / "index.db"), "collection": "logged"}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "--log-format=json",
            "ingest",
            "spec.yaml",
            "--allow-module",
            "tests.plugins",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    assert "documents: 2 seen, 1 indexed, 1 failed" in done.stdout  # the summary stays text on stdout
    entries = json_lines(done.stderr)
    failed = [e for e in entries if e["logger"] == "rag_pipeline" and e["level"] == "WARNING"]
    assert [e["message"] for e in failed] == ["mem/bad.txt: parse failed: corrupt file: no lines could be read"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_service_logs_json_lines_its_own_and_uvicorns(tmp_path):
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    spec = {
        "name": "logged-service",
        "stages": {
            "source": {"type": "local", "path": str(REPO / "examples" / "docs"), "include": ["home-composting.txt"]},
            "embedder": {"type": "huggingface", "model": "all-MiniLM-L6-v2"},
            "store": {"type": "milvus", "uri": "index.db", "collection": "logged"},
        },
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    port = free_port()
    service = subprocess.Popen(
        [sys.executable, str(REPO / "examples" / "service" / "app.py"), "--log-format", "json", "--port", str(port)],
        cwd=tmp_path,
        env={**os.environ, "RAG_SPEC": str(tmp_path / "spec.yaml")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert service.poll() is None and time.monotonic() < deadline, "the service did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
    finally:
        service.send_signal(signal.SIGINT)
        _, stderr = service.communicate(timeout=60)
    entries = json_lines(stderr)
    assert any(e["logger"] == "rag_pipeline.service" and e["message"].startswith("serving ") for e in entries)
    access = [e for e in entries if e["logger"] == "uvicorn.access"]
    assert access and "GET /healthz" in access[-1]["message"]
