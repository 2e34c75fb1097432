"""The hosted embedding APIs, each spoken as its documentation describes it.

=============  ===========================================  ===============================================
embedder       endpoint (default base_url)                  conventions sent
=============  ===========================================  ===============================================
openai         POST {base_url}/embeddings                   ``dimensions`` (text-embedding-3); any
               (https://api.openai.com/v1)                  OpenAI-compatible server (vLLM, TEI, Ollama,
                                                            LiteLLM) through ``base_url``, with the
                                                            catalog's prefixes for the model it serves
cohere         POST {base_url}/v2/embed                     ``input_type`` search_document / search_query,
               (https://api.cohere.com)                     ``output_dimension`` (embed-v4)
jina           POST {base_url}/embeddings                   ``task`` retrieval.passage / retrieval.query
               (https://api.jina.ai/v1)                     (v3, v4), ``dimensions``, ``late_chunking``
voyage         POST {base_url}/embeddings                   ``input_type`` document / query,
               (https://api.voyageai.com/v1)                ``output_dimension``
mixedbread     POST {base_url}/embeddings                   ``prompt`` (the model's query instruction),
               (https://api.mixedbread.com/v1)              ``dimensions``, ``normalized``
=============  ===========================================  ===============================================

Per-request limits are the documented ones: OpenAI 2048 inputs and 300,000 tokens; Cohere 96
texts; Jina 2048 inputs; Voyage 1000 inputs and 120K-1M tokens depending on the model;
Mixedbread 256 inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from core.types import ChunkedDocument
from embedders.api.base import (
    ApiEmbedder,
    ApiEmbedderConfig,
    Request,
    Side,
    TokenCounter,
)
from embedders.api.transport import MalformedResponse

log = logging.getLogger("rag_pipeline.embed")


# -- OpenAI and OpenAI-compatible servers -------------------------------------------------------------------

OPENAI_BASE_URL = "https://api.openai.com/v1"


class OpenAIConfig(ApiEmbedderConfig):
    model: str = Field(
        "text-embedding-3-small",
        min_length=1,
        description="e.g. text-embedding-3-large, or the model a compatible server serves.",
    )
    base_url: str = Field(
        OPENAI_BASE_URL,
        pattern=r"^https?://",
        description="Another OpenAI-compatible server: vLLM, TEI, Ollama, LiteLLM ...",
    )
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="Environment variable holding the key; null for servers without one."
    )
    max_inputs_per_request: int = Field(2048, ge=1, description="OpenAI: 2048 (TEI's default is 32).")
    max_tokens_per_request: int | None = Field(
        300_000, ge=1, description="OpenAI: 300,000 tokens summed over a request's inputs."
    )


class TiktokenCounter(TokenCounter):
    """Exact cl100k_base counts (OpenAI's embedding models), offline through the packaged BPE file."""

    def __init__(self, encoding: Any):
        self.encoding = encoding

    def count(self, text: str) -> int:
        return len(self.encoding.encode(text, disallowed_special=()))


class OpenAIEmbedder(ApiEmbedder):
    type_name = "openai"
    Config = OpenAIConfig
    config: OpenAIConfig
    provider = "OpenAI"
    default_base_url = OPENAI_BASE_URL
    known_dimensions = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536}
    catalog_prefixes = True  # OpenAI-compatible servers embed the text as sent

    @property
    def provider_label(self) -> str:
        return "openai" if self._official() else "openai-compatible"

    def _official(self) -> bool:
        return self.config.base_url.rstrip("/") == OPENAI_BASE_URL

    def endpoint(self) -> str:
        return f"{self.config.base_url.rstrip('/')}/embeddings"

    def payload(self, texts: list[str], side: Side) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.config.model, "input": texts, "encoding_format": "float"}
        if self.config.dimensions is not None:
            body["dimensions"] = self.config.dimensions
        return body

    def token_counter(self) -> TokenCounter:
        if not self._official():
            return TokenCounter()  # another server's tokenizer: only an estimate makes sense
        try:
            from core.tiktoken_data import get_encoding

            return TiktokenCounter(get_encoding("cl100k_base"))
        except Exception as exc:  # no tiktoken or no BPE file: fall back to the conservative estimate
            log.debug("cl100k_base unavailable (%s); estimating OpenAI tokens from UTF-8 bytes", exc)
            return TokenCounter()


# -- Cohere -------------------------------------------------------------------------------------------------


class CohereConfig(ApiEmbedderConfig):
    model: str = Field(
        "embed-v4.0", min_length=1, description="e.g. embed-v4.0, embed-english-v3.0, embed-multilingual-v3.0."
    )
    base_url: str = Field("https://api.cohere.com", pattern=r"^https?://")
    api_key_env: str | None = Field(
        "CO_API_KEY", description="Environment variable holding the key (Cohere's SDK reads CO_API_KEY)."
    )
    max_inputs_per_request: int = Field(96, ge=1, description="Cohere: 96 texts per call.")
    document_input_type: str = Field("search_document", min_length=1, description="input_type for documents.")
    query_input_type: str = Field("search_query", min_length=1, description="input_type for queries.")
    truncate: Literal["NONE", "START", "END"] = Field(
        "END", description="What Cohere does with over-long texts; NONE makes them errors."
    )


class CohereEmbedder(ApiEmbedder):
    type_name = "cohere"
    Config = CohereConfig
    config: CohereConfig
    provider = "Cohere"
    known_dimensions = {
        "embed-v4.0": 1536,
        "embed-english-v3.0": 1024,
        "embed-multilingual-v3.0": 1024,
        "embed-english-light-v3.0": 384,
        "embed-multilingual-light-v3.0": 384,
    }
    query_settings = ("query_prefix", "query_input_type")

    def endpoint(self) -> str:
        return f"{self.config.base_url.rstrip('/')}/v2/embed"

    def payload(self, texts: list[str], side: Side) -> dict[str, Any]:
        config = self.config
        body: dict[str, Any] = {
            "model": config.model,
            "texts": texts,
            "input_type": config.query_input_type if side == "query" else config.document_input_type,
            "embedding_types": ["float"],
            "truncate": config.truncate,
        }
        if config.dimensions is not None:
            body["output_dimension"] = config.dimensions
        return body

    def read_vectors(self, body: Any, count: int) -> list[Any]:
        embeddings = body.get("embeddings") if isinstance(body, dict) else None
        if isinstance(embeddings, dict):
            embeddings = embeddings.get("float")
        if not isinstance(embeddings, list):
            raise MalformedResponse(self.provider, "the answer has no 'embeddings.float' list")
        return embeddings

    def document_options(self) -> dict[str, Any]:
        options = super().document_options()
        if self.config.document_input_type != "search_document":
            options["input_type"] = self.config.document_input_type
        return options


# -- Jina ---------------------------------------------------------------------------------------------------

# Jina models with task adapters: the task picks the adapter (and Jina adds the task's instruction).
_JINA_TASK_MODELS = ("jina-embeddings-v3", "jina-embeddings-v4")


class JinaConfig(ApiEmbedderConfig):
    model: str = Field(
        "jina-embeddings-v3", min_length=1, description="e.g. jina-embeddings-v3, jina-embeddings-v2-base-en."
    )
    base_url: str = Field("https://api.jina.ai/v1", pattern=r"^https?://")
    api_key_env: str | None = Field("JINA_API_KEY", description="Environment variable holding the key.")
    max_inputs_per_request: int = Field(2048, ge=1, description="Jina: 2048 inputs per request.")
    document_task: str | None = Field(
        None, description="Default: retrieval.passage for v3/v4 models, none for others; '' for none."
    )
    query_task: str | None = Field(
        None, description="Default: retrieval.query for v3/v4 models, none for others; '' for none."
    )
    late_chunking: bool = Field(
        False, description="Embed each document's chunks in one request so they see the whole document."
    )
    late_chunking_max_tokens: int = Field(
        8192, ge=16, description="Estimated tokens of one late-chunking request (the model's context)."
    )
    truncate: bool = Field(True, description="Let Jina cut over-long inputs instead of refusing them.")


class JinaEmbedder(ApiEmbedder):
    type_name = "jina"
    Config = JinaConfig
    config: JinaConfig
    provider = "Jina"
    known_dimensions = {
        "jina-embeddings-v3": 1024,
        "jina-embeddings-v4": 2048,
        "jina-embeddings-v2-base-en": 768,
        "jina-embeddings-v2-small-en": 512,
        "jina-embeddings-v2-base-de": 768,
        "jina-embeddings-v2-base-es": 768,
        "jina-embeddings-v2-base-zh": 768,
        "jina-embeddings-v2-base-code": 768,
        "jina-clip-v2": 1024,
    }
    query_settings = ("query_prefix", "query_task")

    def __init__(self, config: JinaConfig | dict[str, Any] | None = None, /, **settings: Any):
        super().__init__(config, **settings)
        self.split_documents = 0  # late chunking: documents too long for one request, embedded in parts

    def task(self, side: Side) -> str | None:
        configured = self.config.query_task if side == "query" else self.config.document_task
        if configured is not None:
            return configured or None
        if self.config.model in _JINA_TASK_MODELS:
            return "retrieval.query" if side == "query" else "retrieval.passage"
        return None

    def endpoint(self) -> str:
        return f"{self.config.base_url.rstrip('/')}/embeddings"

    def payload(self, texts: list[str], side: Side) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.config.model,
            "input": texts,
            "embedding_type": "float",
            "truncate": self.config.truncate,
        }
        task = self.task(side)
        if task is not None:
            body["task"] = task
        if self.config.dimensions is not None:
            body["dimensions"] = self.config.dimensions
        return body

    def document_options(self) -> dict[str, Any]:
        options = super().document_options()
        task = self.task("document")
        if task is not None and task != "retrieval.passage":
            options["task"] = task
        if self.config.late_chunking:
            options["late_chunking"] = "true"
        return options

    def embed(self, documents: Sequence[ChunkedDocument]) -> None:
        """With ``late_chunking``, one request per document: Jina concatenates a request's inputs and
        pools each chunk."""
        if not self.config.late_chunking:
            super().embed(documents)
            return
        documents = [d for d in documents if d.chunks]
        requests: list[Request] = []
        owners: list[int] = []  # document index of each request
        for number, document in enumerate(documents):
            parts = self._document_requests([c.text for c in document.chunks])
            self.split_documents += len(parts) > 1
            requests += parts
            owners += [number] * len(parts)
        vectors = self._embed_requests(requests, "document", {"late_chunking": True})
        chunks = [c for d in documents for c in d.chunks]
        for chunk, vector in zip(chunks, vectors, strict=True):
            chunk.vectors[self.vector_field] = vector

    def _document_requests(self, texts: list[str]) -> list[Request]:
        """A document's chunks in as few requests as the late-chunking context and input limit allow."""
        config = self.config
        return self.pack(texts, "document", config.max_inputs_per_request, config.late_chunking_max_tokens)

    def begin_run(self) -> None:
        super().begin_run()
        self.split_documents = 0

    def run_notes(self) -> list[str]:
        notes = super().run_notes()
        if self.split_documents:
            notes.append(
                f"Jina late chunking: {self.split_documents} documents longer than "
                f"{self.config.late_chunking_max_tokens} (estimated) tokens were embedded in several parts; chunks see "
                "only their own part"
            )
        return notes


# -- Voyage -------------------------------------------------------------------------------------------------

# Documented tokens per request; models not listed get the smallest cap.
_VOYAGE_TOKEN_LIMITS = {"voyage-3.5-lite": 1_000_000, "voyage-3.5": 320_000, "voyage-2": 320_000}
_VOYAGE_DEFAULT_TOKEN_LIMIT = 120_000


class VoyageConfig(ApiEmbedderConfig):
    model: str = Field("voyage-3.5", min_length=1, description="e.g. voyage-3.5, voyage-3-large, voyage-code-3.")
    base_url: str = Field("https://api.voyageai.com/v1", pattern=r"^https?://")
    api_key_env: str | None = Field("VOYAGE_API_KEY", description="Environment variable holding the key.")
    max_inputs_per_request: int = Field(1000, ge=1, description="Voyage: 1000 inputs per request.")
    max_tokens_per_request: int | None = Field(
        None, ge=1, description="Default: the model's documented cap (120K to 1M tokens)."
    )
    document_input_type: str | None = Field("document", description="input_type for documents; null for none.")
    query_input_type: str | None = Field("query", description="input_type for queries; null for none.")
    truncation: bool = Field(True, description="Let Voyage cut over-long inputs instead of refusing them.")


class VoyageEmbedder(ApiEmbedder):
    type_name = "voyage"
    Config = VoyageConfig
    config: VoyageConfig
    provider = "Voyage"
    known_dimensions = {
        "voyage-3.5": 1024,
        "voyage-3.5-lite": 1024,
        "voyage-3-large": 1024,
        "voyage-3": 1024,
        "voyage-3-lite": 512,
        "voyage-code-3": 1024,
        "voyage-finance-2": 1024,
        "voyage-law-2": 1024,
        "voyage-multilingual-2": 1024,
        "voyage-2": 1024,
        "voyage-large-2": 1536,
        "voyage-code-2": 1536,
    }
    query_settings = ("query_prefix", "query_input_type")

    def token_limit(self) -> int | None:
        configured = self.config.max_tokens_per_request
        return configured or _VOYAGE_TOKEN_LIMITS.get(self.config.model, _VOYAGE_DEFAULT_TOKEN_LIMIT)

    def endpoint(self) -> str:
        return f"{self.config.base_url.rstrip('/')}/embeddings"

    def payload(self, texts: list[str], side: Side) -> dict[str, Any]:
        config = self.config
        body: dict[str, Any] = {
            "model": config.model,
            "input": texts,
            "input_type": config.query_input_type if side == "query" else config.document_input_type,
            "truncation": config.truncation,
            "output_dtype": "float",
        }
        if config.dimensions is not None:
            body["output_dimension"] = config.dimensions
        return body

    def document_options(self) -> dict[str, Any]:
        options = super().document_options()
        if self.config.document_input_type != "document":
            options["input_type"] = self.config.document_input_type
        return options


# -- Mixedbread ---------------------------------------------------------------------------------------------


class MixedbreadConfig(ApiEmbedderConfig):
    model: str = Field("mixedbread-ai/mxbai-embed-large-v1", min_length=1)
    base_url: str = Field("https://api.mixedbread.com/v1", pattern=r"^https?://")
    api_key_env: str | None = Field(
        "MXBAI_API_KEY", description="Environment variable holding the key (Mixedbread's SDK reads MXBAI_API_KEY)."
    )
    max_inputs_per_request: int = Field(256, ge=1, description="Mixedbread: 256 inputs per request.")
    normalized: bool = Field(True, description="Ask for unit-length vectors.")


class MixedbreadEmbedder(ApiEmbedder):
    """Prefixes go in the API's ``prompt`` field (the server prepends it), taken from the catalog by default."""

    type_name = "mixedbread"
    Config = MixedbreadConfig
    config: MixedbreadConfig
    provider = "Mixedbread"
    known_dimensions = {"mixedbread-ai/mxbai-embed-large-v1": 1024, "mixedbread-ai/mxbai-embed-2d-large-v1": 1024}
    catalog_prefixes = True

    def prepare(self, text: str, side: Side) -> str:
        return text if text.strip() else " "  # the prompt travels separately

    def endpoint(self) -> str:
        return f"{self.config.base_url.rstrip('/')}/embeddings"

    def payload(self, texts: list[str], side: Side) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.config.model,
            "input": texts,
            "normalized": self.config.normalized,
            "encoding_format": "float",
        }
        prompt = self.query_prefix if side == "query" else self.document_prefix
        if prompt:
            body["prompt"] = prompt
        if self.config.dimensions is not None:
            body["dimensions"] = self.config.dimensions
        return body

    def document_options(self) -> dict[str, Any]:
        options = super().document_options()
        if not self.config.normalized:
            options["normalized"] = "false"
        return options
