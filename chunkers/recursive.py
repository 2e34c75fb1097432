"""Recursive character chunking with exact offsets.

The rule is LangChain's ``RecursiveCharacterTextSplitter``: cut a text at the first separator (of
an ordered list) that occurs in it, merge the pieces greedily up to ``chunk_size`` characters with
``chunk_overlap`` characters carried over, and cut any piece that is still too long with the next
separators. LangChain runs that rule on strings and then has to *search* for each chunk in the
document to learn where it starts, which mislocates repeated text. Here the same rule runs on
positions: every piece is a span of the document, so chunk offsets are exact by construction. For
English text with LangChain's separators and ``keep_separator`` true the chunk texts are the ones
LangChain returns.

Separators: LangChain's defaults (paragraph, line, space, character) with CJK sentence and clause
punctuation (。！？ then ； then ，、) tried before spaces, so Chinese text is cut between sentences
rather than between arbitrary characters; for text without CJK punctuation this is exactly
LangChain's list. ``language`` picks LangChain's separators for a language (``markdown``,
``python``, ``html`` ...) instead.

Sizes are characters by default; ``size_unit: tokens`` counts tokens of a tiktoken ``encoding``
instead (LangChain's ``from_tiktoken_encoder``), so chunk sizes match what an embedder's window and
published chunking benchmarks count. The document is tokenized once and a span counts the tokens
that start inside it; LangChain adds up the counts of the pieces, so where merged pieces tokenize
differently than apart its cuts can differ from these by a piece.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator

from chunkers.base import Chunker
from chunkers.spans import (
    Measure,
    Span,
    SpanChunkingConfig,
    char_length,
    pack_pieces,
    plan_spans,
)
from core.component import require
from core.types import ParsedDocument

if TYPE_CHECKING:
    from chunkers.token import TiktokenTokenization

# Zero-width cuts right after CJK punctuation, so the mark stays with the text it ends (whatever
# keep_separator says). A run of marks or a closing quote after the mark stays with the sentence.
_CLOSERS = "”’」』）"
CJK_SENTENCE_END = rf"(?<=[。！？])(?![。！？{_CLOSERS}])|(?<=[。！？][{_CLOSERS}])"
CJK_CLAUSE_END = r"(?<=[；])(?!；)"
CJK_COMMA = r"(?<=[，、])(?![，、])"

# Regular expressions; "" means "between any two characters", the last resort.
DEFAULT_SEPARATORS: tuple[str, ...] = (r"\n\n", r"\n", CJK_SENTENCE_END, CJK_CLAUSE_END, CJK_COMMA, r" ", "")

KeepSeparator = Literal["start", "end"] | None


def _language_separators(language: str) -> list[str]:
    text_splitters = require("langchain_text_splitters", purpose="language-specific separators")
    splitter = text_splitters.RecursiveCharacterTextSplitter
    separators: list[str] = splitter.get_separators_for_language(text_splitters.Language(language))
    return separators


def _language_names() -> list[str]:
    text_splitters = require("langchain_text_splitters", purpose="language-specific separators")
    return [language.value for language in text_splitters.Language]


@dataclass(frozen=True)
class SeparatorSplitter:
    """Cuts a region of ``text`` recursively at separators, working on spans only.

    ``patterns`` are compiled separators in order of preference; ``None`` stands for the empty
    separator (cut between characters).
    """

    text: str
    patterns: tuple[re.Pattern[str] | None, ...]
    keep: KeepSeparator
    chunk_size: int
    chunk_overlap: int
    measure: Measure = char_length

    def split(self, region: Span) -> Iterator[Span]:
        return self._split(region, 0)

    def _split(self, region: Span, first_level: int) -> Iterator[Span]:
        level, pieces = self._pieces_at_first_separator(region, first_level)
        can_go_deeper = level is not None and self.patterns[level] is not None and level + 1 < len(self.patterns)

        def split_oversized(piece: Span) -> Iterator[Span]:
            return self._split(piece, level + 1) if can_go_deeper and level is not None else iter([piece])

        return pack_pieces(pieces, self.chunk_size, self.chunk_overlap, self.measure, split_oversized)

    def _pieces_at_first_separator(self, region: Span, first_level: int) -> tuple[int | None, Iterator[Span]]:
        """The region cut at the first separator (from ``first_level`` on) that occurs in it.

        Pieces are generated as they are consumed: a document without paragraph breaks is cut at
        every space, and listing those millions of pieces would cost gigabytes.
        """
        start, end = region
        # Search a copy of the region, as LangChain does, so lookarounds cannot see past its edges
        # (for the whole text the slice is the text itself, not a copy).
        segment = self.text[start:end]
        for level in range(first_level, len(self.patterns)):
            pattern = self.patterns[level]
            if pattern is None:
                return level, ((i, i + 1) for i in range(start, end))
            if pattern.search(segment):
                cuts = ((start + m.start(), start + m.end()) for m in pattern.finditer(segment))
                return level, self._pieces_between(cuts, region)
        return None, iter([region])

    def _pieces_between(self, cuts: Iterator[Span], region: Span) -> Iterator[Span]:
        """Pieces of a region cut at separator matches; the separator goes where ``keep`` says."""
        piece_start, end = region
        for cut_start, cut_end in cuts:
            if self.keep == "start":
                piece, piece_start = (piece_start, cut_start), cut_start
            elif self.keep == "end":
                piece, piece_start = (piece_start, cut_end), cut_end
            else:
                piece, piece_start = (piece_start, cut_start), cut_end
            if piece[0] < piece[1]:
                yield piece
        if piece_start < end:
            yield piece_start, end


class RecursiveChunker(Chunker):
    """Character-count chunks cut at the most meaningful separator available."""

    type_name = "recursive"

    class Config(SpanChunkingConfig):
        chunk_size: int = Field(1000, gt=0, description="Largest chunk, in characters (or tokens, see size_unit).")
        chunk_overlap: int = Field(
            200, ge=0, description="Characters (or tokens) of the end of a chunk the next one repeats."
        )
        size_unit: Literal["characters", "tokens"] = Field(
            "characters", description="What chunk_size and chunk_overlap count: characters, or tokens of encoding."
        )
        encoding: str | None = Field(
            None, description="With size_unit tokens: tiktoken encoding or OpenAI model name (default cl100k_base)."
        )
        separators: list[str] | None = Field(
            None,
            description="Separators in order of preference; default: paragraph, line, CJK punctuation, space, "
            "character.",
        )
        is_separator_regex: bool = Field(False, description="Treat the given separators as regular expressions.")
        language: str | None = Field(
            None, description="Use LangChain's separators for this language (markdown, python, html, ...)."
        )
        keep_separator: bool | Literal["start", "end"] = Field(
            True,
            description="Where a separator goes: start of the next piece (true/'start'), end of the previous one "
            "('end'), or nowhere at chunk edges (false).",
        )

        @field_validator("separators")
        @classmethod
        def _not_empty(cls, value: list[str] | None) -> list[str] | None:
            if value is not None and not value:
                raise ValueError('separators must list at least one separator ("" cuts between characters)')
            return value

        @field_validator("language")
        @classmethod
        def _known_language(cls, value: str | None) -> str | None:
            if value is not None and value not in _language_names():
                raise ValueError(f"unknown language {value!r}; known: {', '.join(_language_names())}")
            return value

        @model_validator(mode="after")
        def _separators_compile(self) -> RecursiveChunker.Config:
            if self.encoding is not None and self.size_unit != "tokens":
                raise ValueError("encoding counts tokens: set size_unit: tokens, or leave encoding out")
            if self.encoding is not None:
                from core.tiktoken_data import encoding_name

                encoding_name(self.encoding)  # an unknown name fails here, not at the first document
            if self.language is not None and self.separators is not None:
                raise ValueError("give either separators or language, not both")
            if self.separators is not None and self.is_separator_regex:
                for separator in self.separators:
                    try:
                        re.compile(separator)
                    except re.error as exc:
                        raise ValueError(f"separator {separator!r} is not a valid regular expression: {exc}") from exc
            return self

    config: Config

    @cached_property
    def _patterns(self) -> tuple[re.Pattern[str] | None, ...]:
        if self.config.language is not None:
            expressions = _language_separators(self.config.language)
        elif self.config.separators is None:
            expressions = list(DEFAULT_SEPARATORS)
        elif self.config.is_separator_regex:
            expressions = self.config.separators
        else:
            expressions = [re.escape(s) for s in self.config.separators]
        return tuple(re.compile(e) if e else None for e in expressions)

    @property
    def _keep(self) -> KeepSeparator:
        keep = self.config.keep_separator
        if keep is True:
            return "start"
        return keep or None

    @cached_property
    def _tokens(self) -> TiktokenTokenization:
        from chunkers.token import DEFAULT_ENCODING, TiktokenTokenization
        from core.tiktoken_data import get_encoding

        return TiktokenTokenization(get_encoding(self.config.encoding or DEFAULT_ENCODING))

    def split(self, document: ParsedDocument) -> list[Span]:
        text = document.text
        measure = char_length
        if self.config.size_unit == "tokens":
            # The document is tokenized once; a span measures the tokens that start inside it. Merging
            # pieces re-measures the growing chunk for every piece, so encoding each candidate would
            # cost (pieces x chunk length) characters of encoding.
            starts = self._tokens.token_starts(text)

            def measure(start: int, end: int) -> int:
                return bisect_left(starts, end) - bisect_left(starts, start)

        splitter = SeparatorSplitter(
            text=text,
            patterns=self._patterns,
            keep=self._keep,
            chunk_size=self.config.chunk_size,
            chunk_overlap=self.config.chunk_overlap,
            measure=measure,
        )
        return plan_spans(document, self.config, measure, splitter.split)
