"""The object a backend service holds: built once from a spec, models and clients reused per call."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.report import Progress, RunSummary
from pipeline.runner import LocalRunner
from pipeline.spec import Spec, load_spec, parse_spec


class Pipeline:
    """``Pipeline.from_yaml("spec.yaml").ingest()`` or ``Pipeline({...spec mapping...})``.

    Components are built on first use and kept, so a long-running service pays model loading
    once. ``ingest`` calls are serialised per pipeline object.
    """

    def __init__(
        self,
        spec: Spec | dict[str, Any],
        *,
        base_dir: str | os.PathLike[str] | None = None,
        allowed_modules: Iterable[str] = (),
    ):
        if not isinstance(spec, Spec):
            spec = parse_spec(spec, allowed_modules=allowed_modules, base_dir=Path(base_dir) if base_dir else None)
        elif base_dir is not None:
            spec.base_dir = Path(base_dir)
        self.spec = spec
        self._components: dict[str, Any] = {}
        self._build_lock = threading.Lock()
        self._ingest_lock = threading.Lock()

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], *, allowed_modules: Iterable[str] = ()) -> "Pipeline":
        return cls(load_spec(path, allowed_modules=allowed_modules))

    # -- components ----------------------------------------------------------------------------

    def _component(self, name: str) -> Any:
        with self._build_lock:
            if name not in self._components:
                if name == "sources":
                    self._components[name] = [s.build(self.spec.base_dir) for s in self.spec.sources]
                else:
                    self._components[name] = self.spec.stage(name).build(self.spec.base_dir)
            return self._components[name]

    @property
    def sources(self) -> list[Any]:
        return self._component("sources")

    @property
    def parser(self) -> Any:
        return self._component("parser")

    @property
    def chunker(self) -> Any:
        return self._component("chunker")

    @property
    def embedder(self) -> Any:
        return self._component("embedder")

    @property
    def store(self) -> Any:
        return self._component("store")

    # -- work ----------------------------------------------------------------------------------

    def failures_path(self) -> Path | None:
        configured = self.spec.runner.failures_file
        if configured == "":
            return None
        name = configured or f"{self.spec.name or 'pipeline'}.failures.jsonl"
        path = Path(name).expanduser()
        return path if path.is_absolute() else self.spec.base_dir / path

    def ingest(self, *, progress: Progress | None = None) -> RunSummary:
        """Index every document the sources list; returns the run summary (never raises per document)."""
        with self._ingest_lock:
            runner = LocalRunner(
                self.sources,
                self.parser,
                self.chunker,
                self.embedder,
                self.store,
                self.spec.runner,
                failures_path=self.failures_path(),
            )
            return runner.run(progress)

    def validate(self) -> list[str]:
        """Problems that would stop a run, found without running it (the spec itself is already valid)."""
        problems: list[str] = []
        for source in self.sources:
            problems.extend(f"stages.source ({source.type_name}): {p}" for p in source.check())
        try:
            dimension, model_id = self.embedder.dimension, self.embedder.model_id
        except Exception as exc:
            return problems + [f"stages.embedder: cannot load model: {exc}"]
        try:
            problems.extend(f"stages.store: {p}" for p in self.store.check(dimension, model_id))
        except Exception as exc:
            problems.append(f"stages.store: cannot reach the store: {exc}")
        return problems

    def to_dict(self) -> dict[str, Any]:
        return self.spec.to_dict()

    def close(self) -> None:
        store = self._components.get("store")
        if store is not None:
            store.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
