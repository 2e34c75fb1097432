"""Late chunking: chunk vectors that see the whole document (Günther et al., arXiv 2409.04701).

A naive embedder encodes every chunk on its own, so "It grew 12% that year" never learns which
company "it" is. Late chunking runs the encoder over the whole document once, keeps the token
embeddings and averages them over each chunk's tokens. Chunk boundaries come from whatever chunker
the spec uses; queries are embedded normally (the model's own pooling and ``query_prefix``).

How a document becomes chunk vectors:

1. **One tokenization with offsets.** ``document_prefix + text`` is tokenized once by the fast
   tokenizer. The sequence is ``[lead specials][prefix tokens][text tokens][trail specials]``
   (for BERT: ``[CLS] ... [SEP]``); text tokens carry character offsets into the document text.
2. **Chunk spans to token spans through those offsets** (never by counting tokens per chunk,
   which drifts as soon as a word is split differently inside and outside a chunk). The rule:
   a token belongs to every chunk that contains its *middle character* (the left one of the two
   middle characters when the token has an even number of them). Of two adjacent chunks, a token
   straddling their boundary so goes to the one holding more of its characters, the earlier one
   on a tie; overlapping chunks share the tokens of their overlap. A chunk that holds no middle
   character (it lies inside one token) averages the tokens it overlaps; a chunk that overlaps no
   token at all (only characters the tokenizer drops) takes the nearest token before it. Both are
   counted and reported by :meth:`LateChunkingEmbedder.run_notes`.
   The lead specials and the prefix tokens go to the first chunk (smallest start), the trail
   specials to the last chunk (largest end), as in the paper.
3. **Windows for documents longer than the encoder's context** ("long late chunking"). Each
   window is a complete model input, ``[lead][prefix] text tokens [trail]``, of at most
   ``window_tokens`` tokens; consecutive windows share ``overlap_tokens`` text tokens, and the last
   window ends at the document's end so it is full-sized too. Every token takes its embedding from
   the window where it has the most context: the one maximising the distance to the nearer window
   edge, where an edge at the document's start or end does not count (nothing is missing there);
   ties go to the earlier window. In practice each overlap is cut in its middle, so a token always
   sees at least half the overlap on both sides. Every token is covered, nothing is truncated, and
   no document is ever embedded another way.
4. **Batching.** Windows of all documents in an ``embed()`` call are sorted by length and run
   ``batch_size`` per forward pass with right padding; pooling reads only each window's own
   positions, so padding never reaches a vector.

Chunk vectors are always span means (the method); ``pooling`` only decides how queries are
pooled, so a CLS-pooling model gets CLS query vectors and mean-pooled chunk vectors.
``normalize`` applies to both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field, model_validator

from core.component import require
from core.types import ChunkedDocument
from embedders.huggingface import (
    HuggingFaceConfig,
    HuggingFaceEmbedder,
    LoadedEncoder,
    ModelLoadError,
    TokenizedBatch,
)

if TYPE_CHECKING:
    from torch import Tensor

# Tokenizers that never set a limit report a huge sentinel (int(1e30)) as model_max_length.
_UNSET_TOKENIZER_LIMIT = 1_000_000


class LateChunkingConfig(HuggingFaceConfig):
    window_tokens: int | None = Field(
        None,
        ge=8,
        description="Tokens per encoder input (special and prefix tokens included). Default: max_length, i.e. the "
        "model's own.",
    )
    overlap_tokens: int | None = Field(
        None, ge=0, description="Text tokens shared by consecutive windows. Default: a quarter of window_tokens."
    )

    @model_validator(mode="after")
    def _overlap_smaller_than_window(self) -> LateChunkingConfig:
        if (
            self.window_tokens is not None
            and self.overlap_tokens is not None
            and self.overlap_tokens >= self.window_tokens
        ):
            raise ValueError(
                f"overlap_tokens ({self.overlap_tokens}) must be smaller than window_tokens ({self.window_tokens})"
            )
        return self


# -- tokenizing a document ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DocumentTokens:
    """A document tokenized once: ``[lead specials][prefix tokens][text tokens][trail specials]``."""

    input_ids: np.ndarray  # (length,) the whole sequence
    text_starts: np.ndarray  # (text_count,) character offsets of the text tokens into the document text
    text_ends: np.ndarray
    lead: int  # special tokens before the prefix ([CLS], <s>, BOS)
    prefix: int  # tokens of the document prefix
    trail: int  # special tokens after the text ([SEP], </s>, EOS)

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def head(self) -> int:
        """Tokens before the first text token: the lead specials and the prefix."""
        return self.lead + self.prefix

    @property
    def text_count(self) -> int:
        return len(self.text_starts)


def _count_leading(flags: np.ndarray) -> int:
    """How many entries at the start of ``flags`` are true."""
    false_at = np.flatnonzero(~flags)
    return int(false_at[0]) if len(false_at) else len(flags)


def tokenize_document(tokenizer: Any, text: str, prefix: str = "") -> DocumentTokens:
    """Tokenize ``prefix + text`` once, with offsets, and tell its parts apart.

    Specials are the tokens the tokenizer's post-processor adds (``special_tokens_mask``), not a
    literal "[SEP]" written in the text, which keeps its offsets and counts as text.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(
            f"late chunking maps chunks to tokens through character offsets, which only fast (Rust) tokenizers give; "
            f"{type(tokenizer).__name__} is not one"
        )
    encoded = tokenizer(
        prefix + text, return_offsets_mapping=True, return_special_tokens_mask=True, truncation=False, verbose=False
    )
    ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    special = np.asarray(encoded["special_tokens_mask"], dtype=bool)
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    lead = _count_leading(special)
    trail = _count_leading(special[lead:][::-1])
    body = offsets[lead : len(ids) - trail]
    if np.any(np.diff(body, axis=0) < 0):
        # Spans are found by binary search over the offsets; unordered offsets would give wrong vectors.
        raise ValueError(f"the tokenizer {type(tokenizer).__name__} returned character offsets out of order")
    # A token belongs to the part that holds its middle character (see the module docstring).
    prefix_count = (
        int(np.searchsorted(_middle_characters(body[:, 0], body[:, 1]), len(prefix), side="left")) if prefix else 0
    )
    starts, ends = (body[prefix_count:] - len(prefix)).T
    return DocumentTokens(
        input_ids=ids, text_starts=starts, text_ends=ends, lead=lead, prefix=prefix_count, trail=trail
    )


def _middle_characters(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Each token's middle character (the left one of two); its start for zero-width tokens."""
    middles: np.ndarray = starts + np.maximum(ends - starts - 1, 0) // 2
    return middles


# -- chunk spans -> token positions ------------------------------------------------------------------


@dataclass(frozen=True)
class PoolingPlan:
    """Which positions of the tokenized document each chunk averages.

    ``ranges[i]`` is a half-open range of sequence positions (specials included) averaged into
    chunk ``owners[i]``; a chunk has one range, plus one for the lead/prefix tokens if it is the
    first chunk and one for the trail specials if it is the last.
    """

    ranges: np.ndarray  # (r, 2) int64
    owners: np.ndarray  # (r,) int64
    chunk_count: int
    chunks_inside_a_token: int  # held no token's middle character; averaged the tokens they overlap
    chunks_without_tokens: int  # overlapped no token; took the nearest token before them

    def token_counts(self) -> np.ndarray:
        counts = np.zeros(self.chunk_count, dtype=np.int64)
        np.add.at(counts, self.owners, self.ranges[:, 1] - self.ranges[:, 0])
        return counts


def plan_pooling(tokens: DocumentTokens, spans: Sequence[tuple[int, int]]) -> PoolingPlan:
    """The token positions of each character span ``[start, end)`` of the document text."""
    if not spans:
        raise ValueError("no chunk spans to pool")
    if tokens.length == 0:
        raise ValueError("the tokenizer produced no tokens at all, not even special ones")
    starts, ends = tokens.text_starts, tokens.text_ends
    middles = _middle_characters(starts, ends)
    head = tokens.head
    ranges: list[tuple[int, int]] = []
    owners: list[int] = []
    inside_a_token = without_tokens = 0
    for index, (start, end) in enumerate(spans):
        first = int(np.searchsorted(middles, start, side="left"))
        stop = int(np.searchsorted(middles, end, side="left"))
        if first >= stop:
            # No middle character inside: the tokens the span overlaps (start < end, end > start).
            first = int(np.searchsorted(ends, start, side="right"))
            stop = int(np.searchsorted(starts, end, side="left"))
            if first < stop:
                inside_a_token += 1
            else:
                without_tokens += 1
                first, stop = _nearest_token(tokens, stop)
        ranges.append((head + first, head + stop))
        owners.append(index)
    span_starts = np.array([s for s, _ in spans])
    span_ends = np.array([e for _, e in spans])
    first_chunk = int(np.argmin(span_starts))  # first of the earliest starts
    last_chunk = len(spans) - 1 - int(np.argmax(span_ends[::-1]))  # last of the latest ends
    if head:
        ranges.append((0, head))
        owners.append(first_chunk)
    if tokens.trail:
        ranges.append((tokens.length - tokens.trail, tokens.length))
        owners.append(last_chunk)
    return PoolingPlan(
        ranges=np.array(ranges, dtype=np.int64).reshape(-1, 2),
        owners=np.array(owners, dtype=np.int64),
        chunk_count=len(spans),
        chunks_inside_a_token=inside_a_token,
        chunks_without_tokens=without_tokens,
    )


def _nearest_token(tokens: DocumentTokens, following: int) -> tuple[int, int]:
    """Text-token range of the token just before position ``following`` (or the first one after).

    With no text tokens at all, the range is empty and the chunk averages only the special and
    prefix tokens it gets as first/last chunk; with none of those either, ``SpanSums.means`` raises.
    """
    if following > 0:
        return following - 1, following
    if tokens.text_count:
        return 0, 1
    return 0, 0


# -- windows -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """One encoder input over text tokens ``[start, end)``, keeping the embeddings of ``[own_start, own_end)``."""

    start: int
    end: int
    own_start: int
    own_end: int


def plan_windows(text_count: int, capacity: int, overlap: int) -> list[Window]:
    """Windows of ``capacity`` text tokens, ``overlap`` shared, covering ``text_count`` tokens.

    Windows start every ``capacity - overlap`` tokens; the last one ends at the document's end
    (starting earlier if need be, so it shares more than ``overlap``). Ownership: see
    :func:`_handover`.
    """
    if capacity <= overlap:
        raise ValueError(f"a window holds {capacity} text tokens, which must be more than the overlap of {overlap}")
    if text_count <= capacity:
        return [Window(0, text_count, 0, text_count)]
    stride = capacity - overlap
    starts = [0]
    while starts[-1] + capacity < text_count:
        starts.append(min(starts[-1] + stride, text_count - capacity))
    bounds = [(start, start + capacity) for start in starts]
    handovers = [_handover(bounds[k], bounds[k + 1], text_count) for k in range(len(bounds) - 1)]
    own_starts = [0, *handovers]
    own_ends = [*handovers, text_count]
    return [
        Window(start, end, own_start, own_end)
        for (start, end), own_start, own_end in zip(bounds, own_starts, own_ends, strict=True)
    ]


def context_depth(token: np.ndarray, start: int, end: int, text_count: int) -> np.ndarray:
    """Tokens of context on the thinner side of each token in the window ``[start, end)``.

    A window edge at the document's start or end costs no context, so it does not count.
    """
    unlimited = np.iinfo(np.int64).max
    left = token - start if start > 0 else np.full_like(token, unlimited)
    right = end - 1 - token if end < text_count else np.full_like(token, unlimited)
    depth: np.ndarray = np.minimum(left, right)
    return depth


def _handover(current: tuple[int, int], following: tuple[int, int], text_count: int) -> int:
    """First token that has strictly more context in ``following`` than in ``current``.

    Only tokens both windows hold can change hands. Over that overlap the following window's depth
    never decreases and the current one's, once past its peak, never increases, so the first such
    token splits the overlap into the current window's part and the following window's part.
    """
    shared = np.arange(following[0], current[1], dtype=np.int64)
    better = context_depth(shared, *following, text_count) > context_depth(shared, *current, text_count)
    return int(shared[np.argmax(better)]) if better.any() else current[1]


# -- pooling windows into chunk vectors --------------------------------------------------------------


@dataclass(frozen=True)
class WindowInput:
    """The token ids of one window and where its kept outputs go in the document's sequence."""

    input_ids: np.ndarray
    shift: int  # document position = window position + shift, for every kept position
    keep_start: int  # kept document positions [keep_start, keep_end)
    keep_end: int


def window_inputs(tokens: DocumentTokens, windows: Sequence[Window]) -> list[WindowInput]:
    """Model inputs ``[lead][prefix] text[start:end] [trail]``; the first window also keeps the
    lead/prefix outputs and the last one the trail outputs."""
    ids, head = tokens.input_ids, tokens.head
    leading, trailing = ids[:head], ids[tokens.length - tokens.trail :]
    inputs = []
    for position, window in enumerate(windows):
        text = ids[head + window.start : head + window.end]
        keep_start = 0 if position == 0 else head + window.own_start
        keep_end = tokens.length if position == len(windows) - 1 else head + window.own_end
        inputs.append(WindowInput(np.concatenate([leading, text, trailing]), window.start, keep_start, keep_end))
    return inputs


class SpanSums:
    """Running sums of token embeddings per pooling range, fed one window output at a time.

    Only sums are kept, so memory grows with the number of chunks, not with the document's length.
    """

    def __init__(self, plan: PoolingPlan, dimension: int):
        self.plan = plan
        self.sums = np.zeros((len(plan.ranges), dimension), dtype=np.float64)

    def add(self, hidden: Tensor, window: WindowInput) -> None:
        """Add ``hidden`` (the window's ``(tokens, dim)`` outputs, padding already cut off)."""
        torch = require("torch", purpose="late chunking")
        ranges = self.plan.ranges
        starts = np.maximum(ranges[:, 0], window.keep_start)
        ends = np.minimum(ranges[:, 1], window.keep_end)
        hit = np.flatnonzero(starts < ends)
        if not len(hit):
            return
        # A 0/1 matrix (ranges x window positions) times the outputs sums every range at once.
        positions = torch.arange(hidden.shape[0], device=hidden.device)
        lows = torch.as_tensor(starts[hit] - window.shift, device=hidden.device).unsqueeze(1)
        highs = torch.as_tensor(ends[hit] - window.shift, device=hidden.device).unsqueeze(1)
        membership = ((positions >= lows) & (positions < highs)).float()
        self.sums[hit] += (membership @ hidden.float()).cpu().numpy()

    def means(self) -> np.ndarray:
        """One mean vector per chunk, in chunk order."""
        plan = self.plan
        totals = np.zeros((plan.chunk_count, self.sums.shape[1]), dtype=np.float64)
        np.add.at(totals, plan.owners, self.sums)
        counts = plan.token_counts()
        if np.any(counts == 0):
            raise ValueError(f"{int(np.sum(counts == 0))} chunks have no token to average (the document has no tokens)")
        means: np.ndarray = totals / counts[:, None]
        return means


@dataclass
class _DocumentJob:
    document: ChunkedDocument
    plan: PoolingPlan
    inputs: list[WindowInput]
    sums: SpanSums


# -- the component -----------------------------------------------------------------------------------


class LateChunkingEmbedder(HuggingFaceEmbedder):
    """Chunk vectors pooled from one encoding of the whole document; queries embedded normally.

    Subclasses :class:`HuggingFaceEmbedder` for loading, query embedding, ``dimension`` and
    identity; ``embed_documents`` (texts without their documents) stays naive, the pipeline calls
    :meth:`embed`.
    """

    type_name = "late"
    Config = LateChunkingConfig
    config: LateChunkingConfig

    def __init__(self, config: LateChunkingConfig | dict[str, Any] | None = None, /, **settings: Any):
        super().__init__(config, **settings)
        self._reset_counts()

    def _reset_counts(self) -> None:
        # Counted per run (a service reuses one embedder for many runs); run_notes() reports them.
        self.windowed_documents = 0
        self.chunks_inside_a_token = 0
        self.chunks_without_tokens = 0

    def begin_run(self) -> None:
        super().begin_run()
        self._reset_counts()

    @property
    def model_id(self) -> str:
        """The naive model id plus the late-chunking settings: these vectors must never be mixed with naive ones."""
        settings = ["late chunking"]
        if self.config.window_tokens is not None:
            settings.append(f"window_tokens={self.config.window_tokens}")
        if self.config.overlap_tokens is not None:
            settings.append(f"overlap_tokens={self.config.overlap_tokens}")
        return f"{super().model_id} [{', '.join(settings)}]"

    def window_size(self) -> int | None:
        """Tokens per encoder input; None when the model states no limit (one window per document)."""
        encoder = self.encoder
        configured = self.config.window_tokens
        if configured is None:
            return encoder.max_length
        limit = _position_limit(encoder)
        if limit is not None and configured > limit:
            raise ValueError(
                f"embedder window_tokens {configured} exceeds the {limit} tokens {self.model_name} supports"
            )
        return configured

    def overlap_size(self) -> int:
        configured = self.config.overlap_tokens
        if configured is not None:
            return configured
        window = self.window_size()
        return window // 4 if window is not None else 0

    def embed(self, documents: Sequence[ChunkedDocument]) -> None:
        encoder = self.encoder
        window, overlap = self.window_size(), self.overlap_size()
        jobs = [self._prepare(document, encoder, window, overlap) for document in documents if document.chunks]
        pending = sorted(
            ((job, item) for job in jobs for item in job.inputs), key=lambda pair: len(pair[1].input_ids), reverse=True
        )
        for start in range(0, len(pending), self.config.batch_size):
            self._forward(encoder, pending[start : start + self.config.batch_size])
        for job in jobs:
            vectors = self._finish(job)
            for chunk, vector in zip(job.document.chunks, vectors, strict=True):
                chunk.vectors[self.vector_field] = vector
            self.windowed_documents += len(job.inputs) > 1
            self.chunks_inside_a_token += job.plan.chunks_inside_a_token
            self.chunks_without_tokens += job.plan.chunks_without_tokens

    def run_notes(self) -> list[str]:
        notes = super().run_notes()
        if self.windowed_documents:  # the model is loaded, so the window size is known
            notes.append(
                f"late chunking: {_count(self.windowed_documents, 'document')} longer than one "
                f"{self.window_size()}-token window embedded in overlapping windows ({self.overlap_size()} tokens "
                "shared)"
            )
        if self.chunks_inside_a_token:
            notes.append(
                f"late chunking: {_count(self.chunks_inside_a_token, 'chunk')} inside a single token averaged the "
                "tokens they overlap"
            )
        if self.chunks_without_tokens:
            notes.append(
                f"late chunking: {_count(self.chunks_without_tokens, 'chunk')} of only characters the tokenizer drops "
                f"took the nearest token's embedding"
            )
        return notes

    def _prepare(
        self, document: ChunkedDocument, encoder: LoadedEncoder, window: int | None, overlap: int
    ) -> _DocumentJob:
        parsed = document.document
        try:
            tokens = tokenize_document(encoder.tokenizer, parsed.text, self.document_prefix)
            plan = plan_pooling(tokens, [(chunk.start, chunk.end) for chunk in document.chunks])
            windows = self._windows(tokens, window, overlap)
        except ModelLoadError:
            raise
        except ValueError as exc:
            raise ValueError(f"late chunking of {parsed.source_id}: {exc}") from exc
        return _DocumentJob(document, plan, window_inputs(tokens, windows), SpanSums(plan, self.dimension))

    @staticmethod
    def _windows(tokens: DocumentTokens, window: int | None, overlap: int) -> list[Window]:
        if window is None:
            return [Window(0, tokens.text_count, 0, tokens.text_count)]
        capacity = window - tokens.head - tokens.trail
        if capacity <= overlap:
            raise ValueError(
                f"a {window}-token window leaves {capacity} tokens for text after {tokens.head + tokens.trail} special "
                f"and prefix tokens, not more than overlap_tokens {overlap}; raise window_tokens or lower "
                "overlap_tokens"
            )
        return plan_windows(tokens.text_count, capacity, overlap)

    def _forward(self, encoder: LoadedEncoder, batch: Sequence[tuple[_DocumentJob, WindowInput]]) -> None:
        """One forward pass over right-padded windows; each window's real outputs go to its document."""
        torch = require("torch", purpose="late chunking")
        lengths = [len(item.input_ids) for _, item in batch]
        width = max(lengths)
        pad_id = encoder.tokenizer.pad_token_id
        input_ids = np.full((len(batch), width), pad_id, dtype=np.int64)
        attention = np.zeros((len(batch), width), dtype=np.int64)
        for row, (_, item) in enumerate(batch):
            input_ids[row, : len(item.input_ids)] = item.input_ids
            attention[row, : len(item.input_ids)] = 1
        inputs = {
            "input_ids": torch.from_numpy(input_ids).to(encoder.device),
            "attention_mask": torch.from_numpy(attention).to(encoder.device),
            # One text per input: segment 0 throughout, as the tokenizer itself would give.
            "token_type_ids": torch.zeros((len(batch), width), dtype=torch.long, device=encoder.device),
        }
        with torch.inference_mode():
            hidden = encoder.token_states(TokenizedBatch(inputs=inputs, truncated=[False] * len(batch)))
            for row, ((job, item), length) in enumerate(zip(batch, lengths, strict=True)):
                job.sums.add(hidden[row, :length], item)

    def _finish(self, job: _DocumentJob) -> np.ndarray:
        try:
            means = job.sums.means()
        except ValueError as exc:
            raise ValueError(f"late chunking of {job.document.document.source_id}: {exc}") from exc
        if self.normalize:
            means = means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
        return means.astype(np.float32)


def _position_limit(encoder: LoadedEncoder) -> int | None:
    """The most tokens the model accepts in one input, from its tokenizer and its config."""
    candidates = (
        getattr(encoder.tokenizer, "model_max_length", None),
        getattr(encoder.model.config, "max_position_embeddings", None),
    )
    limits = [n for n in candidates if isinstance(n, int) and 0 < n < _UNSET_TOKENIZER_LIMIT]
    return min(limits) if limits else None


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"
