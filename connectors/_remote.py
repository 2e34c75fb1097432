"""What the connectors that reach beyond the local disk share: path filters, secret scrubbing, retries.

* :class:`PathFilter` applies include/exclude globs with exactly the rules of the local source
  (a pattern without ``/`` matches a name at any depth, one with ``/`` the relative path, ``**``
  spans directories), so a spec means the same thing whichever connector it configures.
* :func:`scrub_url` and :func:`redact` keep credentials out of everything a connector says:
  source ids, URIs, metadata, log lines and error messages. A connector passes every message it
  builds from a library's exception through :func:`redact` before raising or logging it; the
  credential values it knows go to :mod:`core.secrets`, whose scrubber :func:`redact` applies.
* :func:`credential_keys` finds settings that look like key material, so a spec that holds
  credentials is refused instead of being stored, logged or committed with them.
* :func:`retrying` is the tenacity policy for transient failures (throttling, 5xx, timeouts).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit, urlunsplit

# The local source's pattern rules are the project's one definition of include/exclude globs.
from connectors.local import PathPattern
from core.component import require
from core.secrets import REDACTED, register_secret, scrub

# Environment variables whose values are secrets in every context: wherever such a value shows
# up in a message (a library echoing a token, a signed URL), it is replaced (core.secrets).
SECRET_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_CLIENT_SECRET",
    "GIT_PASSWORD",
    "GITHUB_TOKEN",
    "GH_TOKEN",
    "GITLAB_TOKEN",
)

# Setting names that carry key material in fsspec's backends (s3fs, gcsfs, adlfs) and botocore.
_CREDENTIAL_KEY = re.compile(
    r"(^|_)(key|secret|token|password|passwd|credentials?|sas|signature)($|_)|account_key|connection_string|access_key|session_token",
    re.IGNORECASE,
)
# Names that match the pattern above but hold no secret.
_NOT_CREDENTIAL_KEYS = frozenset({"key_prefix", "sse_kms_key_id", "token_env", "requester_pays"})

# userinfo in any URL inside a text: scheme://user:password@host -> scheme://***@host
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s'\"]+)@")
# Query parameters that carry signatures or tokens (presigned S3 URLs, Azure SAS, OAuth tokens).
_SECRET_QUERY = re.compile(
    r"(?P<name>[?&](?:X-Amz-(?:Signature|Credential|Security-Token)|sig|signature|token|access_token|"
    r"api_key|apikey|key|password|se|sv|sp|st|skoid|sktid)=)(?P<value>[^&#\s'\"]+)",
    re.IGNORECASE,
)


# Credentials in HTTP headers as SDKs print them at DEBUG level: a session token, an Authorization
# header (in a dict repr or as a raw header line), the access key id inside a SigV4 credential scope.
_SECRET_HEADERS = (
    re.compile(r"(?i)(x-amz-security-token['\"]?\s*[:=]\s*b?['\"]?)[^'\"\s,}]+"),
    re.compile(r"(?i)(['\"]authorization['\"]\s*:\s*b?['\"])[^'\"]*"),
    re.compile(r"(?im)(^authorization:\s*)\S.*$"),
    re.compile(r"(Credential=)[^/,\s'\"]+"),
)


def scrub_url(url: str) -> str:
    """The URL without its userinfo (``https://user:token@host/x`` -> ``https://host/x``).

    For http(s) the whole userinfo goes (a token is often passed as the user name); for other
    schemes (``ssh://git@host/...``) the user name stays and only a password is dropped.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact(url)
    if "@" not in parts.netloc:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    if parts.scheme.lower() in ("http", "https") or ":" in userinfo:
        user = "" if parts.scheme.lower() in ("http", "https") else userinfo.split(":", 1)[0] + "@"
        return urlunsplit(parts._replace(netloc=f"{user}{hostport}"))
    return url


def url_has_credentials(url: str) -> bool:
    """True when the URL carries a password (or, for http(s), any userinfo at all)."""
    return scrub_url(url) != url


# Parts of an Azure connection string that are key material. The rest names public things (the
# protocol, the account, the endpoint suffix); registered whole, its pieces would blank them in
# every URL a message quotes, since pieces of a secret are scrubbed too.
_CONNECTION_STRING_KEYS = frozenset({"accountkey", "sharedaccesssignature", "sharedaccesskey"})


def _register_environment_secrets() -> None:
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name)
        if value and name == "AZURE_STORAGE_CONNECTION_STRING":
            parts = (part.partition("=") for part in value.split(";"))
            register_secret(*(secret for key, _, secret in parts if key.strip().lower() in _CONNECTION_STRING_KEYS))
        else:
            register_secret(value)


def redact(text: str, extra_secrets: Iterable[str] = ()) -> str:
    """``text`` with URL userinfo, signed-URL parameters, credential headers and secret values replaced by ``***``.

    The values of the credential environment variables and ``extra_secrets`` are registered as
    secrets (read now: a library may have picked them up since the last call), then
    :func:`core.secrets.scrub` removes every registered secret in any form it knows.
    """
    _register_environment_secrets()
    register_secret(*extra_secrets)
    text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    text = _SECRET_QUERY.sub(lambda m: f"{m.group('name')}{REDACTED}", text)
    for header in _SECRET_HEADERS:
        text = header.sub(lambda m: f"{m.group(1)}{REDACTED}", text)
    return scrub(text)


class RedactingFilter(logging.Filter):
    """Rewrites a log record whose text holds credentials (see :func:`redact`) before any handler sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


_REDACTING_FILTER = RedactingFilter()


def guard_library_logs(*prefixes: str) -> None:
    """Attach the redacting filter to the loggers of the libraries named (and all their children).

    SDKs print request headers at DEBUG level (botocore prints the session token and the
    Authorization header), and a ``-v`` run turns DEBUG on for everything. A filter only sees
    records logged on its own logger, so it goes on every existing logger under each prefix;
    call this after the library is imported. The credentials the SDKs read from the environment
    are registered as secrets here, so the root logger's scrubbing filter knows them too.
    """
    _register_environment_secrets()
    names = [n for n in logging.root.manager.loggerDict if any(n == p or n.startswith(f"{p}.") for p in prefixes)]
    for name in {*names, *prefixes}:
        logger = logging.getLogger(name)
        if _REDACTING_FILTER not in logger.filters:
            logger.addFilter(_REDACTING_FILTER)


def describe_error(exc: BaseException, extra_secrets: Iterable[str] = ()) -> str:
    """``Type: message`` of an exception, on one line, redacted."""
    text = " ".join(str(exc).split())
    return redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__, extra_secrets)


def credential_keys(settings: Mapping[str, Any], path: str = "") -> list[str]:
    """Dotted names of the settings (at any depth) that look like credentials."""
    found = []
    for name, value in settings.items():
        dotted = f"{path}.{name}" if path else str(name)
        if isinstance(value, Mapping):
            found.extend(credential_keys(value, dotted))
        elif str(name).lower() not in _NOT_CREDENTIAL_KEYS and _CREDENTIAL_KEY.search(str(name)):
            found.append(dotted)
    return found


def human_size(size: int) -> str:
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size >= factor:
            return f"{size / factor:.0f} {unit}" if size >= 10 * factor else f"{size / factor:.1f} {unit}"
    return f"{size} bytes"


class PathFilter:
    """Include/exclude globs over ``/``-separated relative paths, with the local source's rules."""

    def __init__(self, include: Iterable[str], exclude: Iterable[str]):
        self._include_text = list(include)
        self._exclude_text = list(exclude)

    @cached_property
    def _include(self) -> list[PathPattern]:
        return [PathPattern.parse(p) for p in self._include_text]

    @cached_property
    def _exclude(self) -> list[PathPattern]:
        return [PathPattern.parse(p) for p in self._exclude_text]

    def wants(self, relative: str) -> bool:
        """True for a file that some include pattern matches and no exclude pattern does."""
        if any(p.matches(relative) for p in self._exclude) or not all(self.enters(d) for d in _parents(relative)):
            return False
        return any(p.matches(relative) for p in self._include)

    def enters(self, relative_directory: str) -> bool:
        """False for a directory that an exclude pattern removes with everything below it."""
        return not any(p.matches_directory(relative_directory) for p in self._exclude)


def _parents(relative: str) -> list[str]:
    """``a/b/c.txt`` -> ``["a", "a/b"]``: an excluded directory excludes the files below it."""
    parts = relative.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def retrying(
    *,
    attempts: int,
    max_wait_s: float,
    transient: Callable[[BaseException], bool],
    log: logging.Logger,
    what: str,
    initial_wait_s: float = 0.5,
    wait_hint: Callable[[BaseException], float | None] | None = None,
) -> Any:
    """A tenacity ``Retrying`` for transient failures: exponential backoff with jitter, then re-raise.

    ``wait_hint`` reads a server's own wish from the failure (HTTP ``Retry-After``); the wait is
    the longer of it and the backoff, and never over ``max_wait_s``.
    """
    tenacity = require("tenacity", purpose="retrying remote requests")
    backoff = tenacity.wait_exponential_jitter(initial=initial_wait_s, max=max_wait_s, jitter=initial_wait_s)

    def wait(state: Any) -> float:
        hint = wait_hint(state.outcome.exception()) if wait_hint is not None and state.outcome is not None else None
        seconds: float = min(max(backoff(state), hint or 0.0), max_wait_s)
        return seconds

    def log_retry(state: Any) -> None:
        error = state.outcome.exception()
        log.warning(
            "%s failed (attempt %d of %d), retrying: %s", what, state.attempt_number, attempts, describe_error(error)
        )

    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        wait=wait,
        retry=tenacity.retry_if_exception(transient),
        before_sleep=log_retry,
        reraise=True,
    )
