"""Sources list items cheaply and read their bytes; parsers turn bytes into text with structure."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator

from pipeline.component import Component
from pipeline.types import ParsedDocument, SourceDocument, SourceRef


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

    def check(self) -> list[str]:
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
    """A document that cannot be parsed (corrupt, encrypted, unsupported, empty, ...)."""
