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
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

# Both parsers read identifiers as [A-Za-z_][A-Za-z0-9_]*; keywords cannot be field names.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_KEYWORDS = frozenset({"and", "or", "not", "in", "like", "is", "null", "exists", "true", "false", "iso", "interval"})
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
            raise FilterValueError(f"JSON key {key!r} is not allowed in filters: use 1-255 letters, digits, '_' or '-'")
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


# --------------------------------------------------------------------------------------------
# Filters as data: what a query API receives from a user or an HTTP request.

PAGE_KEY = "page"
# The widest page range a filter may name; a range is sent as the list of its pages.
MAX_PAGE_RANGE = 10_000
_RANGE_OPS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
_OPERATORS = frozenset({"eq", "ne", "in", "contains", *_RANGE_OPS})

Condition = Scalar | list[Scalar] | dict[str, Any]


def contains(target: Target, value: Scalar) -> str:
    """``target`` (an array, e.g. a JSON list) holds ``value``."""
    return f"json_contains({_target(target)}, {literal(value)})"


def contains_any(target: Target, values: Iterable[Scalar]) -> str:
    """``target`` (an array) holds at least one of ``values``."""
    items = list(values)
    if not items:
        raise FilterValueError("contains_any needs at least one value")
    return f"json_contains_any({_target(target)}, [{', '.join(literal(v) for v in items)}])"


def from_mapping(
    conditions: Mapping[str, Condition],
    *,
    fields: Collection[str] = ("id", "source_id", "chunk_index"),
    json_field: str = "metadata",
    pages_key: str = "page_numbers",
) -> str:
    """One expression for a mapping of conditions, all of which must hold; ``{}`` means no filter.

    Keys name a plain field (``source_id``, ``chunk_index``), ``page`` (the chunk's pages), or
    else a metadata key (``media_type``, ``file_name``; ``a.b`` for nested keys). Values are:

    * a scalar: equality, e.g. ``{"source_id": "docs/a.md"}``;
    * a list: any of the values, e.g. ``{"media_type": ["application/pdf", "text/html"]}``;
    * operators: ``{"chunk_index": {"lt": 3}}``, ``{"page": {"gte": 2, "lte": 5}}``,
      ``{"headings": {"contains": "Setup"}}``; ``eq ne lt lte gt gte in contains``.

    Every value becomes a literal and every key is checked, so no input can widen the expression.
    """
    if not isinstance(conditions, Mapping):
        raise FilterValueError(f"filters must be a mapping of field -> condition, got {type(conditions).__name__}")
    parts = []
    for key, condition in conditions.items():
        if not isinstance(key, str):
            raise FilterValueError(f"filter keys must be strings, got {key!r}")
        if key == PAGE_KEY:
            parts.append(_page_condition(json_path(json_field, pages_key), condition))
            continue
        target: Target = field_name(key) if key in fields else json_path(json_field, *key.split("."))
        parts.append(_condition(key, target, condition))
    return all_of(*parts)


def _condition(key: str, target: Target, condition: Condition) -> str:
    if isinstance(condition, list):
        return _one_of(target, condition)
    if not isinstance(condition, Mapping):
        return eq(target, condition)
    unknown = set(condition) - _OPERATORS
    if unknown or not condition:
        raise FilterValueError(
            f"filter {key!r}: unknown operator(s) {', '.join(sorted(map(str, unknown))) or '(none given)'}; "
            f"use {', '.join(sorted(_OPERATORS))}"
        )
    parts = []
    for op, value in condition.items():
        if op == "eq":
            parts.append(eq(target, value))
        elif op == "ne":
            parts.append(ne(target, value))
        elif op == "in":
            if not isinstance(value, list):
                raise FilterValueError(f"filter {key!r}: 'in' takes a list, got {value!r}")
            parts.append(_one_of(target, value))
        elif op == "contains":
            parts.append(contains(target, value))
        else:
            parts.append(compare(target, _RANGE_OPS[op], value))  # type: ignore[arg-type]
    return all_of(*parts)


def _one_of(target: Target, values: list[Scalar]) -> str:
    if not values:
        raise FilterValueError("a filter list needs at least one value (an empty list would match nothing)")
    if isinstance(target, JsonPath):
        # Milvus Lite reads `in` on plain fields only; an 'or' of equalities works everywhere.
        return any_of(*(eq(target, v) for v in values))
    return in_list(target, values)


def _page_condition(pages: JsonPath, condition: Condition) -> str:
    """Chunks on a page, on any of some pages, or overlapping a page range (chunks list their pages)."""
    if isinstance(condition, list):
        return contains_any(pages, [_page_number(p) for p in condition])
    if not isinstance(condition, Mapping):
        return contains(pages, _page_number(condition))
    unknown = set(condition) - {"eq", "in", *_RANGE_OPS}
    if unknown or not condition:
        raise FilterValueError(f"filter 'page': use a page number, a list, or gte/gt/lte/lt bounds; got {condition!r}")
    if "eq" in condition:
        return contains(pages, _page_number(condition["eq"]))
    if "in" in condition:
        return _page_condition(pages, condition["in"])
    low, high = 1, None
    for op, bound in condition.items():
        number = _page_number(bound)
        if op in ("gte", "gt"):
            low = max(low, number + (op == "gt"))
        else:
            high = number - (op == "lt") if high is None else min(high, number - (op == "lt"))
    if high is None:
        raise FilterValueError("filter 'page': a range needs an upper bound (lte or lt)")
    if high < low:
        raise FilterValueError(f"filter 'page': the range {low}..{high} is empty")
    if high - low + 1 > MAX_PAGE_RANGE:
        raise FilterValueError(f"filter 'page': a range may span at most {MAX_PAGE_RANGE} pages")
    return contains_any(pages, range(low, high + 1))


def _page_number(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FilterValueError(f"filter 'page': page numbers are non-negative integers, got {value!r}")
    return value
