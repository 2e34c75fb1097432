"""Sentence spans with exact character offsets, for English, Chinese and mixed text in one pass.

``split_sentences(text)`` returns half-open spans ``(start, end)`` into ``text``. Each span is
stripped of surrounding whitespace and non-empty; everything between spans is whitespace. So the
spans never drop or alter a non-space character, and ``text[start:end]`` is the sentence.

Rules, chosen so they need no model and no downloadable data (nltk's punkt is not on PyPI):
- Chinese terminators ``。！？；`` (the set the Meta-Chunking paper uses) end a sentence wherever
  they appear, together with any closing quotes or brackets right after them.
- ``. ! ?`` end a sentence when whitespace and a sentence start follow (an upper-case letter, a
  digit, an opening quote or bracket, or a non-Latin letter), or when a CJK character follows
  directly after a letter ("done.然后"). A ``.`` after a known abbreviation ("e.g.", "et al.",
  "Fig.") or an initial ("J. Smith", "U.S.") does not.
- A blank line always ends a sentence (headings and list items often lack a full stop).

This module depends on the standard library only, so the Meta-Chunking agreement benchmark can
load it by file path inside the separate virtual environment that runs the official package.
"""

from __future__ import annotations

import re
from typing import Literal

# Closing quotes and brackets that belong to the sentence a terminator ends.
_CLOSERS = "\"'”’」』）》〉】)]"
_OPENERS = "\"'“‘「『（《〈【([{"

_BOUNDARY = re.compile(
    rf"(?P<cjk>[。！？；]+[{re.escape(_CLOSERS)}]*)"
    rf"|(?P<latin>[.!?]+[{re.escape(_CLOSERS)}]*)"
    r"|(?P<blank_line>\n[^\S\n]*\n)"
)

# Lower-cased words that a "." follows without ending the sentence.
_ABBREVIATIONS = frozenset(
    """
    al approx ca cf dept dr e.g eq eqs fig figs i.e inc jr mr mrs ms no nos prof ref refs
    sr st vol vols vs viz resp suppl ed eds
    """.split()
)
_DOTTED_ABBREVIATION = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]")  # U.S, e.g, i.e, a.m


def is_cjk(char: str) -> bool:
    """Han ideographs, CJK punctuation, kana, hangul and full-width forms."""
    code = ord(char)
    return (
        0x3000 <= code <= 0x30FF  # CJK punctuation, hiragana, katakana
        or 0x3400 <= code <= 0x4DBF  # extension A
        or 0x4E00 <= code <= 0x9FFF  # unified ideographs
        or 0xAC00 <= code <= 0xD7AF  # hangul
        or 0xF900 <= code <= 0xFAFF  # compatibility ideographs
        or 0xFF00 <= code <= 0xFFEF  # full-width forms
        or 0x20000 <= code <= 0x2FA1F  # extensions B-F, compatibility supplement
    )


def detect_language(text: str) -> Literal["zh", "en"]:
    """ "zh" when Han characters outnumber Latin words, else "en" (used to pick prompt variants)."""
    han = sum(1 for char in text if 0x4E00 <= ord(char) <= 0x9FFF or 0x3400 <= ord(char) <= 0x4DBF)
    latin_words = len(re.findall(r"[A-Za-z]+", text))
    return "zh" if han > 0 and han >= latin_words else "en"


def _starts_sentence(char: str) -> bool:
    return (
        char.isupper()
        or char.isdigit()
        or char in _OPENERS
        or (char.isalpha() and not char.isascii() and not char.islower())
    )


def _word_before(text: str, end: int) -> str:
    start = end
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    return text[start:end].lstrip(_OPENERS)


def _is_abbreviation(text: str, period: int) -> bool:
    word = _word_before(text, period)
    if not word:
        return False
    if word.lower() in _ABBREVIATIONS or _DOTTED_ABBREVIATION.fullmatch(word):
        return True
    return len(word) == 1 and word.isupper()  # an initial: "J. Smith"


def _latin_ends_sentence(text: str, match: re.Match[str]) -> bool:
    end = match.end()
    if end == len(text):
        return True
    following = text[end]
    if following.isspace():
        rest = end
        while rest < len(text) and text[rest].isspace():
            rest += 1
        if rest == len(text):
            return True
        if not _starts_sentence(text[rest]):
            return False
    elif not (is_cjk(following) and match.start() > 0 and text[match.start() - 1].isalpha()):
        return False  # "3.5", "example.com", "1.由于" (a list number)
    terminator = match.group("latin").rstrip(_CLOSERS)
    return not (terminator == "." and _is_abbreviation(text, match.start()))


def _cut_positions(text: str) -> list[int]:
    cuts: list[int] = []
    for match in _BOUNDARY.finditer(text):
        if match.group("cjk") or match.group("blank_line"):
            cuts.append(match.end())
        elif _latin_ends_sentence(text, match):
            cuts.append(match.end())
    return cuts


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Sentence spans into ``text``: stripped, non-empty, in order; only whitespace lies between them."""
    spans: list[tuple[int, int]] = []
    start = 0
    for cut in [*_cut_positions(text), len(text)]:
        left, right = start, cut
        while left < right and text[left].isspace():
            left += 1
        while right > left and text[right - 1].isspace():
            right -= 1
        if left < right:
            spans.append((left, right))
        start = cut
    return spans
