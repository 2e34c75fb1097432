"""Components: small classes with a typed config, one job, and a dict form that round-trips the spec.

Every stage class (source, parser, chunker, embedder, store) subclasses :class:`Component`, names
its ``kind`` and short ``type_name``, and declares its settings as a pydantic model ``Config``
(unknown keys are errors). ``to_dict()`` gives exactly the mapping a spec would hold for it, and
``from_dict()`` rebuilds an equal component.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class ComponentConfig(BaseModel):
    """Base for component settings: unknown keys are rejected instead of silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=())


class Component:
    kind: ClassVar[str] = ""
    type_name: ClassVar[str] = ""
    Config: ClassVar[type[ComponentConfig]] = ComponentConfig

    def __init__(self, config: ComponentConfig | dict[str, Any] | None = None, /, **settings: Any):
        if config is not None and settings:
            raise TypeError("pass either a config object/mapping or keyword settings, not both")
        if isinstance(config, ComponentConfig):
            self.config = config
        else:
            self.config = self.Config.model_validate(config if config is not None else settings)
        # Relative paths in settings are resolved against the spec file's folder (set by the
        # pipeline), so a cron job gets the same index whatever its working directory.
        self.base_dir = Path.cwd()

    def resolve_path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type_name, **self.config.model_dump(mode="json", exclude_defaults=True)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Component:
        data = dict(data)
        declared = data.pop("type", cls.type_name)
        if declared != cls.type_name:
            raise ValueError(f"{cls.__name__} has type {cls.type_name!r}, the mapping says {declared!r}")
        return cls(data)

    def fingerprint_settings(self) -> dict[str, Any]:
        """Settings that change this component's output (used to decide what must be redone).

        Defaults to the full config; components override it to leave out settings that only
        affect speed (batch sizes, devices, thread counts).
        """
        return self.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class MissingDependencyError(ImportError):
    pass


def require(module: str, extra: str | None = None, purpose: str = "") -> Any:
    """Import an optional heavy dependency, or fail with the install command that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        what = f" for {purpose}" if purpose else ""
        hint = f"pip install 'rag-pipeline[{extra}]'" if extra else f"pip install {module.split('.')[0]}"
        raise MissingDependencyError(f"{module} is needed{what} but is not installed ({exc}); run: {hint}") from exc
