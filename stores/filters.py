"""Milvus boolean filter expressions built from values, never by pasting text.

A file named ``a"b'c.md`` or a source id like ``x" or id != "`` must select exactly that source
when it is deleted or filtered on, never widen the expression. Every value therefore goes through
:func:`literal`, every field name through a strict identifier check, and every JSON key through a
conservative key check.

String literals are written in double quotes using only the escapes that both expression parsers
accept with the same meaning:

* Milvus server (``internal/parser/planparserv2``): the ANTLR grammar forbids a raw ``"``, ``\\``,
  CR or LF inside a double-quoted literal; the text is then decoded by Go's ``strconv.Unquote``,
  which knows ``\\\\ \\" \\n \\r \\t`` (and more) but rejects ``\\'`` in double quotes.
* Milvus Lite 3.x (``milvus_lite/search/filter/tokens.py``): knows only
  ``\\" \\' \\\\ \\n \\r \\t`` and rejects raw CR/LF.

So ``\\`` ``"`` LF CR and TAB are escaped, a single quote is left as it is (legal unescaped in
double quotes for both), and every other character, non-ASCII included, is written raw.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

# Both parsers read identifiers as [A-Za-z_][A-Za-z0-9_]*; keywords cannot be field names.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_KEYWORDS = frozenset(
    {"and", "or", "not", "in", "like", "is", "null", "exists", "true", "false", "iso", "interval"}
)
# JSON keys are written as string literals inside brackets; the server also maps them to a JSON
# pointer, where "/" and "~" are special. Plain key characters keep both parsers and pointers simple.
_JSON_KEY = re.compile(r"[A-Za-z0-9_\-]{1,255}\Z")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

_STRING_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})

Scalar = str | int | float | bool
ComparisonOp = Literal["==", "!=", "<", "<=", ">", ">="]
_COMPARISON_OPS: frozenset[str] = frozenset({"==", "!=", "<", "<=", ">", ">="})


class FilterValueError(ValueError):
    """A value, field name or key that cannot be placed safely in a filter expression."""


@dataclass(frozen=True)
class JsonPath:
    """A validated path into a JSON field, e.g. ``metadata["page_numbers"][0]``."""

    field: str
    keys: tuple[str | int, ...]

    def render(self) -> str:
        parts = [field_name(self.field)]
        for key in self.keys:
            parts.append(f"[{key}]" if isinstance(key, int) else f"[{string_literal(key)}]")
        return "".join(parts)


Target = str | JsonPath


def field_name(name: str) -> str:
    """``name`` unchanged if it is a legal, non-keyword Milvus field name."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name) or name.lower() in _KEYWORDS:
        raise FilterValueError(
            f"{name!r} is not a usable field name (letters, digits and underscores, not starting "
            "with a digit, and not a keyword such as 'and' or 'in')"
        )
    return name


def json_path(field: str, *keys: str | int) -> JsonPath:
    """A path into JSON field ``field``: string keys for objects, non-negative ints for arrays."""
    field_name(field)
    if not keys:
        raise FilterValueError(f"a JSON path into {field!r} needs at least one key")
    for key in keys:
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise FilterValueError(f"JSON path key {key!r} must be a string or an array index")
        if isinstance(key, int) and not 0 <= key <= _INT64_MAX:
            raise FilterValueError(f"JSON array index {key} must be a non-negative integer")
        if isinstance(key, str) and not _JSON_KEY.match(key):
            raise FilterValueError(
                f"JSON key {key!r} is not allowed in filters: use 1-255 letters, digits, '_' or '-'"
            )
    return JsonPath(field, tuple(keys))


def string_literal(value: str) -> str:
    """``value`` as a double-quoted literal that both Milvus and Milvus Lite read back exactly."""
    if not isinstance(value, str):
        raise FilterValueError(f"expected a string, got {type(value).__name__}: {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        # Lone surrogates (e.g. undecodable file names read with surrogateescape) cannot be sent.
        raise FilterValueError(f"{value!r} is not valid Unicode text and cannot be matched: {exc.reason}") from None
    return '"' + value.translate(_STRING_ESCAPES) + '"'


def number_literal(value: int | float) -> str:
    """A finite int (within int64) or float as a literal; bools are refused (use :func:`literal`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FilterValueError(f"expected a number, got {type(value).__name__}: {value!r}")
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise FilterValueError(f"{value} is outside the 64-bit integer range Milvus compares")
        return str(value)
    if not math.isfinite(value):
        raise FilterValueError(f"{value!r} cannot be compared in a filter (only finite numbers)")
    return repr(float(value))  # shortest round-tripping form, e.g. 0.1, 1e-05, 1e+16


def literal(value: Scalar) -> str:
    """Any scalar filter value as a literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return string_literal(value)
    if isinstance(value, (int, float)):
        return number_literal(value)
    raise FilterValueError(f"values of type {type(value).__name__} cannot be used in a filter: {value!r}")


def _target(target: Target) -> str:
    return target.render() if isinstance(target, JsonPath) else field_name(target)


def eq(target: Target, value: Scalar) -> str:
    """``target == value``."""
    return f"{_target(target)} == {literal(value)}"


def ne(target: Target, value: Scalar) -> str:
    """``target != value``."""
    return f"{_target(target)} != {literal(value)}"


def compare(target: Target, op: ComparisonOp, value: int | float) -> str:
    """A numeric comparison, e.g. ``compare("chunk_index", "<", 3)``."""
    if op not in _COMPARISON_OPS:
        raise FilterValueError(f"unknown comparison operator {op!r}; use one of {', '.join(sorted(_COMPARISON_OPS))}")
    return f"{_target(target)} {op} {number_literal(value)}"


def in_list(target: Target, values: Iterable[Scalar]) -> str:
    """``target in [v1, v2, ...]``; all values of one kind (strings, or numbers); empty matches nothing.

    Milvus Lite accepts ``in`` on plain fields only; the server also accepts JSON paths.
    """
    items = list(values)
    kinds = {"string" if isinstance(v, str) else "bool" if isinstance(v, bool) else "number" for v in items}
    if len(kinds) > 1:
        raise FilterValueError(f"an 'in' list must hold values of one kind, got {', '.join(sorted(kinds))}")
    return f"{_target(target)} in [{', '.join(literal(v) for v in items)}]"


def all_of(*expressions: str) -> str:
    """The conjunction of already-built expressions (each parenthesised); empty means no filter."""
    return " and ".join(f"({e})" for e in expressions if e)


def any_of(*expressions: str) -> str:
    """The disjunction of already-built expressions (each parenthesised)."""
    parts = [e for e in expressions if e]
    if not parts:
        raise FilterValueError("any_of needs at least one expression (an empty 'or' would match nothing)")
    return " or ".join(f"({e})" for e in parts)
