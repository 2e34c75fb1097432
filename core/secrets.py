"""The secret values this process holds, and the one scrubber that keeps them out of what it writes.

A component that reads a credential from the environment (the Milvus token named by
``token_env``, an API embedder's key named by ``api_key_env``, git and object-store credentials)
hands the value to :func:`register_secret` as it reads it. Every sink passes its text through
:func:`scrub`: failure reasons, the failures file, the index record, the run summary, the command
line's output, the exceptions the store, embedders and connectors raise, and log records (through
:class:`SecretFilter`, which :func:`install_log_filter` puts on the root logger's handlers).

Servers and libraries do not always echo a key the way it was sent, so :func:`scrub` finds each
registered secret

* raw, and as any run of at least :data:`MIN_FRAGMENT` consecutive characters of it (a server that
  quotes part of the key, or splits it across a message);
* behind JSON string escapes (any character as ``\\uXXXX``, mixed with plain characters, ``\\/``,
  surrogate pairs) and percent-encoding (either hex case, UTF-8 sequences, ``+`` for a space),
  decoded up to :data:`_DECODE_ROUNDS` times (an error body quoted as a string inside another);
* base64 and base64url encoded, at each of the three byte alignments, so the secret is found
  inside a longer blob (``Authorization: Basic base64(user:token)``) and, as with the raw form,
  a long enough run of the encoding is enough;

and replaces each occurrence with ``***``, leaving the rest of the text as it was.

Why :data:`MIN_FRAGMENT` is 8: eight characters of a random key carry about 48 bits (base62), so
such a run practically never occurs by chance in unrelated text, while a server that echoes more
than the usual hint (providers show at most four characters at each end, ``sk-...abcd``) is
caught. A shorter run would start to eat ordinary words and identifiers; a longer one would let a
server print more of a key untouched. A key's public prefix of eight or more
characters (``sk-proj-``) is itself such a run and is replaced wherever it appears: losing a
prefix costs readability, never secrecy. Secrets shorter than eight characters are matched whole,
and values shorter than :data:`MIN_SECRET` are not registered at all: they occur in ordinary text
everywhere, and replacing them would destroy every message while protecting nothing worth the name.

Cost: for each distinct seed (a piece of half the minimum run) one ``str.find`` pass over the text
and one over each decoded form, then a short comparison at each hit: linear in the text, about a
tenth of a second for a 1 MB error body. Nothing here logs, and no repr or exception holds a secret.

Standard library only: the stage packages and the stores import this module, never the reverse.
"""

from __future__ import annotations

import base64
import bisect
import itertools
import json
import logging
import re
import threading
from collections.abc import Iterable

REDACTED = "***"
MIN_FRAGMENT = 8
MIN_SECRET = 6
# Base64 characters that any MIN_FRAGMENT bytes determine on their own, whatever the alignment:
# 8N bits less up to 4 bits lost to the 6-bit grid at the start, over 6 bits per character.
_B64_MIN_RUN = (8 * MIN_FRAGMENT - 4) // 6
_DECODE_ROUNDS = 3

# A run of \u escapes (decoded together: a surrogate pair is one character), one short JSON
# escape, or a run of percent-escapes (decoded together: a UTF-8 sequence is one character).
_ESCAPES = (
    r"(?P<codes>(?:\\u[0-9a-fA-F]{4})+)"
    r"|\\(?P<short>[\"\\/bfnrt])"
    r"|(?P<percent>(?:%[0-9a-fA-F]{2})+)"
)
_ESCAPE = re.compile(_ESCAPES)
# Form encoding also spells a space as '+'; only decoded so when a secret holds a space, since a
# '+' is far more often itself (base64 keys hold it).
_ESCAPE_OR_PLUS = re.compile(_ESCAPES + r"|(?P<plus>\+)")
_SHORT = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def _base64_cores(raw: bytes) -> set[str]:
    """The base64 and base64url characters that ``raw`` determines alone, at each byte alignment.

    Inside a longer blob the secret starts at byte offset 0, 1 or 2 of a 3-byte group; the
    characters that mix its bits with its neighbours' differ from blob to blob, so they are cut.
    """
    cores: set[str] = set()
    for align in range(3):
        encoded = base64.b64encode(bytes(align) + raw).decode("ascii")
        first, last = (8 * align + 5) // 6, (8 * (align + len(raw))) // 6
        core = encoded[first:last]
        cores.update((core, core.translate(str.maketrans("+/", "-_"))))
    return cores


class _View:
    """A text with one round of escapes decoded, and the way back to the text it came from."""

    __slots__ = ("text", "parent", "_at", "_starts", "_ends")

    def __init__(self, text: str, parent: _View | None, escape: re.Pattern[str]):
        self.parent = parent
        self._at: list[int] = []  # position in the decoded text of each decoded escape (one character each)
        self._starts: list[int] = []  # where that escape starts and ends in the text it was decoded from
        self._ends: list[int] = []
        pieces: list[str] = []
        length, done = 0, 0
        for match in escape.finditer(text):
            start = match.start()
            if start > done:
                pieces.append(text[done:start])
                length += start - done
            chars, starts, ends = _decoded(match)
            pieces.append(chars)
            self._at.extend(range(length, length + len(chars)))
            self._starts.extend(starts)
            self._ends.extend(ends)
            length += len(chars)
            done = match.end()
        pieces.append(text[done:])
        self.text = "".join(pieces)

    def start_in_source(self, position: int) -> int:
        """Where the decoded character at ``position`` begins in the text this view decoded."""
        k = bisect.bisect_right(self._at, position) - 1
        if k < 0:
            return position
        if self._at[k] == position:
            return self._starts[k]
        return self._ends[k] + position - self._at[k] - 1

    def end_in_source(self, position: int) -> int:
        """Where the decoded text up to ``position`` (exclusive) ends in the text this view decoded."""
        k = bisect.bisect_right(self._at, position - 1) - 1
        if k >= 0 and self._at[k] == position - 1:
            return self._ends[k]
        return self.start_in_source(position - 1) + 1


def _decoded(match: re.Match[str]) -> tuple[str, Iterable[int], Iterable[int]]:
    """The characters one escape match stands for, and where each one's escape starts and ends."""
    start, end = match.span()
    if match.group("short") is not None:
        return _SHORT[match.group("short")], (start,), (end,)
    if match.groupdict().get("plus") is not None:
        return " ", (start,), (end,)
    if match.group("codes") is not None:
        chars = json.loads(f'"{match.group("codes")}"')  # C speed; pairs surrogates as JSON does
        widths = [12 if ord(c) > 0xFFFF else 6 for c in chars] if len(chars) * 6 != end - start else None
    else:
        raw = bytes.fromhex(match.group("percent").replace("%", ""))
        chars = raw.decode("utf-8", "surrogateescape")  # undecodable bytes stay, as lone surrogates
        widths = [3 * len(c.encode("utf-8", "surrogateescape")) for c in chars] if len(chars) != len(raw) else None
    if widths is None:  # one escape per character: the common case, mapped without a loop
        step = (end - start) // len(chars)
        return chars, range(start, end, step), range(start + step, end + step, step)
    bounds = list(itertools.accumulate(widths, initial=start))
    return chars, bounds[:-1], bounds[1:]


class _Matcher:
    """Finds the registered secrets in a text; built once per set of secrets, then read-only."""

    __slots__ = ("_patterns", "_seeds", "_plus_is_space")

    def __init__(self, secrets: Iterable[str]):
        patterns: dict[str, int] = {}  # text to find -> the shortest run of it that counts
        plus_is_space = False
        for secret in secrets:
            patterns[secret] = min(patterns.get(secret, len(secret)), MIN_FRAGMENT)
            raw = secret.encode("utf-8", "surrogatepass")
            for core in _base64_cores(raw):
                run = len(core) if len(raw) < MIN_FRAGMENT else min(len(core), _B64_MIN_RUN)
                patterns[core] = min(patterns.get(core, run), run)
            plus_is_space = plus_is_space or " " in secret
        self._patterns = list(patterns.items())
        self._plus_is_space = plus_is_space
        # Every run of at least `run` characters of a pattern holds one whole seed: the pieces of
        # ceil(run / 2) characters at multiples of that size. Finding seeds finds every run.
        self._seeds: dict[str, list[tuple[int, int]]] = {}
        for index, (text, run) in enumerate(self._patterns):
            size = (run + 1) // 2
            for offset in range(0, len(text) - size + 1, size):
                self._seeds.setdefault(text[offset : offset + size], []).append((index, offset))

    def __repr__(self) -> str:
        return f"<secret matcher: {len(self._patterns)} patterns>"

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Where ``text`` holds a secret in any form, as (start, end) spans of ``text``."""
        found = self._runs(text)
        chains = [_ESCAPE_OR_PLUS] if self._plus_is_space and "+" in text else []
        if "\\" in text or "%" in text:
            chains.insert(0, _ESCAPE)
        for escape in chains:
            source, parent = text, None
            for _ in range(_DECODE_ROUNDS):
                if "\\" not in source and "%" not in source and not (escape is _ESCAPE_OR_PLUS and "+" in source):
                    break
                view = _View(source, parent, escape)
                if view.text == source:  # backslashes and percent signs that escape nothing
                    break
                found += [_to_text(view, start, end) for start, end in self._runs(view.text)]
                source, parent = view.text, view
        return found

    def _runs(self, text: str) -> list[tuple[int, int]]:
        found: list[tuple[int, int]] = []
        extended: dict[tuple[int, int], tuple[int, int]] = {}  # (pattern, alignment) -> the run last found there
        for seed, places in self._seeds.items():
            at = text.find(seed)
            while at != -1:
                for index, offset in places:
                    key = (index, at - offset)
                    known = extended.get(key)
                    if known is not None and known[0] <= at and at + len(seed) <= known[1]:
                        continue  # this seed lies inside a run already found at the same alignment
                    pattern, run = self._patterns[index]
                    span = _extend(text, at, pattern, offset, len(seed))
                    extended[key] = span
                    if span[1] - span[0] >= run:
                        found.append(span)
                at = text.find(seed, at + 1)
        return found


def _extend(text: str, at: int, pattern: str, offset: int, size: int) -> tuple[int, int]:
    """The longest stretch around ``text[at:at+size] == pattern[offset:offset+size]`` where both agree."""
    left = 0
    while left < offset and left < at and text[at - left - 1] == pattern[offset - left - 1]:
        left += 1
    end, inner = at + size, offset + size
    while inner < len(pattern) and end < len(text) and text[end] == pattern[inner]:
        end += 1
        inner += 1
    return at - left, end


def _to_text(view: _View, start: int, end: int) -> tuple[int, int]:
    """A span of a decoded view as the span of the original text it was decoded from."""
    current: _View | None = view
    while current is not None:
        start, end = current.start_in_source(start), current.end_in_source(end)
        current = current.parent
    return start, end


class SecretRegistry:
    """Secret values to keep out of output; thread-safe. Its repr counts them, never shows them."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._lock = threading.Lock()
        self._matcher: _Matcher | None = None

    def __repr__(self) -> str:
        return f"<SecretRegistry: {len(self._values)} secrets>"

    def register(self, *values: str | None) -> None:
        """Remember each value (None, empty and shorter than :data:`MIN_SECRET` are ignored)."""
        for value in values:
            if value is None:
                continue
            if not isinstance(value, str):
                raise TypeError(f"a secret is registered as a str, not as {type(value).__name__}")
            value = value.strip()
            if len(value) < MIN_SECRET or value in self._values:
                continue
            with self._lock:
                self._values.add(value)
                self._matcher = None

    def scrub(self, text: str) -> str:
        """``text`` with every form of every registered secret replaced by ``***``."""
        matcher = self._matcher
        if matcher is None:
            with self._lock:
                if not self._values:
                    return text
                matcher = self._matcher = self._matcher or _Matcher(sorted(self._values))
        merged: list[list[int]] = []
        for start, end in sorted(matcher.spans(text)):
            if merged and start <= merged[-1][1]:  # overlapping and touching spans become one ***
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        if not merged:
            return text
        pieces, done = [], 0
        for start, end in merged:
            pieces += [text[done:start], REDACTED]
            done = end
        pieces.append(text[done:])
        return "".join(pieces)


_REGISTRY = SecretRegistry()


def register_secret(*values: str | None) -> None:
    """Make ``values`` secrets for the whole process: :func:`scrub` removes them from then on."""
    _REGISTRY.register(*values)


def scrub(text: str) -> str:
    """``text`` without any registered secret, in any form this module knows (see the module doc)."""
    return _REGISTRY.scrub(text)


_EXCEPTION_FORMATTER = logging.Formatter()


class SecretFilter(logging.Filter):
    """Scrubs a log record before a handler writes it: its message, exception and stack text.

    On a handler it sees every record that handler emits, whichever logger it came from (a filter
    on a logger sees only that logger's own records). The traceback is rendered here, scrubbed and
    cached in ``exc_text``, which logging's formatters print instead of rendering it again.
    """

    def __init__(self, registry: SecretRegistry | None = None):
        super().__init__()
        self.registry = registry or _REGISTRY

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit the format: logging would print both raw
            message = f"{record.msg} {record.args!r}"
            record.msg, record.args = message, None
        cleaned = self.registry.scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = _EXCEPTION_FORMATTER.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.registry.scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self.registry.scrub(record.stack_info)
        return True


_FILTER = SecretFilter()


def install_log_filter(logger: logging.Logger | None = None) -> SecretFilter:
    """Put the process-wide :class:`SecretFilter` on every handler of ``logger`` (default: root).

    Call it after the handlers are configured (``logging.basicConfig``); the command line does.
    """
    for handler in (logger or logging.getLogger()).handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
    return _FILTER
