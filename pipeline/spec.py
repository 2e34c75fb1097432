"""YAML spec -> validated config objects, with errors that name the file, line and YAML path.

Shape::

    version: 1
    name: quickstart
    stages:
      source:   {type: local, path: docs}          # or a list of sources
      parser:   {type: unstructured}
      chunker:  {type: recursive, chunk_size: 800}
      embedder: {type: huggingface, model: all-MiniLM-L6-v2}
      store:    {type: milvus, uri: ./index.db, collection: docs, bm25: {analyzer: english}}
      sparse:   {type: splade}                     # optional: learned sparse vectors at ingest
    runner:
      batch_size: 32
      type: local                                  # or ray: the same stages on a Ray cluster
      metrics: {textfile: rag.prom}                # optional: Prometheus metrics after each run
    query:                                         # optional: the query path's defaults
      mode: hybrid
      top_k: 10
      fusion: {method: rrf, k: 60}
      reranker: {type: cross-encoder, model: ./my-cross-encoder, top_n: 20}

String values may use ``${VAR}`` and ``${VAR:-default}``; ``$$`` is a literal ``$``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core import registry
from core.component import Component, ComponentConfig
from core.errors import ComponentNotFound, SpecError
from pipeline.query import QueryConfig

YamlPath = tuple[str | int, ...]

STAGES = ("source", "parser", "chunker", "embedder", "store")
OPTIONAL_STAGES = ("sparse",)  # absent unless the spec names them
DEFAULT_TYPES = {"parser": "unstructured", "chunker": "recursive", "embedder": "huggingface", "store": "milvus"}


class RaySettings(BaseModel):
    """Where and how wide the Ray runner runs (``runner: {type: ray, ray: {...}}``)."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(
        None,
        description="Cluster to run on: 'ray://<head>:10001' (Ray Client), or 'auto' / '<head>:6379' from a node of "
        "the cluster; null: the RAY_ADDRESS environment variable if set, else a new local instance. Every worker "
        "needs the project and its models installed.",
    )
    num_cpus: int | None = Field(
        None,
        ge=1,
        description="CPUs of the local instance the runner starts (default: all cores); a cluster brings its own.",
    )
    embed_actors: int | None = Field(
        None,
        ge=1,
        description="Actors holding the chunker and embedder models; default: one per GPU when the embed actors use "
        "GPUs, else 1.",
    )
    embed_cpus: float = Field(
        1.0, gt=0, description="CPUs each embed actor reserves; on CPU workers torch uses that many threads."
    )
    gpus_per_actor: float | None = Field(
        None,
        ge=0,
        description="GPUs each embed actor reserves; default: 1 when the cluster has GPUs and the embedder's device "
        "is auto or cuda, else 0.",
    )
    parse_concurrency: int | None = Field(
        None,
        ge=1,
        description="Parse tasks running at once, one CPU each; default: the cluster's CPUs left after the embed "
        "actors, at least 1.",
    )
    parse_batch_size: int = Field(
        8, ge=1, description="Documents a parse task takes from the driver at a time and hands on as one block."
    )

    @model_validator(mode="after")
    def _num_cpus_only_for_a_local_instance(self) -> RaySettings:
        if self.num_cpus is not None and self.address not in (None, "local"):
            raise ValueError(f"num_cpus sizes a local instance; the cluster at {self.address!r} brings its own CPUs")
        return self


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class MetricsSettings(BaseModel):
    """Where each run's Prometheus metrics go (``runner: {metrics: {...}}``); pip install '.[metrics]'."""

    model_config = ConfigDict(extra="forbid")

    textfile: str | None = Field(
        None,
        description="After each run, write the metrics to this file in the node-exporter textfile format (relative "
        "to the spec's folder; a .prom file in the folder node-exporter's --collector.textfile.directory reads).",
    )
    pushgateway: str | None = Field(
        None,
        description="After each run, push the metrics to this Prometheus Pushgateway (http(s)://host:9091), grouped "
        "by job and collection.",
    )
    job: str = Field("rag_pipeline", min_length=1, description="The Pushgateway job the metrics are pushed under.")
    basic_auth_env: str = Field(
        "PUSHGATEWAY_BASIC_AUTH",
        description="Name of the environment variable holding user:password for the Pushgateway's basic auth, when "
        "it asks for one (never the credentials themselves).",
    )
    timeout_s: float = Field(10.0, gt=0, description="Seconds a push may take before it is given up (the run stands).")

    @field_validator("textfile")
    @classmethod
    def _textfile_is_a_prom_file(cls, value: str | None) -> str | None:
        if value is not None and not value.endswith(".prom"):
            raise ValueError(f"{value!r}: node-exporter's textfile collector reads only files ending in .prom")
        return value

    @field_validator("pushgateway")
    @classmethod
    def _pushgateway_is_a_plain_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http:// or https:// address")
        if parts.username or parts.password:
            raise ValueError(
                "the address must not carry credentials: put user:password in the variable basic_auth_env names"
            )
        return value

    @field_validator("basic_auth_env")
    @classmethod
    def _basic_auth_env_is_a_name(cls, value: str) -> str:
        if not _ENV_NAME.match(value):
            raise ValueError("basic_auth_env is the *name* of an environment variable, not the credentials")
        return value


class RunnerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["local", "ray"] = Field(
        "local",
        description="local: threads and parser processes on this machine; ray: the same stages on Ray Data (pip "
        "install '.[ray]').",
    )
    ray: RaySettings = Field(default_factory=RaySettings, description="Settings of the Ray runner (type: ray).")
    # Large batches let the embedder sort more chunks by length (less padding): on SciFact with
    # MiniLM on a 2-core CPU, 256 documents per batch ingested 1.20x faster than 32.
    batch_size: int = Field(256, ge=1, description="Documents parsed, chunked and embedded together.")
    max_batch_chars: int = Field(
        4_000_000,
        ge=1,
        description="Local runner: a batch closes early once its documents' parsed text reaches this many characters; "
        "parsed documents waiting for the next batch hold at most as many (bounds memory).",
    )
    write_queue_depth: int = Field(
        2,
        ge=1,
        description="Embedded batches waiting for the store writer, which runs beside the embedding; bounds memory.",
    )
    # A 100 MB text has about 125,000 chunks; embedded at once they would hold their texts, metadata
    # and vectors together (gigabytes, and the store's request rows on top). About a megabyte of
    # text per slice keeps a large document near the size of an ordinary batch, and 1,024 texts are
    # still plenty for the embedder to sort by length.
    slice_chunks: int = Field(
        1024,
        ge=1,
        description="A document with more chunks is embedded and written this many chunks at a time (bounds memory); "
        "its stale chunks are deleted and its record marked indexed after the last slice.",
    )
    parse_workers: int = Field(
        1,
        ge=0,
        description="Parser worker processes (with the Ray runner: one per parse task when above 0); 0 parses "
        "in-process (no time/memory caps).",
    )
    parse_timeout_s: float = Field(
        120.0, gt=0, description="A document whose parse takes longer is killed and recorded."
    )
    parse_memory_mb: int | None = Field(
        4096, ge=256, description="Resident-memory cap per parser worker (a worker above it is killed); null for none."
    )
    failures_file: str | None = Field(
        None,
        description=(
            "JSONL file of per-document failures (default: <spec name>.failures.jsonl next to the spec, "
            "pipeline.failures.jsonl without a name)."
        ),
    )
    progress: Literal["auto", "always", "never"] = "auto"
    metrics: MetricsSettings = Field(
        default_factory=MetricsSettings,
        description="Where each run's Prometheus metrics are written or pushed (the metrics extra).",
    )
    cleanup: Literal["none", "incremental", "full"] = Field(
        "full",
        description="none: only add/update; incremental: also delete stale chunks of changed sources; "
        "full: also delete sources no longer listed (per source root, only after a complete listing).",
    )

    @model_validator(mode="after")
    def _ray_settings_need_the_ray_runner(self) -> RunnerConfig:
        if self.type != "ray" and "ray" in self.model_fields_set:
            raise ValueError("runner.ray settings apply only with runner type: ray")
        return self


class SpecModel(BaseModel):
    """Top-level keys; the stage mappings are validated per component afterwards."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    name: str | None = None
    stages: dict[str, Any]
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    query: dict[str, Any] = Field(
        default_factory=dict, description="Query defaults (pipeline.query.QueryConfig) plus an optional reranker."
    )


@dataclass
class ComponentSpec:
    kind: str
    type_name: str
    cls: type[Component]
    config: ComponentConfig

    def build(self, base_dir: Path | None = None) -> Component:
        component = self.cls(self.config)
        if base_dir is not None:
            component.base_dir = base_dir
        return component

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type_name, **self.config.model_dump(mode="json", exclude_defaults=True)}


@dataclass
class Spec:
    stages: dict[str, list[ComponentSpec] | ComponentSpec]
    runner: RunnerConfig
    name: str | None = None
    path: Path | None = None  # the YAML file, for resolving relative paths and naming errors
    base_dir: Path = field(default_factory=Path.cwd)
    query: QueryConfig = field(default_factory=QueryConfig)
    reranker: ComponentSpec | None = None  # query.reranker

    @property
    def sources(self) -> list[ComponentSpec]:
        return self.stages["source"]  # type: ignore[return-value]

    def stage(self, name: str) -> ComponentSpec:
        return self.stages[name]  # type: ignore[return-value]

    def with_collection(self, name: str) -> Spec:
        """The same spec, its store writing to and searching the collection ``name``."""
        store = self.stage("store")
        config = type(store.config).model_validate({**store.config.model_dump(), "collection": name})
        return dataclasses.replace(self, stages={**self.stages, "store": dataclasses.replace(store, config=config)})

    def to_dict(self) -> dict[str, Any]:
        stages: dict[str, Any] = {}
        for name in STAGES:
            value = self.stages[name]
            stages[name] = [s.to_dict() for s in value] if isinstance(value, list) else value.to_dict()
        out: dict[str, Any] = {"version": 1}
        if self.name:
            out["name"] = self.name
        for name in OPTIONAL_STAGES:
            if self.stages.get(name) is not None:
                stages[name] = self.stage(name).to_dict()
        out["stages"] = stages
        runner = self.runner.model_dump(mode="json", exclude_defaults=True)
        if runner:
            out["runner"] = runner
        query = self.query.model_dump(mode="json", exclude_defaults=True)
        if self.reranker is not None:
            query["reranker"] = self.reranker.to_dict()
        if query:
            out["query"] = query
        return out

    def to_yaml(self) -> str:
        text: str = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
        return text


# ---------------------------------------------------------------------------------------------
# YAML with line numbers


class _Located:
    """Maps YAML paths to 1-based line numbers."""

    def __init__(self, filename: str):
        self.filename = filename
        self.lines: dict[YamlPath, int] = {}

    def where(self, path: YamlPath) -> str:
        probe = path
        while probe and probe not in self.lines:
            probe = probe[:-1]
        line = self.lines.get(probe)
        return f"{self.filename}:{line}" if line else self.filename


def _compose(text: str, located: _Located) -> Any:
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    finally:
        loader.dispose()
    if root is None:
        return {}
    problems: list[str] = []

    def build(node: yaml.Node, path: YamlPath) -> Any:
        located.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            loader.flatten_mapping(node)
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = loader.construct_object(key_node, deep=True)
                if key in result:
                    problems.append(
                        f"{located.filename}:{key_node.start_mark.line + 1} {_dotted(path + (key,))}: duplicate key"
                    )
                located.lines[path + (key,)] = key_node.start_mark.line + 1
                result[key] = build(value_node, path + (key,))
            return result
        if isinstance(node, yaml.SequenceNode):
            return [build(item, path + (i,)) for i, item in enumerate(node.value)]
        return loader.construct_object(node, deep=True)

    data = build(root, ())
    if problems:
        raise SpecError(problems)
    return data


_ENV_PATTERN = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


def substitute_env(value: Any, path: YamlPath, located: _Located, problems: list[str], env: Mapping[str, str]) -> Any:
    """Replace ${VAR} / ${VAR:-default} in every string; unset variables without default are errors."""
    if isinstance(value, dict):
        return {k: substitute_env(v, path + (k,), located, problems, env) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_env(v, path + (i,), located, problems, env) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        problems.append(f"{located.where(path)} {_dotted(path)}: environment variable {name} is not set")
        return ""

    return _ENV_PATTERN.sub(replace, value)


def _dotted(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


_TYPE_WORDS = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _describe(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    given = error.get("input")
    if kind in _TYPE_WORDS:
        return f"expected {_TYPE_WORDS[kind]}, got {json.dumps(given, ensure_ascii=False, default=str)}"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind in ("literal_error", "enum"):
        return f"{error['msg'][0].lower()}{error['msg'][1:]}, got {json.dumps(given, ensure_ascii=False, default=str)}"
    msg: str = error["msg"]
    return msg[0].lower() + msg[1:]


def _validation_problems(exc: ValidationError, prefix: YamlPath, located: _Located) -> list[str]:
    problems = []
    for error in exc.errors():
        loc = prefix + tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        problems.append(f"{located.where(loc)} {_dotted(loc)}: {_describe(error)}")
    return problems


# ---------------------------------------------------------------------------------------------


def _component(
    kind: str, raw: Any, path: YamlPath, located: _Located, allowed: list[str], problems: list[str]
) -> ComponentSpec | None:
    if not isinstance(raw, dict):
        problems.append(
            f"{located.where(path)} {_dotted(path)}: expected a mapping with a 'type' key, got "
            f"{json.dumps(raw, default=str)}"
        )
        return None
    settings = dict(raw)
    type_name = settings.pop("type", DEFAULT_TYPES.get(kind))
    if type_name is None:
        problems.append(f"{located.where(path)} {_dotted(path)}.type: required key is missing")
        return None
    if not isinstance(type_name, str):
        problems.append(
            f"{located.where(path + ('type',))} {_dotted(path + ('type',))}: expected a string, got "
            f"{json.dumps(type_name, default=str)}"
        )
        return None
    try:
        cls = registry.resolve(kind, type_name, allowed)
    except ComponentNotFound as exc:
        problems.append(f"{located.where(path + ('type',))} {_dotted(path + ('type',))}: {exc}")
        return None
    try:
        config = cls.Config.model_validate(settings)
    except ValidationError as exc:
        problems.extend(_validation_problems(exc, path, located))
        return None
    return ComponentSpec(kind=kind, type_name=type_name, cls=cls, config=config)


def parse_spec(
    data: Any,
    *,
    filename: str = "<spec>",
    located: _Located | None = None,
    allowed_modules: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> Spec:
    """Validate an already-loaded mapping (from YAML or built in code) into a Spec."""
    located = located or _Located(filename)
    env = os.environ if env is None else env
    allowed = list(allowed_modules)
    problems: list[str] = []
    if not isinstance(data, dict):
        raise SpecError([f"{located.where(())} <root>: expected a mapping, got {type(data).__name__}"])
    data = substitute_env(data, (), located, problems, env)
    if problems:  # values with a missing variable would only add confusing follow-up errors
        raise SpecError(problems)
    # The top level, the runner and every stage are validated apart, so one spec error never hides
    # another: a wrong runner setting and a wrong stage setting are reported together.
    raw_stages: dict[str, Any] | None
    try:
        top = SpecModel.model_validate({key: value for key, value in data.items() if key != "runner"})
        raw_stages, raw_query, name = top.stages, top.query, top.name
    except ValidationError as exc:
        problems.extend(_validation_problems(exc, (), located))
        raw_stages = data["stages"] if isinstance(data.get("stages"), dict) else None
        raw_query = data["query"] if isinstance(data.get("query"), dict) else {}
        name = None
    runner = RunnerConfig()
    if "runner" in data:
        try:
            runner = RunnerConfig.model_validate(data["runner"])
        except ValidationError as exc:
            problems.extend(_validation_problems(exc, ("runner",), located))
    if raw_stages is None:  # missing or not a mapping: already reported
        raise SpecError(problems)

    stages: dict[str, Any] = {}
    for key in raw_stages:
        if key not in STAGES + OPTIONAL_STAGES:
            problems.append(
                f"{located.where(('stages', key))} stages.{key}: unknown stage; expected one of "
                f"{', '.join(STAGES + OPTIONAL_STAGES)}"
            )
    for kind in STAGES:
        path: YamlPath = ("stages", kind)
        raw = raw_stages.get(kind)
        if kind == "source":
            if raw is None:
                problems.append(f"{located.where(('stages',))} stages.source: required key is missing")
                continue
            items = raw if isinstance(raw, list) else [raw]
            item_paths = [path + (i,) for i in range(len(items))] if isinstance(raw, list) else [path]
            built = [_component(kind, item, p, located, allowed, problems) for item, p in zip(items, item_paths)]
            stages[kind] = [b for b in built if b is not None]
            continue
        if raw is None:
            raw = {}
        stages[kind] = _component(kind, raw, path, located, allowed, problems)
    for kind in OPTIONAL_STAGES:
        if raw_stages.get(kind) is not None:
            stages[kind] = _component(kind, raw_stages[kind], ("stages", kind), located, allowed, problems)
    query, reranker = _query_section(raw_query, located, allowed, problems)
    if problems:
        raise SpecError(problems)
    return Spec(
        stages=stages,
        runner=runner,
        name=name,
        path=None,
        base_dir=base_dir or Path.cwd(),
        query=query,
        reranker=reranker,
    )


def _query_section(
    raw: dict[str, Any], located: _Located, allowed: list[str], problems: list[str]
) -> tuple[QueryConfig, ComponentSpec | None]:
    """The ``query:`` mapping: query settings plus an optional ``reranker`` component."""
    settings = dict(raw)
    reranker_raw = settings.pop("reranker", None)
    reranker = None
    if reranker_raw is not None:
        reranker = _component("reranker", reranker_raw, ("query", "reranker"), located, allowed, problems)
    try:
        return QueryConfig.model_validate(settings), reranker
    except ValidationError as exc:
        problems.extend(_validation_problems(exc, ("query",), located))
        return QueryConfig(), reranker


def load_spec(
    path: str | os.PathLike[str], *, allowed_modules: Iterable[str] = (), env: Mapping[str, str] | None = None
) -> Spec:
    path = Path(path)
    located = _Located(path.name)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError([f"{path}: cannot read spec: {exc.strerror or exc}"]) from None
    try:
        data = _compose(text, located)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path.name}:{mark.line + 1}" if mark else path.name
        raise SpecError([f"{where} invalid YAML: {getattr(exc, 'problem', None) or exc}"]) from None
    spec = parse_spec(data, located=located, allowed_modules=allowed_modules, env=env, base_dir=path.resolve().parent)
    spec.path = path
    return spec


def json_schema() -> dict[str, Any]:
    """JSON Schema of the spec for editors: top-level keys plus every built-in component's settings."""
    schema = SpecModel.model_json_schema()
    defs = schema.setdefault("$defs", {})
    stage_props: dict[str, Any] = {}
    for kind in STAGES + OPTIONAL_STAGES + ("reranker",):
        variants = []
        for type_name in registry.known_names(kind):
            try:
                cls = registry.resolve(kind, type_name)
            except ComponentNotFound:
                continue
            sub = cls.Config.model_json_schema(ref_template="#/$defs/{model}")
            defs.update(sub.pop("$defs", {}))
            sub.setdefault("properties", {})["type"] = {"const": type_name}
            sub["required"] = sorted(set(sub.get("required", [])) | ({"type"} if kind not in DEFAULT_TYPES else set()))
            sub["title"] = f"{kind}: {type_name}"
            sub["additionalProperties"] = False
            variants.append(sub)
        one = {"anyOf": variants}
        stage_props[kind] = {"anyOf": [one, {"type": "array", "items": one}]} if kind == "source" else one
    reranker_schema = stage_props.pop("reranker")
    schema["properties"]["stages"] = {
        "type": "object",
        "properties": stage_props,
        "required": ["source"],
        "additionalProperties": False,
    }
    query_schema = QueryConfig.model_json_schema(ref_template="#/$defs/{model}")
    defs.update(query_schema.pop("$defs", {}))
    query_schema["properties"]["reranker"] = reranker_schema
    query_schema["additionalProperties"] = False
    schema["properties"]["query"] = query_schema
    schema["title"] = "rag-pipeline spec"
    return schema
