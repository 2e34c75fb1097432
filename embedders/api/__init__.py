"""Embedders backed by hosted APIs: OpenAI (and OpenAI-compatible servers), Cohere, Jina, Voyage, Mixedbread.

Spec usage (``type:`` names are registered in :mod:`core.registry`)::

    embedder: {type: openai, model: text-embedding-3-small, dimensions: 512}
    embedder: {type: openai, model: BAAI/bge-m3, base_url: http://localhost:8000/v1, api_key_env: null}
    embedder: {type: cohere, model: embed-v4.0}
    embedder: {type: jina, model: jina-embeddings-v3, late_chunking: true}
    embedder: {type: voyage, model: voyage-3.5}
    embedder: {type: mixedbread, model: mixedbread-ai/mxbai-embed-large-v1}

API keys are read from the environment variable named by ``api_key_env`` (``OPENAI_API_KEY``,
``CO_API_KEY``, ``JINA_API_KEY``, ``VOYAGE_API_KEY``, ``MXBAI_API_KEY`` by default), never from the spec.
"""

from embedders.api.base import ApiEmbedder, ApiEmbedderConfig, TokenCounter
from embedders.api.providers import (
    CohereConfig,
    CohereEmbedder,
    JinaConfig,
    JinaEmbedder,
    MixedbreadConfig,
    MixedbreadEmbedder,
    OpenAIConfig,
    OpenAIEmbedder,
    VoyageConfig,
    VoyageEmbedder,
)
from embedders.api.transport import (
    EmbeddingApiError,
    MalformedResponse,
    RateLimiter,
    RetryPolicy,
)

__all__ = [
    "ApiEmbedder",
    "ApiEmbedderConfig",
    "CohereConfig",
    "CohereEmbedder",
    "EmbeddingApiError",
    "JinaConfig",
    "JinaEmbedder",
    "MalformedResponse",
    "MixedbreadConfig",
    "MixedbreadEmbedder",
    "OpenAIConfig",
    "OpenAIEmbedder",
    "RateLimiter",
    "RetryPolicy",
    "TokenCounter",
    "VoyageConfig",
    "VoyageEmbedder",
]
