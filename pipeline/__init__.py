"""rag-pipeline: document collections -> a searchable Milvus index, from a declarative YAML spec."""

from pipeline.errors import PipelineError, SpecError, StageError
from pipeline.pipeline import Pipeline
from pipeline.report import RunSummary
from pipeline.spec import Spec, load_spec, parse_spec

__all__ = ["Pipeline", "PipelineError", "RunSummary", "Spec", "SpecError", "StageError", "load_spec", "parse_spec"]
