"""Milvus boolean filter expressions built from values, never by pasting text.

The query path hands the store a parsed :class:`core.filters.Filter`; :func:`compile_filter` writes
it as one expression. The builders below serve the store's own queries (records, deletions).

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

from collections.abc import Iterable, Mapping
from typing import Literal

from core.filters import (
    Clause,
    Condition,
    FieldPath,
    Filter,
    FilterValueError,
    Scalar,
    check_field_name,
    check_json_keys,
    check_number,
    check_one_kind,
    check_scalar,
)

_STRING_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})

ComparisonOp = Literal["==", "!=", "<", "<=", ">", ">="]
_COMPARISON_OPS: frozenset[str] = frozenset({"==", "!=", "<", "<=", ">", ">="})
_RANGE_OPS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


Target = str | FieldPath  # a plain field name, or a path into a JSON field


def field_name(name: str) -> str:
    """``name`` unchanged if it is a legal, non-keyword Milvus field name."""
    return check_field_name(name)


def json_path(field: str, *keys: str | int) -> FieldPath:
    """A path into JSON field ``field``: string keys for objects, non-negative ints for arrays."""
    return check_json_keys(field, keys)


def string_literal(value: str) -> str:
    """``value`` as a double-quoted literal that both Milvus and Milvus Lite read back exactly."""
    if not isinstance(value, str):
        raise FilterValueError(f"expected a string, got {type(value).__name__}: {value!r}")
    return '"' + str(check_scalar(value)).translate(_STRING_ESCAPES) + '"'


def number_literal(value: int | float) -> str:
    """A finite int (within int64) or float as a literal; bools are refused (use :func:`literal`)."""
    value = check_number(value)
    if isinstance(value, int):
        return str(value)
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
    if isinstance(target, str):
        return field_name(target)
    if target.keys:
        check_json_keys(target.field, target.keys)
    else:
        field_name(target.field)
    parts = [target.field]
    for key in target.keys:
        parts.append(f"[{key}]" if isinstance(key, int) else f"[{string_literal(key)}]")
    return "".join(parts)


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
    items = check_one_kind(tuple(values))
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


def contains(target: Target, value: Scalar) -> str:
    """``target`` (an array, e.g. a JSON list) holds ``value``."""
    return f"json_contains({_target(target)}, {literal(value)})"


def contains_any(target: Target, values: Iterable[Scalar]) -> str:
    """``target`` (an array) holds at least one of ``values``."""
    items = list(values)
    if not items:
        raise FilterValueError("contains_any needs at least one value")
    return f"json_contains_any({_target(target)}, [{', '.join(literal(v) for v in items)}])"


# --------------------------------------------------------------------------------------------
# Filters as data (core.filters) compiled into one expression.


def compile_filter(conditions: Filter) -> str:
    """The Milvus expression for a parsed filter; ``""`` (no filter) when it has no clauses."""
    return all_of(*(_clause(clause) for clause in conditions.clauses))


def from_mapping(conditions: Mapping[str, Condition]) -> str:
    """The expression for a mapping of conditions (see :mod:`core.filters`), all of which must hold.

    Every value becomes a literal and every key is checked, so no input can widen the expression.
    """
    return compile_filter(Filter.parse(conditions))


def _clause(clause: Clause) -> str:
    target: Target = clause.path if clause.path.keys else clause.path.field
    value = clause.value
    if clause.op == "eq":
        return eq(target, value)  # type: ignore[arg-type]
    if clause.op == "ne":
        return ne(target, value)  # type: ignore[arg-type]
    if clause.op == "contains":
        return contains(target, value)  # type: ignore[arg-type]
    if clause.op == "contains_any":
        return contains_any(target, value)  # type: ignore[arg-type]
    if clause.op == "in":
        assert isinstance(value, tuple)
        if clause.path.keys:
            # Milvus Lite reads `in` on plain fields only; an 'or' of equalities works everywhere.
            return any_of(*(eq(target, v) for v in value))
        return in_list(target, value)
    return compare(target, _RANGE_OPS[clause.op], value)  # type: ignore[arg-type]
