"""Chunk spans from the anchor chunkers as their users run them, for benchmarks/chunking_quality.py.

Runs inside the separate environment that benchmarks/chunking_anchors_env.sh makes (LangChain's
text splitters, semchunk, Chonkie), so none of them is a dependency of the project:

    VENV/bin/python benchmarks/chunking_anchors.py CORPUS_DIR SYSTEM [SYSTEM ...] > spans.json

Prints ``{system: {"seconds": chunking time, "spans": {corpus file name: [[start, end], ...]}} |
{"error": why}}``. Offsets are
characters of the file text, from each library's own offsets (LangChain's ``add_start_index``,
semchunk's ``offsets=True``, Chonkie's ``start_index``/``end_index``), checked against the text.
Standard library and the anchors only: the project is not importable here.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

Spans = list[tuple[int, int]]


def _langchain(size: int, overlap: int) -> Callable[[str], Spans]:
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    splitter = RecursiveCharacterTextSplitter.from_tiktoken_encoder(
        encoding_name="cl100k_base", chunk_size=size, chunk_overlap=overlap
    )

    def split(text: str) -> Spans:
        # Located here, not with add_start_index: with a token length function LangChain subtracts
        # the overlap (tokens) from a character offset and misses overlapping chunks (start_index -1).
        spans: Spans = []
        cursor = 0
        for chunk in splitter.split_text(text):
            start = text.find(chunk, cursor)
            if start < 0:
                raise ValueError(f"a chunk is not a substring of the text: {chunk[:60]!r}")
            spans.append((start, start + len(chunk)))
            cursor = start + 1
        return spans

    return split


def _semchunk(size: int) -> Callable[[str], Spans]:
    import semchunk
    import tiktoken

    chunker = semchunk.chunkerify(tiktoken.get_encoding("cl100k_base"), size)

    def split(text: str) -> Spans:
        _, offsets = chunker(text, offsets=True)
        return [tuple(o) for o in offsets]  # type: ignore[misc]

    return split


def _chonkie(kind: str, size: int, overlap: int = 0) -> Callable[[str], Spans]:
    import chonkie
    import tiktoken

    encoding = tiktoken.get_encoding("cl100k_base")  # by name, Chonkie fetches a tokenizer.json from the hub

    if kind == "token":
        chunker = chonkie.TokenChunker(tokenizer=encoding, chunk_size=size, chunk_overlap=overlap)
    elif kind == "sentence":
        chunker = chonkie.SentenceChunker(tokenizer=encoding, chunk_size=size, chunk_overlap=overlap)
    else:
        chunker = chonkie.RecursiveChunker(tokenizer=encoding, chunk_size=size)

    def split(text: str) -> Spans:
        return [(c.start_index, c.end_index) for c in chunker.chunk(text)]

    return split


SYSTEMS: dict[str, Callable[[], Callable[[str], Spans]]] = {
    "langchain-recursive-250-125": lambda: _langchain(250, 125),
    "langchain-recursive-250-0": lambda: _langchain(250, 0),
    "langchain-recursive-400-0": lambda: _langchain(400, 0),
    "langchain-recursive-200-0": lambda: _langchain(200, 0),
    "semchunk-250": lambda: _semchunk(250),
    "semchunk-200": lambda: _semchunk(200),
    "chonkie-token-250-0": lambda: _chonkie("token", 250),
    "chonkie-token-250-125": lambda: _chonkie("token", 250, 125),
    "chonkie-sentence-250": lambda: _chonkie("sentence", 250),
    "chonkie-recursive-250": lambda: _chonkie("recursive", 250),
}
# What the anchors offer but cannot run here, and why (printed beside the table).
OFFLINE_LIMITS = {
    "chonkie-semantic": "Chonkie's SemanticChunker loads its embedding model from the Hugging Face hub (unreachable)",
    "chonkie-late": "Chonkie's LateChunker loads its embedding model from the Hugging Face hub (unreachable)",
}


def main() -> int:
    corpus_dir, systems = Path(sys.argv[1]), sys.argv[2:]
    texts = {p.name: p.read_text(encoding="utf-8") for p in sorted(corpus_dir.iterdir()) if p.is_file()}
    out: dict[str, object] = {}
    for name in systems:
        if name in OFFLINE_LIMITS:
            out[name] = {"error": OFFLINE_LIMITS[name]}
            continue
        try:
            split = SYSTEMS[name]()
            began = time.perf_counter()
            spans = {file: split(text) for file, text in texts.items()}
            seconds = time.perf_counter() - began
        except Exception as exc:  # an anchor that cannot run is reported, not fatal to the others
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        for file, file_spans in spans.items():
            text = texts[file]
            if not all(0 <= s < e <= len(text) for s, e in file_spans):
                out[name] = {"error": f"offsets outside {file}"}
                break
        else:
            out[name] = {"seconds": seconds, "spans": {file: [list(s) for s in fs] for file, fs in spans.items()}}
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
