"""Objects in a bucket (S3 and S3-compatible stores, GCS, Azure Blob) as a source of documents.

The bucket is reached through fsspec: ``s3://`` with s3fs (extra ``s3``), ``gs://`` with gcsfs
(extra ``gcs``), ``az://``/``abfs://`` with adlfs (extra ``azure``); each is imported only when a
spec uses it. Credentials come from where each SDK looks for them by itself — for S3 the standard
AWS chain: environment variables, ``~/.aws`` profiles (``profile:`` picks one), web identity, the
instance role — and never from the spec: a spec whose URL or ``storage_options`` carries key
material is refused, so it cannot end up in a repository, a log line or the index.

Listing walks the prefix one "directory" (delimiter level) at a time, sorted by name, without
entering excluded directories, and holds only the entries of the directories on the current
path. Each object's change signal is its ETag with its size and last-modified time, all of which
the listing already returns: an unchanged object costs no request of its own, and its body is
never downloaded. Reading streams the object in blocks and stops one byte past
``max_file_bytes``; an object listed as larger fails without being downloaded at all.

Throttling (SlowDown, 429), server errors (5xx) and dropped connections are retried with
exponential backoff (``max_attempts``); the SDKs' own retry loops are turned off, so one setting
says how often a request is tried.

Source ids are ``<scope><key relative to the prefix>``, the scope being the normalised URL with a
trailing slash (``s3://bucket/prefix/``): keys with spaces, quotes or any Unicode keep their exact
text. Include/exclude globs follow the local source's rules, matched against the relative key.
"""

from __future__ import annotations

import builtins
import importlib.util
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from pydantic import ConfigDict, Field, field_validator

from connectors._remote import (
    PathFilter,
    credential_keys,
    describe_error,
    guard_library_logs,
    human_size,
    retrying,
    url_has_credentials,
)
from connectors.base import GlobPatterns, Source
from connectors.local import FileTooLarge, media_type_for
from core.component import ComponentConfig, require
from core.types import SourceRef

log = logging.getLogger("rag_pipeline.source.object_store")


@dataclass(frozen=True)
class Backend:
    """One fsspec protocol: the module that implements it and the extra that installs it."""

    protocol: str  # the fsspec protocol name, also the scheme of normalised URLs
    module: str
    extra: str


BACKENDS: dict[str, Backend] = {
    "s3": Backend("s3", "s3fs", "s3"),
    "s3a": Backend("s3", "s3fs", "s3"),
    "gs": Backend("gs", "gcsfs", "gcs"),
    "gcs": Backend("gs", "gcsfs", "gcs"),
    "az": Backend("az", "adlfs", "azure"),
    "abfs": Backend("az", "adlfs", "azure"),
    "abfss": Backend("az", "adlfs", "azure"),
}

# The SDKs behind the backends print request headers (tokens included) at DEBUG level.
_SDK_LOGGERS = (
    "botocore",
    "aiobotocore",
    "s3fs",
    "fsspec",
    "gcsfs",
    "google.auth",
    "adlfs",
    "azure",
    "urllib3",
    "aiohttp",
)

# Error codes and HTTP statuses that mean "try again later" on S3, GCS and Azure.
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "RequestLimitExceeded",
        "TooManyRequests",
        "ServerBusy",
        "OperationTimedOut",
    }
)
_TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_TYPES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ResponseParserError",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ClientConnectorError",
        "ClientOSError",
        "FSTimeoutError",
        "IncompleteRead",
        "ServiceRequestError",
        "ServiceResponseError",
    }
)


class ObjectStoreError(OSError):
    """A listing or read that failed; the message names the object and the reason, redacted."""


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) says the request may succeed later."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (TimeoutError, ConnectionError)) or type(current).__name__ in _TRANSIENT_TYPES:
            return True
        response = getattr(current, "response", None)
        if isinstance(response, dict):  # botocore's ClientError
            error = response.get("Error") or {}
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if error.get("Code") in _TRANSIENT_CODES or status in _TRANSIENT_STATUSES:
                return True
        status = getattr(current, "status_code", None) or getattr(current, "code", None)  # adlfs, gcsfs
        if isinstance(status, int) and status in _TRANSIENT_STATUSES:
            return True
        if any(code in str(current) for code in ("SlowDown", "reduce your request rate")):
            return True
        current = current.__cause__ or current.__context__
    return False


class ObjectStoreSource(Source):
    """Objects under ``url`` (``s3://bucket/prefix``, ``gs://...``, ``az://container/...``), listed and
    read via fsspec."""

    type_name = "object-store"

    class Config(ComponentConfig):
        # A rejected value is never echoed back in the error: it may be the secret being refused.
        model_config = ConfigDict(hide_input_in_errors=True)

        url: str = Field(description="s3://bucket/prefix (also gs://, az://, abfs://); every object below it is listed")
        endpoint_url: str | None = Field(
            None, description="S3-compatible endpoint (MinIO, Ceph, R2 ...), e.g. http://127.0.0.1:9000"
        )
        region: str | None = Field(None, description="S3 region; default: from the AWS configuration")
        profile: str | None = Field(None, description="AWS profile in ~/.aws to take credentials from")
        anonymous: bool = Field(False, description="public bucket: send unsigned requests")
        storage_options: dict[str, Any] = Field(
            default_factory=dict,
            description="extra fsspec options (requester_pays, account_name ...); never credentials",
        )
        include: GlobPatterns = Field(
            default_factory=lambda: ["**/*"], description="globs a key (relative to the prefix) must match"
        )
        exclude: GlobPatterns = Field(
            default_factory=lambda: [".*"], description="globs that drop an object or a whole 'directory'"
        )
        max_file_bytes: int = Field(
            100 * 2**20, gt=0, description="larger objects are listed and fail at read, undownloaded"
        )
        read_block_bytes: int = Field(8 * 2**20, gt=0, description="bytes per ranged GET while streaming an object")
        timeout_s: float = Field(60.0, gt=0, description="connect and read timeout per request")
        max_attempts: int = Field(5, ge=1, description="tries per request when throttled or on a transient error")
        retry_max_wait_s: float = Field(20.0, gt=0, description="longest backoff between two tries")

        @field_validator("url")
        @classmethod
        def _url_names_a_bucket(cls, value: str) -> str:
            if url_has_credentials(value) or "@" in urlsplit(value).netloc:
                raise ValueError(
                    "the URL must not contain credentials; they come from the environment or the AWS/GCP/Azure "
                    "configuration"
                )
            parts = urlsplit(value)
            if parts.scheme.lower() not in BACKENDS:
                raise ValueError(f"unsupported scheme {parts.scheme!r}; expected one of {', '.join(sorted(BACKENDS))}")
            if not parts.netloc:
                raise ValueError("the URL names no bucket (expected s3://bucket/prefix)")
            if parts.query or parts.fragment:
                raise ValueError("the URL must not have a query or fragment (a presigned URL is not a prefix)")
            return value

        @field_validator("endpoint_url")
        @classmethod
        def _endpoint_is_http(cls, value: str | None) -> str | None:
            if not value:  # "" from `${S3_ENDPOINT_URL:-}` in a spec means: the provider's own endpoint
                return None
            parts = urlsplit(value)
            if "@" in parts.netloc:
                raise ValueError("endpoint_url must not contain credentials")
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError("endpoint_url must be an http(s) URL such as https://minio.example.com:9000")
            return value

        @field_validator("storage_options")
        @classmethod
        def _no_key_material(cls, value: dict[str, Any]) -> dict[str, Any]:
            secrets = credential_keys(value)
            if secrets:
                raise ValueError(
                    f"credentials must not be in the spec (found {', '.join(secrets)}); provide them through the "
                    "environment (AWS_ACCESS_KEY_ID ..., GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*) or a profile"
                )
            return value

    config: Config

    # -- configuration derived once --------------------------------------------------------

    @cached_property
    def backend(self) -> Backend:
        return BACKENDS[urlsplit(self.config.url).scheme.lower()]

    @cached_property
    def root(self) -> str:
        """The prefix as fsspec names it: ``bucket/prefix`` (no scheme, no trailing slash)."""
        parts = urlsplit(self.config.url)
        return f"{parts.netloc}/{parts.path.strip('/')}".rstrip("/")

    @property
    def scope(self) -> str:
        return f"{self.backend.protocol}://{self.root}/"

    @cached_property
    def _filter(self) -> PathFilter:
        return PathFilter(self.config.include, self.config.exclude)

    def check(self) -> list[str]:
        backend = self.backend
        problems = []
        for module in ("fsspec", backend.module):
            if importlib.util.find_spec(module) is None:
                problems.append(
                    f"object-store source: {self.config.url} needs {module}; run: pip install "
                    f"'rag-pipeline[{backend.extra}]'"
                )
        if backend.protocol != "s3":
            s3_only = [name for name in ("endpoint_url", "region", "profile") if getattr(self.config, name) is not None]
            if s3_only:
                problems.append(
                    f"object-store source: {', '.join(s3_only)} only apply to s3:// URLs, not {backend.protocol}://"
                )
        return problems

    # -- the filesystem ----------------------------------------------------------------------

    @cached_property
    def fs(self) -> Any:
        """The fsspec filesystem, built once per source, with listing caches and SDK retries off."""
        backend = self.backend
        require(backend.module, backend.extra, f"{backend.protocol}:// object-store sources")
        fsspec = require("fsspec", backend.extra, "object-store sources")
        # A service re-indexes with the same source object: cached listings would hide changes.
        options: dict[str, Any] = {"skip_instance_cache": True, "use_listings_cache": False, **self._backend_options()}
        options.update(self.config.storage_options)
        filesystem = fsspec.filesystem(backend.protocol, **options)
        guard_library_logs(*_SDK_LOGGERS)
        if backend.protocol == "s3":
            filesystem.retries = 1  # s3fs' own retry loop; ours (max_attempts) is the only one
        return filesystem

    def _backend_options(self) -> dict[str, Any]:
        config = self.config
        if self.backend.protocol == "s3":
            options: dict[str, Any] = {
                "anon": config.anonymous,
                "config_kwargs": {
                    "connect_timeout": config.timeout_s,
                    "read_timeout": config.timeout_s,
                    "retries": {"total_max_attempts": 1, "mode": "standard"},  # botocore's own retries off
                },
            }
            if config.endpoint_url:
                options["endpoint_url"] = config.endpoint_url
            if config.region:
                options["client_kwargs"] = {"region_name": config.region}
            if config.profile:
                options["profile"] = config.profile
            return options
        if self.backend.protocol == "gs":
            return {"token": "anon"} if config.anonymous else {}
        return {"anon": True} if config.anonymous else {}

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return retrying(
            attempts=self.config.max_attempts,
            max_wait_s=self.config.retry_max_wait_s,
            transient=is_transient,
            log=log,
            what=what,
        )(fn, *args, **kwargs)

    # -- listing ---------------------------------------------------------------------------

    def list(self) -> Iterator[SourceRef]:
        guard_library_logs(*_SDK_LOGGERS)  # again: SDK modules imported since then have loggers of their own
        root = self.root
        entries = self._directory(root)
        if entries is None:
            return
        stack: list[Iterator[dict[str, Any]]] = [iter(entries)]
        while stack:
            entry = next(stack[-1], None)
            if entry is None:
                stack.pop()
                continue
            name = str(entry["name"]).rstrip("/")
            relative = name[len(root) + 1 :] if root else name
            if not name.startswith(f"{root}/") or not relative:
                continue  # the prefix itself, or an entry the store placed outside it
            if entry.get("type") == "directory":
                if self._filter.enters(relative):
                    stack.append(iter(self._directory(name) or []))
                continue
            if str(entry["name"]).endswith("/"):
                continue  # a "folder" marker object, not a document
            if self._filter.wants(relative):
                yield self._ref(relative, entry)

    def _directory(self, path: str) -> builtins.list[dict[str, Any]] | None:  # list() above shadows the type
        """One delimiter level under ``path``, sorted by name; None when the prefix holds nothing."""
        uri = f"{self.backend.protocol}://{path}/"
        try:
            entries = self._call(f"listing {uri}", self.fs.ls, path, detail=True)
        except FileNotFoundError:
            if path != self.root:
                return []  # emptied while we walked
            self._check_bucket()
            log.warning("%s holds no objects", self.scope)
            return None
        except Exception as exc:
            raise ObjectStoreError(f"cannot list {uri}: {describe_error(exc)}") from None
        return sorted(entries, key=lambda e: str(e["name"]))

    def _check_bucket(self) -> None:
        bucket = self.root.split("/", 1)[0]
        try:
            self._call(f"checking bucket {bucket}", self.fs.info, bucket)
        except Exception as exc:
            raise ObjectStoreError(
                f"bucket {self.backend.protocol}://{bucket} cannot be listed: {describe_error(exc)}"
            ) from None

    def _ref(self, relative: str, entry: dict[str, Any]) -> SourceRef:
        etag = _first(entry, "ETag", "etag", "md5Hash", "generation")
        modified = _first(entry, "LastModified", "last_modified", "updated", "mtime")
        modified_text = (
            modified.isoformat() if isinstance(modified, datetime) else (str(modified) if modified is not None else "")
        )
        size = int(entry.get("size") or 0)
        etag_text = str(etag).strip('"') if etag is not None else ""
        name = PurePosixPath(relative).name
        metadata: dict[str, Any] = {
            "file_name": name,
            "relative_path": relative,
            "extension": PurePosixPath(name).suffix.lower().lstrip("."),
            "bucket": self.root.split("/", 1)[0],
            "object_key": str(entry["name"]).split("/", 1)[1],
        }
        if etag_text:
            metadata["etag"] = etag_text
        if modified_text:
            metadata["last_modified"] = modified_text
        return SourceRef(
            source_id=f"{self.scope}{relative}",
            uri=f"{self.scope}{relative}",
            media_type=media_type_for(name),
            size=size,
            change_signal=f"etag={etag_text};size={size};modified={modified_text}",
            metadata=metadata,
        )

    # -- reading ---------------------------------------------------------------------------

    def read(self, ref: SourceRef) -> bytes:
        if not ref.uri.startswith(self.scope):
            raise ValueError(f"{ref.source_id}: {ref.uri} is not under this source's prefix {self.scope}")
        self._check_size(ref.size)
        path = ref.uri[len(f"{self.backend.protocol}://") :]
        try:
            data: bytes = self._call(f"reading {ref.uri}", self._read_capped, path)
        except FileTooLarge:
            raise
        except FileNotFoundError:
            raise FileNotFoundError("object no longer exists (deleted after listing)") from None
        except PermissionError as exc:
            raise PermissionError(f"access denied reading the object: {describe_error(exc)}") from None
        except Exception as exc:
            raise ObjectStoreError(f"cannot read {ref.uri}: {describe_error(exc)}") from None
        return data

    def _read_capped(self, path: str) -> bytes:
        """Stream the object block by block; stop one byte past the cap (it may have grown since listing)."""
        limit, block = self.config.max_file_bytes, self.config.read_block_bytes
        parts, total = [], 0
        with self.fs.open(path, "rb", block_size=block, cache_type="none") as handle:
            self._check_size(getattr(handle, "size", None) or 0)
            while total <= limit:
                part = handle.read(min(block, limit + 1 - total))
                if not part:
                    break
                parts.append(part)
                total += len(part)
        self._check_size(total)
        return b"".join(parts)

    def _check_size(self, size: int) -> None:
        limit = self.config.max_file_bytes
        if size > limit:
            raise FileTooLarge(f"object is {human_size(size)}, over max_file_bytes={limit} ({human_size(limit)})")


def _first(entry: dict[str, Any], *keys: str) -> Any:
    return next((entry[k] for k in keys if entry.get(k) not in (None, "")), None)
