"""The model stages on a CUDA device (CI has none: these skip there, with that reason).

Tiny randomly initialised models built from configs (as in tests/test_catalog.py) check the
plumbing only: that ``device: auto`` puts the model on the GPU, that half precision is used where
asked, and that the GPU's results agree with the CPU's in float32. Nothing here measures quality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from chunkers.meta import MarginSamplingChunker, PerplexityChunker
from core.causal_lm import load_causal_lm
from core.types import ParsedDocument
from embedders.huggingface import HuggingFaceEmbedder
from tests.test_catalog import _small, build_model, save_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TEXTS = [
    "Bees keep the hive at 35 degrees in winter.",
    "Re-wax the chain of a cargo bike every 300 km.",
    "Steep green tea at eighty degrees for two minutes.",
]
PROSE = (
    "The hive needs a dry place. Bees cluster in winter. They keep the brood warm. "
    "A cargo bike carries heavy loads. Its chain needs wax. Check the brakes every month. "
    "Green tea is steeped briefly. Water should not boil. Two minutes are enough."
)


def causal_lm_folder(root: Path) -> Path:
    """A tiny random Qwen2 causal LM with a byte-level tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = root / "tiny-qwen2-lm"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**_small(num_key_value_heads=2, max_position_embeddings=2048))).save_pretrained(folder)
    save_tokenizer(folder, None, "right", "<eos>", byte_level=True)
    return folder


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_embedder_runs_on_the_gpu_by_default_and_agrees_with_the_cpu(tmp_path, dtype):
    folder = build_model(tmp_path, "bert", "tiny-bert")
    reference = HuggingFaceEmbedder(model=str(folder), device="cpu").embed_documents(TEXTS)
    embedder = HuggingFaceEmbedder(model=str(folder), dtype=dtype)  # device: auto
    got = embedder.embed_documents(TEXTS)
    weights = next(embedder.encoder.model.parameters())
    assert weights.device.type == "cuda" and weights.dtype == getattr(torch, dtype)
    assert got.dtype == np.float32 and got.shape == reference.shape
    cosines = (got * reference).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))
    assert cosines.min() > (0.9999 if dtype == "float32" else 0.99), cosines


@pytest.mark.parametrize(
    ("chunker_class", "settings"),
    [(PerplexityChunker, {}), (MarginSamplingChunker, {"max_prompt_chunk_tokens": 256, "max_sentence_tokens": 64})],
)
def test_lm_chunkers_on_the_gpu_find_the_cpu_boundaries(tmp_path, chunker_class, settings):
    folder = str(causal_lm_folder(tmp_path))
    document = ParsedDocument("prose.txt", "prose.txt", "text/plain", "0", PROSE, ())
    on_cpu = chunker_class(model=folder, device="cpu", **settings).split(document)
    on_gpu = chunker_class(model=folder, device="cuda", **settings).split(document)
    assert load_causal_lm(folder, "cuda").model.device.type == "cuda"
    assert on_gpu == on_cpu
    for dtype in ("bfloat16", "float16"):  # half precision may move a near-tie, but must run and keep offsets exact
        spans = chunker_class(model=folder, device="cuda", dtype=dtype, **settings).split(document)
        assert spans[0][0] == 0 and spans[-1][1] == len(PROSE)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
        assert next(load_causal_lm(folder, "cuda", dtype).model.parameters()).dtype == getattr(torch, dtype)
