"""Filters as data: what a query receives from a user or an HTTP request, checked once, in neutral form.

The query path parses a mapping of conditions into a :class:`Filter` and hands it to the store,
which compiles it for its engine (:func:`stores.filters.compile_filter` writes a Milvus boolean
expression). :meth:`Filter.matches` is the reference meaning, used by stores that filter in Python.

A mapping's keys name a chunk field (``id``, ``source_id``, ``chunk_index``), ``page`` (the
chunk's pages), or else a metadata key (``media_type``, ``file_name``; ``a.b`` for nested keys).
Values are:

* a scalar: equality, e.g. ``{"source_id": "docs/a.md"}``;
* a list: any of the values, e.g. ``{"media_type": ["application/pdf", "text/html"]}``;
* operators: ``{"chunk_index": {"lt": 3}}``, ``{"page": {"gte": 2, "lte": 5}}``,
  ``{"headings": {"contains": "Setup"}}``; ``eq ne lt lte gt gte in contains``.

Everything a Milvus server would refuse (a key it cannot address, a number outside int64, text
that is not valid Unicode) is refused here, so every store refuses the same filters.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

Scalar = str | int | float | bool
Condition = Scalar | list[Scalar] | dict[str, Any]
Operator = Literal["eq", "ne", "in", "contains", "contains_any", "lt", "lte", "gt", "gte"]

CHUNK_FIELDS = ("id", "source_id", "chunk_index")
METADATA_FIELD = "metadata"
PAGES_KEY = "page_numbers"
PAGE_CONDITION = "page"
# The widest page range a filter may name; a range is matched as the list of its pages.
MAX_PAGE_RANGE = 10_000
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# Milvus reads identifiers as [A-Za-z_][A-Za-z0-9_]*; keywords cannot be field names.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_KEYWORDS = frozenset({"and", "or", "not", "in", "like", "is", "null", "exists", "true", "false", "iso", "interval"})
# JSON keys become string literals inside brackets and JSON pointers on the server, where "/" and
# "~" are special: plain key characters keep every engine simple.
_JSON_KEY = re.compile(r"[A-Za-z0-9_\-]{1,255}\Z")
_RANGE_OPERATORS = ("lt", "lte", "gt", "gte")
_USER_OPERATORS = frozenset({"eq", "ne", "in", "contains", *_RANGE_OPERATORS})


class FilterValueError(ValueError):
    """A value, field name or key that cannot be placed safely in a filter."""


@dataclass(frozen=True)
class FieldPath:
    """A chunk field, or a path into its JSON metadata (``keys`` non-empty), e.g. ``metadata.page_numbers``."""

    field: str
    keys: tuple[str | int, ...] = ()


@dataclass(frozen=True)
class Clause:
    """One condition on one field: ``value`` is a tuple for ``in`` and ``contains_any``."""

    path: FieldPath
    op: Operator
    value: Scalar | tuple[Scalar, ...]


@dataclass(frozen=True)
class Filter:
    """Clauses that must all hold; no clauses selects everything."""

    clauses: tuple[Clause, ...] = ()

    @classmethod
    def parse(cls, conditions: Mapping[str, Condition] | None) -> Filter:
        """The filter a mapping of conditions describes (see the module docs); raises FilterValueError."""
        if conditions is None:
            return cls()
        if not isinstance(conditions, Mapping):
            raise FilterValueError(f"filters must be a mapping of field -> condition, got {type(conditions).__name__}")
        clauses: list[Clause] = []
        for key, condition in conditions.items():
            if not isinstance(key, str):
                raise FilterValueError(f"filter keys must be strings, got {key!r}")
            if key == PAGE_CONDITION:
                clauses.append(_page_clause(condition))
                continue
            path = FieldPath(check_field_name(key)) if key in CHUNK_FIELDS else metadata_path(*key.split("."))
            clauses.extend(_clauses(key, path, condition))
        return cls(tuple(clauses))

    def __bool__(self) -> bool:
        return bool(self.clauses)

    def matches(self, row: Mapping[str, Any]) -> bool:
        """Whether a stored row (``id``, ``source_id``, ``chunk_index``, ``metadata``) passes every clause.

        A clause on a metadata key the row lacks, or of another type than the value, does not hold.
        """
        return all(_holds(clause, row) for clause in self.clauses)


def check_field_name(name: str) -> str:
    """``name`` unchanged if it is a legal, non-keyword field name."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name) or name.lower() in _KEYWORDS:
        raise FilterValueError(
            f"{name!r} is not a usable field name (letters, digits and underscores, not starting "
            "with a digit, and not a keyword such as 'and' or 'in')"
        )
    return name


def check_json_keys(field: str, keys: tuple[str | int, ...]) -> FieldPath:
    """A path into JSON field ``field``: string keys for objects, non-negative ints for arrays."""
    check_field_name(field)
    if not keys:
        raise FilterValueError(f"a JSON path into {field!r} needs at least one key")
    for key in keys:
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise FilterValueError(f"JSON path key {key!r} must be a string or an array index")
        if isinstance(key, int) and not 0 <= key <= INT64_MAX:
            raise FilterValueError(f"JSON array index {key} must be a non-negative integer")
        if isinstance(key, str) and not _JSON_KEY.match(key):
            raise FilterValueError(f"JSON key {key!r} is not allowed in filters: use 1-255 letters, digits, '_' or '-'")
    return FieldPath(field, keys)


def metadata_path(*keys: str | int) -> FieldPath:
    return check_json_keys(METADATA_FIELD, keys)


def check_scalar(value: Any) -> Scalar:
    """``value`` if it can be compared in a filter: valid Unicode text, a finite number within int64, a bool."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            # Lone surrogates (e.g. undecodable file names read with surrogateescape) cannot be sent.
            raise FilterValueError(f"{value!r} is not valid Unicode text and cannot be matched: {exc.reason}") from None
        return value
    if isinstance(value, (int, float)):
        return check_number(value)
    raise FilterValueError(f"values of type {type(value).__name__} cannot be used in a filter: {value!r}")


def check_number(value: Any) -> int | float:
    """A finite int (within int64) or float; bools are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FilterValueError(f"expected a number, got {type(value).__name__}: {value!r}")
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        raise FilterValueError(f"{value} is outside the 64-bit integer range Milvus compares")
    if isinstance(value, float) and not math.isfinite(value):
        raise FilterValueError(f"{value!r} cannot be compared in a filter (only finite numbers)")
    return value


def check_one_kind(values: tuple[Scalar, ...]) -> tuple[Scalar, ...]:
    kinds = {"string" if isinstance(v, str) else "bool" if isinstance(v, bool) else "number" for v in values}
    if len(kinds) > 1:
        raise FilterValueError(f"an 'in' list must hold values of one kind, got {', '.join(sorted(kinds))}")
    return values


def _clauses(key: str, path: FieldPath, condition: Condition) -> list[Clause]:
    if isinstance(condition, list):
        return [_one_of(path, condition)]
    if not isinstance(condition, Mapping):
        return [Clause(path, "eq", check_scalar(condition))]
    unknown = set(condition) - _USER_OPERATORS
    if unknown or not condition:
        raise FilterValueError(
            f"filter {key!r}: unknown operator(s) {', '.join(sorted(map(str, unknown))) or '(none given)'}; "
            f"use {', '.join(sorted(_USER_OPERATORS))}"
        )
    clauses = []
    for name, value in condition.items():
        op = cast(Operator, name)  # one of _USER_OPERATORS, checked above
        if op in ("eq", "ne", "contains"):
            clauses.append(Clause(path, op, check_scalar(value)))
        elif op == "in":
            if not isinstance(value, list):
                raise FilterValueError(f"filter {key!r}: 'in' takes a list, got {value!r}")
            clauses.append(_one_of(path, value))
        else:
            clauses.append(Clause(path, op, check_number(value)))
    return clauses


def _one_of(path: FieldPath, values: list[Any]) -> Clause:
    if not values:
        raise FilterValueError("a filter list needs at least one value (an empty list would match nothing)")
    return Clause(path, "in", check_one_kind(tuple(check_scalar(v) for v in values)))


def _page_clause(condition: Condition) -> Clause:
    """Chunks on a page, on any of some pages, or overlapping a page range (chunks list their pages)."""
    pages = metadata_path(PAGES_KEY)
    if isinstance(condition, list):
        if not condition:
            raise FilterValueError("contains_any needs at least one value")
        return Clause(pages, "contains_any", tuple(_page_number(p) for p in condition))
    if not isinstance(condition, Mapping):
        return Clause(pages, "contains", _page_number(condition))
    unknown = set(condition) - {"eq", "in", *_RANGE_OPERATORS}
    if unknown or not condition:
        raise FilterValueError(f"filter 'page': use a page number, a list, or gte/gt/lte/lt bounds; got {condition!r}")
    if "eq" in condition:
        return Clause(pages, "contains", _page_number(condition["eq"]))
    if "in" in condition:
        return _page_clause(condition["in"])
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
    return Clause(pages, "contains_any", tuple(range(low, high + 1)))


def _page_number(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FilterValueError(f"filter 'page': page numbers are non-negative integers, got {value!r}")
    return value


# -- the reference meaning -----------------------------------------------------------------------

_MISSING = object()


def _lookup(row: Mapping[str, Any], path: FieldPath) -> Any:
    value: Any = row.get(path.field, _MISSING)
    for key in path.keys:
        if isinstance(key, int) and isinstance(value, list) and key < len(value):
            value = value[key]
        elif isinstance(key, str) and isinstance(value, Mapping) and key in value:
            value = value[key]
        else:
            return _MISSING
    return value


def _same_kind(a: Any, b: Any) -> bool:
    """Text compares with text, bools with bools, numbers with numbers (never a bool with a number)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str)
    return isinstance(a, (int, float)) and isinstance(b, (int, float))


def _holds(clause: Clause, row: Mapping[str, Any]) -> bool:
    actual = _lookup(row, clause.path)
    if actual is _MISSING or actual is None:
        return False
    op, value = clause.op, clause.value
    if op in ("contains", "contains_any"):
        if not isinstance(actual, list):
            return False
        wanted = value if isinstance(value, tuple) else (value,)
        return any(_same_kind(item, w) and item == w for item in actual for w in wanted)
    if op == "in":
        assert isinstance(value, tuple)
        return any(_same_kind(actual, v) and actual == v for v in value)
    if not _same_kind(actual, value):
        return False
    if op == "eq":
        return bool(actual == value)
    if op == "ne":
        return bool(actual != value)
    compared = {"lt": actual < value, "lte": actual <= value, "gt": actual > value, "gte": actual >= value}
    return bool(compared[op])
