"""Errors a user sees. Each names what failed and where; none carries a secret."""

from __future__ import annotations


class PipelineError(Exception):
    """Base class for errors raised by this project."""


class SpecError(PipelineError):
    """A spec that cannot be loaded: every problem found, each with file, line and YAML path."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ComponentNotFound(PipelineError):
    pass


class StageError(PipelineError):
    """One document failed in one stage. Recorded, never fatal to the run."""

    def __init__(self, source_id: str, stage: str, reason: str):
        self.source_id = source_id
        self.stage = stage
        self.reason = reason
        super().__init__(f"{source_id}: {stage} failed: {reason}")


class StoreSchemaError(PipelineError):
    """An existing collection does not match what the spec would write into it."""


class ParserStartupError(PipelineError):
    """Parser worker processes exit before they can parse anything: no document could be parsed."""


class LockConflict(PipelineError):
    """Another process holds what this run needs: the collection's re-index lock, or a Milvus
    Lite database (which one process at a time may open)."""


class LockHeldError(LockConflict):
    """Another live run holds the collection's re-index lock."""


class LockLostError(PipelineError):
    """This run no longer holds the re-index lock it took (another run judged it dead and took
    over, or the lock could not be refreshed in time); it stops before writing anything more."""


def is_lock_conflict(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from, is a :class:`LockConflict`."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, LockConflict):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
