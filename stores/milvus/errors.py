"""What the Milvus store raises."""

from __future__ import annotations

from core.errors import LockConflict, PipelineError


class MilvusStoreError(PipelineError):
    """A Milvus operation failed after its retries; names the collection, the operation and why."""


class DatabaseInUseError(MilvusStoreError, LockConflict):
    """The Milvus Lite database is open in another process (Milvus Lite allows one at a time)."""


class InvalidChunksError(ValueError):
    """Chunks that cannot be stored as they are; nothing from the call was written.

    ``problems`` maps each offending source id to its reasons, so the caller can record those
    documents as failed in the store stage and write the others.
    """

    def __init__(self, problems: dict[str, list[str]], where: str):
        self.problems = problems
        lines = [f"{_printable(source_id)}: {'; '.join(reasons)}" for source_id, reasons in problems.items()]
        super().__init__(
            f"{where}: {len(problems)} document(s) have chunks that cannot be stored:\n" + "\n".join(lines)
        )

    @property
    def source_ids(self) -> list[str]:
        return list(self.problems)


def _printable(text: str) -> str:
    """``text`` as is, or quoted with escapes when it holds newlines or other control characters."""
    return text if text.isprintable() else repr(text)
