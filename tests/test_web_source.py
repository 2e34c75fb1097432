"""The web source against a real HTTP server on 127.0.0.1 (a thread, a random port) serving a small site.

The site has links between pages, a robots.txt that disallows a folder, a redirect loop, a 404, a
slow page, huge pages (with and without Content-Length), links to file:// and to other hosts, and
pages that can be edited or removed between runs. The server logs every request, so tests can
prove what was (and was not) downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("httpcore")

from connectors._http import AddressRefused, GuardedBackend, PageTooLarge, normalize_url  # noqa: E402
from connectors.web import WebSource, extract_links  # noqa: E402
from core.records import MemoryRecords  # noqa: E402
from pipeline import Pipeline  # noqa: E402
from tests.plugins.components import PLUGINS  # noqa: E402

# -- the site ------------------------------------------------------------------------------------


@dataclass
class Page:
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    status: int = 200
    location: str | None = None
    delay_s: float = 0.0
    validators: bool = True  # send ETag and Last-Modified
    declare_length: bool = True
    fail_times: int = 0  # answer 503 this many times first
    modified: float = field(default_factory=time.time)


@dataclass
class Hit:
    method: str
    path: str
    status: int
    body_bytes: int
    at: float


class Site:
    def __init__(self) -> None:
        self.pages: dict[str, Page] = {}
        self.hits: list[Hit] = []
        self.lock = threading.Lock()
        self.url = ""

    def html(self, path: str, title: str, text: str, links: list[str] = (), head: str = "") -> None:
        anchors = "".join(f'<li><a href="{href}">{href}</a></li>' for href in links)
        body = (
            f"<html><head><title>{title}</title>{head}</head>"
            f"<body><h1>{title}</h1><p>{text}</p><ul>{anchors}</ul></body></html>"
        )
        self.pages[path] = Page(body.encode())

    def edit(self, path: str, **changes) -> None:
        page = self.pages[path]
        for name, value in changes.items():
            setattr(page, name, value)
        page.modified = time.time() + 1

    def gets(self, status: int = 200) -> list[str]:
        """Paths answered to GET with ``status`` and a body."""
        return [h.path for h in self.hits if h.method == "GET" and h.status == status]

    def requested(self, path_prefix: str) -> bool:
        return any(h.path.startswith(path_prefix) for h in self.hits)

    def clear(self) -> None:
        with self.lock:
            self.hits.clear()


def _handler(site: Site):  # type: ignore[no-untyped-def]
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
            pass

        def do_HEAD(self) -> None:
            self.answer(send_body=False)

        def do_GET(self) -> None:
            self.answer(send_body=True)

        def answer(self, send_body: bool) -> None:
            page = site.pages.get(self.path)
            status, headers, body = self.response(page)
            if page is not None and page.delay_s:
                time.sleep(page.delay_s)
            sent = len(body) if send_body else 0
            with site.lock:
                site.hits.append(Hit(self.command, self.path, status, sent, time.monotonic()))
            try:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                if send_body:
                    self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout, size cap): that is what some tests want

        def response(self, page: Page | None) -> tuple[int, dict[str, str], bytes]:
            if page is None:
                return 404, {"Content-Type": "text/plain", "Content-Length": "9"}, b"not found"
            if page.fail_times > 0:
                page.fail_times -= 1
                return 503, {"Retry-After": "0", "Content-Length": "0"}, b""
            if page.location is not None:
                return page.status, {"Location": page.location, "Content-Length": "0"}, b""
            headers = {"Content-Type": page.content_type}
            if page.declare_length:
                headers["Content-Length"] = str(len(page.body))
            if page.validators:
                etag = f'"{hashlib.sha1(page.body).hexdigest()[:16]}"'
                headers.update({"ETag": etag, "Last-Modified": formatdate(page.modified, usegmt=True)})
                if self.headers.get("If-None-Match") == etag:
                    return 304, {"ETag": etag}, b""
            return page.status, headers, page.body

    return Handler


@pytest.fixture
def site() -> Iterator[Site]:
    site = Site()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(site))
    server.daemon_threads = True
    site.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, name="test-site", daemon=True)
    thread.start()
    yield site
    server.shutdown()
    server.server_close()


def build_site(site: Site, secret_file: Path) -> None:
    site.pages["/robots.txt"] = Page(b"User-agent: *\nDisallow: /private/\n", "text/plain")
    site.html(
        "/",
        "Garden handbook",
        "Start here for the handbook.",
        [
            "/docs/intro",
            "/docs/setup",
            "/notes.txt",
            "/docs/intro#part-2",
            "/private/secret",
            "/loop-a",
            "/missing",
            "/slow",
            "/huge",
            "/huge-undeclared",
            secret_file.as_uri(),
            "http://169.254.169.254/latest/meta-data/",
            "http://localhost:1/elsewhere",
            "mailto:bees@example.com",
            "javascript:alert(1)",
        ],
    )
    site.html(
        "/docs/intro", "Introduction to beekeeping", "Face the hive entrance south-east.", ["/docs/deep/page", "/"]
    )
    site.html("/docs/setup", "Setting up the hive", "Put a hedge two metres in front of the entrance.")
    site.html("/docs/deep/page", "Swarm season", "Inspect the brood frames every nine days.", ["/docs/deeper"])
    site.html("/docs/deeper", "Too deep", "Three hops from the start page.")
    site.pages["/notes.txt"] = Page(b"Plain text notes: bees need water every day.", "text/plain")
    site.html("/private/secret", "Private", "robots.txt says no.")
    site.pages["/loop-a"] = Page(status=302, location="/loop-b")
    site.pages["/loop-b"] = Page(status=302, location="/loop-a")
    site.html("/slow", "Slow", "This page takes its time.")
    site.pages["/slow"].delay_s = 1.5
    site.pages["/huge"] = Page(b"<p>" + b"x" * 300_000 + b"</p>")
    site.pages["/huge-undeclared"] = Page(b"<p>" + b"y" * 300_000 + b"</p>", declare_length=False)


def crawl_spec(site: Site, tmp_path: Path, **settings) -> dict:
    source = {
        "type": "web",
        "start_urls": [f"{site.url}/"],
        "max_depth": 2,
        "allow_private_addresses": True,
        "delay_s": 0,
        "timeout_s": 0.5,
        "max_page_bytes": 100_000,
        "max_attempts": 2,
        "retry_max_wait_s": 0.05,
        "cache_dir": str(tmp_path / "crawl-cache"),
        **settings,
    }
    return {
        "version": 1,
        "name": "web-test",
        "stages": {
            "source": source,
            "parser": {"type": "unstructured"},  # HTML goes through unstructured's HTML partitioner
            "chunker": {"type": "recursive", "chunk_size": 400, "chunk_overlap": 0},
            "embedder": {"type": "tests.plugins.components:HashEmbedder"},  # plumbing: the test is about the source
            "store": {"type": "tests.plugins.components:MemoryStore"},
        },
        "runner": {"parse_workers": 0, "progress": "never", "failures_file": ""},
    }


class Index:
    def __init__(self, spec: dict):
        self.pipeline = Pipeline(spec, allowed_modules=PLUGINS)
        self.records = MemoryRecords()

    def run(self):
        return self.pipeline.reindex(records=self.records)

    def texts(self) -> dict[str, str]:
        out: dict[str, list[str]] = {}
        for row in self.pipeline.store.table.values():
            out.setdefault(row["source_id"], []).append(row["text"])
        return {k: " ".join(v) for k, v in out.items()}


# -- the crawl, end to end ---------------------------------------------------------------------


def test_crawl_reindex_cycle_uses_conditional_requests(site, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("local file content that must never be indexed")
    build_site(site, secret)
    index = Index(crawl_spec(site, tmp_path))
    host = site.url.removeprefix("http://")

    first = index.run()
    pages = {f"{host}/", f"{host}/docs/intro", f"{host}/docs/setup", f"{host}/docs/deep/page", f"{host}/notes.txt"}
    assert set(index.texts()) == pages
    assert "south-east" in index.texts()[f"{host}/docs/intro"] and "Garden handbook" in index.texts()[f"{host}/"]
    reasons = {f.source_id.removeprefix(host): f.reason for f in first.failures}
    assert set(reasons) == {"/loop-a", "/slow", "/huge", "/huge-undeclared"}
    assert "redirect loop" in reasons["/loop-a"] and "/loop-b -> " in reasons["/loop-a"]
    assert "timeout" in reasons["/slow"]
    assert "max_page_bytes" in reasons["/huge"] and "max_page_bytes" in reasons["/huge-undeclared"]
    # Never requested: robots.txt forbids it, other hosts, file:// links, depth 3.
    assert not site.requested("/private") and not site.requested("/docs/deeper")
    assert not any("must never be indexed" in text for text in index.texts().values())
    # Each page body crossed the wire once: read() got the body the listing had already fetched.
    downloads = site.gets(200)
    assert sorted(p for p in downloads if p.startswith(("/docs", "/notes")) or p == "/") == [
        "/",
        "/docs/deep/page",
        "/docs/intro",
        "/docs/setup",
        "/notes.txt",
    ]
    assert site.gets(404) == ["/missing"]
    assert "missing" not in str(first.failures)  # a 404 is a page that is gone, not a failure

    site.clear()
    second = index.run()
    assert (
        second.changes.unchanged == 5 and second.changes.added == second.changes.updated == second.changes.deleted == 0
    )
    # No unchanged page's body was downloaded (the failing pages are tried again, as failures are).
    assert [
        p for p in site.gets(200) if p in ("/", "/docs/intro", "/docs/setup", "/docs/deep/page", "/notes.txt")
    ] == []
    assert sorted(site.gets(304)) == [
        "/",
        "/docs/intro",
        "/docs/setup",
        "/notes.txt",
    ]  # conditional GETs below max depth
    assert [h.path for h in site.hits if h.method == "HEAD"] == ["/docs/deep/page"]  # a leaf at max depth

    site.html("/docs/setup", "Setting up the hive", "Put a hedge two metres in front, and a water tray nearby.")
    site.clear()
    third = index.run()
    assert (third.changes.updated, third.changes.unchanged) == (1, 4)
    assert site.gets(200).count("/docs/setup") == 1  # once, shared by listing and read
    assert [p for p in site.gets(200) if p in ("/", "/docs/intro", "/docs/deep/page")] == []
    assert "water tray" in index.texts()[f"{host}/docs/setup"]

    del site.pages["/docs/intro"]
    site.html("/", "Garden handbook", "Start here for the handbook.", ["/docs/setup"])
    fourth = index.run()
    # the removed page, the page only it linked to, the notes and the four failing pages no longer linked
    assert fourth.changes.deleted == 7
    assert set(index.texts()) == {f"{host}/", f"{host}/docs/setup"}
    # the failing pages are no longer linked either, so their dead-letter records went too
    assert set(index.records.records) == {f"{host}/", f"{host}/docs/setup"}


def test_url_list_and_sitemaps_are_probed_with_head(site, tmp_path):
    site.html("/a", "Page A", "Alpha text.")
    site.html("/b", "Page B", "Beta text.")
    site.pages["/notes.txt"] = Page(b"Plain notes.", "text/plain")
    site.pages["/robots.txt"] = Page(b"User-agent: *\nAllow: /\n", "text/plain")
    urlset = f'<?xml version="1.0"?><urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9"><url><loc>{site.url}/a</loc></url><url><loc>{site.url}/b</loc></url><url><loc>http://elsewhere.test/x</loc></url></urlset>'
    site.pages["/sitemap-pages.xml.gz"] = Page(gzip.compress(urlset.encode()), "application/gzip")
    site.pages["/sitemap.xml"] = Page(
        f'<?xml version="1.0"?><sitemapindex xmlns="http://www.sitemaps.org/schemas/sitemap/0.9"><sitemap><loc>{site.url}/sitemap-pages.xml.gz</loc></sitemap></sitemapindex>'.encode(),
        "application/xml",
    )
    spec = crawl_spec(
        site, tmp_path, start_urls=[], urls=[f"{site.url}/notes.txt"], sitemaps=[f"{site.url}/sitemap.xml"]
    )
    index = Index(spec)
    host = site.url.removeprefix("http://")
    first = index.run()
    assert first.documents_failed == 0 and set(index.texts()) == {f"{host}/a", f"{host}/b", f"{host}/notes.txt"}
    site.clear()
    second = index.run()
    assert second.changes.unchanged == 3
    assert sorted(h.path for h in site.hits if h.method == "HEAD") == ["/a", "/b", "/notes.txt"]
    assert [p for p in site.gets(200) if not p.startswith(("/sitemap", "/robots"))] == []
    site.edit("/b", body=b"<html><body><p>Beta text, revised.</p></body></html>")
    third = index.run()
    assert third.changes.updated == 1 and "revised" in index.texts()[f"{host}/b"]


def test_pages_without_validators_get_a_content_hash_signal(site, tmp_path):
    site.pages["/robots.txt"] = Page(b"", "text/plain", status=404)
    site.html("/plain", "No validators", "This server sends no ETag.")
    site.pages["/plain"].validators = False
    source = WebSource(urls=[f"{site.url}/plain"], allow_private_addresses=True, delay_s=0)
    [ref] = list(source.list())
    assert ref.change_signal.startswith("sha256=") and ref.size == len(site.pages["/plain"].body)
    assert source.read(ref) == site.pages["/plain"].body and site.gets(200).count("/plain") == 1
    [again] = list(source.list())
    assert again.change_signal == ref.change_signal


# -- hostile input ------------------------------------------------------------------------------


def test_private_addresses_are_refused_unless_allowed(site):
    site.html("/", "Home", "Hello.")
    for url in (f"{site.url}/", site.url.replace("127.0.0.1", "localhost") + "/"):
        source = WebSource(start_urls=[url], delay_s=0)
        [ref] = list(source.list())
        with pytest.raises(AddressRefused, match="loopback address; set allow_private_addresses: true"):
            source.read(ref)
    assert "loopback" in WebSource(start_urls=[f"{site.url}/"]).check()[0]
    assert site.hits == []  # not one request reached the server

    guard = GuardedBackend(allow_private=False)
    port = int(site.url.rsplit(":", 1)[1])
    with pytest.raises(AddressRefused, match="127.0.0.1 is a loopback address"):
        guard.connect_tcp("127.0.0.1", port)
    with pytest.raises(AddressRefused, match="private"):
        guard.connect_tcp("10.1.2.3", 80)
    with pytest.raises(AddressRefused, match="link-local"):
        guard.connect_tcp("169.254.169.254", 80)
    GuardedBackend(allow_private=True).connect_tcp("127.0.0.1", port).close()


def test_file_urls_are_refused_unless_allowed(tmp_path):
    page = tmp_path / "mirror" / "index.html"
    page.parent.mkdir()
    page.write_text("<html><body><p>A saved page.</p><a href='other.html'>x</a></body></html>")
    with pytest.raises(ValueError, match="allowed_schemes"):
        WebSource(urls=[page.as_uri()], namespace="mirror")
    source = WebSource(urls=[page.as_uri()], allowed_schemes=["file"], namespace="mirror")
    [ref] = list(source.list())
    assert source.read(ref) == page.read_bytes() and ref.source_id.startswith("mirror/")


def test_redirect_to_another_host_is_refused(site, tmp_path):
    site.pages["/robots.txt"] = Page(b"", "text/plain", status=404)
    site.pages["/away"] = Page(status=301, location=site.url.replace("127.0.0.1", "localhost") + "/landing")
    source = WebSource(urls=[f"{site.url}/away"], allow_private_addresses=True, delay_s=0)
    [ref] = list(source.list())
    with pytest.raises(OSError, match="outside the allowed hosts"):
        source.read(ref)
    assert not any(h.path == "/landing" for h in site.hits)


def test_credentials_in_urls_and_multi_host_sources_are_rejected():
    with pytest.raises(ValueError, match="credentials") as refused:
        WebSource(urls=["https://user:hunter2-secret@example.com/"])
    assert "hunter2-secret" not in str(refused.value)
    with pytest.raises(ValueError, match="namespace"):
        WebSource(urls=["https://a.example.com/", "https://b.example.com/"])
    with pytest.raises(ValueError, match="at least one page"):
        WebSource()
    two_hosts = WebSource(urls=["https://a.example.com/x", "https://b.example.com/y"], namespace="sites")
    assert two_hosts.scope == "sites/" and two_hosts.source_id("https://b.example.com/y") == "sites/b.example.com/y"


# -- limits, politeness, failures ------------------------------------------------------------------


def test_depth_and_page_limits(site, tmp_path):
    build_site(site, tmp_path / "none.txt")
    host = site.url.removeprefix("http://")
    only_start = [
        r.source_id
        for r in WebSource(
            start_urls=[f"{site.url}/"],
            max_depth=0,
            allow_private_addresses=True,
            delay_s=0,
            cache_dir=str(tmp_path / "c1"),
        ).list()
    ]
    assert only_start == [f"{host}/"]
    two = [
        r.source_id
        for r in WebSource(
            start_urls=[f"{site.url}/"],
            max_pages=2,
            allow_private_addresses=True,
            delay_s=0,
            cache_dir=str(tmp_path / "c2"),
        ).list()
    ]
    assert two == [f"{host}/", f"{host}/docs/intro"]


def test_politeness_delay_between_requests_to_one_host(site, tmp_path):
    site.pages["/robots.txt"] = Page(b"User-agent: *\nAllow: /\n", "text/plain")
    for name in "abc":
        site.html(f"/{name}", name, name)
    list(WebSource(urls=[f"{site.url}/{n}" for n in "abc"], allow_private_addresses=True, delay_s=0.25).list())
    times = [h.at for h in site.hits]
    assert len(times) == 4 and all(later - earlier >= 0.2 for earlier, later in zip(times, times[1:], strict=False))

    site.clear()  # robots.txt's Crawl-delay (whole seconds, as Python's robots parser reads it) wins when longer
    site.pages["/robots.txt"] = Page(b"User-agent: *\nCrawl-delay: 1\n", "text/plain")
    list(WebSource(urls=[f"{site.url}/{n}" for n in "ab"], allow_private_addresses=True, delay_s=0.1).list())
    times = [h.at for h in site.hits]
    assert len(times) == 3 and all(later - earlier >= 0.9 for earlier, later in zip(times, times[1:], strict=False))


def test_transient_errors_are_retried_and_an_outage_deletes_nothing(site, tmp_path):
    site.pages["/robots.txt"] = Page(b"", "text/plain", status=404)
    site.html("/", "Home", "Home page.", ["/flaky"])
    site.html("/flaky", "Flaky", "Answers 503 once.")
    site.pages["/flaky"].fail_times = 1
    index = Index(crawl_spec(site, tmp_path, max_attempts=3))
    first = index.run()
    assert first.documents_failed == 0 and len(index.texts()) == 2

    fresh = Index(crawl_spec(site, tmp_path, max_attempts=2, cache_dir=str(tmp_path / "empty-cache")))
    fresh.records, fresh.pipeline.store.table = index.records, index.pipeline.store.table
    site.pages["/"].fail_times = 10  # the start page is down and this machine has no crawl cache
    down = fresh.run()
    assert down.changes.deleted == 0 and len(index.texts()) == 2
    assert down.failures[-1].stage == "list" and "listing incomplete" in down.failures[-1].reason

    site.pages["/"].fail_times = 10  # down again, but the crawl cache knows its links
    cached = index.run()
    assert cached.changes.deleted == 0 and f"{site.url.removeprefix('http://')}/flaky" in index.texts()


def test_size_cap_applies_to_listed_sizes_without_download(site):
    site.pages["/robots.txt"] = Page(b"", "text/plain", status=404)
    site.pages["/big.txt"] = Page(b"z" * 5000, "text/plain")
    source = WebSource(urls=[f"{site.url}/big.txt"], allow_private_addresses=True, delay_s=0, max_page_bytes=1000)
    [ref] = list(source.list())
    assert ref.size == 5000
    with pytest.raises(PageTooLarge):
        source.read(ref)
    assert site.gets(200) == []  # HEAD told the size; the body was never fetched


# -- parsing helpers ------------------------------------------------------------------------------


def test_link_extraction_and_url_normalisation():
    html = b"""<html><head><base href="https://Example.com/docs/"><meta name="robots" content="noindex"></head><body>
    <a href="intro#top">a</a><a href="./intro">dup</a><a href="/x y">space</a><a rel="nofollow" href="/skip">n</a>
    <a href="https://example.com:443/caf\xc3\xa9">u</a><a href="mailto:x@y">m</a><a href="HTTP://other.example.com:80/">o</a></body></html>"""
    found = extract_links(html, "https://example.com/start")
    assert found.links == [
        "https://example.com/docs/intro",
        "https://example.com/x%20y",
        "https://example.com/caf%C3%A9",
        "mailto:x@y",
        "http://other.example.com/",
    ]
    assert found.noindex and not found.nofollow
    assert normalize_url("https://bücher.example/ä?q=1 2#frag") == "https://xn--bcher-kva.example/%C3%A4?q=1%202"
