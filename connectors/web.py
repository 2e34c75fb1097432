"""Web pages as a source of documents: a list of URLs, sitemaps, and a crawl from start URLs.

Three ways to name pages, combinable in one source:

* ``urls``: exactly these pages;
* ``sitemaps``: every page a sitemap (or sitemap index, plain or gzipped) lists;
* ``start_urls``: a breadth-first crawl following ``<a href>`` links up to ``max_depth`` hops,
  on the start URLs' hosts only (``allowed_hosts`` adds others), skipping ``rel=nofollow`` links,
  honouring ``<meta name=robots content=noindex/nofollow>``.

Every fetch honours robots.txt (RFC 9309: a missing robots.txt allows everything, an unreachable
one stops the listing rather than reading it as "allow"; ``Crawl-delay`` lengthens
``delay_s``, the pause between two requests to one host), and goes through the careful client
in :mod:`connectors._http`: private, loopback and link-local addresses and non-http(s) schemes
(``file://``) are refused unless the spec allows them (``allow_private_addresses``,
``allowed_schemes``), redirects are limited and checked hop by hop, bodies are capped at
``max_page_bytes``, requests time out, throttling and 5xx are retried.

**Change signals without downloads.** A page's change signal is its ETag and Last-Modified. A
page whose links are not needed is probed with HEAD. A page whose links the crawl needs is asked
for with a conditional GET (``If-None-Match``/``If-Modified-Since`` from the last crawl): when the
server answers 304, its links come from the crawl cache (``cache_dir``), so an unchanged site is
re-crawled without one page body. A body downloaded while listing is handed to ``read`` instead
of being fetched twice. Servers that send no validators cost a GET per page and get a content
hash as signal (unchanged pages are still not re-parsed or re-embedded).

**Failures.** A page that answers 404/410 is gone: not listed, so a full cleanup removes it. A
page that times out, is too large, loops in redirects, is refused or answers another error is
listed and fails at read with that reason (its previous chunks stay searchable). When a start
URL cannot be fetched and its links are unknown, or robots.txt or a sitemap is unreachable, the
listing ends with an error, so that a site that is down never looks like a site that was emptied.

Source ids are ``<host[:port]><path>[?query]`` (the scheme is left out, so http and https
spellings of a page are one document); with ``namespace``, ``<namespace>/<host><path>``. A source
whose pages span several hosts needs a ``namespace``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import cached_property
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import unquote, urlsplit
from urllib.robotparser import RobotFileParser
from xml.etree import ElementTree

from pydantic import ConfigDict, Field, field_validator, model_validator

from connectors._http import (
    AddressRefused,
    ClientSettings,
    ConnectionFailed,
    FetchError,
    FetchResult,
    FetchTimeout,
    HttpClient,
    PageTooLarge,
    TransientStatus,
    literal_address_kind,
    normalize_url,
    origin_of,
)
from connectors._remote import PathFilter, describe_error, url_has_credentials
from connectors.base import GlobPatterns, Namespace, Source
from connectors.local import MEDIA_TYPES, media_type_for
from core.component import ComponentConfig
from core.types import SourceRef, sha256_hex

log = logging.getLogger("rag_pipeline.source.web")

DEFAULT_MEDIA_TYPES = ["text/html", "application/xhtml+xml", "text/plain", "text/markdown", "application/pdf"]
HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
MAX_LINKS_PER_PAGE = 2000
MAX_SITEMAP_NESTING = 3
GONE_STATUSES = frozenset({404, 410})
# The extension a page's file name gets for its media type, so the parser routes it right.
_EXTENSION_FOR = {"application/xhtml+xml": "html", **{media: ext for ext, media in reversed(MEDIA_TYPES.items())}}


class WebListingError(OSError):
    """The listing cannot be trusted to be complete (a start page, robots.txt or a sitemap failed)."""


class RobotsDisallowed(PermissionError):
    """robots.txt forbids the page."""


# -- HTML links ---------------------------------------------------------------------------------


class _LinkParser(HTMLParser):
    """Links (``a``/``area`` href without ``rel=nofollow``), ``<base href>`` and meta robots flags."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []
        self.base: str | None = None
        self.noindex = False
        self.nofollow = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name.lower(): value or "" for name, value in attrs}
        if tag in ("a", "area") and values.get("href") and "nofollow" not in values.get("rel", "").lower().split():
            if len(self.links) < MAX_LINKS_PER_PAGE:
                self.links.append(values["href"])
        elif tag == "base" and values.get("href") and self.base is None:
            self.base = values["href"]
        elif tag == "meta" and values.get("name", "").lower() == "robots":
            directives = {d.strip().lower() for d in values.get("content", "").split(",")}
            self.noindex |= bool(directives & {"noindex", "none"})
            self.nofollow |= bool(directives & {"nofollow", "none"})


@dataclass
class PageLinks:
    links: list[str]
    noindex: bool
    nofollow: bool


def extract_links(body: bytes, page_url: str) -> PageLinks:
    """The absolute, normalised link targets of an HTML page, in document order, without duplicates."""
    parser = _LinkParser()
    parser.feed(body.decode("utf-8", errors="replace"))
    parser.close()
    base = page_url
    if parser.base:
        try:
            base = normalize_url(parser.base, base=page_url)
        except ValueError:
            pass
    links: dict[str, None] = {}
    for href in parser.links:
        try:
            links[normalize_url(href, base=base)] = None
        except ValueError:
            continue
    return PageLinks(list(links), parser.noindex, parser.nofollow)


# -- sitemaps -----------------------------------------------------------------------------------


def parse_sitemap(body: bytes, max_bytes: int) -> tuple[list[str], list[str]]:
    """``(page URLs, nested sitemap URLs)`` of a sitemap or sitemap index (gzip is unpacked, capped)."""
    if body[:2] == b"\x1f\x8b":
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        body = inflater.decompress(body, max_bytes + 1)
        if len(body) > max_bytes:
            raise PageTooLarge(f"sitemap unpacks to more than max_page_bytes={max_bytes}")
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise WebListingError(f"sitemap is not valid XML: {exc}") from None
    pages: list[str] = []
    nested: list[str] = []
    for element in root:
        loc = next((child.text or "" for child in element if child.tag.rsplit("}", 1)[-1] == "loc"), "").strip()
        if not loc:
            continue
        kind = element.tag.rsplit("}", 1)[-1]
        (nested if kind == "sitemap" else pages).append(loc)
    return pages, nested


# -- the crawl cache ------------------------------------------------------------------------------


@dataclass
class CachedPage:
    """What the last crawl learnt about a page whose links it needed."""

    etag: str = ""
    last_modified: str = ""
    media_type: str = ""
    links: list[str] = field(default_factory=list)
    noindex: bool = False
    nofollow: bool = False


class CrawlCache:
    """Validators and links per page, kept between runs in one JSON file (written atomically)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.pages: dict[str, CachedPage] = {}
        if path is not None and path.is_file():
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
                self.pages = {url: CachedPage(**page) for url, page in raw.get("pages", {}).items()}
            except (OSError, ValueError, TypeError) as exc:
                log.warning("ignoring the unreadable crawl cache %s (%s); pages are fetched in full", path, exc)

    def get(self, url: str) -> CachedPage | None:
        return self.pages.get(url)

    def put(self, url: str, page: CachedPage) -> None:
        self.pages[url] = page

    def save(self, visited: set[str]) -> None:
        """Keep the pages this crawl saw (the others are gone or out of reach)."""
        if self.path is None:
            return
        kept = {url: asdict(page) for url, page in self.pages.items() if url in visited}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            partial.write_text(json.dumps({"version": 1, "pages": kept}), encoding="utf-8")
            os.replace(partial, self.path)
        except OSError as exc:
            log.warning("cannot write the crawl cache %s (%s); the next run fetches pages in full", self.path, exc)


# -- the source ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Visit:
    url: str
    depth: int | None  # None: a listed page (urls, sitemaps) whose links are not followed
    seed: bool  # named by the spec (failures are reported, not skipped)
    indexable: bool = True  # False for a start URL outside the include/exclude patterns


@dataclass
class _Downloaded:
    """A body fetched while listing, handed to read() for the same source id and signal."""

    source_id: str
    change_signal: str
    body: bytes


def _default_schemes() -> list[Literal["http", "https", "file"]]:
    return ["http", "https"]


class WebSource(Source):
    """Web pages from ``urls``, ``sitemaps`` and a crawl from ``start_urls`` (see the module docs)."""

    type_name = "web"

    class Config(ComponentConfig):
        # A rejected value is never echoed back in the error: it may hold the credentials being refused.
        model_config = ConfigDict(hide_input_in_errors=True)

        urls: list[str] = Field(
            default_factory=list, description="pages to index as they are (their links are not followed)"
        )
        sitemaps: list[str] = Field(
            default_factory=list, description="sitemap or sitemap index URLs whose pages are indexed"
        )
        start_urls: list[str] = Field(
            default_factory=list, description="where the crawl starts; links are followed up to max_depth"
        )
        allowed_hosts: list[str] = Field(
            default_factory=list,
            description="hosts the crawl may enter besides the start URLs' own (host or host:port)",
        )
        max_depth: int = Field(2, ge=0, description="link hops from a start URL (0: the start pages only)")
        max_pages: int = Field(1000, ge=1, description="pages listed at most, per run")
        include: GlobPatterns = Field(
            default_factory=lambda: ["**"], description="globs over the URL path (without the leading /)"
        )
        exclude: GlobPatterns = Field(
            default_factory=list, description="globs over the URL path; excluded pages are not fetched"
        )
        media_types: list[str] = Field(
            default_factory=lambda: list(DEFAULT_MEDIA_TYPES), description="content types that are indexed"
        )
        delay_s: float = Field(
            1.0, ge=0, description="pause between two requests to one host (robots.txt Crawl-delay can raise it)"
        )
        timeout_s: float = Field(30.0, gt=0, description="connect/read timeout per request")
        request_deadline_s: float = Field(120.0, gt=0, description="longest a page's whole body may take to arrive")
        max_page_bytes: int = Field(10 * 2**20, gt=0, description="larger pages are refused; the download stops there")
        max_redirects: int = Field(5, ge=0)
        max_attempts: int = Field(3, ge=1, description="tries per request on 429/5xx, timeouts and dropped connections")
        retry_max_wait_s: float = Field(30.0, gt=0)
        respect_robots: bool = True
        user_agent: str = Field("rag-pipeline/0.1 (+https://pypi.org/project/rag-pipeline/)", min_length=1)
        allow_private_addresses: bool = Field(
            False, description="allow loopback, private and link-local addresses (intranets, tests)"
        )
        allowed_schemes: list[Literal["http", "https", "file"]] = Field(default_factory=_default_schemes)
        namespace: Namespace = Field(
            None, description="prefix of every source id; required when pages span several hosts"
        )
        cache_dir: str | None = Field(None, description="crawl cache folder; default: $XDG_CACHE_HOME/rag-pipeline/web")

        @field_validator("urls", "sitemaps", "start_urls")
        @classmethod
        def _urls_are_absolute(cls, values: list[str]) -> list[str]:
            normalized = []
            for value in values:
                if url_has_credentials(value) or "@" in urlsplit(value).netloc:
                    raise ValueError("URLs must not contain credentials")
                scheme = urlsplit(value).scheme.lower()
                if scheme not in ("http", "https", "file"):
                    raise ValueError(f"{value!r}: only http(s) URLs (and file:// when allowed) can be fetched")
                try:
                    normalized.append(normalize_url(value))
                except ValueError as exc:
                    raise ValueError(f"{value!r}: {exc}") from None
            return normalized

        @model_validator(mode="after")
        def _pages_and_scope(self) -> WebSource.Config:
            seeds = [*self.urls, *self.sitemaps, *self.start_urls]
            if not seeds:
                raise ValueError("name at least one page: urls, sitemaps or start_urls")
            refused = [u for u in seeds if urlsplit(u).scheme not in self.allowed_schemes]
            if refused:
                raise ValueError(
                    f"{refused[0]}: scheme {urlsplit(refused[0]).scheme}:// is not in allowed_schemes "
                    f"({', '.join(self.allowed_schemes)}); file:// pages are read from this machine's disk"
                )
            netlocs = {urlsplit(u).netloc for u in seeds}
            if self.namespace is None and (len(netlocs) != 1 or "" in netlocs or self.allowed_hosts):
                raise ValueError(
                    "the pages span several hosts (or local files): set namespace, the prefix that keeps their source "
                    "ids together"
                )
            return self

    config: Config

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._downloaded: _Downloaded | None = None
        self._errors: dict[str, OSError] = {}  # source id -> why it cannot be read (this listing)
        self._client_lock = threading.Lock()

    # -- identity ------------------------------------------------------------------------------

    @property
    def scope(self) -> str:
        if self.config.namespace is not None:
            return f"{self.config.namespace}/"
        return f"{urlsplit(self._seeds[0]).netloc}/"

    @property
    def _seeds(self) -> list[str]:
        return [*self.config.start_urls, *self.config.urls, *self.config.sitemaps]

    def source_id(self, url: str) -> str:
        parts = urlsplit(url)
        key = f"{parts.netloc}{parts.path}" + (f"?{parts.query}" if parts.query else "")
        return f"{self.config.namespace}/{key}" if self.config.namespace is not None else key

    @cached_property
    def _allowed_netlocs(self) -> frozenset[str]:
        return frozenset({urlsplit(u).netloc for u in self._seeds} | {h.lower() for h in self.config.allowed_hosts})

    def host_allowed(self, netloc: str) -> bool:
        """True for the start URLs' own host:port and for what ``allowed_hosts`` names (host or host:port)."""
        netloc = netloc.lower()
        hostname = urlsplit(f"//{netloc}").hostname or netloc
        return netloc in self._allowed_netlocs or hostname in self._allowed_netlocs

    @cached_property
    def _filter(self) -> PathFilter:
        return PathFilter(self.config.include, self.config.exclude)

    def _wanted(self, url: str) -> bool:
        return self._filter.wants(unquote(urlsplit(url).path).lstrip("/"))

    # -- setup ---------------------------------------------------------------------------------

    def check(self) -> list[str]:
        problems = []
        if importlib.util.find_spec("httpcore") is None:
            problems.append("web source: needs httpcore; run: pip install 'rag-pipeline[web]'")
        if not self.config.allow_private_addresses:
            for url in self._seeds:
                host = urlsplit(url).hostname or ""
                kind = literal_address_kind(host) if host else None
                if kind is not None:
                    problems.append(
                        f"web source: {url} is on a {kind} address; set allow_private_addresses: true to allow it"
                    )
        return problems

    @cached_property
    def client(self) -> HttpClient:
        config = self.config
        settings = ClientSettings(
            user_agent=config.user_agent,
            timeout_s=config.timeout_s,
            deadline_s=config.request_deadline_s,
            max_bytes=config.max_page_bytes,
            max_redirects=config.max_redirects,
            delay_s=config.delay_s,
            max_attempts=config.max_attempts,
            retry_max_wait_s=config.retry_max_wait_s,
            allow_private=config.allow_private_addresses,
            allowed_schemes=frozenset(config.allowed_schemes),
        )
        return HttpClient(settings, host_allowed=self.host_allowed)

    def cache_path(self) -> Path | None:
        """The crawl cache file: one per source (scope and start URLs), only for crawls."""
        if not self.config.start_urls:
            return None
        if self.config.cache_dir is not None:
            folder = self.resolve_path(self.config.cache_dir)
        else:
            folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rag-pipeline" / "web"
        key = sha256_hex(json.dumps([self.scope, sorted(self.config.start_urls)]))[:24]
        return folder / f"{key}.json"

    # -- listing -------------------------------------------------------------------------------

    def list(self) -> Iterator[SourceRef]:
        self._errors.clear()
        self._downloaded = None
        crawl = _Crawl(self)
        try:
            yield from crawl.refs()
        finally:
            crawl.finish()

    # -- reading -------------------------------------------------------------------------------

    def read(self, ref: SourceRef) -> bytes:
        error = self._errors.get(ref.source_id)
        if error is not None:
            raise error
        downloaded, self._downloaded = self._downloaded, None
        if downloaded is not None and (downloaded.source_id, downloaded.change_signal) == (
            ref.source_id,
            ref.change_signal,
        ):
            return downloaded.body
        if ref.size > self.config.max_page_bytes:
            raise PageTooLarge(f"page is {ref.size} bytes, over max_page_bytes={self.config.max_page_bytes}")
        with self._client_lock:
            result = self.client.fetch("GET", ref.uri)
        if result.status in GONE_STATUSES:
            raise FileNotFoundError(f"page is gone (HTTP {result.status}) since it was listed")
        if result.status != 200 or result.body is None:
            raise FetchError(f"HTTP {result.status} from {ref.uri}")
        return result.body

    # -- refs ----------------------------------------------------------------------------------

    def page_ref(self, visit: _Visit, result: FetchResult, media_type: str, signal: str, size: int) -> SourceRef:
        metadata: dict[str, Any] = {
            "file_name": _file_name(visit.url, media_type),
            "url": visit.url,
            "host": urlsplit(visit.url).netloc,
            **{key.replace("-", "_"): value for key, value in result.validators.items()},
        }
        if result.final_url != visit.url:
            metadata["final_url"] = result.final_url
        if visit.depth is not None:
            metadata["depth"] = visit.depth
        return SourceRef(self.source_id(visit.url), visit.url, media_type, size, signal, metadata)

    def error_ref(self, visit: _Visit, error: OSError) -> SourceRef:
        """A page listed only so that the run records why it cannot be indexed."""
        source_id = self.source_id(visit.url)
        self._errors[source_id] = error
        guessed = media_type_for(PurePosixPath(urlsplit(visit.url).path).name)
        media_type = "text/html" if guessed == "application/octet-stream" else guessed
        return SourceRef(
            source_id,
            visit.url,
            media_type,
            0,
            "unavailable",
            {"file_name": _file_name(visit.url, media_type), "url": visit.url},
        )


class _Crawl:
    """One listing run: the queue, robots.txt per origin, the crawl cache, what was seen."""

    def __init__(self, source: WebSource):
        self.source = source
        self.config = source.config
        self.client = source.client
        self.cache = CrawlCache(source.cache_path())
        self.robots: dict[str, RobotFileParser | None] = {}
        self.queue: deque[_Visit] = deque()
        self.seen: set[str] = set()  # source ids, so http/https spellings of a page are one visit
        self.visited: set[str] = set()
        self.incomplete: list[str] = []

    def refs(self) -> Iterator[SourceRef]:
        config = self.config
        for url in config.start_urls:
            self.enqueue(url, 0, seed=True)
        for url in config.urls:
            self.enqueue(url, None, seed=True)
        for sitemap in config.sitemaps:
            for url in self.sitemap_pages(sitemap):
                self.enqueue(url, None, seed=True)
        listed = 0
        while self.queue and listed < config.max_pages:
            visit = self.queue.popleft()
            with self.source._client_lock:
                ref = self.visit(visit)
            if ref is not None:
                listed += 1
                yield ref
        if self.queue:
            log.info(
                "%s: max_pages=%d reached; %d queued pages were not visited",
                self.source.scope,
                config.max_pages,
                len(self.queue),
            )
        if self.incomplete:
            raise WebListingError(f"listing incomplete, nothing is deleted this run: {'; '.join(self.incomplete)}")

    def finish(self) -> None:
        self.cache.save(self.visited)

    # -- the queue ---------------------------------------------------------------------------

    def enqueue(self, url: str, depth: int | None, seed: bool) -> None:
        parts = urlsplit(url)
        if parts.scheme not in self.config.allowed_schemes:
            log.debug("not following %s: scheme not allowed", url)
            return
        if parts.scheme != "file" and not self.source.host_allowed(parts.netloc):
            log.debug("not following %s: host outside the crawl", url)
            return
        wanted = self.source._wanted(url)
        if not wanted and not (seed and depth is not None):
            return  # excluded; a start URL is still fetched for its links
        identity = self.source.source_id(url)
        if identity in self.seen:
            return
        self.seen.add(identity)
        self.queue.append(_Visit(url, depth, seed, wanted))

    def sitemap_pages(self, url: str, nesting: int = 0) -> Iterator[str]:
        try:
            result = self.client.fetch("GET", url)
        except OSError as exc:
            raise WebListingError(f"sitemap {url} cannot be fetched: {describe_error(exc)}") from None
        if result.status != 200 or result.body is None:
            raise WebListingError(f"sitemap {url} answered HTTP {result.status}")
        pages, nested = parse_sitemap(result.body, self.config.max_page_bytes)
        for page in pages:
            try:
                yield normalize_url(page)
            except ValueError:
                log.info("sitemap %s: skipping the invalid URL %r", url, page)
        for child in nested:
            if nesting >= MAX_SITEMAP_NESTING:
                raise WebListingError(f"sitemap {url}: sitemap indexes nested more than {MAX_SITEMAP_NESTING} deep")
            yield from self.sitemap_pages(normalize_url(child, base=url), nesting + 1)

    # -- one page ------------------------------------------------------------------------------

    def visit(self, visit: _Visit) -> SourceRef | None:
        source, config = self.source, self.config
        needs_links = visit.depth is not None and visit.depth < config.max_depth
        cached = self.cache.get(visit.url) if needs_links else None
        try:
            self.check_robots(visit.url)
            result = self.probe(visit.url, needs_links, cached)
        except RobotsDisallowed as exc:
            if visit.seed:
                return source.error_ref(visit, exc)
            log.debug("%s", exc)
            return None
        except WebListingError:
            raise
        except OSError as exc:
            self.links_unavailable(visit, cached, exc)
            return source.error_ref(visit, exc) if visit.indexable else None
        if result.status in GONE_STATUSES:
            (log.warning if visit.seed else log.info)("%s is gone (HTTP %d); not listed", visit.url, result.status)
            return None
        self.visited.add(visit.url)
        page: CachedPage | None
        if result.status == 304 and cached is not None:
            page, media_type = cached, cached.media_type
            validators = {
                "etag": result.headers.get("etag") or cached.etag,
                "last-modified": result.headers.get("last-modified") or cached.last_modified,
            }
            result.headers.update({k: v for k, v in validators.items() if v})
        elif result.status == 200:
            media_type = result.media_type or media_type_for(PurePosixPath(urlsplit(visit.url).path).name)
            page = self.remember(visit, result, media_type) if needs_links else None
        else:
            self.links_unavailable(visit, cached, FetchError(f"HTTP {result.status}"))
            return (
                source.error_ref(visit, FetchError(f"HTTP {result.status} from {visit.url}"))
                if visit.indexable
                else None
            )
        if page is not None and not page.nofollow:
            for link in page.links:
                self.enqueue(link, visit.depth + 1, seed=False)  # type: ignore[operator]
        if not visit.indexable or (page is not None and page.noindex):
            return None
        if media_type not in config.media_types:
            if visit.seed:
                return source.error_ref(
                    visit, FetchError(f"media type {media_type or 'unknown'} is not in media_types")
                )
            log.debug("not indexing %s: media type %s", visit.url, media_type)
            return None
        return self.page_ref(visit, result, media_type)

    def probe(self, url: str, needs_links: bool, cached: CachedPage | None) -> FetchResult:
        """GET (conditional when the cache knows the page) if the links are needed, else HEAD."""
        if needs_links:
            headers = {}
            if cached is not None and cached.etag:
                headers["If-None-Match"] = cached.etag
            if cached is not None and cached.last_modified:
                headers["If-Modified-Since"] = cached.last_modified
            return self.client.fetch("GET", url, headers)
        result = self.client.fetch("HEAD", url)
        if result.status in (405, 501) or (result.status == 200 and not result.validators):
            return self.client.fetch("GET", url)  # no cheap signal: the content hash is the signal
        return result

    def remember(self, visit: _Visit, result: FetchResult, media_type: str) -> CachedPage:
        """Cache the page's validators (and an HTML page's links) for the next run's conditional GET."""
        found = (
            extract_links(result.body, result.final_url)
            if media_type in HTML_TYPES and result.body
            else PageLinks([], False, False)
        )
        page = CachedPage(
            result.headers.get("etag", ""),
            result.headers.get("last-modified", ""),
            media_type,
            found.links,
            found.noindex,
            found.nofollow,
        )
        self.cache.put(visit.url, page)
        return page

    def links_unavailable(self, visit: _Visit, cached: CachedPage | None, error: Exception) -> None:
        """A page whose links the crawl needed failed: use the last crawl's links, or flag the listing."""
        if visit.depth is None or visit.depth >= self.config.max_depth:
            return
        if cached is not None:
            log.warning("%s failed (%s); following the links it had on the last crawl", visit.url, error)
            self.visited.add(visit.url)
            if not cached.nofollow:
                for link in cached.links:
                    self.enqueue(link, visit.depth + 1, seed=False)
        elif visit.seed and isinstance(error, (FetchTimeout, TransientStatus, ConnectionFailed)):
            # A site that is down must not look like a site that was emptied.
            self.incomplete.append(f"start page {visit.url} failed ({error}) and its links are unknown")

    def page_ref(self, visit: _Visit, result: FetchResult, media_type: str) -> SourceRef:
        source = self.source
        validators = result.validators
        if validators:
            signal = ";".join(f"{name}={validators.get(name, '')}" for name in ("etag", "last-modified"))
        else:
            signal = f"sha256={sha256_hex(result.body or b'')}"
        size = len(result.body) if result.body is not None else int(result.headers.get("content-length", "0") or 0)
        ref = source.page_ref(visit, result, media_type, signal, size)
        if result.body is not None and result.status == 200:
            source._downloaded = _Downloaded(ref.source_id, signal, result.body)
        return ref

    # -- robots.txt ----------------------------------------------------------------------------

    def check_robots(self, url: str) -> None:
        if not self.config.respect_robots or url.startswith("file:"):
            return
        origin = origin_of(url)
        if origin not in self.robots:
            self.robots[origin] = self.load_robots(origin)
        rules = self.robots[origin]
        if rules is not None and not rules.can_fetch(self.config.user_agent, url):
            raise RobotsDisallowed(f"{url} is disallowed by {origin}/robots.txt")

    def load_robots(self, origin: str) -> RobotFileParser | None:
        """The origin's rules; None when there are none (4xx). Unreachable robots.txt stops the listing."""
        url = f"{origin}/robots.txt"
        try:
            result = self.client.fetch("GET", url)
        except AddressRefused:
            raise
        except OSError as exc:
            raise WebListingError(
                f"{url} is unreachable ({describe_error(exc)}); pages there are not crawled this run"
            ) from None
        if 400 <= result.status < 500 or result.body is None:
            return None
        if result.status != 200:
            raise WebListingError(f"{url} answered HTTP {result.status}; pages there are not crawled this run")
        rules = RobotFileParser(url)
        rules.parse(result.body.decode("utf-8", errors="replace").splitlines())
        delay = rules.crawl_delay(self.config.user_agent)
        if delay:
            self.client.set_delay(origin, float(delay))
        return rules


def _file_name(url: str, media_type: str) -> str:
    """The page's name with an extension that matches its media type (``/docs/`` -> ``docs.html``)."""
    path = unquote(urlsplit(url).path)
    name = PurePosixPath(path).name or PurePosixPath(path.rstrip("/")).name or "index"
    extension = _EXTENSION_FOR.get(media_type)
    if extension is None or media_type_for(name) == media_type:
        return name
    return f"{name}.{extension}"


__all__ = ["WebSource", "WebListingError", "RobotsDisallowed", "extract_links", "parse_sitemap"]
