"""Whether the embedder and the BM25 analyzer fit the languages of the documents: the notes a run
summary carries after an ingest or reindex, and the warnings ``validate`` gives from a sample.

The documents' languages come from :mod:`core.language` (counted by the runners, or here from a
sample); the embedder says what its model covers (:meth:`embedders.base.Embedder.languages`); the
BM25 analyzer is what the store says it is (:meth:`stores.base.Store.bm25_analyzer`). Anything
unknown (a model the catalog has no claim for, a store that does not say, custom analyzer
parameters) gives no warning.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

from connectors.base import Parser, Source
from core.language import LANGUAGES, MULTILINGUAL, NEEDS_SEGMENTER, LanguageTally, covers, detect_language
from embedders.base import Embedder
from pipeline.parse_pool import parse_one
from stores.base import Store

SAMPLE_DOCUMENTS = 20  # what validate parses to tell the sources' languages: seconds, not minutes
MODELS_DOC = "docs/models.md#languages"

SPACED = LANGUAGES - NEEDS_SEGMENTER  # what a tokenizer splitting at spaces and punctuation fits
WORDS = "words split at spaces and punctuation"
ENGLISH = f"{WORDS}, English stop words and stemming"
CHINESE = "Chinese word segmentation"
# Milvus tokenizers by name, and the analyzers the Milvus store names (standard, english, jieba)
# or Milvus builds in (chinese), as what they do and the languages that fits.
_TOKENIZERS: dict[str, tuple[str, frozenset[str]]] = {
    "standard": (WORDS, SPACED),
    "whitespace": ("words split at spaces", SPACED),
    "jieba": (CHINESE, frozenset({"zh"})),
    "icu": ("Unicode word boundaries in any language", frozenset({MULTILINGUAL})),
}
_ANALYZERS: dict[str, tuple[str, frozenset[str]]] = {
    "standard": (WORDS, SPACED),
    "english": (ENGLISH, frozenset({"en"})),
    "jieba": (CHINESE, frozenset({"zh"})),
    "chinese": (CHINESE, frozenset({"zh"})),
}
_LINDERA_DICTIONARIES = {"ipadic": "ja", "ipadic-neologd": "ja", "unidic": "ja", "ko-dic": "ko", "cc-cedict": "zh"}


@dataclass(frozen=True)
class Analyzer:
    """A BM25 analyzer as the warnings name it, what it does, and the languages it fits (None: not known)."""

    name: str
    does: str
    languages: frozenset[str] | None


def bm25_analyzer(store: Store) -> Analyzer | None:
    """The analyzer of the store's BM25 branch; None when the store has no BM25 branch, an unknown
    analyzer when the store does not say which."""
    if "bm25" not in store.branches():
        return None
    analyzer = store.bm25_analyzer()
    if isinstance(analyzer, str):
        does, languages = _ANALYZERS.get(analyzer, ("", None))
        return Analyzer(repr(analyzer), does, languages)
    if isinstance(analyzer, dict):
        does, languages = _analyzer_params(analyzer)
        return Analyzer(json.dumps(analyzer, ensure_ascii=False, sort_keys=True), does, languages)
    return Analyzer("unknown", "", None)


def _analyzer_params(params: Mapping[str, Any]) -> tuple[str, frozenset[str] | None]:
    """What Milvus analyzer parameters do: a built-in analyzer (``type``), or a tokenizer, which an
    English stemmer among the filters narrows to English."""
    if "type" in params:
        return _ANALYZERS.get(str(params["type"]), ("", None))
    tokenizer = params.get("tokenizer")
    name = tokenizer.get("type") if isinstance(tokenizer, Mapping) else tokenizer
    if name == "lindera" and isinstance(tokenizer, Mapping):
        language = _LINDERA_DICTIONARIES.get(str(tokenizer.get("dict_kind")))
        return (f"{language} morphological analysis", frozenset({language})) if language else ("", None)
    does, languages = _TOKENIZERS.get(str(name), ("", None))
    stemmers = [
        f.get("language") for f in params.get("filter", []) if isinstance(f, Mapping) and f.get("type") == "stemmer"
    ]
    if languages == SPACED and stemmers == ["english"]:
        return ENGLISH, frozenset({"en"})
    return does, (None if stemmers else languages)  # another language's stemmer: no claim


def language_notes(counts: Mapping[str, int], embedder: Embedder, store: Store, of: str = "documents") -> list[str]:
    """What a run summary (or validate) should say about the documents' languages, ``counts`` being
    documents by language: for each notable language (core.language.LanguageTally.notable) that the
    embedder's model or the BM25 analyzer does not fit, why and what to do; one note for a mixed
    corpus, with its counts, whether or not anything misfits."""
    tally = LanguageTally(dict(counts))
    notable = tally.notable()
    if not notable:
        return []
    model = embedder.languages()
    analyzer = bm25_analyzer(store)
    poor_dense = [language for language in notable if covers(model, language) is False]
    poor_bm25 = [
        language for language in notable if analyzer is not None and covers(analyzer.languages, language) is False
    ]
    problems = []
    if poor_dense and model is not None:
        # BM25 is the way out only where its analyzer is not known to misfit the same text.
        bm25_instead = analyzer is not None and not set(poor_dense) & set(poor_bm25)
        problems.append(
            f"dense retrieval will be poor on {_part(tally, poor_dense, of)}: the embedder's model covers "
            f"{', '.join(sorted(model))} only; consider a multilingual model ({MODELS_DOC})"
            + (" or query mode bm25" if bm25_instead else "")
        )
    if analyzer is not None and poor_bm25:
        problems.append(
            f"BM25 will match poorly on {_part(tally, poor_bm25, of)}: the analyzer {analyzer.name} ({analyzer.does}) "
            f"does not fit it; pick one that does ({MODELS_DOC})"
        )
    if tally.mixed():
        verdict = "; ".join(problems) or "neither the embedder nor the BM25 analyzer is known to misfit any of them"
        return [f"mixed-language corpus ({tally.describe()} {of}): {verdict}"]
    return problems


def _part(tally: LanguageTally, languages: Sequence[str], of: str) -> str:
    """``zh text (1104 of 1104 documents)``: the languages and how many documents are in them."""
    documents = sum(tally.counts[language] for language in languages)
    return f"{' and '.join(languages)} text ({documents} of {tally.known} {of})"


def sample_languages(sources: Sequence[Source], parser: Parser, limit: int = SAMPLE_DOCUMENTS) -> dict[str, int]:
    """Documents by language among the first ``limit`` the sources list (shared between the sources),
    read and parsed in this process; what cannot be listed, read or parsed is left out (validate
    reports unreachable sources itself, and a run records such failures)."""
    tally = LanguageTally()
    for source in sources:
        try:
            refs = list(islice(source.list(), max(1, limit // len(sources))))
        except Exception:
            continue
        for ref in refs:
            try:
                document = source.load(ref)
            except Exception:
                continue
            parsed, _ = parse_one(parser, document)
            if parsed is not None:
                tally.add(detect_language(parsed.text).language)
    return tally.counts
