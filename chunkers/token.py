"""Fixed-size token windows with exact character offsets.

The document (or each section/element, see :mod:`chunkers.spans`) is tokenized once; a chunk is
the text from the start of its first token to the start of the token after its last, so
consecutive windows without overlap tile the text exactly and windows with overlap repeat exactly
``chunk_overlap`` tokens' worth of text.

Token starts are character offsets. A byte-level tokenizer may start a token inside a multi-byte
character (a Chinese character or an emoji split over two tokens); such a start is moved back to
the start of that character. Starts and ends use the same rule, so no character is lost or
duplicated: the character goes wholly to the chunk where its first byte falls. Because a chunk's
text can then hold a little more than its window, each chunk is re-tokenized on its own and
shortened until it fits ``chunk_size``.

Tokenizers: a tiktoken encoding (``encoding: cl100k_base``, the default, or an OpenAI model name;
works offline, see :mod:`core.tiktoken_data`), or a Hugging Face fast tokenizer
(``tokenizer: <hub id or local folder>``) whose offset mappings give the starts.
"""

from __future__ import annotations

from functools import cached_property, lru_cache
from typing import Any, Protocol

from pydantic import Field, field_validator, model_validator

from chunkers.base import Chunker
from chunkers.spans import (
    Measure,
    Span,
    SpanChunkingConfig,
    plan_spans,
    trim_whitespace,
)
from core.component import require
from core.models import resolve_model_path
from core.tiktoken_data import encoding_name, get_encoding
from core.types import ParsedDocument

DEFAULT_ENCODING = "cl100k_base"


def encodable(text: str) -> str:
    """``text`` with lone surrogates replaced by '?': same length, same offsets, valid UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


class Tokenization(Protocol):
    def token_starts(self, text: str) -> list[int]:
        """Character offset at which each token of ``text`` starts, non-decreasing."""

    def count(self, text: str) -> int:
        """Number of tokens in ``text`` on its own (no special tokens)."""


class TiktokenTokenization:
    def __init__(self, encoding: Any):
        self.encoding = encoding

    def _encode(self, text: str) -> list[int]:
        # Text that looks like a special token ("<|endoftext|>") is ordinary document text here.
        ids: list[int] = self.encoding.encode(encodable(text), disallowed_special=())
        return ids

    def token_starts(self, text: str) -> list[int]:
        np = require("numpy", purpose="token offsets")
        utf8 = encodable(text).encode("utf-8")
        lengths = np.fromiter((len(b) for b in self.encoding.decode_tokens_bytes(self._encode(text))), dtype=np.int64)
        if int(lengths.sum()) != len(utf8):
            raise RuntimeError(f"tiktoken encoding {self.encoding.name} did not reproduce the bytes of the text")
        byte_starts = np.cumsum(lengths) - lengths
        data = np.frombuffer(utf8, dtype=np.uint8)
        # Character index of every byte: count the bytes that begin a character (not 0b10xxxxxx).
        char_of_byte = np.cumsum((data & 0xC0) != 0x80) - 1
        starts: list[int] = char_of_byte[byte_starts].tolist()
        return starts

    def count(self, text: str) -> int:
        return len(self._encode(text))


class HuggingFaceTokenization:
    def __init__(self, tokenizer: Any):
        # A copy of the Rust tokenizer without the truncation and padding a tokenizer.json may
        # carry (MiniLM's truncates at 128 tokens), which would silently cut long documents.
        tokenizers = require("tokenizers", purpose="Hugging Face tokenizers")
        self.tokenizer = tokenizers.Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()

    def token_starts(self, text: str) -> list[int]:
        starts: list[int] = []
        for start, _ in self.tokenizer.encode(encodable(text), add_special_tokens=False).offsets:
            starts.append(max(start, starts[-1]) if starts else start)
        return starts

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(encodable(text), add_special_tokens=False).ids)


def token_windows(
    text: str, region: Span, tokenization: Tokenization, measure: Measure, size: int, overlap: int
) -> list[Span]:
    """Spans of ``size``-token windows over ``text[region]``, each next one starting ``overlap`` tokens back.

    ``measure`` gives the token count of a span as it will be emitted (trimmed or not), which is
    what must fit ``size``.
    """
    low, high = region
    starts = tokenization.token_starts(text[low:high])
    n = len(starts)
    if n == 0:
        return [region]
    # bounds[i]: where the window that begins (or ends before) token i starts, in the document; the
    # first window takes any leading text no token covers, the last runs to the end of the region.
    bounds = [low, *(low + s for s in starts[1:]), high]
    spans: list[Span] = []
    first = 0
    while True:
        last = min(first + size, n)
        # A window inside one character is empty: widen it to hold that character.
        while last < n and bounds[last] <= bounds[first]:
            last += 1
        # On its own the window's text may take more tokens than it spanned in context: shorten it.
        while last - first > 1 and bounds[last - 1] > bounds[first] and measure(bounds[first], bounds[last]) > size:
            last -= 1
        spans.append((bounds[first], bounds[last]))
        if last >= n:
            return spans
        first = max(last - overlap, first + 1)


class TokenChunker(Chunker):
    """Chunks of at most ``chunk_size`` tokens of a tiktoken encoding or a Hugging Face tokenizer."""

    type_name = "token"

    class Config(SpanChunkingConfig):
        chunk_size: int = Field(512, gt=0, description="Largest chunk, in tokens.")
        chunk_overlap: int = Field(64, ge=0, description="Tokens of the end of a chunk the next one repeats.")
        encoding: str | None = Field(
            None,
            description=f"tiktoken encoding or OpenAI model name (default {DEFAULT_ENCODING} when no tokenizer is "
            "given).",
        )
        tokenizer: str | None = Field(
            None, description="Hugging Face tokenizer: hub id or local folder (a fast tokenizer)."
        )

        @field_validator("encoding")
        @classmethod
        def _known_encoding(cls, value: str | None) -> str | None:
            if value is not None:
                encoding_name(value)
            return value

        @model_validator(mode="after")
        def _one_tokenizer(self) -> TokenChunker.Config:
            if self.encoding is not None and self.tokenizer is not None:
                raise ValueError("give either encoding (tiktoken) or tokenizer (Hugging Face), not both")
            return self

    config: Config

    def fingerprint_settings(self) -> dict[str, Any]:
        # The default encoding is part of what the chunks depend on, even when the spec omits it.
        settings = self.to_dict()
        if self.config.tokenizer is None:
            settings["encoding"] = encoding_name(self.config.encoding or DEFAULT_ENCODING)
        return settings

    @cached_property
    def tokenization(self) -> Tokenization:
        if self.config.tokenizer is None:
            return TiktokenTokenization(get_encoding(self.config.encoding or DEFAULT_ENCODING))
        return HuggingFaceTokenization(self._load_hf_tokenizer(self.config.tokenizer))

    def _load_hf_tokenizer(self, name_or_path: str) -> Any:
        transformers = require("transformers", purpose="Hugging Face tokenizers")
        local = self.resolve_path(name_or_path)
        source = str(local) if local.is_dir() else resolve_model_path(name_or_path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        if not tokenizer.is_fast:
            raise ValueError(
                f"tokenizer {name_or_path!r} has no fast (Rust) version, and character offsets need one; "
                "pick a tokenizer that ships a tokenizer.json"
            )
        return tokenizer

    def split(self, document: ParsedDocument) -> list[Span]:
        tokenization = self.tokenization
        text = document.text
        strip = self.config.strip_whitespace

        @lru_cache(maxsize=4096)
        def token_count(start: int, end: int) -> int:
            # Measured as emitted: " retrieval" is one cl100k token, "retrieval" two.
            if strip:
                start, end = trim_whitespace(text, (start, end))
            return tokenization.count(text[start:end])

        def windows(region: Span) -> list[Span]:
            return token_windows(
                text, region, tokenization, token_count, self.config.chunk_size, self.config.chunk_overlap
            )

        return plan_spans(document, self.config, token_count, windows)
