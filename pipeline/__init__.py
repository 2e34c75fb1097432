"""rag-pipeline: document collections -> a searchable Milvus index, from a declarative YAML spec.

Names are imported on first use, so ``import chunkers.base`` (which needs ``pipeline.component``)
never pulls in the runner, and the runner's import of the stage bases never meets a half-loaded
package.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Pipeline": "pipeline.pipeline",
    "PipelineError": "pipeline.errors",
    "SpecError": "pipeline.errors",
    "StageError": "pipeline.errors",
    "RunSummary": "pipeline.report",
    "Spec": "pipeline.spec",
    "load_spec": "pipeline.spec",
    "parse_spec": "pipeline.spec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
