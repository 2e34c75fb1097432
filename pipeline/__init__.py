"""rag-pipeline: document collections -> a searchable Milvus index, from a declarative YAML spec.

The orchestration layer: it stands on the stage packages (``connectors``, ``chunkers``,
``embedders``, ``stores``, ``rerankers``), which stand on ``core``; none of them imports this
package, so importing it eagerly here never meets a half-loaded module.
"""

from core.errors import PipelineError, SpecError, StageError
from pipeline.pipeline import Pipeline
from pipeline.report import RunSummary
from pipeline.spec import Spec, load_spec, parse_spec

__all__ = ["Pipeline", "PipelineError", "RunSummary", "Spec", "SpecError", "StageError", "load_spec", "parse_spec"]
