"""A small search service over one pipeline: open ``/query``, token-protected ``/ingest``.

The pipeline is built once when the app starts (models loaded, store connected) and shared by
every request; queries run in FastAPI's thread pool, which ``Pipeline.query`` allows.

Run it (from the repository root)::

    export RAG_SPEC=examples/quickstart.yaml          # the spec to serve (default: that one)
    export RAG_INGEST_TOKEN="$(openssl rand -hex 32)"  # without it, /ingest is disabled
    uvicorn --app-dir examples/service app:app --host 127.0.0.1 --port 8000

Endpoints:

* ``GET /query?q=...&top_k=5&mode=dense`` and ``POST /query`` with JSON
  ``{"text": ..., "top_k": ..., "mode": ..., "filters": {...}, "rerank": ...}``: the best chunks
  (``pipeline.query.QueryResult.to_dict()``); 400 for a bad filter or mode, 503 when the index
  cannot be searched (nothing ingested yet, store down).
* ``POST /ingest`` with ``Authorization: Bearer <RAG_INGEST_TOKEN>``: an incremental re-index
  (unchanged sources skipped, removed ones deleted) under the collection's lock, answered with
  the run summary when it is done; 401 without the right token, 409 while another run (here or
  on another machine, e.g. the cron job) holds the lock, 503 when no token is configured.
* ``GET /healthz``: 200 once the pipeline is loaded.
* ``GET /metrics``: the Prometheus metrics of the queries and ingests this process served
  (query latency by mode, documents and chunks by run, stage seconds; ``pipeline.telemetry``);
  501 without the metrics extra.

Put it behind a TLS-terminating proxy: the bearer token must not cross a network in clear text.
With ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the other ``OTEL_*`` variables) set, each query and ingest
is traced to that collector. ``python examples/service/app.py --log-format json`` serves with one
JSON object per log line.
"""

import argparse
import hmac
import logging
import os
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Header, HTTPException, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run from anywhere without installing the package
    sys.path.insert(0, str(REPO))

from core.errors import is_lock_conflict  # noqa: E402
from pipeline import Pipeline  # noqa: E402
from pipeline.logs import LOG_FORMATS, configure_logging  # noqa: E402
from pipeline.query import QueryError, QueryInputError  # noqa: E402
from pipeline.telemetry import configure_tracing_from_env  # noqa: E402

log = logging.getLogger("rag_pipeline.service")

DEFAULT_SPEC = REPO / "examples" / "quickstart.yaml"
Mode = Literal["auto", "dense", "bm25", "sparse", "hybrid"]


class QueryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=4000)
    top_k: int | None = Field(None, ge=1, le=100)
    mode: Mode | None = None
    filters: dict[str, Any] | None = None
    rerank: bool | None = None


def metrics_registry() -> Any:
    """A registry of the app's own (not the process-wide default one), or None without prometheus_client."""
    try:
        from prometheus_client import CollectorRegistry
    except ImportError:
        return None
    return CollectorRegistry()


def create_app(
    spec_path: str | os.PathLike[str] | None = None, *, ingest_token: str | None = None, tracer_provider: Any = None
) -> FastAPI:
    """The app for one spec; ``spec_path`` and ``ingest_token`` default to $RAG_SPEC and $RAG_INGEST_TOKEN.

    Spans go to ``tracer_provider``; by default to the one the OTEL_* variables configure, else to
    OpenTelemetry's global provider."""
    spec = Path(spec_path or os.environ.get("RAG_SPEC") or DEFAULT_SPEC)
    token = ingest_token if ingest_token is not None else os.environ.get("RAG_INGEST_TOKEN", "")
    registry = metrics_registry()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop_tracing = None
        if tracer_provider is None:
            try:
                stop_tracing = configure_tracing_from_env()
            except Exception as exc:  # observability must not keep the index from being served
                log.warning("tracing is off: %s", exc)
        pipeline = Pipeline.from_yaml(spec, metrics_registry=registry, tracer_provider=tracer_provider)
        pipeline.embedder.warm_up()  # load the model now, not on the first request (the index may not exist yet)
        app.state.pipeline = pipeline
        log.info("serving %s", spec)
        try:
            yield
        finally:
            pipeline.close()
            if stop_tracing is not None:
                stop_tracing()

    app = FastAPI(title="rag-pipeline search", lifespan=lifespan)

    def run_query(request: Request, body: QueryRequest) -> dict[str, Any]:
        pipeline: Pipeline = request.app.state.pipeline
        try:
            result = pipeline.query(
                body.text, top_k=body.top_k, filters=body.filters, mode=body.mode, rerank=body.rerank
            )
        except QueryInputError as exc:
            raise HTTPException(400, str(exc)) from None
        except QueryError as exc:
            raise HTTPException(503, str(exc)) from None
        return result.to_dict()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics() -> Response:
        if registry is None:
            raise HTTPException(501, "metrics need prometheus-client: pip install 'rag-pipeline[metrics]'")
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/query")
    def query_get(
        request: Request,
        q: Annotated[str, Query(min_length=1, max_length=4000, description="the question")],
        top_k: Annotated[int | None, Query(ge=1, le=100)] = None,
        mode: Mode | None = None,
    ) -> dict[str, Any]:
        return run_query(request, QueryRequest(text=q, top_k=top_k, mode=mode))

    @app.post("/query")
    def query_post(request: Request, body: QueryRequest) -> dict[str, Any]:
        return run_query(request, body)

    @app.post("/ingest")
    def ingest(request: Request, authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
        if not token:
            raise HTTPException(503, "ingest is disabled: the server has no RAG_INGEST_TOKEN")
        scheme, _, given = (authorization or "").partition(" ")
        # compare_digest takes the same time whatever the mismatch, so timing reveals nothing.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})
        pipeline: Pipeline = request.app.state.pipeline
        try:
            summary = pipeline.reindex()  # takes the collection's re-index lock for the run
        except Exception as exc:
            if is_lock_conflict(exc):
                raise HTTPException(409, f"another re-index is running: {exc}") from None
            log.exception("ingest failed")
            raise HTTPException(500, f"ingest failed: {exc}") from None
        return summary.to_dict()

    return app


app = create_app()


def main(argv: Sequence[str] | None = None) -> None:
    """``python examples/service/app.py``: serve ``app`` with uvicorn, its logs and uvicorn's in one format."""
    parser = argparse.ArgumentParser(description="Serve the search service for $RAG_SPEC.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text", help="text lines, or one JSON object each")
    args = parser.parse_args(argv)
    configure_logging(logging.INFO, args.log_format)
    import uvicorn

    # log_config=None: uvicorn's loggers (access lines included) go through the root handler set above.
    uvicorn.run(app, host=args.host, port=args.port, log_config=None)


if __name__ == "__main__":
    main()
