"""Do Meta-Chunking's chunks end where the topic changes? Recursive, sentence-packed, PPL (and
margin) chunks of the same mean length, on documents made of several SciFact abstracts run together.

    python benchmarks/meta_chunking_boundaries.py [--documents N] [--abstracts-per-document K]
                                                  [--target-tokens T] [--methods ppl,margin]

Each document joins K randomly drawn abstracts (seeded) with a single space, so no paragraph
break gives the topic change away and only the content can. Where one abstract ends and the next
begins is known exactly. LM chunks are fitted to ``--target-tokens`` MiniLM tokens. Two chunkers
without an LM are sized by search to the same mean chunk length: the recursive chunker (as in
meta_chunking_quality.py), and greedy packing of the same sentences up to a number of MiniLM
tokens. The second is the control: the LM chunkers end chunks at sentence ends too, so it shows
what the LM adds beyond that. Printed per method:

* pure chunks: the share of chunks that lie inside one abstract (a chunk across a topic change
  mixes two topics, which is what these chunkers are meant to avoid);
* boundaries found: the share of topic changes where a chunk ends (up to the whitespace between).

Chunks are several times smaller than an abstract, so segmentation scores such as Pk, which also
count every chunk end inside an abstract as an error, would mostly measure the chunk size.

Chunking by an LM is slow on a CPU: 80 documents of 4 abstracts take PPL about 6 minutes on a
2-core CPU; margin sampling several times that.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from late_chunking import DEFAULT_DATASETS  # noqa: E402
from meta_chunking_quality import (  # noqa: E402
    EMBEDDER_TOKENIZER,
    chunk_all,
    mean_length,
    recursive_matching,
    size_matching,
)

from chunkers.meta import MarginSamplingChunker, PerplexityChunker, fit_to_target  # noqa: E402
from chunkers.sentences import split_sentences  # noqa: E402
from core.models import resolve_model_path  # noqa: E402
from core.types import (  # noqa: E402
    Chunk,
    ChunkedDocument,
    Element,
    ParsedDocument,
    chunk_id,
    sha256_hex,
)


def joined_abstracts(
    corpus_file: Path, documents: int, per_document: int, seed: int
) -> tuple[list[ParsedDocument], dict[str, list[int]]]:
    """Documents of ``per_document`` abstracts each, and per document the offsets where abstract 2.. start."""
    records = [json.loads(line) for line in corpus_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    drawn = random.Random(seed).sample(records, documents * per_document)
    parsed, starts = [], {}
    for number in range(documents):
        abstracts = [" ".join(r["text"].split()) for r in drawn[number * per_document : (number + 1) * per_document]]
        text, offsets = "", []
        for abstract in abstracts:
            if text:
                text += " "
                offsets.append(len(text))
            text += abstract
        source_id = f"joined-{number}"
        element = Element(text=text, category="NarrativeText", start=0, end=len(text))
        parsed.append(
            ParsedDocument(source_id, f"scifact-joined:{number}", "text/plain", sha256_hex(text), text, (element,))
        )
        starts[source_id] = offsets
    return parsed, starts


def sentence_packing(documents: Sequence[ParsedDocument], target_mean: float) -> tuple[list[ChunkedDocument], int]:
    """Sentences packed greedily up to T MiniLM tokens, T searched so the mean chunk length is closest
    to ``target_mean``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(EMBEDDER_TOKENIZER))
    units = []
    for document in documents:
        spans = split_sentences(document.text)
        sizes = [
            len(ids) for ids in tokenizer([document.text[a:b] for a, b in spans], add_special_tokens=False)["input_ids"]
        ]
        units.append((spans, sizes))

    def packed(target: int) -> list[ChunkedDocument]:
        out = []
        for document, (spans, sizes) in zip(documents, units):
            groups = fit_to_target([(i, i + 1) for i in range(len(spans))], sizes, [0.0] * len(spans), target)
            chunks = []
            for index, (first, last) in enumerate(groups):
                start, end = spans[first][0], spans[last - 1][1]
                text = document.text[start:end]
                chunks.append(
                    Chunk(chunk_id(document.source_id, index, start, text), document.source_id, index, text, start, end)
                )
            out.append(ChunkedDocument(document, chunks))
        return out

    return size_matching(packed, 8, 1024, target_mean)


def scores(chunked: Sequence[ChunkedDocument], starts: dict[str, list[int]]) -> dict[str, float]:
    pure = total_chunks = found = total_changes = 0
    for document in chunked:
        text, changes = document.document.text, starts[document.document.source_id]
        for chunk in document.chunks:
            total_chunks += 1
            pure += bisect.bisect_right(changes, chunk.start) == bisect.bisect_right(changes, chunk.end - 1)
        ends = {chunk.end for chunk in document.chunks}
        for change in changes:
            total_changes += 1
            gap_start = change - 1
            while gap_start > 0 and text[gap_start - 1].isspace():
                gap_start -= 1
            found += any(gap_start <= end <= change for end in ends)
    return {"pure": pure / total_chunks, "found": found / total_changes}


def report(label: str, chunked: Sequence[ChunkedDocument], starts: dict[str, list[int]]) -> None:
    result = scores(chunked, starts)
    count = sum(len(d.chunks) for d in chunked)
    print(
        f"{label:<10} pure chunks {result['pure']:.1%}  boundaries found {result['found']:.1%}"
        f"   {count:,} chunks, mean {mean_length(chunked):.0f} chars",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=Path, default=DEFAULT_DATASETS)
    parser.add_argument("--documents", type=int, default=80)
    parser.add_argument("--abstracts-per-document", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--target-tokens", type=int, default=128, help="LM chunks are fitted to this many embedder tokens"
    )
    parser.add_argument("--methods", default="ppl", help="comma-separated LM chunkers: ppl, margin")
    args = parser.parse_args(argv)
    corpus_file = args.datasets / "scifact" / "corpus.jsonl"
    if not corpus_file.is_file():
        print(f"SKIP: SciFact not found under {args.datasets} (set --datasets or RAG_PIPELINE_DATASETS)")
        return 0

    documents, starts = joined_abstracts(corpus_file, args.documents, args.abstracts_per_document, args.seed)
    abstract_chars = (sum(len(d.text) for d in documents) - sum(len(s) for s in starts.values())) / (
        len(documents) * args.abstracts_per_document
    )
    print(
        f"{len(documents)} documents of {args.abstracts_per_document} SciFact abstracts (seed {args.seed}), "
        f"{sum(len(s) for s in starts.values())} topic changes; mean abstract {abstract_chars:.0f} chars; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    fitting = {"target_size": args.target_tokens, "size_tokenizer": EMBEDDER_TOKENIZER}
    chunkers = {"ppl": PerplexityChunker(**fitting), "margin": MarginSamplingChunker(**fitting)}
    lm_chunked: dict[str, list[ChunkedDocument]] = {}
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        lm_chunked[name], seconds = chunk_all(chunkers[name], documents)
        print(f"{name}: chunked {len(documents)} documents in {seconds:.1f} s", flush=True)
    target_mean = statistics.fmean(mean_length(chunked) for chunked in lm_chunked.values())
    recursive, size = recursive_matching(documents, target_mean)
    print(f"recursive: chunk_size {size} chars (overlap 0) gives the LM chunkers' mean length, {target_mean:.0f} chars")
    sentences, target = sentence_packing(documents, target_mean)
    print(f"sentences: packed up to {target} MiniLM tokens gives the closest mean length")
    report("recursive", recursive, starts)
    report("sentences", sentences, starts)
    for name, chunked in lm_chunked.items():
        report(name, chunked, starts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
