"""Pooling token embeddings into one vector per text, correct for left and right padding.

Every function takes the encoder's ``hidden`` states, shape ``(batch, tokens, dim)``, and the
tokenizer's ``attention_mask``, shape ``(batch, tokens)`` with 1 for real tokens and 0 for padding,
and returns float32 ``(batch, dim)``. Nothing assumes which side the padding is on: decoder-style
embedders pad on the left, BERT-style ones on the right, and both give the same vector for a text
as encoding it alone. Pooling runs in float32 whatever the model's dtype, so half-precision models
do not lose precision in long sums.

torch is only touched through the tensors passed in, so importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

from core.models import Pooling


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Average of the real tokens' vectors (a text with no tokens gives zeros)."""
    values = hidden.float()
    mask = attention_mask.unsqueeze(-1).to(values)
    counts = mask.sum(dim=1).clamp(min=1.0)
    return (values * mask).sum(dim=1) / counts


def max_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Element-wise maximum over the real tokens (a text with no tokens gives zeros)."""
    real = attention_mask.unsqueeze(-1).to(hidden.device).bool()
    masked = hidden.float().masked_fill(~real, float("-inf"))
    pooled = masked.max(dim=1).values
    return pooled.masked_fill(~real.any(dim=1), 0.0)


def first_token_positions(attention_mask: Tensor) -> Tensor:
    """Index of each row's first real token: 0 with right padding, the pad count with left padding."""
    # argmax returns the first maximum, i.e. the first 1 in the mask.
    return attention_mask.int().argmax(dim=1)


def last_token_positions(attention_mask: Tensor) -> Tensor:
    """Index of each row's last real token, whichever side the padding is on."""
    width = attention_mask.shape[1]
    return width - 1 - attention_mask.int().flip(dims=[1]).argmax(dim=1)


def _gather_rows(hidden: Tensor, positions: Tensor) -> Tensor:
    """hidden[i, positions[i]] for every row i."""
    index = positions.to(hidden.device).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
    return hidden.gather(1, index).squeeze(1).float()


def cls_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """The first real token's vector ([CLS] for BERT-style models, even when padded on the left)."""
    return _gather_rows(hidden, first_token_positions(attention_mask))


def last_token_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """The last real token's vector (decoder-style embedders, e.g. with an EOS token appended)."""
    return _gather_rows(hidden, last_token_positions(attention_mask))


POOLERS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mean": mean_pool,
    "cls": cls_pool,
    "last": last_token_pool,
    "max": max_pool,
}


def pool(method: Pooling, hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Dispatch on the pooling name used in configs (``mean``, ``cls``, ``last``, ``max``)."""
    try:
        pooler = POOLERS[method]
    except KeyError:
        raise ValueError(f"unknown pooling {method!r}; expected one of {', '.join(POOLERS)}") from None
    return pooler(hidden, attention_mask)


def without_leading_tokens(attention_mask: Tensor, count: int) -> Tensor:
    """The mask with each row's first ``count`` real tokens masked out, whichever side the padding is on.

    Instructor and GritLM pool only the text's tokens, not the instruction in front of it; a row's
    rank among its real tokens (a running sum of the mask) says which ones those are.
    """
    if count <= 0:
        return attention_mask
    rank = attention_mask.long().cumsum(dim=1)
    return attention_mask * (rank > count).to(attention_mask.dtype)


def l2_normalize(vectors: Tensor) -> Tensor:
    """Rows scaled to unit length; all-zero rows stay zero instead of becoming NaN."""
    norms = vectors.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    normalized: Tensor = vectors / norms
    return normalized
