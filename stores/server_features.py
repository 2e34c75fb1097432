"""Which Milvus server version a store's settings need, checked before anything is written.

A server older than a feature the spec asks for fails in the middle of a run, with an error from
deep inside Milvus (an unknown data type, an unknown function). ``MilvusStore.check`` and
``prepare`` ask the server for its version first and refuse with a sentence instead::

    the Milvus server at http://127.0.0.1:19530 runs v2.3.5-lite; the store's bm25 field needs
    Milvus >= 2.5 (the built-in BM25 function)

A version that cannot be read (a development build, a managed service that reports a product
name) never blocks: the server is then trusted, and an unsupported request fails as it would have.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

logger = logging.getLogger(__name__)

Version = tuple[int, int, int]


@dataclass(frozen=True)
class Feature:
    """A Milvus capability and the first server release that has it."""

    description: str
    minimum: Version

    @property
    def needs(self) -> str:
        major, minor, patch = self.minimum
        return f"Milvus >= {major}.{minor}" + (f".{patch}" if patch else "")


UPSERT = Feature("upsert", (2, 3, 0))
COSINE_METRIC = Feature("the COSINE metric", (2, 3, 0))
SPARSE_VECTORS = Feature("sparse float vectors", (2, 4, 0))
HYBRID_SEARCH = Feature("hybrid_search", (2, 4, 0))
BM25_FUNCTION = Feature("the built-in BM25 function", (2, 5, 0))
FLOAT16_VECTORS = Feature("float16 vector fields", (2, 4, 0))

# "v2.3.5-lite", "2.5.4", "v2.4.0-rc.1"; Zilliz Cloud answers with a product name that says which
# Milvus it is compatible with, e.g. "Zilliz Cloud Vector Database(Compatible with Milvus 2.5)".
_RELEASE = re.compile(r"v?(\d+)\.(\d+)(?:\.(\d+))?")
_COMPATIBLE = re.compile(r"\bmilvus\s+v?(\d+)\.(\d+)(?:\.(\d+))?", re.IGNORECASE)


def parse_version(reported: str) -> Version | None:
    """The (major, minor, patch) a server reports, or None when the text names no release."""
    text = reported.strip()
    found = _RELEASE.match(text) or _COMPATIBLE.search(text)
    if found is None:
        return None
    major, minor, patch = found.groups()
    return int(major), int(minor), int(patch or 0)


def supports(reported: str, feature: Feature) -> bool:
    """Whether a server reporting ``reported`` has ``feature`` (an unreadable version is trusted)."""
    version = parse_version(reported)
    return version is None or version >= feature.minimum


def required_features(config: Any) -> list[tuple[str, Feature]]:
    """What a MilvusStoreConfig asks of the server: (which setting asks, the feature), in spec order."""
    required = [("the store", UPSERT)]  # every write is an upsert by chunk id
    if config.index.metric == "COSINE" and config.vector_storage != "binary":
        required.append(("the store's index metric", COSINE_METRIC))
    if config.vector_storage == "float16":
        required.append(("the store's vector_storage float16", FLOAT16_VECTORS))
    if config.bm25 is not None:
        required.append(("the store's bm25 field", SPARSE_VECTORS))
        required.append(("the store's bm25 field", BM25_FUNCTION))
    if config.learned_sparse is not None:
        required.append(("the store's learned_sparse field", SPARSE_VECTORS))
    return required


def unsupported(reported: str, config: Any, uri: str) -> list[str]:
    """One sentence per feature the store's settings need that the server reporting ``reported`` lacks.

    A setting that needs several features is named once, with the newest release it needs.
    """
    version = parse_version(reported)
    if version is None:
        return []
    newest: dict[str, Feature] = {}
    for setting, feature in required_features(config):
        if version < feature.minimum and (setting not in newest or feature.minimum > newest[setting].minimum):
            newest[setting] = feature
    where = public_uri(uri)
    return [
        f"the Milvus server at {where} runs {reported.strip()}; {setting} needs {feature.needs} "
        f"({feature.description}). Use a newer server, or remove that setting from the spec"
        for setting, feature in newest.items()
    ]


def server_problems(client: Any, config: Any, uri: str, timeout: float) -> list[str]:
    """:func:`unsupported` for the server ``client`` is connected to; nothing when it will not say."""
    try:
        reported = str(client.get_server_version(timeout=timeout))
    except Exception as exc:  # noqa: BLE001 - a server that hides its version is trusted, not refused
        logger.debug("%s did not report its version: %s", public_uri(uri), type(exc).__name__)
        return []
    return unsupported(reported, config, uri)


def public_uri(uri: str) -> str:
    """``uri`` without user info, query or fragment: safe to print even when they carry a secret."""
    parts = urlsplit(uri)
    if not parts.netloc:
        return uri.split("?", 1)[0].split("#", 1)[0]
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:  # not a number: leave it out rather than fail while reporting
        port = None
    netloc = host if port is None else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


__all__ = [
    "BM25_FUNCTION",
    "COSINE_METRIC",
    "FLOAT16_VECTORS",
    "Feature",
    "HYBRID_SEARCH",
    "SPARSE_VECTORS",
    "UPSERT",
    "Version",
    "parse_version",
    "public_uri",
    "required_features",
    "server_problems",
    "supports",
    "unsupported",
]
