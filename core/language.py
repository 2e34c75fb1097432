"""Which language a text is in, guessed from its characters, and the tally of a corpus' languages.

The guess is a script count, not a language model: cheap enough to run on every parsed document,
with no dependency, and enough for what it serves, which is telling a user that an English-only
embedder or a whitespace tokenizer meets Chinese text. Letters are counted by script (digits,
punctuation and spaces are ignored); the script with most letters names the language:

* Han -> ``zh``, or ``ja`` when kana are among them; kana -> ``ja``; Hangul -> ``ko``;
  Greek -> ``el``; Hebrew -> ``he``; Thai -> ``th``;
* scripts shared by many languages give the script's name: ``cyrillic``, ``arabic``,
  ``devanagari``; Latin gives ``en`` when English function words are frequent, else ``latin``;
* letters of any other script give ``other``; a text with too few letters gives ``unknown``.

Codes are ISO 639-1 where the script tells the language. A component says which of these codes it
handles as a set, where :data:`MULTILINGUAL` stands for every language (see :func:`covers`).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field

MULTILINGUAL = "multilingual"  # in a component's language set: it handles every language
UNKNOWN = "unknown"  # too few letters to tell
OTHER = "other"  # letters of a script this module does not name
LATIN = "latin"  # Latin script, not recognisably English

SAMPLE_CHARS = 4000  # a document's language is read from its beginning: enough text, bounded time
MIN_LETTERS = 20
# A Han character or a kana or Hangul syllable carries about what three Latin letters do, so a
# Chinese text quoting English names is still counted as Chinese.
SYLLABIC_WEIGHT = 3
KANA_SHARE = 0.2  # kana among Han and kana that make a text Japanese (Chinese text quotes a few kana names)
ENGLISH_SHARE = 0.05  # of the words: English prose has 30-50%, scientific abstracts 7% and more

# ISO 15924 script code, the language it gives, and its letters. Han and kana are resolved together.
_SCRIPTS: tuple[tuple[str, str, str], ...] = (
    ("Hani", "zh", "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"),
    ("Kana", "ja", "\u3041-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9d"),
    ("Hang", "ko", "\uac00-\ud7af\u1100-\u11ff\u3131-\u318e"),
    ("Cyrl", "cyrillic", "\u0400-\u052f"),
    ("Arab", "arabic", "\u0620-\u064a\u066e-\u06d3\u06fa-\u06ff\u0750-\u077f\u08a0-\u08c9\ufb50-\ufdff\ufe70-\ufefc"),
    ("Deva", "devanagari", "\u0900-\u0963\u0972-\u097f"),
    ("Grek", "el", "\u0370-\u03ff\u1f00-\u1fff"),
    ("Hebr", "he", "\u05d0-\u05ea\u05f0-\u05f2"),
    ("Thai", "th", "\u0e01-\u0e3a\u0e40-\u0e4e"),
    ("Latn", LATIN, "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff"),
)
# One pass over the text: runs of each script's letters, then runs of letters of any other script
# (Zzzz), each run named by its group.
_RUNS = re.compile("|".join(f"(?P<{script}>[{letters}]+)" for script, _, letters in _SCRIPTS) + r"|(?P<Zzzz>[^\W\d_]+)")
_SYLLABIC = frozenset({"Hani", "Kana", "Hang"})
_ASCII = re.compile(r"[\x00-\x7f]+")
_ASCII_LETTERS = re.compile(r"[A-Za-z]+")
# Frequent English words that are rare as words of other Latin-script languages: not "a", "in",
# "on", "is", "of", "at", "for", "to", "was", "will", "also", which French, German, Dutch,
# Danish or Polish text uses as often.
_ENGLISH_WORDS = frozenset(
    "the and that with this are be by from which have has had were been it its their not or these they "
    "can would should there than what when who how but into such about between you his".split()
)

# Languages a tokenizer that splits at spaces and punctuation cannot cut into words: Chinese,
# Japanese and Thai write no spaces between words, and Korean writes them between phrases (a word
# with its particles), so whitespace tokens rarely match across inflected forms.
NEEDS_SEGMENTER = frozenset({"zh", "ja", "ko", "th"})
LANGUAGES = frozenset({"en", OTHER, *(language for _, language, _ in _SCRIPTS)})
"""Every language code :func:`detect_language` gives, except :data:`UNKNOWN`."""


@dataclass(frozen=True)
class LanguageGuess:
    language: str  # a code from LANGUAGES, or UNKNOWN
    script: str  # ISO 15924: Hani, Jpan (Han with kana), Kana, Hang, Cyrl, Latn, ...; Zzzz when unknown
    confidence: float  # the winning script's share of the (weighted) letters, 0 when unknown


def detect_language(text: str, max_chars: int = SAMPLE_CHARS) -> LanguageGuess:
    """The language of ``text``, read from its first ``max_chars`` characters."""
    sample = text[:max_chars]
    counts = _script_counts(sample)
    total = sum(counts.values())
    if total < MIN_LETTERS:
        return LanguageGuess(UNKNOWN, "Zzzz", 0.0)
    han, kana = counts.get("Hani", 0), counts.get("Kana", 0)
    if han and kana >= KANA_SHARE * (han + kana):  # Japanese mixes Han with kana: one script
        counts = {**counts, "Jpan": han + kana, "Hani": 0, "Kana": 0}
    script = max(counts, key=lambda name: counts[name])
    confidence = round(counts[script] / total, 3)
    if script == "Latn":
        return LanguageGuess("en" if _english(sample) else LATIN, script, confidence)
    language = "ja" if script == "Jpan" else next((lang for name, lang, _ in _SCRIPTS if name == script), OTHER)
    return LanguageGuess(language, script, confidence)


def _script_counts(sample: str) -> dict[str, int]:
    """Weighted letters per script; ``Zzzz`` holds letters of scripts not named here."""
    # ASCII letters are counted by one pattern, and the run-by-run pass reads only what is left, so
    # a mostly English text with a few accents or symbols costs about what a pure ASCII one does.
    counts = {"Latn": sum(map(len, _ASCII_LETTERS.findall(sample)))}
    for run in _RUNS.finditer(_ASCII.sub("", sample)):
        script = run.lastgroup or "Zzzz"
        counts[script] = counts.get(script, 0) + (run.end() - run.start())
    return {script: n * SYLLABIC_WEIGHT if script in _SYLLABIC else n for script, n in counts.items()}


def _english(sample: str) -> bool:
    words = _ASCII_LETTERS.findall(sample.lower())  # English words are ASCII; others only add to the count
    return bool(words) and sum(map(_ENGLISH_WORDS.__contains__, words)) >= ENGLISH_SHARE * len(words)


def covers(languages: Collection[str] | None, language: str) -> bool | None:
    """Whether a component that handles ``languages`` fits text in ``language``; None when it makes
    no claim (``languages`` is None) or the language is :data:`UNKNOWN`."""
    if languages is None or language == UNKNOWN:
        return None
    return MULTILINGUAL in languages or language in languages


MIXED_SHARE = 0.8  # a corpus whose largest language has fewer documents than this share is mixed
NOTABLE_SHARE = 0.2  # a language with this share of the documents matters for the warnings


@dataclass
class LanguageTally:
    """Documents per language over a run; documents of :data:`UNKNOWN` language count, but take
    no part in the shares (an image-only PDF says nothing about the corpus' language)."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, language: str, documents: int = 1) -> None:
        self.counts[language] = self.counts.get(language, 0) + documents

    @property
    def known(self) -> int:
        """Documents whose language was told."""
        return sum(n for language, n in self.counts.items() if language != UNKNOWN)

    def ranked(self) -> list[tuple[str, int]]:
        """Every language with its documents, most first (ties by code, so the order is stable)."""
        return sorted(self.counts.items(), key=lambda item: (-item[1], item[0]))

    def dominant(self) -> str | None:
        """The language with most documents; None when no document's language was told."""
        return next((language for language, _ in self.ranked() if language != UNKNOWN), None)

    def share(self, language: str) -> float:
        return self.counts.get(language, 0) / self.known if self.known else 0.0

    def mixed(self) -> bool:
        """No language holds :data:`MIXED_SHARE` of the documents whose language was told."""
        dominant = self.dominant()
        return dominant is not None and self.share(dominant) < MIXED_SHARE

    def notable(self) -> list[str]:
        """The dominant language and every other one with :data:`NOTABLE_SHARE` of the documents, most first."""
        dominant = self.dominant()
        return [
            language
            for language, _ in self.ranked()
            if language != UNKNOWN and (language == dominant or self.share(language) >= NOTABLE_SHARE)
        ]

    def describe(self) -> str:
        """``zh 1104, en 3, unknown 2``: the counts, most first."""
        return ", ".join(f"{language} {n}" for language, n in self.ranked())
