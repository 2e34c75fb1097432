"""Chunkers side by side on span-level retrieval: our chunkers against the anchors, one embedder.

    python benchmarks/chunking_quality.py [--systems NAME,...] [--anchors-python VENV/bin/python]
                                          [--dataset DIR] [--k 5 10] [--cache-dir DIR]

The shared ``chunking-eval`` set (Chroma's token-level chunking benchmark: four long corpora and
375 questions whose answers are character spans; see its README) under the protocol it defines:
every system chunks the raw text of every corpus file, all chunks of all corpora are embedded with
the shipped all-MiniLM-L6-v2 into one index (exact cosine search with numpy, so the comparison is
about the chunks alone), each question retrieves its top k chunks, and recall, precision, IoU
(means over questions) and precision_omega come from :mod:`pipeline.excerpts`, the measures the
``eval --excerpts`` command reports. Mean chunk size is in cl100k tokens: chunkers only compare at
similar sizes.

Systems:
* ours: ``token-<size>-<overlap>`` (TokenChunker, cl100k tokens), ``recursive-<chars>-<overlap>``
  (RecursiveChunker, characters), ``rectokens-<size>-<overlap>`` (RecursiveChunker, cl100k
  tokens), ``sentences-<size>`` (a control: whole sentences packed greedily up to ``size`` tokens,
  from :mod:`chunkers.sentences`), ``ppl-<size>[-bfloat16|-int8]`` (Meta-Chunking PPL with the
  shipped SmolLM2, fitted to ``size`` of its tokens; not in the default list: slow on a CPU);
* anchors, run by benchmarks/chunking_anchors.py in the environment chunking_anchors_env.sh makes:
  LangChain's RecursiveCharacterTextSplitter (tiktoken lengths), semchunk, Chonkie's token,
  sentence and recursive chunkers. An anchor that cannot run offline is listed with the reason.

Chunk vectors are cached by text in ``--cache-dir``, so a rerun only embeds new chunks; the embed
column is the time of what this run embedded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.cpu import cpu_model, reported_features  # noqa: E402
from core.types import Element, ParsedDocument  # noqa: E402
from pipeline.excerpts import ExcerptSet, load_excerpts, precision_omega, span_scores  # noqa: E402

Spans = list[tuple[int, int]]

OURS = [
    "token-200-0",
    "token-200-100",
    "token-250-0",
    "token-250-125",
    "token-400-0",
    "token-400-200",
    "recursive-800-0",
    "recursive-1000-0",
    "recursive-1000-500",
    "recursive-1200-0",
    "recursive-1800-0",
    "rectokens-200-0",
    "rectokens-200-100",
    "rectokens-250-0",
    "rectokens-250-125",
    "rectokens-400-0",
    "sentences-250",
]
ANCHORS = [
    "langchain-recursive-200-0",
    "langchain-recursive-250-0",
    "langchain-recursive-250-125",
    "langchain-recursive-400-0",
    "semchunk-200",
    "semchunk-250",
    "chonkie-token-250-0",
    "chonkie-sentence-250",
    "chonkie-recursive-250",
    "chonkie-semantic",
    "chonkie-late",
]


def is_ours(name: str) -> bool:
    return name.split("-")[0] in ("token", "recursive", "rectokens", "sentences", "ppl")


def document(corpus_id: str, text: str) -> ParsedDocument:
    """The raw file text as one parsed document: every system chunks exactly the same characters."""
    return ParsedDocument(
        corpus_id, f"file:///{corpus_id}", "text/plain", "", text, (Element(text, "NarrativeText", 0, len(text)),)
    )


def our_chunker(name: str) -> Callable[[ParsedDocument], Spans]:
    kind, *numbers = name.split("-")
    if kind == "sentences":
        return sentence_packer(int(numbers[0]))
    if kind == "ppl":
        return perplexity_chunker(int(numbers[0]), numbers[1] if len(numbers) > 1 else "float32")
    size, overlap = int(numbers[0]), int(numbers[1])
    if kind == "token":
        from chunkers.token import TokenChunker

        chunker = TokenChunker(TokenChunker.Config(chunk_size=size, chunk_overlap=overlap, encoding="cl100k_base"))
    else:
        from chunkers.recursive import RecursiveChunker

        unit = "tokens" if kind == "rectokens" else "characters"
        chunker = RecursiveChunker(RecursiveChunker.Config(chunk_size=size, chunk_overlap=overlap, size_unit=unit))
    return lambda doc: [(c.start, c.end) for c in chunker.chunk(doc)]


def perplexity_chunker(size: int, mode: str) -> Callable[[ParsedDocument], Spans]:
    """Meta-Chunking PPL with the shipped SmolLM2, fitted to ``size`` tokens of the LM's tokenizer;
    ``mode``: float32, bfloat16 or int8 (dynamic int8 linear layers)."""
    from chunkers.meta import PerplexityChunker

    settings = {"quantize": "int8"} if mode == "int8" else {"dtype": mode}
    chunker = PerplexityChunker(PerplexityChunker.Config(target_size=size, **settings))
    return lambda doc: [(c.start, c.end) for c in chunker.chunk(doc)]


def sentence_packer(size: int) -> Callable[[ParsedDocument], Spans]:
    from chunkers.sentences import split_sentences
    from core.tiktoken_data import get_encoding

    encoding = get_encoding("cl100k_base")

    def pack(doc: ParsedDocument) -> Spans:
        spans: Spans = []
        start = end = tokens = 0
        for s, e in split_sentences(doc.text):
            count = len(encoding.encode(doc.text[s:e], disallowed_special=()))
            if tokens and tokens + count > size:
                spans.append((start, end))
                tokens = 0
            if not tokens:
                start = s
            end, tokens = e, tokens + count
        if tokens:
            spans.append((start, end))
        return spans

    return pack


def anchor_spans(python: str, corpus_dir: Path, names: Sequence[str]) -> dict[str, dict]:
    from core.tiktoken_data import get_encoding, tiktoken_cache_dir

    get_encoding("cl100k_base")  # puts the packaged BPE file into the cache the anchors' tiktoken reads
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tiktoken_cache_dir())}
    if not Path(python).is_file():
        why = f"no anchor environment at {python}: run bash benchmarks/chunking_anchors_env.sh"
        return {name: {"error": why} for name in names}
    run = subprocess.run(
        [python, str(REPO / "benchmarks" / "chunking_anchors.py"), str(corpus_dir), *names],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if run.returncode != 0:
        return {name: {"error": f"chunking_anchors.py failed: {run.stderr.strip()[-300:]}"} for name in names}
    return json.loads(run.stdout)


class VectorCache:
    """MiniLM vectors by chunk text, kept between runs."""

    def __init__(self, folder: Path, embedder):  # type: ignore[no-untyped-def]
        self.folder = folder
        self.embedder = embedder
        folder.mkdir(parents=True, exist_ok=True)
        self.file = folder / "minilm_vectors.npz"
        self.vectors: dict[str, np.ndarray] = {}
        if self.file.exists():
            stored = np.load(self.file)
            self.vectors = {key: stored[key] for key in stored.files}

    def embed(self, texts: Sequence[str]) -> tuple[np.ndarray, float]:
        keys = [hashlib.sha256(t.encode("utf-8", "replace")).hexdigest()[:24] for t in texts]
        missing = sorted({k: t for k, t in zip(keys, texts) if k not in self.vectors}.items())
        began = time.perf_counter()
        if missing:
            vectors = self.embedder.embed_documents([t for _, t in missing])
            self.vectors.update({k: v for (k, _), v in zip(missing, vectors)})
            np.savez(self.file, **self.vectors)
        seconds = time.perf_counter() - began if missing else 0.0
        return np.stack([self.vectors[k] for k in keys]), seconds


def evaluate(
    name: str,
    spans: dict[str, Spans],
    excerpts: ExcerptSet,
    questions: np.ndarray,
    cache: VectorCache,
    encoding,  # type: ignore[no-untyped-def]
    ks: Sequence[int],
) -> dict:
    chunks = [(corpus_id, span) for corpus_id in sorted(spans) for span in spans[corpus_id]]
    texts = [excerpts.corpus_texts[c][s:e] for c, (s, e) in chunks]
    vectors, embed_seconds = cache.embed(texts)
    order = np.argsort(-(questions @ vectors.T), axis=1)[:, : max(ks)]
    result: dict = {
        "chunks": len(chunks),
        "mean_tokens": float(np.mean([len(encoding.encode(t, disallowed_special=())) for t in texts])),
        "embed_seconds": embed_seconds,
    }
    per_question: dict[int, dict[str, list[float]]] = {k: defaultdict(list) for k in ks}
    per_corpus: dict[int, dict[str, list[float]]] = {k: defaultdict(list) for k in ks}
    omega = []
    for q, ranked in zip(excerpts.questions, order):
        omega.append(precision_omega(spans.get(q.corpus_id, []), q.references))
        for k in ks:
            scores = span_scores([chunks[i] for i in ranked[:k]], q.corpus_id, q.references)
            for measure, value in scores.items():
                per_question[k][measure].append(value)
            per_corpus[k][q.corpus_id].append(scores["recall"])
    for k in ks:
        for measure, values in per_question[k].items():
            result[f"{measure}@{k}"] = float(np.mean(values))
            result[f"{measure}@{k}_se"] = float(np.std(values) / np.sqrt(len(values)))
        result[f"recall@{k}_per_corpus"] = {c: float(np.mean(v)) for c, v in per_corpus[k].items()}
    result["precision_omega"] = float(np.mean(omega))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(REPO.parent / "shared" / "datasets" / "chunking-eval"))
    parser.add_argument("--systems", help="comma-separated names (default: all ours and all anchors)")
    parser.add_argument("--anchors-python", default=str(REPO.parent / "venvs" / "chunk-anchors" / "bin" / "python"))
    parser.add_argument("--k", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "rag-pipeline" / "chunking-quality"))
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    dataset = Path(args.dataset)
    if not (dataset / "questions.csv").is_file():
        print(f"chunking-eval not found at {dataset}: pass --dataset", file=sys.stderr)
        return 2
    from core.tiktoken_data import get_encoding
    from embedders.huggingface import HuggingFaceEmbedder

    names = args.systems.split(",") if args.systems else OURS + ANCHORS
    ks = sorted(set(args.k))
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores; {reported_features()}); load {os.getloadavg()[0]:.2f}")
    excerpts = load_excerpts(dataset / "questions.csv", dataset / "corpora")
    skipped = len(excerpts.skipped)
    print(f"{len(excerpts.questions)} questions over {len(excerpts.corpus_files)} corpora; {skipped} skipped")
    embedder = HuggingFaceEmbedder(HuggingFaceEmbedder.Config(model="all-MiniLM-L6-v2"))
    embedder.warm_up()
    questions = np.stack([embedder.embed_query(q.question) for q in excerpts.questions])
    cache = VectorCache(Path(args.cache_dir), embedder)
    encoding = get_encoding("cl100k_base")

    files = {path.name: corpus_id for corpus_id, path in excerpts.corpus_files.items()}
    anchors = anchor_spans(args.anchors_python, dataset / "corpora", [n for n in names if not is_ours(n)])
    results: dict[str, dict] = {}
    for name in names:
        if is_ours(name):
            chunk = our_chunker(name)
            began = time.perf_counter()
            spans = {c: chunk(document(c, excerpts.corpus_texts[c])) for c in excerpts.corpus_texts}
            chunk_seconds = time.perf_counter() - began
        else:
            outcome = anchors.get(name, {"error": "unknown system"})
            if "error" in outcome:
                results[name] = {"error": outcome["error"]}
                print(f"{name}: not run: {outcome['error']}", flush=True)
                continue
            spans = {files[f]: [tuple(s) for s in v] for f, v in outcome["spans"].items() if f in files}
            chunk_seconds = outcome["seconds"]
        results[name] = {
            **evaluate(name, spans, excerpts, questions, cache, encoding, ks),
            "chunk_seconds": chunk_seconds,
        }
        r = results[name]
        print(
            f"{name}: {r['chunks']} chunks, {r['mean_tokens']:.0f} tokens, recall@{ks[0]} {r[f'recall@{ks[0]}']:.4f}, "
            f"iou@{ks[0]} {r[f'iou@{ks[0]}']:.4f} (chunk {chunk_seconds:.1f} s, embed {r['embed_seconds']:.1f} s)",
            flush=True,
        )

    corpora = sorted(excerpts.corpus_files)
    header = f"{'system':<30}{'chunks':>7}{'tokens':>7}"
    for k in ks:
        header += f"{f'recall@{k} ± se':>16}{f'iou@{k}':>9}{f'prec@{k}':>9}"
    header += f"{'p_omega':>9}{'chunk s':>9}" + "".join(f"{c[:10]:>11}" for c in corpora)
    print(f"\nall-MiniLM-L6-v2, exact search over all corpora; recall ± standard error; per-corpus recall@{ks[0]}")
    print(header)
    for name, r in results.items():
        if "error" in r:
            continue
        line = f"{name:<30}{r['chunks']:>7}{r['mean_tokens']:>7.0f}"
        for k in ks:
            line += f"{r[f'recall@{k}']:.4f} ± {r[f'recall@{k}_se']:.3f}".rjust(16)
            line += f"{r[f'iou@{k}']:>9.4f}{r[f'precision@{k}']:>9.4f}"
        line += f"{r['precision_omega']:>9.4f}{r['chunk_seconds']:>9.2f}"
        line += "".join(f"{r[f'recall@{ks[0]}_per_corpus'].get(c, 0.0):>11.3f}" for c in corpora)
        print(line)
    for name, r in results.items():
        if "error" in r:
            print(f"{name}: not run: {r['error']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_model(), "ks": ks, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
