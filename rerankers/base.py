"""The reranker contract: score (query, passage) pairs; higher means more relevant."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from pydantic import Field

from core.component import Component, ComponentConfig
from core.errors import PipelineError


class RerankerError(PipelineError):
    """A reranker model that cannot be found, loaded or run."""


class RerankerConfig(ComponentConfig):
    top_n: int = Field(
        20,
        ge=1,
        description="How many of the best retrieved chunks are rescored; the rest keep their order after them.",
    )
    batch_size: int = Field(16, ge=1, description="Pairs per forward pass.")
    device: str = Field("cpu", pattern=r"^(cpu|mps|(cuda|xpu)(:\d+)?)$")


class Reranker(Component):
    kind = "reranker"
    Config: ClassVar[type[RerankerConfig]] = RerankerConfig
    config: RerankerConfig

    @property
    @abstractmethod
    def model_id(self) -> str: ...

    @abstractmethod
    def score(self, query: str, passages: Sequence[str]) -> list[float]:
        """One score per passage, in input order; higher is more relevant. Safe to call from several threads."""

    def rerank(self, query: str, passages: Sequence[str]) -> list[tuple[int, float]]:
        """(index into ``passages``, score) for every passage, best first; ties keep the input order."""
        scores = self.score(query, passages)
        return sorted(enumerate(scores), key=lambda pair: -pair[1])

    def fingerprint_settings(self) -> dict[str, Any]:
        settings = self.to_dict()
        for key in ("batch_size", "device", "top_n"):
            settings.pop(key, None)
        return settings
