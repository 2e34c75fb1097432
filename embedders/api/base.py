"""What every hosted-API embedder shares: settings, the API key, batching, concurrency, checks.

A provider subclass (:mod:`embedders.api.providers`) says where to POST, how to spell one request
and how to read the answer; :class:`ApiEmbedder` does the rest:

* **batching** to the provider's documented limits: at most ``max_inputs_per_request`` texts and,
  where the provider caps a request's tokens, at most ``max_tokens_per_request`` (estimated; see
  :class:`TokenCounter`);
* **bounded concurrency**: ``max_concurrency`` requests in flight, answers put back in input order;
* **rate limits and retries**: :mod:`embedders.api.transport`;
* **answer checks**: one vector per input, in order, each with the expected number of finite
  values; anything else is a :class:`~embedders.api.transport.MalformedResponse`;
* **the API key** comes from the environment variable named by ``api_key_env``, read at each
  request; it is never part of the settings, ``to_dict()``, ``repr()``, logs or errors;
* **identity up front**: ``dimension`` is the configured ``dimensions``, the documented size of a
  known model, or the length of one probe embedding; ``model_id`` names the provider, the model
  and every setting that changes document vectors.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import ConfigDict, Field, field_validator

from core.component import ComponentConfig
from core.secrets import register_secret
from embedders.api.transport import (
    ApiTransport,
    EmbeddingApiError,
    MalformedResponse,
    RateLimiter,
    RetryPolicy,
)
from embedders.base import Embedder
from embedders.catalog import find_family

Side = Literal["query", "document"]

# Settings that change how fast or how politely vectors are fetched, never which vectors.
TRANSPORT_SETTINGS = (
    "base_url",
    "api_key_env",
    "max_inputs_per_request",
    "max_tokens_per_request",
    "max_concurrency",
    "requests_per_minute",
    "tokens_per_minute",
    "timeout_seconds",
    "max_retries",
    "backoff_base_seconds",
    "backoff_max_seconds",
    "max_retry_after_seconds",
)

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PROBE_TEXT = "dimension probe"


class ApiEmbedderConfig(ComponentConfig):
    # A mistyped setting must never echo its value: it may be a key pasted into the wrong place.
    model_config = ConfigDict(**ComponentConfig.model_config, hide_input_in_errors=True)

    model: str = Field(..., min_length=1, description="The provider's model name.")
    base_url: str = Field(..., pattern=r"^https?://", description="API root, e.g. https://api.openai.com/v1.")
    api_key_env: str | None = Field(
        ..., description="Name of the environment variable holding the API key; null for none."
    )
    dimensions: int | None = Field(
        None, ge=1, description="Output size the API is asked for (Matryoshka models); default: the model's."
    )
    query_prefix: str | None = Field(
        None, description="Prepended to queries before sending; default: the catalog's for the model, else none."
    )
    document_prefix: str | None = Field(
        None, description="Prepended to documents before sending; default: the catalog's, else none."
    )
    max_inputs_per_request: int = Field(..., ge=1, description="Texts per request (the provider's documented limit).")
    max_tokens_per_request: int | None = Field(
        None, ge=1, description="Estimated tokens per request, where the provider caps them."
    )
    max_concurrency: int = Field(4, ge=1, le=64, description="Requests in flight at once.")
    requests_per_minute: float | None = Field(None, gt=0, description="Client-side request budget (token bucket).")
    tokens_per_minute: float | None = Field(
        None, gt=0, description="Client-side token budget (token bucket, estimated tokens)."
    )
    timeout_seconds: float = Field(60.0, gt=0, description="Per request; a timeout is retried.")
    max_retries: int = Field(6, ge=0, description="Retries of 429, 5xx, timeouts and dropped connections.")
    backoff_base_seconds: float = Field(
        1.0, gt=0, description="First backoff ceiling; doubles per retry (full jitter)."
    )
    backoff_max_seconds: float = Field(60.0, gt=0, description="Largest backoff ceiling.")
    max_retry_after_seconds: float = Field(
        300.0, gt=0, description="Fail instead of waiting longer than this for Retry-After."
    )

    @field_validator("api_key_env")
    @classmethod
    def _names_a_variable(cls, value: str | None) -> str | None:
        if value is None:
            return None
        looks_like_a_key = len(value) >= 24 and any(c.islower() for c in value) and any(c.isdigit() for c in value)
        if not _ENV_NAME.match(value) or looks_like_a_key:
            raise ValueError(
                "api_key_env takes the NAME of the environment variable that holds the key (e.g. OPENAI_API_KEY), "
                "never the key itself; export the key in that variable"
            )
        return value


class TokenCounter:
    """Estimated tokens of a text: a conservative guess for request and rate budgets.

    UTF-8 bytes / 3 over-counts typical English (about 4 bytes per token) and roughly matches CJK
    text, so budgets built on it stay under the real limits for most inputs.
    """

    def count(self, text: str) -> int:
        return len(text.encode("utf-8")) // 3 + 1


@dataclass(frozen=True)
class Request:
    """One batch: its texts (prefixes applied) and their estimated tokens."""

    texts: list[str]
    tokens: int


class ApiEmbedder(Embedder):
    """Base of the hosted-API embedders; subclasses implement :meth:`endpoint`, :meth:`payload` and
    :meth:`read_vectors`."""

    Config: ClassVar[type[ApiEmbedderConfig]] = ApiEmbedderConfig
    config: ApiEmbedderConfig
    provider: ClassVar[str] = ""  # as users know it, e.g. "OpenAI"
    default_base_url: ClassVar[str] = ""
    known_dimensions: ClassVar[dict[str, int]] = {}  # documented default output size per model
    catalog_prefixes: ClassVar[bool] = False  # the server adds no model prompts: take them from the catalog
    # Settings of a subclass that only shape query vectors (left out of the fingerprint).
    query_settings: ClassVar[tuple[str, ...]] = ("query_prefix",)

    def __init__(self, config: ApiEmbedderConfig | dict[str, Any] | None = None, /, **settings: Any):
        super().__init__(config, **settings)
        self._dimension: int | None = None
        self._transport: ApiTransport | None = None
        self._lock = threading.RLock()
        self._requests_before_run = 0
        self._retries_before_run: dict[str, int] = {}
        self._waited_before_run = 0.0

    # -- identity ---------------------------------------------------------------------------------

    @property
    def provider_label(self) -> str:
        """The provider as model ids name it (``openai-compatible`` for another server speaking OpenAI's API)."""
        return self.type_name

    @property
    def dimension(self) -> int:
        with self._lock:
            if self._dimension is None:
                self._dimension = (
                    self.config.dimensions or self.known_dimensions.get(self.config.model) or self._probe_dimension()
                )
            return self._dimension

    @property
    def model_id(self) -> str:
        options = [f"{name}={value}" for name, value in self.document_options().items()]
        name = f"{self.provider_label}/{self.config.model}"
        return f"{name} ({', '.join(options)})" if options else name

    def document_options(self) -> dict[str, Any]:
        """Settings besides the model that change document vectors, spelled for ``model_id``."""
        options: dict[str, Any] = {}
        if self.config.dimensions is not None:
            options["dimensions"] = self.config.dimensions
        if self.document_prefix:
            options["document_prefix"] = repr(self.document_prefix)
        return options

    def fingerprint_settings(self) -> dict[str, Any]:
        excluded = TRANSPORT_SETTINGS + self.query_settings
        settings = {k: v for k, v in self.to_dict().items() if k not in excluded}
        return {**settings, "model_id": self.model_id}

    @property
    def query_prefix(self) -> str:
        return self._prefix("query")

    @property
    def document_prefix(self) -> str:
        return self._prefix("document")

    def _prefix(self, side: Side) -> str:
        configured = self.config.query_prefix if side == "query" else self.config.document_prefix
        if configured is not None:
            return configured
        family = find_family(self.config.model) if self.catalog_prefixes else None
        if family is None:
            return ""
        return family.query_prefix if side == "query" else family.document_prefix

    # -- the provider's protocol (subclasses) -------------------------------------------------------

    def endpoint(self) -> str:
        raise NotImplementedError

    def payload(self, texts: list[str], side: Side) -> dict[str, Any]:
        """The JSON body for one request."""
        raise NotImplementedError

    def read_vectors(self, body: Any, count: int) -> list[Any]:
        """The answer's vectors in input order (still unchecked lists of numbers); most providers
        answer in OpenAI's shape (``data[i].embedding``)."""
        return openai_style_vectors(self.provider, body, count)

    def token_counter(self) -> TokenCounter:
        return TokenCounter()

    def token_limit(self) -> int | None:
        """Estimated tokens one request may carry (None: no documented cap)."""
        return self.config.max_tokens_per_request

    def prepare(self, text: str, side: Side) -> str:
        """The text as sent: with the side's prefix; empty texts become one space (most APIs refuse "")."""
        return self._prefix(side) + text if text.strip() else self._prefix(side) + " "

    # -- embedding ----------------------------------------------------------------------------------

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        return self._embed_requests(self.batches(texts, "document"), "document")

    def embed_query(self, text: str) -> np.ndarray:
        vector: np.ndarray = self._embed_requests(self.batches([text], "query"), "query")[0]
        return vector

    def batches(self, texts: Sequence[str], side: Side) -> list[Request]:
        """Consecutive runs of texts within the per-request input and token limits (input order kept)."""
        return self.pack(texts, side, self.config.max_inputs_per_request, self.token_limit())

    def pack(self, texts: Sequence[str], side: Side, max_inputs: int, max_tokens: int | None) -> list[Request]:
        """Texts (prefixed for ``side``) in consecutive requests of at most ``max_inputs`` texts and,
        when given, ``max_tokens`` estimated tokens; a single text over the budget goes alone."""
        counter = self.token_counter()
        requests: list[Request] = []
        current: list[str] = []
        tokens = 0
        for text in texts:
            prepared = self.prepare(text, side)
            cost = counter.count(prepared)
            full = len(current) >= max_inputs or (max_tokens is not None and current and tokens + cost > max_tokens)
            if full:
                requests.append(Request(current, tokens))
                current, tokens = [], 0
            current.append(prepared)
            tokens += cost
        if current:
            requests.append(Request(current, tokens))
        return requests

    def _embed_requests(self, requests: list[Request], side: Side, extra: dict[str, Any] | None = None) -> np.ndarray:
        """Vectors of all requests' texts, in order; requests run ``max_concurrency`` at a time."""
        if not requests:
            return np.zeros((0, self.dimension), dtype=np.float32)
        call: Callable[[Request], np.ndarray] = lambda request: self._call(request, side, extra)  # noqa: E731
        if len(requests) == 1 or self.config.max_concurrency == 1:
            parts = [call(r) for r in requests]
        else:
            with ThreadPoolExecutor(
                max_workers=self.config.max_concurrency, thread_name_prefix=f"{self.type_name}-embed"
            ) as pool:
                futures = [pool.submit(call, r) for r in requests]
                try:
                    parts = [f.result() for f in futures]
                except BaseException:
                    for future in futures:  # queued requests are pointless once one failed for good
                        future.cancel()
                    raise
        return np.concatenate(parts)

    def _call(self, request: Request, side: Side, extra: dict[str, Any] | None = None) -> np.ndarray:
        body = self.transport.post_json(
            self.endpoint(),
            {**self.payload(request.texts, side), **(extra or {})},
            api_key=self._api_key(),
            tokens=request.tokens,
        )
        return self._checked(self.read_vectors(body, len(request.texts)), len(request.texts))

    def _checked(self, rows: list[Any], count: int) -> np.ndarray:
        if len(rows) != count:
            raise MalformedResponse(self.provider, f"returned {len(rows)} embeddings for {count} inputs")
        expected = self._dimension or self.config.dimensions or self.known_dimensions.get(self.config.model)
        for number, row in enumerate(rows):
            if (
                not isinstance(row, list)
                or not row
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row)
            ):
                raise MalformedResponse(self.provider, f"embedding {number} is not a list of numbers")
            if expected is not None and len(row) != expected:
                raise MalformedResponse(self.provider, f"embedding {number} has {len(row)} values, expected {expected}")
            expected = len(row)
        vectors = np.asarray(rows, dtype=np.float32)
        if not np.isfinite(vectors).all():
            raise MalformedResponse(self.provider, "an embedding holds NaN or infinite values")
        with self._lock:
            if self._dimension is None:  # the first answer fixes the size every later one must have
                self._dimension = vectors.shape[1]
        return vectors

    def _probe_dimension(self) -> int:
        """The model's output size, from one embedding (models the table does not know)."""
        return int(self._call(Request([self.prepare(PROBE_TEXT, "document")], 4), "document").shape[1])

    # -- key, transport, run notes --------------------------------------------------------------------

    def _api_key(self) -> str | None:
        variable = self.config.api_key_env
        if variable is None:
            return None
        key = os.environ.get(variable, "").strip()
        if not key:
            raise EmbeddingApiError(
                self.provider,
                f"the API key is read from the environment variable {variable}, which is not set; export it, or set "
                f"api_key_env to the variable that holds the key (null for a server without authentication)",
            )
        register_secret(key)  # from now on every error text and log line is scrubbed of it
        return key

    @property
    def transport(self) -> ApiTransport:
        with self._lock:
            if self._transport is None:
                config = self.config
                self._transport = ApiTransport(
                    self.provider,
                    timeout_seconds=config.timeout_seconds,
                    max_connections=config.max_concurrency,
                    limiter=RateLimiter(config.requests_per_minute, config.tokens_per_minute),
                    policy=RetryPolicy(
                        max_retries=config.max_retries,
                        backoff_base_seconds=config.backoff_base_seconds,
                        backoff_max_seconds=config.backoff_max_seconds,
                        max_retry_after_seconds=config.max_retry_after_seconds,
                    ),
                    key_hint=f"the key in ${config.api_key_env}"
                    if config.api_key_env
                    else "the request (no API key is configured)",
                )
            return self._transport

    def close(self) -> None:
        with self._lock:
            if self._transport is not None:
                self._transport.close()
                self._transport = None

    def begin_run(self) -> None:
        stats = self.transport.stats
        self._requests_before_run = stats.requests
        self._retries_before_run = dict(stats.retried)
        self._waited_before_run = self.transport.limiter.waited_seconds

    def run_notes(self) -> list[str]:
        if self._transport is None:
            return []
        stats = self._transport.stats
        notes = []
        retried = {k: v - self._retries_before_run.get(k, 0) for k, v in stats.retried.items()}
        retried = {k: v for k, v in retried.items() if v}
        if retried:
            reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(retried.items()))
            notes.append(
                f"{self.provider}: {sum(retried.values())} of {stats.requests - self._requests_before_run} requests "
                f"retried ({reasons})"
            )
        waited = self._transport.limiter.waited_seconds - self._waited_before_run
        if waited >= 1:
            notes.append(f"{self.provider}: waited {math.ceil(waited)} s for the client-side rate limits")
        return notes


def openai_style_vectors(provider: str, body: Any, count: int) -> list[Any]:
    """``{"data": [{"index": i, "embedding": [...]}, ...]}`` (OpenAI, Jina, Voyage, Mixedbread) in input order."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise MalformedResponse(provider, "the answer has no 'data' list of embeddings")
    if len(data) != count:
        raise MalformedResponse(provider, f"returned {len(data)} embeddings for {count} inputs")
    rows: dict[int, Any] = {}
    for position, item in enumerate(data):
        if not isinstance(item, dict) or "embedding" not in item:
            raise MalformedResponse(provider, f"data item {position} has no 'embedding'")
        index = item.get("index", position)  # order is by index; an answer without indices is in input order
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < count or index in rows:
            raise MalformedResponse(provider, f"data item {position} has a repeated or out-of-range index {index!r}")
        rows[index] = item["embedding"]
    return [rows[i] for i in range(count)]
