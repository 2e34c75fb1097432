"""A careful HTTP client for crawling: address guard, redirect limits, size caps, politeness, retries.

Built on httpcore (the engine under httpx) because it lets us own the socket connect: every
connection goes through :class:`GuardedBackend`, which resolves the host itself, refuses any
address that is not globally routable (loopback, private, link-local, CGNAT, multicast, reserved)
unless allowed, and then connects to the very address it checked. Checking a name and letting
the library resolve it again later would leave room for DNS rebinding.

Each request: at most ``max_redirects`` hops, each re-checked (scheme, host allow-list, loops);
a per-operation timeout plus a deadline for the whole body; the body read in pieces and abandoned
one byte past ``max_bytes`` (a declared Content-Length over the cap is refused before any body is
read); ``Accept-Encoding: identity`` so the cap counts the bytes that are indexed; a minimum
interval between two requests to one host; 429/5xx and dropped connections retried with backoff,
honouring ``Retry-After``. ``file://`` URLs are read from the local disk when allowed.
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, unquote_to_bytes, urljoin, urlsplit, urlunsplit

from connectors._remote import describe_error, human_size, retrying
from connectors.local import FileTooLarge, media_type_for
from core.component import require

log = logging.getLogger("rag_pipeline.source.web")

DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = "=&%:@!$'()*+,;/?-._~"


# -- errors: OSError subclasses whose message is the reason the runner records ------------------


class FetchError(OSError):
    """A page that could not be fetched; the message says why."""


class AddressRefused(PermissionError):
    """A URL whose host is (or resolves to) an address the spec does not allow, or a refused scheme."""


class PageTooLarge(FileTooLarge):
    """A response body over ``max_bytes``."""


class RedirectProblem(FetchError):
    """Too many redirects, a redirect loop, or a redirect to a refused place."""


class ConnectionFailed(FetchError):
    """The connection could not be made or broke off (may work on a later try)."""


class FetchTimeout(TimeoutError):
    """No response (or no complete body) in time."""


class TransientStatus(FetchError):
    """A status that may go away on a later try (429, 5xx)."""

    def __init__(self, message: str, status: int, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


# -- URLs ---------------------------------------------------------------------------------------


def normalize_url(url: str, base: str | None = None) -> str:
    """An absolute URL in one canonical spelling: lower-case scheme and host, no default port, no
    fragment, no userinfo, path and query percent-encoded; ``base`` resolves a relative link.

    Raises ValueError for a URL with no host or an invalid port.
    """
    text = url.strip()
    if base is not None:
        text = urljoin(base, text)
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "file":
        return urlunsplit(("file", "", quote(unquote(parts.path), safe=_PATH_SAFE) or "/", "", ""))
    if scheme not in DEFAULT_PORTS:
        return urlunsplit((scheme, parts.netloc, parts.path, parts.query, ""))
    host = parts.hostname
    if not host:
        raise ValueError(f"URL has no host: {url!r}")
    if ":" in host:
        host = f"[{host}]"
    elif not host.isascii():
        host = host.encode("idna").decode("ascii")
    port = parts.port  # raises ValueError for a port that is not a number in range
    netloc = host if port in (None, DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    return urlunsplit((scheme, netloc, path, quote(parts.query, safe=_QUERY_SAFE), ""))


def origin_of(url: str) -> str:
    """``https://host[:port]`` (``file://`` for local files)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


# -- the address guard ----------------------------------------------------------------------------


def address_kind(address: str) -> str | None:
    """Why an IP address is not a public internet address ("loopback", "private" ...), or None."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind, flag in (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("unspecified", ip.is_unspecified),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    ):
        if flag:
            return kind
    return None if ip.is_global else "non-public"


def literal_address_kind(host: str) -> str | None:
    """``address_kind`` for a host that is an IP literal or ``localhost``, without any DNS lookup."""
    bare = host.strip("[]").lower()
    if bare == "localhost" or bare.endswith(".localhost"):
        return "loopback"
    try:
        return address_kind(bare)
    except ValueError:
        return None


def refusal(host: str, address: str, kind: str) -> str:
    where = host if host == address else f"{host} ({address})"
    return f"{where} is a {kind} address; set allow_private_addresses: true in the spec to allow it"


class GuardedBackend:
    """An httpcore network backend that connects only to allowed addresses, the ones it checked."""

    def __init__(self, allow_private: bool):
        httpcore = require("httpcore", "web", "web sources")
        self._inner = httpcore.SyncBackend()
        self._connect_error = httpcore.ConnectError
        self.allow_private = allow_private

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> Any:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ConnectionFailed(f"cannot resolve host {host}: {exc.strerror or exc}") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not self.allow_private:
            for address in addresses:
                kind = address_kind(address)
                if kind is not None:
                    raise AddressRefused(refusal(host, address, kind))
        error: Exception | None = None
        for address in addresses:
            try:
                return self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except self._connect_error as exc:
                error = exc
        raise error or ConnectionFailed(f"no address to connect to for {host}")

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> Any:
        raise AddressRefused("unix sockets are not reachable from a web source")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


# -- the client -----------------------------------------------------------------------------------


@dataclass
class FetchResult:
    url: str  # as requested
    final_url: str  # after redirects
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes | None = None  # None for HEAD and 304
    redirects: list[str] = field(default_factory=list)

    @property
    def media_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    @property
    def validators(self) -> dict[str, str]:
        """ETag and Last-Modified, when the server sent them."""
        return {k: self.headers[k] for k in ("etag", "last-modified") if self.headers.get(k)}


@dataclass
class ClientSettings:
    user_agent: str
    timeout_s: float
    deadline_s: float
    max_bytes: int
    max_redirects: int
    delay_s: float
    max_attempts: int
    retry_max_wait_s: float
    allow_private: bool
    allowed_schemes: frozenset[str]


class HttpClient:
    """One crawl's HTTP client: a connection pool behind the address guard, per-host pacing, retries."""

    def __init__(self, settings: ClientSettings, host_allowed: Callable[[str], bool] = lambda host: True):
        httpcore = require("httpcore", "web", "web sources")
        self._httpcore = httpcore
        self.settings = settings
        self.host_allowed = host_allowed
        self._pool = httpcore.ConnectionPool(
            network_backend=GuardedBackend(settings.allow_private), max_connections=4, retries=0
        )
        self._last_request: dict[str, float] = {}
        self._delays: dict[str, float] = {}
        self._pace_lock = threading.Lock()

    def close(self) -> None:
        self._pool.close()

    def set_delay(self, origin: str, seconds: float) -> None:
        """A longer interval for one origin (robots.txt's Crawl-delay)."""
        self._delays[origin] = max(seconds, self.settings.delay_s)

    def fetch(self, method: str, url: str, headers: Mapping[str, str] | None = None) -> FetchResult:
        """The response after redirects; raises a FetchError subclass when there is none to give."""
        settings = self.settings
        result: FetchResult = retrying(
            attempts=settings.max_attempts,
            max_wait_s=settings.retry_max_wait_s,
            transient=_is_transient,
            log=log,
            what=f"{method} {url}",
            wait_hint=lambda exc: getattr(exc, "retry_after", None),
        )(self._follow, method, url, dict(headers or {}))
        return result

    def _follow(self, method: str, url: str, headers: dict[str, str]) -> FetchResult:
        chain = [url]
        current = url
        while True:
            self._check_target(current, first=current == url)
            result = (
                self._fetch_file(current) if current.startswith("file:") else self._request(method, current, headers)
            )
            location = result.headers.get("location")
            if result.status not in REDIRECT_STATUSES or not location:
                result.url, result.redirects = url, chain[1:]
                return result
            target = normalize_url(location, base=current)
            if target in chain:
                raise RedirectProblem(f"redirect loop: {' -> '.join([*chain, target])}")
            if len(chain) > self.settings.max_redirects:
                raise RedirectProblem(
                    f"more than max_redirects={self.settings.max_redirects} redirects: {' -> '.join(chain)} -> ..."
                )
            chain.append(target)
            current = target

    def _check_target(self, url: str, first: bool) -> None:
        parts = urlsplit(url)
        scheme = parts.scheme
        what = "URL" if first else "redirect target"
        if scheme not in self.settings.allowed_schemes:
            raise AddressRefused(
                f"{what} {url}: scheme {scheme}:// is not allowed (allowed_schemes: "
                f"{', '.join(sorted(self.settings.allowed_schemes))})"
            )
        if scheme == "file":
            return
        host = parts.hostname or ""
        if not first and not self.host_allowed(parts.netloc):
            raise RedirectProblem(f"redirect to {url}: host {parts.netloc} is outside the allowed hosts")
        kind = literal_address_kind(host)
        if kind is not None and not self.settings.allow_private:
            raise AddressRefused(refusal(host, host, kind))

    def _pace(self, url: str) -> None:
        origin = origin_of(url)
        with self._pace_lock:
            interval = self._delays.get(origin, self.settings.delay_s)
            wait = self._last_request.get(origin, float("-inf")) + interval - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._last_request[origin] = time.monotonic()

    def _request(self, method: str, url: str, headers: dict[str, str]) -> FetchResult:
        settings, httpcore = self.settings, self._httpcore
        self._pace(url)
        request_headers = {
            "User-Agent": settings.user_agent,
            "Accept": "text/html,application/xhtml+xml,text/plain,text/markdown,application/xml;q=0.9,*/*;q=0.8",
            "Accept-Encoding": "identity",
            **headers,
        }
        timeout = settings.timeout_s
        extensions = {"timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}}
        deadline = time.monotonic() + settings.deadline_s
        try:
            with self._pool.stream(
                method, url, headers=list(request_headers.items()), extensions=extensions
            ) as response:
                result = FetchResult(url, url, response.status, _header_dict(response.headers))
                if result.status in TRANSIENT_STATUSES:
                    raise TransientStatus(
                        f"HTTP {result.status} from {url}", result.status, _retry_after(result.headers)
                    )
                if method != "HEAD" and result.status not in REDIRECT_STATUSES and result.status != 304:
                    result.body = self._read_body(response, result, deadline)
                return result
        except (FetchError, AddressRefused, FetchTimeout, PageTooLarge):
            raise
        except httpcore.TimeoutException:
            raise FetchTimeout(f"no response from {url} within timeout_s={timeout:g}") from None
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as exc:
            raise ConnectionFailed(f"request to {url} failed: {describe_error(exc)}") from None

    def _read_body(self, response: Any, result: FetchResult, deadline: float) -> bytes:
        limit = self.settings.max_bytes
        declared = result.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise PageTooLarge(
                f"{result.url}: page is {human_size(int(declared))}, over max_page_bytes={limit} ({human_size(limit)})"
            )
        parts, total = [], 0
        for piece in response.iter_stream():
            parts.append(piece)
            total += len(piece)
            if total > limit:
                raise PageTooLarge(
                    f"{result.url}: page is over max_page_bytes={limit} ({human_size(limit)}); download stopped"
                )
            if time.monotonic() > deadline:
                raise FetchTimeout(
                    f"{result.url}: the page did not arrive within request_deadline_s={self.settings.deadline_s:g}"
                )
        return b"".join(parts)

    def _fetch_file(self, url: str) -> FetchResult:
        """A local file, with the headers a web server would send for it (validators from the mtime)."""
        path = Path(os.fsdecode(unquote_to_bytes(urlsplit(url).path)))
        limit = self.settings.max_bytes
        try:
            info = path.stat()
            if info.st_size > limit:
                raise PageTooLarge(
                    f"{url}: file is {human_size(info.st_size)}, over max_page_bytes={limit} ({human_size(limit)})"
                )
            with path.open("rb") as handle:
                body = handle.read(limit + 1)
        except FileNotFoundError:
            return FetchResult(url, url, 404, {})
        except IsADirectoryError:
            raise FetchError(f"{url} is a folder, not a file") from None
        except PermissionError as exc:
            raise FetchError(f"{url}: permission denied ({exc.strerror})") from None
        if len(body) > limit:
            raise PageTooLarge(f"{url}: file grew over max_page_bytes={limit} ({human_size(limit)})")
        headers = {
            "content-type": media_type_for(path.name),
            "content-length": str(len(body)),
            "last-modified": email.utils.formatdate(info.st_mtime, usegmt=True),
            "etag": f'"{info.st_size:x}-{info.st_mtime_ns:x}"',
        }
        return FetchResult(url, url, 200, headers, body)


def _header_dict(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in raw}


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after", "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (TransientStatus, FetchTimeout, ConnectionFailed)) and "cannot resolve" not in str(exc)
