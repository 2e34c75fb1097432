"""API embedders against local HTTP servers that speak each provider's documented protocol.

These are protocol tests, not tests of the live services: a ``FakeApi`` on 127.0.0.1 answers the
documented request shapes (OpenAI/Jina/Voyage/Mixedbread ``data[].embedding`` with ``index``,
Cohere v2 ``embeddings.float``), can be scripted to fail first (429 with Retry-After, 5xx, 401,
slow answers, malformed bodies), and records every request it got.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from core.types import Chunk, ChunkedDocument, ParsedDocument
from embedders.api import (
    CohereEmbedder,
    EmbeddingApiError,
    JinaEmbedder,
    MalformedResponse,
    MixedbreadEmbedder,
    OpenAIEmbedder,
    RateLimiter,
    VoyageEmbedder,
)
from embedders.api.transport import retry_after_seconds

KEY = "sk-test-0123456789abcdefSECRET"
DIM = 8


def fake_vector(text: str, size: int = DIM) -> list[float]:
    """A deterministic vector per text, so answers can be checked for order."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).normal(size=size).round(6).tolist()


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float

    @property
    def texts(self) -> list[str]:
        return self.body.get("input") or self.body.get("texts") or []


Reply = tuple[int, dict[str, str], bytes]


@dataclass
class FakeApi:
    """A provider's embedding endpoint; ``script`` holds replies used (in order) before normal answers."""

    style: str  # "openai" (data[] with index) or "cohere" (embeddings.float)
    size: int = DIM
    script: deque = field(default_factory=deque)  # Reply, or a callable(Seen) -> Reply
    seen: list[Seen] = field(default_factory=list)
    delay: float = 0.0  # seconds every normal answer takes (to observe concurrency)
    in_flight: int = 0
    max_in_flight: int = 0
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def normal(self, seen: Seen) -> Reply:
        size = seen.body.get("dimensions") or seen.body.get("output_dimension") or self.size
        vectors = [fake_vector(t, size) for t in seen.texts]
        if self.style == "cohere":
            body = {
                "id": "r1",
                "embeddings": {"float": vectors},
                "texts": seen.texts,
                "meta": {},
                "response_type": "embeddings_by_type",
            }
        else:  # reversed on purpose: clients must order by "index"
            data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)][::-1]
            body = {"object": "list", "data": data, "model": seen.body.get("model"), "usage": {"total_tokens": 1}}
        return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()

    def handle(self, seen: Seen) -> Reply:
        with self._lock:
            self.seen.append(seen)
            step = self.script.popleft() if self.script else None
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if step is None:
                time.sleep(self.delay)
                return self.normal(seen)
            return step(seen) if callable(step) else step
        finally:
            with self._lock:
                self.in_flight -= 1

    @property
    def request_sizes(self) -> list[int]:
        return [len(s.texts) for s in self.seen]


@pytest.fixture
def serve() -> Iterator[Callable[..., FakeApi]]:
    servers: list[ThreadingHTTPServer] = []

    def start(style: str = "openai", **settings: Any) -> FakeApi:
        api = FakeApi(style, **settings)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                seen = Seen(
                    self.path, {k.lower(): v for k, v in self.headers.items()}, json.loads(raw), time.monotonic()
                )
                status, headers, body = api.handle(seen)
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(server)
        api.url = f"http://127.0.0.1:{server.server_address[1]}"
        return api

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def api_keys(monkeypatch):
    for variable in ("OPENAI_API_KEY", "CO_API_KEY", "JINA_API_KEY", "VOYAGE_API_KEY", "MXBAI_API_KEY"):
        monkeypatch.setenv(variable, KEY)


FAST = {"backoff_base_seconds": 0.01, "backoff_max_seconds": 0.05}

DOCS = ["first document", "", "third document about search", "fourth"]


def json_reply(body: Any, status: int = 200, **headers: str) -> Reply:
    return status, {"Content-Type": "application/json", **headers}, json.dumps(body).encode()


# -- each provider's protocol ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    embedder: type
    style: str
    path: str
    base_suffix: str  # appended to the server URL to make base_url
    settings: dict[str, Any]
    document_fields: dict[str, Any]  # expected in document requests
    query_fields: dict[str, Any]
    document_prefix: str = ""
    query_prefix: str = ""


CASES = [
    Case(
        OpenAIEmbedder,
        "openai",
        "/v1/embeddings",
        "/v1",
        {"model": "text-embedding-3-large", "dimensions": DIM},
        {"model": "text-embedding-3-large", "dimensions": DIM, "encoding_format": "float"},
        {"model": "text-embedding-3-large", "dimensions": DIM},
    ),
    Case(
        CohereEmbedder,
        "cohere",
        "/v2/embed",
        "",
        {"model": "embed-v4.0", "dimensions": DIM},
        {
            "model": "embed-v4.0",
            "input_type": "search_document",
            "embedding_types": ["float"],
            "output_dimension": DIM,
            "truncate": "END",
        },
        {"input_type": "search_query"},
    ),
    Case(
        JinaEmbedder,
        "openai",
        "/v1/embeddings",
        "/v1",
        {"model": "jina-embeddings-v3", "dimensions": DIM},
        {"model": "jina-embeddings-v3", "task": "retrieval.passage", "dimensions": DIM, "embedding_type": "float"},
        {"task": "retrieval.query"},
    ),
    Case(
        VoyageEmbedder,
        "openai",
        "/v1/embeddings",
        "/v1",
        {"model": "voyage-3.5", "dimensions": DIM},
        {"model": "voyage-3.5", "input_type": "document", "output_dimension": DIM, "truncation": True},
        {"input_type": "query"},
    ),
    Case(
        MixedbreadEmbedder,
        "openai",
        "/v1/embeddings",
        "/v1",
        {"dimensions": DIM},
        {
            "model": "mixedbread-ai/mxbai-embed-large-v1",
            "dimensions": DIM,
            "normalized": True,
            "encoding_format": "float",
        },
        {"prompt": "Represent this sentence for searching relevant passages: "},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.embedder.type_name)
def test_provider_protocol(serve, case: Case):
    api = serve(case.style)
    embedder = case.embedder(base_url=api.url + case.base_suffix, **case.settings)
    vectors = embedder.embed_documents(DOCS)
    query = embedder.embed_query("what is search")

    document_request, query_request = api.seen
    assert document_request.path == query_request.path == case.path
    assert document_request.headers["authorization"] == f"Bearer {KEY}"
    assert document_request.body.items() >= case.document_fields.items()
    assert query_request.body.items() >= case.query_fields.items()
    assert "late_chunking" not in document_request.body or document_request.body["late_chunking"] is False
    if case.embedder is MixedbreadEmbedder:
        assert "prompt" not in document_request.body  # the instruction is for queries only
    sent = document_request.texts
    assert sent == [t or " " for t in DOCS]  # empty texts go as one space: the APIs refuse ""
    np.testing.assert_allclose(
        vectors, [fake_vector(t) for t in sent], atol=1e-6
    )  # input order, whatever the answer's order
    np.testing.assert_allclose(query, fake_vector(query_request.texts[0]), atol=1e-6)
    assert vectors.dtype == np.float32 and embedder.dimension == DIM


def test_known_models_need_no_probe_and_others_are_probed_once(serve):
    assert OpenAIEmbedder().dimension == 1536 and OpenAIEmbedder(model="text-embedding-3-large").dimension == 3072
    assert OpenAIEmbedder(dimensions=256).dimension == 256
    assert CohereEmbedder().dimension == 1536 and VoyageEmbedder(model="voyage-3-lite").dimension == 512
    api = serve(size=12)
    embedder = OpenAIEmbedder(base_url=api.url, model="some/local-model", api_key_env=None)
    assert embedder.dimension == 12 and embedder.dimension == 12
    assert len(api.seen) == 1 and "authorization" not in api.seen[0].headers


def test_openai_compatible_server_gets_the_catalog_prefixes(serve):
    api = serve()
    embedder = OpenAIEmbedder(base_url=api.url + "/v1", model="intfloat/e5-small-v2", api_key_env=None, dimensions=DIM)
    embedder.embed_documents(["a document"])
    embedder.embed_query("a question")
    assert [s.texts for s in api.seen] == [["passage: a document"], ["query: a question"]]
    assert embedder.model_id == "openai-compatible/intfloat/e5-small-v2 (dimensions=8, document_prefix='passage: ')"
    custom = OpenAIEmbedder(
        base_url=api.url, model="intfloat/e5-small-v2", api_key_env=None, document_prefix="", query_prefix=""
    )
    assert (custom.document_prefix, custom.query_prefix) == ("", "")
    assert OpenAIEmbedder(model="text-embedding-3-small").document_prefix == ""  # OpenAI's own models need none


def test_fingerprint_covers_vectors_not_transport():
    base = OpenAIEmbedder().fingerprint_settings()
    assert (
        OpenAIEmbedder(
            max_concurrency=9, requests_per_minute=10, base_url="https://proxy.example/v1"
        ).fingerprint_settings()
        != base
    )
    assert OpenAIEmbedder(max_concurrency=9, requests_per_minute=10, timeout_seconds=5).fingerprint_settings() == base
    assert OpenAIEmbedder(dimensions=256).fingerprint_settings() != base
    cohere = CohereEmbedder().fingerprint_settings()
    assert CohereEmbedder(query_input_type="classification").fingerprint_settings() == cohere
    assert CohereEmbedder(document_input_type="clustering").fingerprint_settings() != cohere


# -- batching and concurrency -----------------------------------------------------------------------------


def test_batches_follow_the_input_limit_and_keep_order_under_concurrency(serve):
    api = serve(delay=0.05)
    texts = [f"text number {i}" for i in range(10)]
    embedder = OpenAIEmbedder(base_url=api.url, max_inputs_per_request=3, max_concurrency=3, dimensions=DIM)
    vectors = embedder.embed_documents(texts)
    assert sorted(api.request_sizes) == [1, 3, 3, 3]
    assert 1 < api.max_in_flight <= 3
    np.testing.assert_allclose(vectors, [fake_vector(t) for t in texts], atol=1e-6)


def test_cohere_sends_at_most_96_texts(serve):
    api = serve("cohere")
    CohereEmbedder(base_url=api.url, dimensions=DIM, max_concurrency=1).embed_documents([f"t{i}" for i in range(200)])
    assert api.request_sizes == [96, 96, 8]


def test_batches_follow_the_token_limit(serve):
    api = serve()
    texts = ["x" * 60] * 5 + ["y" * 600]  # 21 estimated tokens each, then one of 201 (alone over the limit)
    OpenAIEmbedder(
        base_url=api.url, api_key_env=None, max_tokens_per_request=50, max_concurrency=1, dimensions=DIM
    ).embed_documents(texts)
    assert api.request_sizes == [2, 2, 1, 1]


def test_openai_counts_tokens_with_its_tokenizer():
    counter = OpenAIEmbedder().token_counter()
    assert counter.count("hello world") == 2  # cl100k_base, offline from the packaged BPE file


def test_client_side_request_rate(serve):
    api = serve()
    embedder = OpenAIEmbedder(
        base_url=api.url, max_inputs_per_request=1, max_concurrency=4, requests_per_minute=600, dimensions=DIM
    )
    embedder.embed_documents([f"t{i}" for i in range(14)])  # 10 per second, bursts of 10
    arrivals = sorted(s.at for s in api.seen)
    assert arrivals[-1] - arrivals[0] >= 0.3
    assert "waited" not in " ".join(embedder.run_notes())  # under a second of waiting is not worth a note


def test_token_bucket_with_a_fake_clock():
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(requests_per_minute=120, tokens_per_minute=600, clock=lambda: now[0], sleep=sleep)
    limiter.acquire(5)
    limiter.acquire(5)  # 2 requests and 10 tokens per second: both fit the first second's burst
    assert slept == []
    limiter.acquire(30)  # a large request waits for a full token bucket, then leaves a debt
    assert now[0] == pytest.approx(1.0)
    limiter.acquire(1)
    assert now[0] == pytest.approx(3.1)  # the 20-token debt plus one token at 10 tokens per second
    limiter.pause(2.0)
    limiter.acquire(0)
    assert now[0] == pytest.approx(5.1)


# -- retries ------------------------------------------------------------------------------------------------


def test_429_with_retry_after_seconds_is_honoured(serve, caplog):
    api = serve()
    api.script.append(json_reply({"error": {"message": "Rate limit reached"}}, 429, **{"Retry-After": "0.4"}))
    embedder = OpenAIEmbedder(base_url=api.url, dimensions=DIM, **FAST)
    embedder.begin_run()
    with caplog.at_level(logging.WARNING, logger="rag_pipeline.embed"):
        vectors = embedder.embed_documents(["a", "b"])
    first, second = api.seen
    assert second.at - first.at >= 0.4  # the backoff alone would be at most 0.01 s
    assert vectors.shape == (2, DIM)
    assert "HTTP 429" in caplog.text and "retrying in 0.4" in caplog.text
    assert embedder.run_notes() == ["OpenAI: 1 of 2 requests retried (1 rate limited)"]


def test_retry_after_as_http_date():
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    headers = {"retry-after": format_datetime(now + timedelta(seconds=7), usegmt=True)}
    assert retry_after_seconds(headers, now=lambda: now) == pytest.approx(7.0)
    assert (
        retry_after_seconds({"retry-after": format_datetime(now - timedelta(seconds=7), usegmt=True)}, now=lambda: now)
        == 0.0
    )
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == pytest.approx(0.25)
    assert retry_after_seconds({"retry-after": "soon"}) is None and retry_after_seconds({}) is None


def test_retry_after_http_date_end_to_end(serve):
    api = serve()
    # HTTP dates have whole seconds, so the date is cut down to one: 2 s ahead leaves a wait of 1-2 s
    # (1 s ahead could leave almost none), never the 10 ms backoff.
    when = datetime.now(timezone.utc) + timedelta(seconds=2)
    api.script.append(json_reply({}, 503, **{"Retry-After": format_datetime(when, usegmt=True)}))
    OpenAIEmbedder(base_url=api.url, dimensions=DIM, **FAST).embed_documents(["a"])
    first, second = api.seen
    assert second.at - first.at >= 0.1


def test_server_error_then_success(serve):
    api = serve("cohere")
    api.script.extend([json_reply({"message": "internal"}, 500), json_reply({"message": "bad gateway"}, 502)])
    vectors = CohereEmbedder(base_url=api.url, dimensions=DIM, **FAST).embed_documents(["a"])
    assert len(api.seen) == 3 and vectors.shape == (1, DIM)


def test_timeout_then_success(serve):
    api = serve()

    def slow(seen: Seen) -> Reply:
        time.sleep(1.0)
        return api.normal(seen)

    api.script.append(slow)
    started = time.monotonic()
    vectors = OpenAIEmbedder(base_url=api.url, timeout_seconds=0.3, dimensions=DIM, **FAST).embed_documents(["a"])
    assert len(api.seen) == 2 and vectors.shape == (1, DIM)
    assert time.monotonic() - started < 0.9  # the slow answer was not waited for


def test_gives_up_after_max_retries(serve):
    api = serve()
    api.script.extend([json_reply({"error": "overloaded"}, 503)] * 5)
    with pytest.raises(
        EmbeddingApiError, match=r"OpenAI: gave up after 3 attempts; last: HTTP 503 Service Unavailable"
    ):
        OpenAIEmbedder(base_url=api.url, dimensions=DIM, max_retries=2, **FAST).embed_documents(["a"])
    assert len(api.seen) == 3


def test_a_retry_after_beyond_the_limit_fails_at_once(serve):
    api = serve()
    api.script.append(json_reply({}, 429, **{"Retry-After": "3600"}))
    with pytest.raises(EmbeddingApiError, match="asks to wait 3600 s, more than max_retry_after_seconds"):
        VoyageEmbedder(base_url=api.url, dimensions=DIM).embed_documents(["a"])
    assert len(api.seen) == 1


@pytest.mark.parametrize("status", [401, 403])
def test_auth_errors_fail_fast_without_the_key(serve, status):
    api = serve()
    api.script.append(json_reply({"error": {"message": f"Incorrect API key provided: {KEY}"}}, status))
    with pytest.raises(EmbeddingApiError) as raised:
        JinaEmbedder(base_url=api.url, dimensions=DIM, **FAST).embed_documents(["a"])
    message = str(raised.value)
    assert len(api.seen) == 1  # not retried
    assert message.startswith(f"Jina: HTTP {status}") and "$JINA_API_KEY" in message
    assert KEY not in message and raised.value.status == status


def test_bad_request_fails_fast_with_the_server_reason(serve):
    api = serve()
    api.script.append(json_reply({"error": {"message": f"dimensions must be <= 3072 (key {KEY})"}}, 400))
    with pytest.raises(
        EmbeddingApiError, match=r"OpenAI: HTTP 400 Bad Request \(not retried\): .*dimensions must be <= 3072"
    ) as raised:
        OpenAIEmbedder(base_url=api.url, dimensions=DIM).embed_documents(["a"])
    assert KEY not in str(raised.value) and "(key ***)" in str(raised.value)
    assert len(api.seen) == 1


def test_a_key_echoed_escaped_or_in_pieces_is_scrubbed_from_errors_and_retry_logs(serve, caplog):
    # The server writes the key as JSON \u escapes, quotes both ends of it, and echoes a Basic auth header.
    escaped = "".join(f"\\u{ord(c):04x}" for c in KEY)
    auth = base64.b64encode(f"key:{KEY}".encode()).decode()
    body = (
        f'{{"error": {{"message": "{escaped}", "hint": "{KEY[:10]}...{KEY[-10:]}", "auth": "Basic {auth}"}}}}'.encode()
    )
    api = serve()
    api.script.extend(
        [(503, {"Content-Type": "application/json"}, body), (400, {"Content-Type": "application/json"}, body)]
    )
    with caplog.at_level(logging.WARNING, logger="rag_pipeline.embed"), pytest.raises(EmbeddingApiError) as raised:
        OpenAIEmbedder(base_url=api.url, dimensions=DIM, **FAST).embed_documents(["a"])
    message, logged = str(raised.value), caplog.text
    assert "HTTP 400" in message and '"message": "***"' in message and '"hint": "***...***"' in message
    assert "HTTP 503" in logged and '"hint": "***...***"' in logged
    for text in (message, logged):
        assert "\\u0073\\u006b" not in text and KEY[:8] not in text and KEY[-8:] not in text
        assert auth[8:20] not in text  # characters set by the key's bytes alone


# -- malformed answers ------------------------------------------------------------------------------------------


def _openai_body(vectors: list[Any], indices: list[Any] | None = None) -> dict[str, Any]:
    indices = indices if indices is not None else list(range(len(vectors)))
    return {"data": [{"index": i, "embedding": v} for i, v in zip(indices, vectors, strict=True)]}


@pytest.mark.parametrize(
    "reply, message",
    [
        ((200, {"Content-Type": "text/html"}, b"<html>gateway</html>"), "not JSON \\(text/html\\)"),
        (json_reply({"object": "list"}), "no 'data' list"),
        (json_reply(_openai_body([[0.1] * DIM])), "returned 1 embeddings for 2 inputs"),
        (json_reply(_openai_body([[0.1] * DIM, [0.1] * (DIM - 1)])), "embedding 1 has 7 values, expected 8"),
        (json_reply(_openai_body([[0.1] * DIM, ["x"] * DIM])), "embedding 1 is not a list of numbers"),
        (json_reply(_openai_body([[0.1] * DIM, [0.1] * DIM], [0, 0])), "repeated or out-of-range index 0"),
        (json_reply({"data": [{"index": 0}, {"index": 1}]}), "data item 0 has no 'embedding'"),
    ],
    ids=["html", "no-data", "count", "dimension", "not-numbers", "duplicate-index", "missing-embedding"],
)
def test_malformed_answers_are_refused(serve, reply, message):
    api = serve()
    api.script.append(reply)
    with pytest.raises(MalformedResponse, match=message):
        OpenAIEmbedder(base_url=api.url, dimensions=DIM, **FAST).embed_documents(["a", "b"])
    assert len(api.seen) == 1


def test_malformed_cohere_answer(serve):
    api = serve("cohere")
    api.script.append(json_reply({"embeddings": [[0.1] * DIM]}))
    with pytest.raises(MalformedResponse, match="Cohere: returned 1 embeddings for 2 inputs"):
        CohereEmbedder(base_url=api.url, dimensions=DIM).embed_documents(["a", "b"])


# -- the API key ----------------------------------------------------------------------------------------------


def test_the_key_never_leaks(serve, caplog):
    api = serve()
    api.script.extend(
        [
            json_reply({"error": KEY}, 429, **{"Retry-After": "0"}),
            json_reply({"error": {"message": f"bad key {KEY}"}}, 401),
        ]
    )
    embedder = OpenAIEmbedder(base_url=api.url, dimensions=DIM, **FAST)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(EmbeddingApiError) as raised:
            embedder.embed_documents(["a"])
    assert api.seen[0].headers["authorization"] == f"Bearer {KEY}"  # it was sent ...
    for text in (
        caplog.text,
        str(raised.value),
        repr(raised.value),
        repr(embedder),
        json.dumps(embedder.to_dict()),
        json.dumps(embedder.fingerprint_settings()),
        embedder.model_id,
    ):
        assert KEY not in text  # ... and shown nowhere


def test_the_key_comes_from_the_named_variable_only(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(EmbeddingApiError, match="environment variable OPENAI_API_KEY, which is not set"):
        OpenAIEmbedder(dimensions=DIM).embed_documents(["a"])
    with pytest.raises(ValidationError) as raised:
        OpenAIEmbedder(api_key_env=KEY)  # a key pasted where the variable's name belongs
    assert "NAME of the environment variable" in str(raised.value) and KEY not in str(raised.value)
    with pytest.raises(ValidationError) as raised:
        OpenAIEmbedder(api_key=KEY)  # an unknown setting: refused without echoing it
    assert "api_key" in str(raised.value) and KEY not in str(raised.value)


# -- Jina late chunking ----------------------------------------------------------------------------------------


def _document(source_id: str, texts: list[str]) -> ChunkedDocument:
    text = " ".join(texts)
    parsed = ParsedDocument(source_id, f"file:///{source_id}", "text/plain", "h", text, ())
    chunks, start = [], 0
    for index, chunk_text in enumerate(texts):
        chunks.append(Chunk(f"{source_id}-{index}", source_id, index, chunk_text, start, start + len(chunk_text)))
        start += len(chunk_text) + 1
    return ChunkedDocument(parsed, chunks)


def test_jina_late_chunking_sends_one_document_per_request(serve):
    api = serve()
    documents = [_document("a", ["one", "two", "three"]), _document("b", ["four"]), _document("c", [])]
    embedder = JinaEmbedder(base_url=api.url, late_chunking=True, dimensions=DIM, max_concurrency=1)
    embedder.embed(documents)
    assert [s.texts for s in api.seen] == [["one", "two", "three"], ["four"]]
    assert all(s.body["late_chunking"] is True and s.body["task"] == "retrieval.passage" for s in api.seen)
    for chunk in documents[0].chunks + documents[1].chunks:
        np.testing.assert_allclose(chunk.vectors["dense"], fake_vector(chunk.text), atol=1e-6)
    assert "late_chunking=true" in embedder.model_id
    embedder.embed_query("q")
    assert "late_chunking" not in api.seen[-1].body


def test_jina_late_chunking_splits_documents_beyond_its_context(serve):
    api = serve()
    embedder = JinaEmbedder(
        base_url=api.url, late_chunking=True, late_chunking_max_tokens=40, dimensions=DIM, max_concurrency=1
    )
    embedder.begin_run()
    embedder.embed([_document("long", ["a" * 60, "b" * 60, "c" * 60])])  # 21 estimated tokens each
    assert api.request_sizes == [1, 1, 1]
    assert "1 documents longer than 40" in " ".join(embedder.run_notes())
