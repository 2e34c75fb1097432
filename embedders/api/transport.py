"""Calling an embedding API politely: rate limits, retries with backoff, errors that name the provider.

* :class:`RateLimiter`: token buckets for requests per minute and tokens per minute, shared by
  every worker thread, plus a shared pause when the server answers 429 with ``Retry-After``.
* :class:`RetryPolicy`: which failures are retried (429, 408, 409, 5xx, timeouts, dropped
  connections) and how long to wait (the server's ``Retry-After`` / ``retry-after-ms`` when it
  sends one, else exponential backoff with full jitter). 400, 401, 403, 404 and 422 are never
  retried: the same request would fail again, so the run stops with a message naming the provider
  and the HTTP status.
* :class:`ApiTransport`: one ``httpx.Client`` per embedder; ``post_json`` sends one request under
  the limits and returns the parsed JSON body.

The API key is read from the environment by the caller and handed to ``post_json`` per request; it
is never stored here, logged, or put into an exception: the caller registers it with
:mod:`core.secrets`, error texts built from server answers go through its scrubber (which also
finds the key JSON-escaped, percent-encoded, base64-encoded or in pieces), and auth failures carry
no server text at all.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any

from core.component import require
from core.errors import PipelineError
from core.secrets import scrub

log = logging.getLogger("rag_pipeline.embed")

RETRIED_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
AUTH_STATUSES = frozenset({401, 403})


class EmbeddingApiError(PipelineError):
    """An embedding API call that failed for good; the message names the provider and never the key."""

    def __init__(self, provider: str, message: str, status: int | None = None):
        self.provider = provider
        self.status = status
        super().__init__(f"{provider}: {message}")


class MalformedResponse(EmbeddingApiError):
    """A 2xx answer that is not what the API documents (not JSON, wrong count, wrong size ...)."""


class TokenBucket:
    """``rate_per_minute`` units per minute, at most one second's worth in a burst.

    A request costing more than the bucket holds may go once the bucket is full; it leaves a debt
    that later requests wait out, so the average rate holds for large requests too.
    """

    def __init__(self, rate_per_minute: float, clock: Callable[[], float] = time.monotonic):
        self.rate = rate_per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self.clock = clock
        self.updated = clock()

    def wait_time(self, cost: float) -> float:
        """Seconds until a request of ``cost`` may go (0: now). Call with the limiter's lock held."""
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now
        needed = min(cost, self.capacity)
        return 0.0 if self.level >= needed else (needed - self.level) / self.rate

    def take(self, cost: float) -> None:
        self.level -= cost


class RateLimiter:
    """Request and token budgets shared by all workers of one embedder."""

    def __init__(
        self,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.requests = TokenBucket(requests_per_minute, clock) if requests_per_minute else None
        self.tokens = TokenBucket(tokens_per_minute, clock) if tokens_per_minute else None
        self.clock = clock
        self.sleep = sleep
        self.paused_until = 0.0
        self.waited_seconds = 0.0
        self._lock = threading.Lock()

    def acquire(self, tokens: int) -> None:
        """Block until one request of ``tokens`` tokens fits both budgets and any shared pause is over."""
        while True:
            with self._lock:
                wait = max(self.paused_until - self.clock(), 0.0)
                for bucket, cost in ((self.requests, 1), (self.tokens, tokens)):
                    if bucket is not None:
                        wait = max(wait, bucket.wait_time(cost))
                if wait <= 0:
                    for bucket, cost in ((self.requests, 1), (self.tokens, tokens)):
                        if bucket is not None:
                            bucket.take(cost)
                    return
                self.waited_seconds += wait
            self.sleep(wait)

    def pause(self, seconds: float) -> None:
        """Hold every worker back for ``seconds`` (the server said it is overloaded)."""
        with self._lock:
            self.paused_until = max(self.paused_until, self.clock() + seconds)


def retry_after_seconds(headers: Any, now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> float | None:
    """The wait a response asks for: ``retry-after-ms``, else ``Retry-After`` in seconds or as an HTTP date."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        try:
            return max(float(milliseconds) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return max((moment - now()).total_seconds(), 0.0)


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 6
    backoff_base_seconds: float = 1.0
    backoff_max_seconds: float = 60.0
    max_retry_after_seconds: float = 300.0  # a server asking for a longer wait fails the call instead
    jitter: Callable[[float, float], float] = field(default=random.uniform, compare=False)

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2^attempt)] (attempt 0 is the first retry)."""
        return self.jitter(0.0, min(self.backoff_max_seconds, self.backoff_base_seconds * 2.0**attempt))

    def after_server_wait(self, seconds: float) -> float:
        """The server's wait plus up to 10% (at most 1 s), so workers do not all return at once."""
        return seconds + self.jitter(0.0, min(1.0, 0.1 * seconds))


@dataclass
class CallStats:
    """What retries a run needed (for its summary)."""

    requests: int = 0
    retried: dict[str, int] = field(default_factory=dict)  # reason -> count

    def add_retry(self, reason: str) -> None:
        self.retried[reason] = self.retried.get(reason, 0) + 1


def excerpt(text: str) -> str:
    """A server's answer for a message: scrubbed of every registered secret (before the cut, so the
    cut cannot leave a piece too short to be recognised), squeezed to one line, cut to 300 characters."""
    text = " ".join(scrub(text).split())
    return text if len(text) <= 300 else text[:297] + "..."


def status_text(status: int) -> str:
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


class ApiTransport:
    """POSTs JSON to one provider with rate limiting and retries; thread-safe."""

    def __init__(
        self,
        provider: str,
        *,
        timeout_seconds: float,
        max_connections: int,
        limiter: RateLimiter,
        policy: RetryPolicy,
        key_hint: str,
        sleep: Callable[[float], None] = time.sleep,
    ):
        httpx = require("httpx", purpose="API embedders")
        self.provider = provider
        self.limiter = limiter
        self.policy = policy
        self.key_hint = key_hint  # how to fix a refused key, e.g. "the key in $OPENAI_API_KEY"
        self.sleep = sleep
        self.stats = CallStats()
        self._stats_lock = threading.Lock()
        self._httpx = httpx
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout_seconds),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    def close(self) -> None:
        self._client.close()

    def post_json(self, url: str, payload: dict[str, Any], *, api_key: str | None, tokens: int) -> Any:
        """The parsed JSON answer to ``payload``, after as many retries as the policy allows."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        body = json.dumps(payload).encode("utf-8")
        last_problem = ""
        for attempt in range(self.policy.max_retries + 1):
            self.limiter.acquire(tokens)
            with self._stats_lock:
                self.stats.requests += 1
            try:
                response = self._client.post(url, content=body, headers=headers)
            except self._httpx.TimeoutException:
                last_problem, reason, wait = "timed out", "timeout", self.policy.backoff(attempt)
            except self._httpx.TransportError as exc:
                last_problem = f"connection failed ({type(exc).__name__})"
                reason, wait = "connection", self.policy.backoff(attempt)
            else:
                if response.is_success:
                    return self._json(response)
                status = response.status_code
                if status not in RETRIED_STATUSES:
                    raise self._refusal(response)
                last_problem = (
                    f"{status_text(status)}: {excerpt(response.text)}" if response.text else status_text(status)
                )
                reason = "rate limited" if status == 429 else f"HTTP {status}"
                wait = self._wait_for(response, attempt, last_problem)
            if attempt == self.policy.max_retries:
                break
            with self._stats_lock:
                self.stats.add_retry(reason)
            log.warning(
                "%s: %s; retrying in %.1f s (retry %d of %d)",
                self.provider,
                last_problem,
                wait,
                attempt + 1,
                self.policy.max_retries,
            )
            self.sleep(wait)
        raise EmbeddingApiError(
            self.provider, f"gave up after {self.policy.max_retries + 1} attempts; last: {last_problem}"
        )

    def _wait_for(self, response: Any, attempt: int, problem: str) -> float:
        asked = retry_after_seconds(response.headers)
        if asked is None:
            return self.policy.backoff(attempt)
        if asked > self.policy.max_retry_after_seconds:
            raise EmbeddingApiError(
                self.provider,
                f"{problem}; the server asks to wait {asked:.0f} s, more than max_retry_after_seconds "
                f"({self.policy.max_retry_after_seconds:.0f} s): check the account's quota",
                response.status_code,
            )
        wait = self.policy.after_server_wait(asked)
        if response.status_code == 429:
            self.limiter.pause(wait)  # the whole account is limited, not just this worker
        return wait

    def _refusal(self, response: Any) -> EmbeddingApiError:
        status = response.status_code
        if status in AUTH_STATUSES:
            # No server text: some providers echo part of the key back.
            return EmbeddingApiError(
                self.provider,
                f"{status_text(status)}: the API refused {self.key_hint}; check that it is valid and allowed to use "
                "this model",
                status,
            )
        detail = excerpt(response.text) if response.text else "no details"
        return EmbeddingApiError(self.provider, f"{status_text(status)} (not retried): {detail}", status)

    def _json(self, response: Any) -> Any:
        try:
            return response.json()
        except ValueError:
            kind = response.headers.get("content-type", "no content type")
            raise MalformedResponse(
                self.provider,
                f"answered {status_text(response.status_code)} with a body that is not JSON ({kind}): "
                f"{excerpt(response.text)!r}",
            ) from None
