"""Meta-Chunking: do our PPL and margin-sampling boundaries agree with the official implementation?

    python benchmarks/meta_chunking_agreement.py [--scifact N] [--cmrc N] [--from results.json]
                                                 [--lmchunker-python PATH] [--datasets DIR]

The official side is PyPI ``lmchunker==0.5.1`` (IAAR-Shanghai/Meta-Chunking). It pins
transformers < 5, so it lives in its own virtual environment (see benchmarks/README_meta_chunking.md)
and runs in a subprocess of that environment's Python: ``$LMCHUNKER_PYTHON`` or
``--lmchunker-python``, by default ``<repo>/../venvs/lmchunker/bin/python``. Without it, or without
the shared datasets, the script says so and exits 0.

Both sides use the same weights (the shipped SmolLM2-135M-Instruct, fp32), threshold 0, no merging,
on the first N SciFact abstracts (English) and CMRC 2018 paragraphs (Chinese). Two loading-side
workarounds make the official package run offline:
1. nltk's punkt data is not installable offline: its ``sent_tokenize`` (English) is replaced by
   this project's sentence splitter, loaded by file path, so both sides see the same sentences.
   The official Chinese splitter (jieba + 。！？；) runs offline; it is replaced as well so that the
   comparison is about the chunking algorithm, unless ``--jieba`` keeps it (it leaves a closing
   quote or bracket after 。 to the next sentence, which changes what the LM sees there).
2. transformers 4.57 misreads the config that transformers 5 saves (rope_theta falls back to
   10000 instead of 100000) and does not know its tokenizer class: the official side loads a
   sibling folder with a 4.x-style config.json / tokenizer_config.json and the same weights.
The script first checks that this worked: identical token ids and per-token losses in both
environments, and an identical margin-sampling prompt.

Agreement: official chunks are joined sentences (no offsets), so positions are compared in
non-space characters. For every sentence end of either side (except the text's end), the sides
agree when both or neither put a chunk boundary there; the score is the fraction that agree.
``--from`` reuses the official boundaries saved by ``meta_chunking_speed.py --save``.

The same file is the worker inside the official environment (``--worker``): only the standard
library is imported at module level, so it runs there without this project's dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LMCHUNKER_PYTHON_ENV = "LMCHUNKER_PYTHON"
DATASETS_ENV = "RAG_PIPELINE_DATASETS"


# =============================================================================================
# Worker: runs inside the lmchunker environment and answers JSON lines on stdin
# =============================================================================================


class _CountingModel:
    """Wraps the official side's model to count the tokens it runs and keep its first input."""

    def __init__(self, model: Any):
        self._model = model
        self.calls = 0
        self.tokens = 0
        self.first_input_ids: list[int] | None = None

    def __call__(self, input_ids: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.tokens += int(input_ids.shape[-1])
        if self.first_input_ids is None:
            self.first_input_ids = input_ids[0].tolist()
        return self._model(input_ids, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def _worker(sentences_module: str, keep_jieba: bool) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("project_sentences", sentences_module)
    sentences = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sentences)

    def sent_tokenize(text: str, language: str = "english") -> list[str]:
        return [text[start:end] for start, end in sentences.split_sentences(text)]

    protocol = sys.stdout
    sys.stdout = sys.stderr  # the official code prints progress; keep the protocol channel clean

    import lmchunker.modules.margin_sampling_chunking as margin_module
    import lmchunker.modules.ppl_chunking as ppl_module
    import torch
    import transformers
    from lmchunker.chunker import chunker

    ppl_module.sent_tokenize = sent_tokenize
    margin_module.sent_tokenize = sent_tokenize
    if not keep_jieba:
        for module in (ppl_module, margin_module):
            official_splitter = module.split_text_by_punctuation
            module.split_text_by_punctuation = lambda text, language, official_splitter=official_splitter: (
                sent_tokenize(text) if language == "zh" else official_splitter(text, language)
            )
    tokenizer = model = None

    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        if op == "load":
            if request.get("threads"):
                torch.set_num_threads(int(request["threads"]))
            started = time.perf_counter()
            tokenizer = transformers.AutoTokenizer.from_pretrained(request["model"])
            model = transformers.AutoModelForCausalLM.from_pretrained(
                request["model"], torch_dtype=torch.float32
            ).eval()
            reply: dict[str, Any] = {
                "seconds": time.perf_counter() - started,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "rope_theta": getattr(model.config, "rope_theta", None),
            }
        elif op == "chunk":
            counting = _CountingModel(model)
            method = {"ppl": "ppl", "margin": "ms"}[request["method"]]
            started = time.perf_counter()
            chunks = chunker(
                request["text"],
                counting,
                tokenizer,
                request["language"],
                methodth=method,
                threshold=0,
                dynamic_merge="no",
            )
            seconds = time.perf_counter() - started
            reply = {
                "chunks": chunks,
                "sentences": ppl_module.split_text_by_punctuation(request["text"], request["language"]),
                "seconds": seconds,
                "forward_calls": counting.calls,
                "forward_tokens": counting.tokens,
                "first_input_ids": counting.first_input_ids,
            }
        elif op == "losses":
            ids = tokenizer(request["text"], add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, :-1].float()
            losses = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
            reply = {"ids": ids, "losses": losses.tolist()}
        elif op == "exit":
            return
        else:
            reply = {"error": f"unknown op {op!r}"}
        protocol.write(json.dumps(reply) + "\n")
        protocol.flush()


# =============================================================================================
# Main side
# =============================================================================================


@dataclass(frozen=True)
class Text:
    id: str
    text: str
    language: str  # "en" or "zh", as the official API wants it


def datasets_dir(override: str | None = None) -> Path:
    if override:
        return Path(override)
    if os.environ.get(DATASETS_ENV):
        return Path(os.environ[DATASETS_ENV])
    return ROOT.parent / "shared" / "datasets"


def load_texts(datasets: Path, scifact: int, cmrc: int) -> list[Text] | None:
    sources = [
        (datasets / "scifact" / "corpus.jsonl", scifact, "en"),
        (datasets / "cmrc2018-zh" / "corpus.jsonl", cmrc, "zh"),
    ]
    if any(not path.is_file() for path, _, _ in sources):
        return None
    texts: list[Text] = []
    for path, count, language in sources:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if sum(t.language == language for t in texts) >= count:
                    break
                record = json.loads(line)
                if record.get("text", "").strip():
                    texts.append(Text(str(record["_id"]), record["text"], language))
    return texts


def lmchunker_python(override: str | None = None) -> Path | None:
    candidate = Path(
        override or os.environ.get(LMCHUNKER_PYTHON_ENV) or ROOT.parent / "venvs" / "lmchunker" / "bin" / "python"
    )
    return candidate if candidate.is_file() else None


def transformers4_folder(model_folder: Path) -> Path:
    """A sibling of ``model_folder`` that transformers 4.x reads correctly: same weights (linked),
    rope_theta at the top level of config.json, and a tokenizer class 4.x knows."""
    target = model_folder.with_name(model_folder.name + "-transformers4")
    target.mkdir(exist_ok=True)
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json"):
        link = target / name
        if not link.exists() and (model_folder / name).exists():
            link.symlink_to(model_folder / name)
    config = json.loads((model_folder / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or {}
    config["rope_theta"] = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    config.pop("transformers_version", None)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    tokens = json.loads((model_folder / "tokenizer_config.json").read_text())
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.get("max_position_embeddings", 8192),
        **{key: tokens[key] for key in ("bos_token", "eos_token", "pad_token", "unk_token") if key in tokens},
    }
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return target


class OfficialChunker:
    """The official package, running in its own environment behind a JSON-lines pipe."""

    def __init__(self, python: Path, model_folder: Path, threads: int | None = None, keep_jieba: bool = False):
        worker = [str(python), str(Path(__file__).resolve()), "--worker", str(ROOT / "chunkers" / "sentences.py")]
        self.process = subprocess.Popen(
            worker + (["--jieba"] if keep_jieba else []),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.info = self._ask({"op": "load", "model": str(transformers4_folder(model_folder)), "threads": threads})

    def chunk(self, method: str, text: Text) -> dict[str, Any]:
        return self._ask({"op": "chunk", "method": method, "text": text.text, "language": text.language})

    def losses(self, text: str) -> dict[str, Any]:
        return self._ask({"op": "losses", "text": text})

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"op": "exit"}) + "\n")
            self.process.stdin.flush()
            self.process.wait(timeout=60)

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the lmchunker worker exited (code {self.process.poll()}) during {request['op']!r}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply


_CLOSERS = "\"'”’」』）》〉】)]"


def _nonspace(text: str) -> int:
    return sum(1 for char in text if not char.isspace())


def _past_closers(text: str, positions: list[int]) -> list[int]:
    """Positions (in non-space characters of ``text``) moved past closing quotes and brackets, so a
    boundary before or after the "）" of "。）" counts as the same sentence end."""
    characters = [char for char in text if not char.isspace()]
    moved = []
    for position in positions:
        while position < len(characters) and characters[position] in _CLOSERS:
            position += 1
        moved.append(position)
    return moved


def nonspace_ends_of_pieces(text: str, pieces: list[str]) -> list[int]:
    """Where each of consecutive pieces of ``text`` ends, counted in non-space characters."""
    ends, total = [], 0
    for piece in pieces:
        total += _nonspace(piece)
        ends.append(total)
    return _past_closers(text, ends)


def nonspace_ends_of_spans(text: str, spans: list[tuple[int, int]]) -> list[int]:
    return _past_closers(text, [_nonspace(text[:end]) for _, end in spans])


@dataclass
class Agreement:
    agreeing: int = 0
    compared: int = 0
    ours: int = 0  # boundaries
    official: int = 0
    texts_identical: int = 0
    texts: int = 0

    def add(
        self,
        our_sentence_ends: list[int],
        official_sentence_ends: list[int],
        our_ends: list[int],
        official_ends: list[int],
    ) -> list[int]:
        """Adds one text; returns the sentence ends (non-space positions) where the sides differ."""
        final = max(our_sentence_ends[-1:] + official_sentence_ends[-1:] + [0])
        candidates = (set(our_sentence_ends) | set(official_sentence_ends)) - {final}
        ours, official = set(our_ends) - {final}, set(official_ends) - {final}
        differing = sorted(position for position in candidates if (position in ours) != (position in official))
        self.compared += len(candidates)
        self.agreeing += len(candidates) - len(differing)
        self.ours += len(ours)
        self.official += len(official)
        self.texts += 1
        self.texts_identical += not differing
        return differing

    @property
    def rate(self) -> float:
        return self.agreeing / self.compared if self.compared else 1.0

    def summary(self) -> str:
        return (
            f"{self.rate:.1%} of sentence ends agree ({self.agreeing}/{self.compared}); boundaries ours {self.ours} / "
            f"official {self.official}; identical texts {self.texts_identical}/{self.texts}"
        )


def our_chunkers(batch_size: int = 8, quantize: str = "none") -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from chunkers.meta import MarginSamplingChunker, PerplexityChunker

    return {
        "ppl": PerplexityChunker(threshold=0.0, target_size=None, batch_size=batch_size, quantize=quantize),
        "margin": MarginSamplingChunker(threshold=0.0, target_size=None, batch_size=batch_size, quantize=quantize),
    }


def as_documents(texts: list[Text]) -> list[Any]:
    from core.types import ParsedDocument

    return [ParsedDocument(f"{t.language}/{t.id}", f"dataset:{t.id}", "text/plain", "", t.text, ()) for t in texts]


def compare(
    method: str, texts: list[Text], ours: list[list[tuple[int, int]]], official: list[dict[str, Any]], verbose: bool
) -> Agreement:
    from chunkers.sentences import split_sentences

    agreement = Agreement()
    for text, spans, result in zip(texts, ours, official):
        differing = agreement.add(
            nonspace_ends_of_spans(text.text, split_sentences(text.text)),
            nonspace_ends_of_pieces(text.text, result["sentences"]),
            nonspace_ends_of_spans(text.text, spans),
            nonspace_ends_of_pieces(text.text, result["chunks"]),
        )
        if verbose and differing:
            print(
                f"  {method} {text.language}/{text.id}: differs at {len(differing)} sentence end(s), non-space offsets "
                f"{differing}"
            )
    return agreement


def check_environments(official: OfficialChunker, texts: list[Text], chunkers: dict[str, Any]) -> bool:
    """Same token ids, same per-token losses, same margin prompt in both environments."""
    import torch

    from chunkers.meta import tokenize_units

    lm = chunkers["ppl"].lm
    print(
        f"official side: transformers {official.info['transformers']}, torch {official.info['torch']}, "
        f"{official.info['threads']} threads, rope_theta {official.info['rope_theta']}"
    )
    good = True
    for text in [t for t in texts if t.language == "en"][:1] + [t for t in texts if t.language == "zh"][:1]:
        theirs = official.losses(text.text)
        ids = lm.tokenizer(text.text, add_special_tokens=False)["input_ids"]
        same_ids = ids == theirs["ids"]
        ours = lm.token_losses([ids], 1, len(ids) + 1, lm.context_length)[0]
        difference = (ours - torch.tensor(theirs["losses"])).abs().max().item() if same_ids else float("nan")
        print(
            f"  {text.language}/{text.id}: {len(ids)} tokens, identical ids: {same_ids}, max |loss difference| "
            f"{difference:.2e}"
        )
        good &= same_ids and difference < 1e-3
        margin = chunkers["margin"]
        prompts = margin._prompts_for(lm)
        units = tokenize_units(text.text, lm.tokenizer, margin.config.max_sentence_tokens)
        (a_start, a_end), (b_start, b_end) = units.spans[0], units.spans[1]
        our_prompt = prompts.ids(
            text.language, text.text[a_start:a_end], text.text[b_start:b_end], text.text[a_start:b_end]
        )
        their_prompt = official.chunk("margin", Text(text.id, text.text[a_start:b_end], text.language))[
            "first_input_ids"
        ]
        print(
            f"  {text.language}/{text.id}: first margin prompt ({len(our_prompt)} tokens) identical: "
            f"{our_prompt == their_prompt}"
        )
        good &= our_prompt == their_prompt
    return good


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scifact", type=int, default=20, help="SciFact abstracts (English)")
    parser.add_argument("--cmrc", type=int, default=10, help="CMRC 2018 paragraphs (Chinese)")
    parser.add_argument("--datasets", help=f"datasets folder (default ${DATASETS_ENV} or ../shared/datasets)")
    parser.add_argument(
        "--lmchunker-python", help=f"python of the lmchunker environment (default ${LMCHUNKER_PYTHON_ENV})"
    )
    parser.add_argument("--from", dest="saved", help="official results saved by meta_chunking_speed.py --save")
    parser.add_argument("--jieba", action="store_true", help="keep the official Chinese sentence splitter")
    parser.add_argument("--quiet", action="store_true", help="do not list the differing texts")
    args = parser.parse_args(argv)

    texts = load_texts(datasets_dir(args.datasets), args.scifact, args.cmrc)
    if texts is None:
        print(f"SKIP: datasets not found under {datasets_dir(args.datasets)} (set {DATASETS_ENV} or --datasets)")
        return 0
    python = lmchunker_python(args.lmchunker_python)
    if python is None:
        print(
            f"SKIP: the lmchunker environment is missing (set {LMCHUNKER_PYTHON_ENV}); see "
            "benchmarks/README_meta_chunking.md"
        )
        return 0

    chunkers = our_chunkers()
    lm = chunkers["ppl"].lm
    official = OfficialChunker(python, Path(lm.path), keep_jieba=args.jieba)
    try:
        environments_match = check_environments(official, texts, chunkers)
        saved = json.loads(Path(args.saved).read_text()) if args.saved else None
        documents = as_documents(texts)
        for method in ("ppl", "margin"):
            if saved is not None:
                results = [saved["official"][method][f"{t.language}/{t.id}"] for t in texts]
            else:
                results = [official.chunk(method, text) for text in texts]
            ours = chunkers[method].split_batch(documents)
            agreement = compare(method, texts, ours, results, verbose=not args.quiet)
            print(f"{method}: {agreement.summary()}")
    finally:
        official.close()
    print(
        "environments match" if environments_match else "WARNING: the environments disagree on ids, losses or prompts"
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], keep_jieba="--jieba" in sys.argv[3:])
    else:
        sys.exit(main())
