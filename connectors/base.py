"""Sources list items cheaply and read their bytes; parsers turn bytes into text with structure."""

from __future__ import annotations

import builtins
from abc import abstractmethod
from collections.abc import Iterator
from typing import Annotated, Any

from pydantic import AfterValidator

from core.component import Component
from core.types import ParsedDocument, SourceDocument, SourceRef


def path_id(raw: bytes) -> str:
    """A file path's bytes as the text of a source id, one distinct text per distinct path.

    A UTF-8 path without a backslash is itself. Any other path (not UTF-8, or holding a
    backslash) escapes a backslash as ``\\\\`` and each byte that is not UTF-8 as ``\\xHH``: the
    escaped form of the name ``caf<0xE9>`` is then ``caf\\xe9``, which no file literally named
    ``caf\\xe9`` can have (its own backslash is doubled), so two files never share an id.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        if "\\" not in text:
            return text
    return raw.replace(b"\\", b"\\\\").decode("utf-8", errors="backslashreplace")


# -- settings every listing source shares ------------------------------------------------------


def _usable_namespace(value: str | None) -> str | None:
    """A namespace prefixes every source id: surrounding slashes go, and one of only slashes is refused."""
    if value is not None and not value.strip("/"):
        raise ValueError("namespace must not be empty")
    return value.strip("/") if value is not None else None


def _patterns_not_blank(value: list[str]) -> list[str]:
    if any(not pattern.strip() for pattern in value):
        raise ValueError("patterns must not be blank")
    return value


# A source's ``namespace`` setting, and its ``include``/``exclude`` globs.
Namespace = Annotated[str | None, AfterValidator(_usable_namespace)]
GlobPatterns = Annotated[list[str], AfterValidator(_patterns_not_blank)]


class Source(Component):
    kind = "source"

    @abstractmethod
    def list(self) -> Iterator[SourceRef]:
        """Yield every item lazily (a 10,000-file folder is never held in memory at once)."""

    @abstractmethod
    def read(self, ref: SourceRef) -> bytes:
        """Return the item's bytes; raise OSError (or a subclass) when it cannot be read."""

    @property
    @abstractmethod
    def scope(self) -> str:
        """The prefix shared by every source id this source yields (used to scope cleanup)."""

    def check(self) -> builtins.list[str]:  # builtins: the method list() above shadows the type here
        """Problems found without reading anything (a missing folder, missing credentials)."""
        return []

    def load(self, ref: SourceRef) -> SourceDocument:
        return SourceDocument.from_ref(ref, self.read(ref))


class Parser(Component):
    kind = "parser"

    @abstractmethod
    def parse(self, document: SourceDocument) -> ParsedDocument:
        """Parse one document. Raise ParseFailure with a reason a user can act on."""

    def check(self) -> list[str]:
        """Problems that would fail every document (a missing model or tool), found up front."""
        return []


class ParseFailure(Exception):
    """A document that cannot be parsed (corrupt, encrypted, unsupported, ...)."""


class EmptyDocument(ParseFailure):
    """The document holds no text at all (0 bytes, or only whitespace).

    Not a failure of the run: a parser turns it into a parsed document with empty text, which is
    indexed with no chunks, so an emptied file's old chunks are deleted rather than kept forever.
    """


def empty_document(document: SourceDocument, reason: str, metadata: dict[str, Any] | None = None) -> ParsedDocument:
    """The parsed form of an empty source: no text, no elements, and why in its metadata."""
    return ParsedDocument(
        source_id=document.source_id,
        uri=document.uri,
        media_type=document.media_type,
        content_hash=document.content_hash,
        text="",
        elements=(),
        metadata={**(metadata or document.metadata), "empty": reason},
    )
