"""Meta-Chunking (Zhao et al., arXiv 2410.12788): chunk boundaries chosen by a small causal LM.

Two chunkers, both working on sentences (``chunkers.sentences``) and returning exact character
spans of the document:

- ``ppl`` (:class:`PerplexityChunker`): one LM pass gives every token's loss; a sentence's score is
  the mean loss of its tokens, and a chunk ends after each sentence whose score is a local minimum
  at least ``threshold`` deep. Texts longer than ``window_tokens`` run window by window, carrying
  the keys and values forward with at most ``max_context_tokens`` of context.
- ``margin`` (:class:`MarginSamplingChunker`): for each next sentence the LM answers whether to split
  it from the current chunk (answer 1) or keep them together (answer 2); the sentence joins when
  P(2) - P(1) exceeds a threshold that becomes the mean of the last ``threshold_window`` margins.

Both then optionally fit the meta-chunks to ``target_size`` tokens of a chosen tokenizer: chunks
above the target are split at their weakest internal link, then neighbours merge greedily while
they fit.

Where this differs from the official code on purpose:
- the LM reads the document's own text (the official joins sentences with '' and tokenises each
  alone, so English sentences run together without spaces), starting after ``<|endoftext|>``;
- no text is ever dropped (the official truncates English sentences over 512 words); sentences
  longer than ``max_sentence_tokens`` are cut at token boundaries instead;
- the dynamic PPL threshold is kept per document, so a document's chunks never depend on which
  documents were chunked before it in the same process;
- sizes for the combination step are tokens of a configurable tokenizer, not words or characters
  depending on the language; chunks above the target are split rather than kept.

Speed, with the same decisions: the margin prompt's shared prefix (system message and
instructions) and, after a merge, the current chunk are served from the key/value cache of the
previous prompt instead of being encoded again; only the answer position goes through the output
head; independent documents run together, their tokens packed without padding
(``core.causal_lm.PackedDecoder``).
"""

from __future__ import annotations

import bisect
import math
import threading
from abc import abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from chunkers.base import Chunker
from chunkers.sentences import detect_language, split_sentences
from core.causal_lm import (
    DEFAULT_CAUSAL_LM,
    CausalLM,
    common_prefix_length,
    load_causal_lm,
)
from core.component import ComponentConfig, require
from core.types import ParsedDocument

Span = tuple[int, int]
Language = Literal["en", "zh"]


# ---------------------------------------------------------------------------------------------
# Units: sentences with their tokens
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Units:
    """What a document is chunked from: sentence spans (over-long sentences cut at token
    boundaries), the document's LM token ids, and the token range [first, last) of each unit."""

    spans: list[Span]
    token_ranges: list[tuple[int, int]]
    token_ids: list[int]

    def __len__(self) -> int:
        return len(self.spans)


def _stripped(text: str, start: int, end: int) -> Span:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def tokenize_units(text: str, tokenizer: Any, max_unit_tokens: int) -> Units:
    """Sentence units of ``text`` with the LM tokens of the whole text (tokenised once, in context).

    A token belongs to the sentence holding its last non-space character; tokens of whitespace
    only (between sentences) belong to none.
    """
    sentences = split_sentences(text)
    if not sentences:
        return Units([], [], [])
    if not getattr(tokenizer, "is_fast", True):
        raise ValueError(
            f"{type(tokenizer).__name__} gives no character offsets; LM chunking needs a fast (tokenizers) tokenizer"
        )
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    token_ids: list[int] = list(encoding["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(pair) for pair in encoding["offset_mapping"]]
    starts = [start for start, _ in sentences]
    first_token = [-1] * len(sentences)
    last_token = [-1] * len(sentences)
    for index, (begin, end) in enumerate(offsets):
        while end > begin and text[end - 1].isspace():
            end -= 1
        if end == begin:
            continue
        owner = bisect.bisect_right(starts, end - 1) - 1
        if first_token[owner] < 0:
            first_token[owner] = index
        last_token[owner] = index + 1
    spans: list[Span] = []
    ranges: list[tuple[int, int]] = []
    previous_end = 0
    for number, span in enumerate(sentences):
        if first_token[number] < 0:  # no token ends inside it: give it an empty range
            first_token[number] = last_token[number] = previous_end
        for piece, token_range in _cut_long(
            text, span, (first_token[number], last_token[number]), offsets, max_unit_tokens
        ):
            spans.append(piece)
            ranges.append(token_range)
        previous_end = last_token[number]
    return Units(spans, ranges, token_ids)


def _cut_long(
    text: str, span: Span, tokens: tuple[int, int], offsets: list[tuple[int, int]], max_tokens: int
) -> list[tuple[Span, tuple[int, int]]]:
    """A sentence of more than ``max_tokens`` tokens as consecutive pieces cut at token starts."""
    first, last = tokens
    if last - first <= max_tokens:
        return [(span, tokens)]
    pieces = []
    piece_start, piece_first = span[0], first
    cut = piece_first + max_tokens
    while cut < last:
        cut_char = offsets[cut][0]
        trimmed = _stripped(text, piece_start, cut_char)
        if cut_char > piece_start and trimmed[0] < trimmed[1]:
            pieces.append((trimmed, (piece_first, cut)))
            piece_start, piece_first = cut_char, cut
            cut += max_tokens
        else:  # the cut would fall inside one character's bytes or leave only spaces: move on
            cut += 1
    pieces.append((_stripped(text, piece_start, span[1]), (piece_first, last)))
    return pieces


# ---------------------------------------------------------------------------------------------
# Boundary rules
# ---------------------------------------------------------------------------------------------


def perplexity_minima(scores: Sequence[float], threshold: float, dynamic: bool = False) -> list[int]:
    """Indexes i after which a chunk ends: sentence scores that are local minima deep enough.

    s_i < s_{i-1} and s_i < s_{i+1} with the larger of the two rises >= threshold, or
    s_i < s_{i-1} == ... s_i == s_{i+1} with the left rise >= threshold (a flat right side).
    Dynamic: once 100 minima were accepted, the threshold becomes the smallest accepted depth.
    NaN scores (units without tokens of their own) are passed over: their neighbours are compared
    with each other, and they never end a chunk themselves.
    """
    scored = [index for index, score in enumerate(scores) if not math.isnan(score)]
    minima: list[int] = []
    depths: list[float] = []
    for position in range(1, len(scored) - 1):
        before, here, after = (scores[scored[position + offset]] for offset in (-1, 0, 1))
        depth: float | None = None
        if here < before and here < after:
            if before - here >= threshold or after - here >= threshold:
                depth = min(before - here, after - here)
        elif here < before and here == after and before - here >= threshold:
            depth = before - here
        if depth is not None:
            minima.append(scored[position])
            depths.append(depth)
        if dynamic and len(depths) >= 100:
            threshold = min(depths)
    return minima


def groups_from_ends(count: int, ends: Sequence[int]) -> list[tuple[int, int]]:
    """Unit ranges [a, b) of the chunks that end after each unit in ``ends``."""
    groups, start = [], 0
    for end in sorted(ends):
        groups.append((start, end + 1))
        start = end + 1
    if start < count:
        groups.append((start, count))
    return groups


def fit_to_target(
    groups: list[tuple[int, int]], sizes: Sequence[int], gap_strength: Sequence[float], target: int
) -> list[tuple[int, int]]:
    """Chunks of at most ``target`` (unit sizes summed) where possible.

    A chunk above the target is cut at its strongest internal gap (``gap_strength[i]`` is the
    evidence for a boundary after unit i), again until every piece fits or is a single unit;
    then consecutive chunks merge greedily while their total stays within the target.
    """

    def size(group: tuple[int, int]) -> int:
        return sum(sizes[group[0] : group[1]])

    fitted: list[tuple[int, int]] = []
    for group in groups:
        pending = [group]
        while pending:
            start, end = pending.pop()
            if size((start, end)) <= target or end - start == 1:
                fitted.append((start, end))
                continue
            cut = max(range(start + 1, end), key=lambda unit: gap_strength[unit - 1])
            pending.extend([(cut, end), (start, cut)])  # popped left piece first: order is kept
    merged: list[tuple[int, int]] = []
    for group in fitted:
        if merged and size(merged[-1]) + size(group) <= target:
            merged[-1] = (merged[-1][0], group[1])
        else:
            merged.append(group)
    return merged


# ---------------------------------------------------------------------------------------------
# Shared chunker machinery
# ---------------------------------------------------------------------------------------------


class LMChunkerConfig(ComponentConfig):
    model: str = DEFAULT_CAUSAL_LM  # hub id or local folder of any causal LM
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", "mps" or "auto"
    quantize: Literal["none", "int8"] = (
        "none"  # int8 (CPU): ~1.6x faster, but it moves boundaries (80% agreement in benchmarks/meta_chunking_speed.py)
    )
    max_sentence_tokens: int = Field(256, ge=8)  # longer sentences are cut at token boundaries
    target_size: int | None = Field(None, ge=0)  # tokens of size_tokenizer per chunk; 0 or None: no fitting
    size_tokenizer: str | None = None  # hub id or folder (e.g. the embedder's); None: the LM's tokenizer
    batch_size: int = Field(8, ge=1)  # documents per forward pass


@dataclass(frozen=True)
class MetaChunks:
    """A document's meta-chunks as unit ranges [a, b), and per gap (after unit i) the evidence for
    a boundary there, which decides where chunks above the target size are cut."""

    groups: list[tuple[int, int]]
    gap_strength: list[float]


class LMChunker(Chunker):
    """Base of the LM-driven chunkers: lazy shared model, units, size fitting, batch entry point."""

    Config: ClassVar[type[LMChunkerConfig]] = LMChunkerConfig
    config: LMChunkerConfig

    def fingerprint_settings(self) -> dict[str, Any]:
        settings = self.to_dict()
        settings.pop("batch_size", None)  # speed only
        settings.pop("device", None)
        return settings

    @property
    def lm(self) -> CausalLM:
        from core.models import resolve_device

        return load_causal_lm(
            self.config.model, resolve_device(self.config.device), self.config.dtype, self.config.quantize
        )

    def split(self, document: ParsedDocument) -> list[Span]:
        return self.split_batch([document])[0]

    def split_batch(self, documents: Sequence[ParsedDocument]) -> list[list[Span]]:
        """Spans of several documents, their LM work batched together (faster than one by one)."""
        if not documents:
            return []
        lm = self.lm
        units = [tokenize_units(document.text, lm.tokenizer, self.config.max_sentence_tokens) for document in documents]
        meta = self._meta_chunks(lm, documents, units)
        return [
            self._spans(document, doc_units, doc_meta) for document, doc_units, doc_meta in zip(documents, units, meta)
        ]

    @abstractmethod
    def _meta_chunks(self, lm: CausalLM, documents: Sequence[ParsedDocument], units: list[Units]) -> list[MetaChunks]:
        """The meta-chunks of each document (before fitting to the target size)."""

    def _spans(self, document: ParsedDocument, units: Units, meta: MetaChunks) -> list[Span]:
        groups, target = meta.groups, self.config.target_size
        if target and len(units) > 1:
            groups = fit_to_target(groups, self._unit_sizes(document.text, units), meta.gap_strength, target)
        return [(units.spans[start][0], units.spans[end - 1][1]) for start, end in groups]

    def _unit_sizes(self, text: str, units: Units) -> list[int]:
        if self.config.size_tokenizer is None:
            return [last - first for first, last in units.token_ranges]
        tokenizer = _size_tokenizer(self.config.size_tokenizer)
        encoded = tokenizer([text[start:end] for start, end in units.spans], add_special_tokens=False)["input_ids"]
        return [len(ids) for ids in encoded]


@lru_cache(maxsize=8)
def _size_tokenizer(name_or_path: str) -> Any:
    from core.models import resolve_model_path

    transformers = require("transformers", purpose="sizing chunks in tokens")
    return transformers.AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))


# ---------------------------------------------------------------------------------------------
# PPL chunking
# ---------------------------------------------------------------------------------------------


class PerplexityChunkerConfig(LMChunkerConfig):
    threshold: float = 0.0  # how deep a perplexity minimum must be to end a chunk
    dynamic_threshold: bool = False  # after 100 minima, the smallest accepted depth (paper)
    window_tokens: int = Field(4096, ge=16)  # tokens per pass for long texts (at most half the context)
    max_context_tokens: int | None = Field(None, ge=32)  # None: the model's context length

    @model_validator(mode="after")
    def _window_inside_context(self) -> PerplexityChunkerConfig:
        if self.max_context_tokens is not None and self.window_tokens >= self.max_context_tokens:
            raise ValueError(
                f"window_tokens ({self.window_tokens}) must be smaller than max_context_tokens "
                f"({self.max_context_tokens})"
            )
        return self


class PerplexityChunker(LMChunker):
    """PPL chunking: chunks end at sentences whose mean token loss is a local minimum."""

    type_name = "ppl"
    Config = PerplexityChunkerConfig
    config: PerplexityChunkerConfig

    def _meta_chunks(self, lm: CausalLM, documents: Sequence[ParsedDocument], units: list[Units]) -> list[MetaChunks]:
        context = min(self.config.max_context_tokens or lm.context_length, lm.context_length)
        window = min(self.config.window_tokens, context // 2)
        start = lm.start_token_ids()
        scored = [index for index, doc_units in enumerate(units) if len(doc_units) >= 3]  # fewer have no minimum
        losses = lm.token_losses(
            [start + units[index].token_ids for index in scored], self.config.batch_size, window, context
        )
        meta = [
            MetaChunks(groups_from_ends(len(doc_units), []), [0.0] * max(len(doc_units) - 1, 0)) for doc_units in units
        ]
        for index, token_losses in zip(scored, losses):
            scores = sentence_scores(token_losses, units[index].token_ranges, len(start))
            ends = perplexity_minima(scores, self.config.threshold, self.config.dynamic_threshold)
            # A steep rise of perplexity into the next sentence is evidence for a boundary before it.
            rises = [_finite(after - before) for before, after in zip(scores, scores[1:])]
            meta[index] = MetaChunks(groups_from_ends(len(units[index]), ends), rises)
        return meta


def sentence_scores(token_losses: Any, token_ranges: Sequence[tuple[int, int]], start_tokens: int) -> list[float]:
    """Mean loss of each unit's tokens; the text's first token (predicted from no text) is left out."""
    scores = []
    for first, last in token_ranges:
        # Token i of the text is position i + start_tokens of the sequence, whose loss is entry i + start_tokens - 1.
        begin = max(first + start_tokens - 1, start_tokens)
        end = last + start_tokens - 1
        scores.append(token_losses[begin:end].mean().item() if end > begin else math.nan)
    return scores


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


# ---------------------------------------------------------------------------------------------
# Margin-sampling chunking
# ---------------------------------------------------------------------------------------------

SYSTEM_MESSAGE = "You are a helpful assistant."

# The split-or-keep question of the paper, word for word (indentation included): a small model's
# answer probabilities shift with any change of wording, and these are the ones it was tuned on.
SPLIT_OR_KEEP_QUERIES: dict[Language, str] = {
    "en": (
        "This is a text chunking task. You are a text analysis expert. Please choose one of the following two "
        "options based on the logical structure and semantic content of the provided sentence:\n"
        '        1. Split "{joined}" into "{chunk}" and "{sentence}" two parts;\n'
        '        2. Keep "{joined}" unsplit in its original form;\n'
        "        Please answer 1 or 2."
    ),
    "zh": (
        "这是一个文本分块任务.你是一位文本分析专家，请根据提供的句子的逻辑结构和语义内容，从下面两种方案中选择一种分块方式：\n"
        "        1. 将“{joined}”分割成“{chunk}”与“{sentence}”两部分；\n"
        "        2. 将“{joined}”不进行分割，保持原形式；\n"
        "        请回答1或2。"
    ),
}
_CHATML = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n"
_QUERY_SLOT = "\u0000QUERY\u0000"


class SplitOrKeepPrompts:
    """Token ids of the split-or-keep prompt in the model's chat format, and of its two answers."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.answer_ids = [self._single_token(answer) for answer in ("1", "2")]
        self.before_query, self.after_query = self._chat_frame()

    def ids(self, language: Language, chunk: str, sentence: str, joined: str) -> list[int]:
        query = SPLIT_OR_KEEP_QUERIES[language].format(joined=joined, chunk=chunk, sentence=sentence)
        return list(self.tokenizer(self.before_query + query + self.after_query, add_special_tokens=False)["input_ids"])

    def shared_prefix(self, language: Language) -> list[int]:
        """The tokens every prompt of ``language`` starts with, whatever the sentences."""
        one = self.ids(language, "Alpha one.", "Beta two.", "Alpha one. Beta two.")
        other = self.ids(language, "Gamma three.", "Delta four.", "Gamma three. Delta four.")
        return one[: common_prefix_length(one, other)]

    def _chat_frame(self) -> tuple[str, str]:
        messages = [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": _QUERY_SLOT}]
        if getattr(self.tokenizer, "chat_template", None):
            rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:  # a base model without a chat template: ChatML, as the paper's Qwen models use
            rendered = _CHATML.format(system=SYSTEM_MESSAGE, query=_QUERY_SLOT)
        before, _, after = rendered.partition(_QUERY_SLOT)
        return before, after

    def _single_token(self, text: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return int(ids[-1])  # some tokenizers put a word-start marker token first


@dataclass
class _MarginDocument:
    """The decisions made so far for one document."""

    text: str
    units: Units
    language: Language
    threshold: float
    chunk_start: int = 0  # first unit of the current chunk
    next_unit: int = 1  # the unit to decide about
    margins: list[float] = field(default_factory=list)  # margins[i]: decision about unit i + 1
    ends: list[int] = field(default_factory=list)  # units after which a chunk ends

    @property
    def done(self) -> bool:
        return self.next_unit >= len(self.units)

    def prompt(self, prompts: SplitOrKeepPrompts, max_chunk_tokens: int) -> list[int]:
        shown = self.next_unit - 1  # the chunk's tail that fits max_chunk_tokens, at least one unit
        tokens = self._tokens(shown)
        while shown > self.chunk_start and tokens + self._tokens(shown - 1) <= max_chunk_tokens:
            shown -= 1
            tokens += self._tokens(shown)
        spans, text = self.units.spans, self.text
        chunk = text[spans[shown][0] : spans[self.next_unit - 1][1]]
        sentence = text[spans[self.next_unit][0] : spans[self.next_unit][1]]
        joined = text[spans[shown][0] : spans[self.next_unit][1]]
        return prompts.ids(self.language, chunk, sentence, joined)

    def record(self, margin: float, threshold_window: int) -> None:
        if margin <= self.threshold:
            self.ends.append(self.next_unit - 1)
            self.chunk_start = self.next_unit
        self.next_unit += 1
        self.margins.append(margin)
        if len(self.margins) >= threshold_window:
            recent = self.margins[-threshold_window:]
            self.threshold = sum(recent) / len(recent)

    def _tokens(self, unit: int) -> int:
        first, last = self.units.token_ranges[unit]
        return last - first


class MarginSamplingChunkerConfig(LMChunkerConfig):
    threshold: float = 0.0  # starting threshold on P(keep) - P(split)
    threshold_window: int = Field(5, ge=1)  # then the mean of this many latest margins (paper: 5)
    prompt_language: Literal["auto", "en", "zh"] = "auto"  # auto: by the script of each document
    max_prompt_chunk_tokens: int = Field(1024, ge=8)  # longer current chunks are shown by their tail


class MarginSamplingChunker(LMChunker):
    """Margin-sampling chunking: the LM decides, sentence by sentence, to split or to keep."""

    type_name = "margin"
    Config = MarginSamplingChunkerConfig
    config: MarginSamplingChunkerConfig

    def __init__(self, config: Any = None, /, **settings: Any):
        super().__init__(config, **settings)
        self._prompts: SplitOrKeepPrompts | None = None
        self._lock = threading.Lock()

    def _meta_chunks(self, lm: CausalLM, documents: Sequence[ParsedDocument], units: list[Units]) -> list[MetaChunks]:
        prompts = self._prompts_for(lm)
        states = [
            _MarginDocument(document.text, doc_units, self._language(document.text), self.config.threshold)
            for document, doc_units in zip(documents, units)
        ]
        # One cache slot per document in flight. A slot keeps the keys/values of its last prompt,
        # so the next prompt only runs what differs: the instructions are shared by all prompts
        # (also across documents taking over a slot), the current chunk too after a merge.
        cache = lm.prefix_cache(self.config.batch_size)
        waiting = deque(state for state in states if not state.done)
        in_slot: dict[int, _MarginDocument] = {}
        while waiting or in_slot:
            for slot in range(self.config.batch_size):
                if slot not in in_slot and waiting:
                    in_slot[slot] = waiting.popleft()
            sequences = {
                slot: state.prompt(prompts, self.config.max_prompt_chunk_tokens) for slot, state in in_slot.items()
            }
            for slot, (p_split, p_keep) in cache.next_token_probabilities(sequences, prompts.answer_ids).items():
                in_slot[slot].record(p_keep - p_split, self.config.threshold_window)
            in_slot = {slot: state for slot, state in in_slot.items() if not state.done}
        return [
            MetaChunks(groups_from_ends(len(state.units), state.ends), [-margin for margin in state.margins])
            for state in states
        ]

    def _language(self, text: str) -> Language:
        return detect_language(text) if self.config.prompt_language == "auto" else self.config.prompt_language

    def _prompts_for(self, lm: CausalLM) -> SplitOrKeepPrompts:
        with self._lock:
            if self._prompts is None:
                prompts = SplitOrKeepPrompts(lm.tokenizer)
                longest = (
                    len(prompts.shared_prefix("en"))
                    + 64
                    + 3 * (self.config.max_prompt_chunk_tokens + self.config.max_sentence_tokens)
                )
                if longest > lm.context_length:
                    raise ValueError(
                        f"margin chunker: a prompt can reach {longest} tokens, more than the {lm.context_length} of "
                        f"{lm.name}; lower max_prompt_chunk_tokens or max_sentence_tokens"
                    )
                self._prompts = prompts
            return self._prompts
