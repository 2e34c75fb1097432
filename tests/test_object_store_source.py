"""The object-store source against a real S3 API: moto's server, on 127.0.0.1, started by the tests.

moto's WSGI app is served over HTTP by werkzeug in a thread, behind a small middleware that
counts requests (so a test can prove that an unchanged object was not downloaded) and can answer
with injected errors (throttling, 5xx, access denied). s3fs talks to it exactly as to AWS.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from connectors.local import FileTooLarge  # noqa: E402
from connectors.object_store import ObjectStoreError, ObjectStoreSource  # noqa: E402
from core.component import MissingDependencyError  # noqa: E402
from core.errors import SpecError  # noqa: E402
from core.records import MemoryRecords  # noqa: E402
from pipeline import Pipeline  # noqa: E402
from pipeline.spec import parse_spec  # noqa: E402
from tests.plugins.components import PLUGINS  # noqa: E402

ACCESS_KEY = "AKIAMOTOTESTKEY12345"
SECRET_KEY = "moto-secret-7f3a9c2e-never-print-me"
SESSION_TOKEN = "moto-session-token-b81d44-never-print-me"

HOSTILE_KEYS = {
    "naïve café.txt": "Crème brûlée needs a very hot grill.",
    "say \"cheese\" and 'smile'.txt": "Quotes in a key must survive the trip.",
    "中文 文件/说明.txt": "茶叶应在八十度的水中冲泡。",
    "a+b=c&d?.txt": "Reserved URL characters are part of the key.",
    "100% done.txt": "Percent signs are not escapes here.",
}


# -- the server --------------------------------------------------------------------------------


@dataclass
class Fault:
    """Answer the next ``times`` requests that ``matches`` selects with an S3 error document."""

    matches: Callable[[str, str, str], bool]
    status: int
    code: str
    times: int


@dataclass
class S3Server:
    url: str
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, query)
    faults: list[Fault] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def object_reads(self, bucket: str) -> list[str]:
        """Paths of GETs of object bodies (a listing is a GET of the bucket itself, with a query)."""
        prefix = f"/{bucket}/"
        return [path for method, path, _ in self.requests if method == "GET" and path.startswith(prefix)]

    def heads(self, bucket: str) -> list[str]:
        return [path for method, path, _ in self.requests if method == "HEAD" and path.startswith(f"/{bucket}/")]

    def fail(self, matches: Callable[[str, str, str], bool], status: int, code: str, times: int = 1) -> None:
        with self.lock:
            self.faults.append(Fault(matches, status, code, times))


def _middleware(app, server: S3Server):  # type: ignore[no-untyped-def]
    def wrapped(environ, start_response):  # type: ignore[no-untyped-def]
        method, path, query = (
            environ["REQUEST_METHOD"],
            environ.get("RAW_URI", environ["PATH_INFO"]).split("?")[0],
            environ.get("QUERY_STRING", ""),
        )
        with server.lock:
            server.requests.append((method, path, query))
            fault = next((f for f in server.faults if f.times > 0 and f.matches(method, path, query)), None)
            if fault is not None:
                fault.times -= 1
        if fault is not None:
            body = (
                f"<?xml version='1.0'?><Error><Code>{fault.code}</Code><Message>injected {fault.code}</Message></Error>"
            ).encode()
            if method == "HEAD":  # a HEAD answer has headers only, as S3 sends it
                body = b""
            start_response(
                f"{fault.status} Injected", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
            )
            return [body]
        return app(environ, start_response)

    return wrapped


@pytest.fixture(scope="module")
def aws_env(tmp_path_factory) -> Iterator[None]:
    """Credentials the way production gets them: from the environment, never from the spec."""
    empty = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        patch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        patch.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        patch.setenv("AWS_CONFIG_FILE", str(empty / "config"))
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty / "credentials"))
        yield


@pytest.fixture(scope="module")
def s3_server(aws_env) -> Iterator[S3Server]:
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import WSGIRequestHandler, make_server

    class QuietHandler(WSGIRequestHandler):
        def log_request(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            pass

    server = S3Server(url="")
    app = _middleware(DomainDispatcherApplication(create_backend_app), server)
    httpd = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler)
    server.url = f"http://127.0.0.1:{httpd.server_port}"
    thread = threading.Thread(target=httpd.serve_forever, name="moto-s3", daemon=True)
    thread.start()
    yield server
    httpd.shutdown()
    thread.join(timeout=10)


class Bucket:
    def __init__(self, server: S3Server, name: str):
        import boto3

        self.server, self.name = server, name
        self.client = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1")
        self.client.create_bucket(Bucket=name)

    def put(self, key: str, body: str | bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=body.encode() if isinstance(body, str) else body)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.name, Key=key)


_bucket_count = 0


@pytest.fixture
def bucket(s3_server) -> Iterator[Bucket]:
    global _bucket_count
    _bucket_count += 1
    yield Bucket(s3_server, f"test-bucket-{_bucket_count}")
    s3_server.faults.clear()  # a fault a failed test left behind must not hit the next test


def source(server: S3Server, bucket: Bucket, prefix: str = "docs", **settings) -> ObjectStoreSource:
    return ObjectStoreSource(
        url=f"s3://{bucket.name}/{prefix}", endpoint_url=server.url, max_attempts=3, retry_max_wait_s=0.05, **settings
    )


def spec(server: S3Server, bucket: Bucket, store: dict, **settings) -> dict:
    return {
        "version": 1,
        "name": "s3-test",
        "stages": {
            "source": {
                "type": "object-store",
                "url": f"s3://{bucket.name}/docs",
                "endpoint_url": server.url,
                "max_attempts": 3,
                "retry_max_wait_s": 0.05,
                **settings,
            },
            "parser": {"type": "unstructured"},
            "chunker": {"type": "recursive", "chunk_size": 400, "chunk_overlap": 0},
            "embedder": {"type": "tests.plugins.components:HashEmbedder"},  # plumbing: the test is about the source
            "store": store,
        },
        "runner": {"parse_workers": 0, "progress": "never", "failures_file": ""},
    }


def indexed_texts(pipeline: Pipeline) -> dict[str, str]:
    client = pipeline.store.client()
    client.load_collection("docs")
    rows = client.query("docs", filter="", output_fields=["source_id", "text", "metadata"], limit=1000)
    return {r["source_id"]: r["text"] for r in rows}


# -- tests ---------------------------------------------------------------------------------------


def test_reindex_cycle_against_s3_downloads_only_what_changed(s3_server, bucket, tmp_path):
    bucket.put("docs/guide.txt", "The hive entrance faces south-east.")
    bucket.put("docs/notes/compost.txt", "Turn the compost heap every two weeks.")
    for key, text in HOSTILE_KEYS.items():
        bucket.put(f"docs/{key}", text)
    bucket.put("elsewhere/outside.txt", "Not under the prefix.")
    pipeline = Pipeline(
        spec(s3_server, bucket, {"type": "milvus", "uri": str(tmp_path / "index.db"), "collection": "docs"}),
        allowed_modules=PLUGINS,
    )
    scope = f"s3://{bucket.name}/docs/"
    try:
        first = pipeline.reindex()
        assert first.documents_failed == 0, first.failures
        expected = {
            f"{scope}guide.txt": "The hive entrance faces south-east.",
            f"{scope}notes/compost.txt": "Turn the compost heap every two weeks.",
        }
        expected.update({f"{scope}{key}": text for key, text in HOSTILE_KEYS.items()})
        assert indexed_texts(pipeline) == expected  # every odd key round-trips into its source id, bytes intact
        assert first.changes.added == len(expected)

        s3_server.requests.clear()
        unchanged = pipeline.reindex()
        assert (unchanged.changes.unchanged, unchanged.documents_seen) == (len(expected), 0)
        assert s3_server.object_reads(bucket.name) == [] and s3_server.heads(bucket.name) == []  # listing only

        bucket.put("docs/guide.txt", "The hive entrance faces south-east, behind a hedge.")
        bucket.delete("docs/notes/compost.txt")
        s3_server.requests.clear()
        changed = pipeline.reindex()
        assert (changed.changes.updated, changed.changes.deleted, changed.changes.unchanged) == (
            1,
            1,
            len(expected) - 2,
        )
        assert s3_server.object_reads(bucket.name) == [f"/{bucket.name}/docs/guide.txt"]
        texts = indexed_texts(pipeline)
        assert texts[f"{scope}guide.txt"].endswith("behind a hedge.") and f"{scope}notes/compost.txt" not in texts
        records = pipeline.store.index_record()
        assert {r.source_id for r in records.all()} == set(texts)
        assert all(r.scope == scope and r.change_signal.startswith("etag=") for r in records.all())
    finally:
        pipeline.close()


def test_refs_carry_identity_signal_and_metadata(s3_server, bucket):
    bucket.put("docs/a/b.md", "# Title\n\nbody")
    [ref] = list(source(s3_server, bucket).list())
    assert ref.source_id == ref.uri == f"s3://{bucket.name}/docs/a/b.md"
    assert ref.media_type == "text/markdown" and ref.size == len("# Title\n\nbody")
    assert ref.metadata["object_key"] == "docs/a/b.md" and ref.metadata["file_name"] == "b.md"
    assert ref.change_signal == f"etag={ref.metadata['etag']};size={ref.size};modified={ref.metadata['last_modified']}"
    bucket.put("docs/a/b.md", "# Title\n\nbody, edited")
    [edited] = list(source(s3_server, bucket).list())
    assert edited.change_signal != ref.change_signal


def test_include_exclude_and_excluded_prefixes_are_not_listed(s3_server, bucket):
    for key in (
        "docs/a.md",
        "docs/b.txt",
        "docs/.hidden.txt",
        "docs/drafts/c.md",
        "docs/drafts/deeper/d.md",
        "docs/keep/e.md",
    ):
        bucket.put(key, "x")
    bucket.put("docs/folder-marker/", b"")  # the "folder" objects consoles create
    s3_server.requests.clear()
    refs = list(source(s3_server, bucket, include=["*.md"], exclude=["drafts", ".*"]).list())
    assert [r.metadata["relative_path"] for r in refs] == ["a.md", "keep/e.md"]
    listed_prefixes = [q for m, p, q in s3_server.requests if m == "GET" and "list-type" in q]
    assert not any("drafts" in q for q in listed_prefixes)  # an excluded "directory" is not even listed


def test_throttling_and_server_errors_are_retried(s3_server, bucket):
    bucket.put("docs/a.txt", "alpha")
    src = source(s3_server, bucket)
    s3_server.fail(lambda m, p, q: m == "GET" and "list-type" in q, 503, "SlowDown")
    [ref] = list(src.list())
    object_path = f"/{bucket.name}/docs/a.txt"
    s3_server.fail(lambda m, p, q: m == "GET" and p == object_path, 500, "InternalError", times=2)
    s3_server.requests.clear()
    assert src.read(ref) == b"alpha"
    assert len(s3_server.object_reads(bucket.name)) == 3  # two injected failures, then the body


def test_permanent_errors_fail_at_once_with_the_reason(s3_server, bucket):
    bucket.put("docs/a.txt", "alpha")
    src = source(s3_server, bucket)
    [ref] = list(src.list())
    s3_server.fail(lambda m, p, q: p.endswith("/docs/a.txt"), 403, "AccessDenied", times=5)
    s3_server.requests.clear()
    with pytest.raises(PermissionError, match="access denied"):
        src.read(ref)
    assert len(s3_server.requests) == 1
    s3_server.faults.clear()  # the object is readable again; now it disappears
    bucket.delete("docs/a.txt")
    with pytest.raises(FileNotFoundError, match="deleted after listing"):
        src.read(ref)


def test_size_cap_is_enforced_without_downloading_and_while_streaming(s3_server, bucket):
    bucket.put("docs/big.txt", b"x" * 5000)
    bucket.put("docs/small.txt", b"y" * 100)
    src = source(s3_server, bucket, max_file_bytes=1000, read_block_bytes=256)
    refs = {r.metadata["file_name"]: r for r in src.list()}
    s3_server.requests.clear()
    with pytest.raises(FileTooLarge, match="max_file_bytes=1000"):
        src.read(refs["big.txt"])
    assert s3_server.object_reads(bucket.name) == []  # refused on the listed size alone
    bucket.put("docs/small.txt", b"y" * 5000)  # grew after the listing: streaming stops at the cap
    with pytest.raises(FileTooLarge):
        src.read(refs["small.txt"])
    assert len(s3_server.object_reads(bucket.name)) <= 1


def test_listing_failure_deletes_nothing(s3_server, bucket, tmp_path):
    bucket.put("docs/a.txt", "alpha")
    pipeline = Pipeline(
        spec(s3_server, bucket, {"type": "tests.plugins.components:MemoryStore"}), allowed_modules=PLUGINS
    )
    records = MemoryRecords()
    assert pipeline.reindex(records=records).changes.added == 1
    s3_server.fail(lambda m, p, q: "list-type" in q, 503, "ServiceUnavailable", times=10)
    summary = pipeline.reindex(records=records)
    assert summary.changes.deleted == 0 and set(records.records) == {f"s3://{bucket.name}/docs/a.txt"}
    assert summary.failures[0].stage == "list" and "ServiceUnavailable" in summary.failures[0].reason


def test_missing_bucket_is_a_listing_error(s3_server):
    src = ObjectStoreSource(url="s3://no-such-bucket/docs", endpoint_url=s3_server.url, max_attempts=1)
    with pytest.raises(ObjectStoreError, match="no-such-bucket"):
        list(src.list())


def test_credentials_never_reach_specs_logs_errors_or_the_index(s3_server, bucket, tmp_path, caplog):
    secrets = (SECRET_KEY, SESSION_TOKEN, ACCESS_KEY)
    # Key material in a spec is refused, and the refusal does not repeat it.
    for bad in (
        {"storage_options": {"key": ACCESS_KEY, "secret": SECRET_KEY}},
        {"storage_options": {"client_kwargs": {"aws_secret_access_key": SECRET_KEY}}},
        {"url": f"s3://{ACCESS_KEY}:{SECRET_KEY}@{bucket.name}/docs"},
        {"endpoint_url": f"http://{ACCESS_KEY}:{SECRET_KEY}@127.0.0.1:9"},
    ):
        with pytest.raises(SpecError) as refused:
            parse_spec(
                spec(s3_server, bucket, {"type": "tests.plugins.components:MemoryStore"}, **bad),
                allowed_modules=PLUGINS,
            )
        assert "credentials" in str(refused.value) and not any(s in str(refused.value) for s in secrets)
        with pytest.raises(ValueError) as direct:
            ObjectStoreSource(url=f"s3://{bucket.name}/docs", **bad) if "url" not in bad else ObjectStoreSource(**bad)
        assert not any(s in str(direct.value) for s in secrets)

    bucket.put("docs/a.txt", "alpha")
    bucket.put("docs/denied.txt", "beta")
    caplog.set_level(logging.DEBUG)  # from here on, everything is the connector's doing
    for library in ("botocore", "aiobotocore", "s3fs", "fsspec"):  # the CLI quiets them; a test before may have run it
        caplog.set_level(logging.DEBUG, logger=library)
    s3_server.fail(lambda m, p, q: p.endswith("/denied.txt") and m == "GET", 403, "AccessDenied", times=1)
    pipeline = Pipeline(
        spec(s3_server, bucket, {"type": "milvus", "uri": str(tmp_path / "index.db"), "collection": "docs"}),
        allowed_modules=PLUGINS,
    )
    try:
        summary = pipeline.reindex()
        assert summary.documents_indexed == 1 and [f.stage for f in summary.failures] == ["read"]
        client = pipeline.store.client()
        stored = []
        for collection in ("docs", "docs_records"):
            client.load_collection(collection)
            stored += client.query(collection, filter="", output_fields=["*"], limit=1000)
        stored_text = json.dumps(stored, default=str)
        failures_text = json.dumps(summary.to_dict())
    finally:
        pipeline.close()
    gone = ObjectStoreSource(url="s3://missing-bucket-x/docs", endpoint_url=s3_server.url, max_attempts=1)
    with pytest.raises(ObjectStoreError) as listing_error:
        list(gone.list())
    # Not even the SDK's own DEBUG logging (request headers, signing steps) shows them.
    everything_logged = "\n".join(r.getMessage() for r in caplog.records)
    assert any(r.name.startswith("botocore") for r in caplog.records)
    for text in (stored_text, failures_text, str(listing_error.value), everything_logged):
        assert not any(s in text for s in secrets)


def test_check_names_the_missing_extra_without_any_request():
    gcs = ObjectStoreSource(url="gs://some-bucket/docs")
    problems = gcs.check()
    if problems:  # gcsfs is not installed here; if it ever is, there is nothing to report
        assert "gcsfs" in problems[0] and "rag-pipeline[gcs]" in problems[0]
        with pytest.raises(MissingDependencyError, match=r"rag-pipeline\[gcs\]"):
            gcs.fs  # noqa: B018 (building the filesystem is what fails)
    assert ObjectStoreSource(url="s3://bucket/x", endpoint_url="http://127.0.0.1:1").check() == []
    assert "only apply to s3://" in ObjectStoreSource(url="az://container/x", region="eu-west-1").check()[-1]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"url": "ftp://bucket/x"}, "unsupported scheme"),
        ({"url": "s3:///x"}, "names no bucket"),
        ({"url": "s3://bucket/x?X-Amz-Signature=abc"}, "presigned"),
        ({"url": "s3://bucket/x", "endpoint_url": "localhost:9000"}, "http"),
        ({"url": "s3://bucket/x", "bogus": 1}, "Extra inputs"),
    ],
)
def test_bad_settings_are_rejected(settings, message):
    with pytest.raises(ValueError, match=message):
        ObjectStoreSource(**settings)


def test_spec_round_trip_and_scope():
    src = ObjectStoreSource(url="s3a://bucket/some/prefix/", endpoint_url="http://127.0.0.1:9000", include=["*.md"])
    assert src.scope == "s3://bucket/some/prefix/" and src.root == "bucket/some/prefix"
    assert ObjectStoreSource.from_dict(src.to_dict()).config == src.config
    assert ObjectStoreSource(url="s3://bucket").scope == "s3://bucket/"


def test_multi_source_example_spec_is_valid(monkeypatch):
    monkeypatch.setenv("DOCS_BUCKET_URL", "s3://example-bucket/handbook")
    monkeypatch.delenv("S3_ENDPOINT_URL", raising=False)
    example = Path(__file__).resolve().parents[1] / "examples" / "multi_source.yaml"
    from pipeline.spec import load_spec

    loaded = load_spec(example)
    types = [s.type_name for s in loaded.sources]
    assert types == ["local", "object-store", "web"]
    built = [s.build(loaded.base_dir) for s in loaded.sources]
    assert [s.scope for s in built] == [
        "docs/",
        "s3://example-bucket/handbook/",
        "docs.python.org/",
    ]  # three cleanup scopes
    assert built[1].config.endpoint_url is None  # ${S3_ENDPOINT_URL:-} left empty: AWS's own endpoint
