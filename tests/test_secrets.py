"""The secret scrubber (core.secrets) and the sinks that use it.

The unit tests use their own :class:`SecretRegistry`, so the secrets they register stay out of
the process-wide one; the sink tests register random keys in the process-wide registry (as the
components do) and read back what each sink wrote. The end-to-end test reproduces the outside
tester's report: an embedding server whose error body echoes the API key JSON-escaped, in
pieces, percent-encoded and base64-encoded, through ``python -m pipeline -v ingest --json``.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import random
import re
import string
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, unquote_plus

import pytest
import yaml

from core.secrets import (
    MIN_FRAGMENT,
    SecretRegistry,
    install_log_filter,
    register_secret,
)

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-live-9Qz/7Xw+Lm2Rt5Vb8Nc4Hd6Jf1Kg3Pa0"  # holds '/' and '+', which JSON and URLs escape


def registry(*secrets: str) -> SecretRegistry:
    found = SecretRegistry()
    found.register(*secrets)
    return found


def unique_key() -> str:
    """A key no other test registered, for the process-wide registry."""
    return f"sk-{uuid.uuid4().hex}/{uuid.uuid4().hex[:12]}+Z"


def escape_all(text: str, upper: bool = False) -> str:
    return "".join(f"\\u{ord(c):04X}" if upper else f"\\u{ord(c):04x}" for c in text)


def escape_some(text: str) -> str:
    """Every third character as \\uXXXX, '/' as '\\/', the rest plain: how some servers mix them."""
    return "".join(f"\\u{ord(c):04x}" if i % 3 == 0 else "\\/" if c == "/" else c for i, c in enumerate(text))


def b64(data: bytes, url: bool = False) -> str:
    return (base64.urlsafe_b64encode if url else base64.b64encode)(data).decode()


# -- an oracle, written apart from the scrubber: does a text still hold the key in some form? ----------------


def _unescape_json(text: str) -> str:
    return re.sub(
        r"\\(u[0-9a-fA-F]{4}|[\"\\/])",
        lambda m: chr(int(m.group(1)[1:], 16)) if m.group(1)[0] == "u" else m.group(1),
        text,
    )


def leaks(text: str, key: str = KEY) -> list[str]:
    """Each form of ``key`` (or of an 8-character piece of it) that ``text`` still holds."""
    once = _unescape_json(text)
    views = {
        "raw": text,
        "json": once,
        "json twice": _unescape_json(once),
        "url": unquote_plus(text),
        "json+url": unquote_plus(once),
    }
    pieces = {key[i : i + MIN_FRAGMENT] for i in range(len(key) - MIN_FRAGMENT + 1)}
    found = [f"{name}: {piece}" for name, view in views.items() for piece in pieces if piece in view]
    for align in range(3):  # 12-character windows well inside the encodings: set by the key's bytes alone
        for url in (False, True):
            encoded = b64(bytes(align) + key.encode(), url)[4:-4]
            for i in range(len(encoded) - 11):
                window = encoded[i : i + 12]
                found += [f"base64 in {name}: {window}" for name in ("raw", "json", "url") if window in views[name]]
    return found


# -- the scrubber, form by form --------------------------------------------------------------------------------


def test_raw_secret_is_replaced_and_the_rest_kept():
    assert registry(KEY).scrub(f"bad key {KEY}, try again") == "bad key ***, try again"
    assert registry(KEY).scrub(f"{KEY}{KEY} tail") == "*** tail"  # touching matches are one ***


@pytest.mark.parametrize(
    "encoded",
    [
        escape_all(KEY),
        escape_all(KEY, upper=True),
        escape_some(KEY),
        json.dumps(KEY)[1:-1].replace("/", "\\/"),
        json.dumps(escape_some(KEY))[1:-1],  # an error body quoted as a string inside another
        escape_all(json.dumps(KEY)[1:-1]).replace("\\", "\\\\"),
    ],
    ids=["all-lower", "all-upper", "mixed", "escaped-slash", "nested", "nested-escaped"],
)
def test_json_escaped_secret_is_replaced(encoded):
    text = f'{{"error": {{"message": "Incorrect API key provided: {encoded}", "code": 401}}}}'
    cleaned = registry(KEY).scrub(text)
    assert cleaned == '{"error": {"message": "Incorrect API key provided: ***", "code": 401}}'


def test_json_surrogate_pairs_and_non_ascii_secrets():
    key = "pässwörd-🙂-Schlüssel-42"
    assert registry(key).scrub(f"x {json.dumps(key)} y") == 'x "***" y'
    assert registry(key).scrub(f"x {quote(key)} y") == "x *** y"  # UTF-8 sequences, one character each


@pytest.mark.parametrize(
    "encoded",
    [
        quote(KEY, safe=""),
        re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), quote(KEY, safe="")),
        quote(KEY, safe="").replace("sk", "%73%6B"),
    ],
    ids=["upper-hex", "lower-hex", "letters-too"],
)
def test_percent_encoded_secret_is_replaced(encoded):
    assert registry(KEY).scrub(f"GET /v1?key={encoded}&model=m") == "GET /v1?key=***&model=m"


def test_plus_for_space_only_where_a_secret_holds_a_space():
    phrase = "correct horse battery staple"
    assert registry(phrase).scrub(f"p={quote_plus(phrase)}&q=a+b") == "p=***&q=a+b"
    assert registry(KEY).scrub(f"k={KEY}") == "k=***"  # the key's own '+' stays a '+'


@pytest.mark.parametrize("align", [0, 1, 2])
@pytest.mark.parametrize("url", [False, True], ids=["base64", "base64url"])
def test_base64_secret_inside_a_longer_blob_at_every_alignment(align, url):
    before, after = "xyz"[:align].encode(), b"--trailer"
    blob = b64(before + KEY.encode() + after, url)
    cleaned = registry(KEY).scrub(f"token={blob};")
    assert "***" in cleaned and not leaks(cleaned)
    assert cleaned.startswith("token=") and cleaned.endswith(";")


def test_basic_auth_header_is_scrubbed():
    header = "Authorization: Basic " + b64(f"apikey:{KEY}".encode())
    cleaned = registry(KEY).scrub(f"request headers: {header}\nnext line")
    # The characters that encode "apikey" stay, and the one or two that mix ':' with the key's
    # first bits (they differ with whatever precedes the key); the key's own characters go.
    assert re.match(r"request headers: Authorization: Basic " + b64(b"apikey") + r".{0,2}\*\*\*", cleaned), cleaned
    assert not leaks(cleaned) and cleaned.endswith("\nnext line")


def test_fragments_of_at_least_min_fragment_characters_are_replaced():
    text = f"key begins {KEY[:MIN_FRAGMENT]} and ends {KEY[-12:]}; middle {KEY[15 : 15 + MIN_FRAGMENT]}."
    assert registry(KEY).scrub(text) == "key begins *** and ends ***; middle ***."


def test_fragments_are_found_after_decoding_too():
    escaped = escape_all(KEY[:10]) + " ... " + quote(KEY[-10:], safe="")
    assert registry(KEY).scrub(f"[{escaped}]") == "[*** ... ***]"
    blob = b64(b"prefix:" + KEY[5:25].encode() + b":suffix")  # a piece of the key, base64-encoded
    cleaned = registry(KEY).scrub(blob)
    assert "***" in cleaned and not leaks(cleaned)


def test_text_sharing_fewer_than_min_fragment_characters_is_unchanged():
    near = MIN_FRAGMENT - 1
    text = (
        f"prefix {KEY[:near]} and {KEY[10 : 10 + near]} and {escape_all(KEY[20 : 20 + near])} and "
        f"{quote(KEY[25 : 25 + near])}"
    )
    assert registry(KEY).scrub(text) == text
    assert registry(KEY).scrub("ordinary text with no key at all") == "ordinary text with no key at all"


def test_a_short_secret_is_matched_whole_only():
    short = "pw7#Qz"  # MIN_SECRET <= 6 < MIN_FRAGMENT
    assert registry(short).scrub(f"pass={short}!") == "pass=***!"
    assert registry(short).scrub(f"pass={short[:5]}!") == f"pass={short[:5]}!"
    assert registry("abc").scrub("abc abc") == "abc abc"  # under MIN_SECRET: not a secret worth the name


def test_many_random_keys_in_every_form():
    rng = random.Random(7)
    alphabet = string.ascii_letters + string.digits + "-_/+=.~"
    for _ in range(40):
        key = "".join(rng.choice(alphabet) for _ in range(rng.randint(16, 64)))
        forms = [
            key,
            escape_some(key),
            quote(key, safe=""),
            b64(rng.randbytes(rng.randint(0, 5)) + key.encode() + b"!", rng.random() < 0.5),
        ]
        text = " | ".join(f"{rng.choice(['err', 'msg', 'x'])}={form}" for form in forms)
        cleaned = registry(key).scrub(text)
        assert not leaks(cleaned, key), (key, cleaned)
        assert cleaned.count("***") == len(forms)


def test_a_megabyte_body_is_scrubbed_whole():
    # No timing assert (the machine is shared): this checks that a large body is handled in one
    # piece, with the key found in the middle of it and everything else left as it was.
    rng = random.Random(3)
    filler = "".join(rng.choice(string.ascii_letters + ' ,.:{}"') for _ in range(1_000_000))
    body = filler[:500_000] + escape_some(KEY) + filler[500_000:] + escape_all("ordinary text " * 5000)
    cleaned = registry(KEY).scrub(body)
    assert cleaned == filler[:500_000] + "***" + filler[500_000:] + escape_all("ordinary text " * 5000)


def test_nothing_exposes_the_secret():
    found = registry(KEY)
    found.scrub(f"warm the matcher {KEY}")
    assert KEY not in repr(found) and KEY not in repr(found._matcher)
    with pytest.raises(TypeError) as refused:
        found.register(KEY.encode())  # type: ignore[arg-type]
    assert KEY not in str(refused.value) and str(KEY.encode()) not in str(refused.value)


# -- the log filter ---------------------------------------------------------------------------------------------


def test_log_filter_scrubs_messages_arguments_and_tracebacks_at_debug():
    key = unique_key()
    register_secret(key)
    stream = io.StringIO()
    logger = logging.getLogger(f"test_secrets.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    install_log_filter(logger)
    try:
        logger.debug("server said %s", json.dumps({"echo": escape_some(key)}))
        logger.info(f"headers {{'authorization': 'Basic {b64(('u:' + key).encode())}'}}")
        try:
            raise RuntimeError(f"auth failed for {key}")
        except RuntimeError:
            logger.debug("call failed", exc_info=True)
    finally:
        logger.removeHandler(handler)
    written = stream.getvalue()
    assert "DEBUG server said" in written and "Traceback" in written and "RuntimeError: auth failed for ***" in written
    assert not leaks(written, key), written


# -- the sinks, one by one --------------------------------------------------------------------------------------


def test_describe_error_and_the_failure_log_and_the_summary(tmp_path):
    from pipeline.report import Failure, FailureLog, RunSummary
    from pipeline.stages import describe_error

    key = unique_key()
    register_secret(key)
    reason = describe_error(ValueError(f"server echoed {escape_some(key)} and {key[:12]}"))
    assert reason == "ValueError: server echoed *** and ***"

    # A reason that did not go through describe_error (a parse worker's, a lost Ray task's) is scrubbed at the log.
    log = FailureLog(tmp_path / "t.failures.jsonl")
    log.record(Failure(source_id="mem/a.txt", stage="embed", reason=f"raw {key}", uri=f"memory:a?token={quote(key)}"))
    log.close()
    written = (tmp_path / "t.failures.jsonl").read_text()
    assert json.loads(written)["reason"] == "raw ***" and not leaks(written, key)

    summary = RunSummary(failures=log.failures, notes=[f"note {b64(key.encode())}"])
    dumped = json.dumps(summary.to_dict(), ensure_ascii=False)
    assert not leaks(dumped, key) and not leaks(summary.format(), key) and "raw ***" in summary.format()


def test_the_index_record_reason_is_scrubbed():
    from core.records import SourceRecord

    key = unique_key()
    register_secret(key)
    record = SourceRecord("mem/a.txt", "mem/", status="failed", stage="embed", reason=f"HTTP 400: {escape_all(key)}")
    body = record.to_json()
    assert json.loads(body)["reason"] == "HTTP 400: ***" and not leaks(body, key)


def test_connector_redaction_uses_the_shared_scrubber(monkeypatch):
    from connectors._remote import describe_error, redact

    key = unique_key()
    monkeypatch.setenv("GITHUB_TOKEN", key)  # read from the environment by redact, as before
    assert describe_error(OSError(f"denied for {escape_some(key)}")) == "OSError: denied for ***"
    other = unique_key()
    assert redact(f"clone failed: {quote(other, safe='')}", [other]) == "clone failed: ***"


def test_an_azure_connection_string_registers_its_key_only(monkeypatch):
    from connectors._remote import redact

    account_key = base64.b64encode(uuid.uuid4().bytes * 2).decode()
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING",
        f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={account_key};EndpointSuffix=core.windows.net",
    )
    url = "https://acct.blob.core.windows.net/container/doc.txt"
    assert redact(f"{url}: refused for key {account_key}") == f"{url}: refused for key ***"


# -- the outside tester's report, end to end ---------------------------------------------------------------------


def error_body(key: str) -> bytes:
    """An OpenAI-style error that echoes the key in every way servers and proxies have been seen to."""
    message = {
        "message": "invalid api key KEY_ESCAPED",
        "hint": f"your key starts with {key[:12]} and ends with {key[-12:]}",
        "request": f"/v1/embeddings?api_key={quote(key, safe='')}",
        "auth": "Basic " + b64(f"user:{key}".encode()),
    }
    return json.dumps({"error": message}).replace("KEY_ESCAPED", escape_some(key)).encode()


@pytest.fixture
def echoing_server() -> Iterator[dict[str, Any]]:
    """An OpenAI-compatible embedding endpoint that fails every request: first 503 (retried), then 400."""
    seen: dict[str, Any] = {"requests": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen["requests"] += 1
            body = error_body(seen["key"])
            self.send_response(503 if seen["requests"] == 1 else 400)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Echo", "Bearer " + seen["key"][:20])  # httpcore prints response headers at DEBUG
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    seen["url"] = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield seen
    finally:
        server.shutdown()


def test_an_echoed_key_reaches_no_output_of_the_cli(tmp_path, echoing_server):
    key = KEY
    echoing_server["key"] = key
    spec = {
        "version": 1,
        "name": "leak",
        "stages": {
            "source": {"type": "tests.plugins.components:MemorySource", "documents": {"a.txt": "alpha\nbeta"}},
            "parser": {"type": "tests.plugins.components:LineParser"},
            "chunker": {"type": "tests.plugins.components:ElementChunker"},
            "embedder": {
                "type": "openai",
                "model": "test-embedder",
                "base_url": echoing_server["url"],
                "api_key_env": "LEAK_TEST_KEY",
                "dimensions": 8,
                "max_retries": 1,
                "backoff_base_seconds": 0.01,
                "backoff_max_seconds": 0.01,
            },
            "store": {"type": "milvus", "uri": str(tmp_path / "index.db"), "collection": "docs"},
        },
        "runner": {"parse_workers": 0, "progress": "never"},
    }
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    env = {
        **os.environ,
        "LEAK_TEST_KEY": key,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "-v", "ingest", str(spec_path), "--json", "--allow-module", "tests.plugins"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-3000:]  # the run finished, the document failed
    assert echoing_server["requests"] == 2  # the 503 was retried, the 400 was not

    summary = json.loads(done.stdout)
    (failure,) = summary["failures"]
    assert failure["stage"] == "embed" and "HTTP 400" in failure["reason"] and "***" in failure["reason"]
    assert "your key starts with *** and ends with ***" in failure["reason"]  # the rest of the message is kept

    # stderr holds the retry warning (the 503 body), the failure line and httpcore's DEBUG header dump.
    assert "retrying in" in done.stderr and "failed: EmbeddingApiError" in done.stderr and "X-Echo" in done.stderr

    failures_file = tmp_path / "leak.failures.jsonl"
    assert json.loads(failures_file.read_text())["reason"] == failure["reason"]

    from pymilvus import MilvusClient

    client = MilvusClient(uri=str(tmp_path / "index.db"))
    try:
        rows = client.query("docs_records", filter='kind == "source"', output_fields=["body"])
    finally:
        client.close()
    (row,) = rows
    record = json.loads(row["body"])
    assert record["status"] == "failed" and "***" in record["reason"]

    for name, text in {
        "stdout": done.stdout,
        "stderr": done.stderr,
        "failures file": failures_file.read_text(),
        "record": row["body"],
    }.items():
        assert not leaks(text, key), f"{name} leaks the key: {leaks(text, key)[:5]}"
