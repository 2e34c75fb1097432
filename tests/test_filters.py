"""Filter expressions built from hostile values stay exactly one literal.

The decoding checks run each literal through Milvus Lite's own tokenizer; the store tests run the
same values against a real Milvus Lite collection.
"""

from __future__ import annotations

import math

import pytest

from stores import filters
from stores.filters import FilterValueError

HOSTILE = [
    "a\"b'c.md",
    'x" or id != "',
    '" or 1==1 or "',
    "' or 1==1 or '",
    "back\\slash\\",
    "trailing\\",
    '\\" or true or \\"',
    "line\nbreak\r\nand\ttab",
    "unicodé/文档/😀.md",
    "nul\x00and\x1fcontrol",
    "",
]


def lite_tokens(expression: str):
    tokens = pytest.importorskip(
        "milvus_lite.search.filter.tokens",
        reason="needs Milvus Lite 3's filter tokenizer (the default engine is Lite 2.5; tests/test_milvus_store.py "
        "and the server tier check the same literals against real engines)",
    )
    return [t for t in tokens.tokenize(expression) if t.kind.name != "EOF"]


@pytest.mark.parametrize("value", HOSTILE)
def test_string_literal_decodes_to_exactly_the_value_in_milvus_lite(value):
    tokens = lite_tokens(filters.string_literal(value))
    assert [t.kind.name for t in tokens] == ["STRING"]
    assert tokens[0].value == value


@pytest.mark.parametrize("value", HOSTILE)
def test_string_literal_uses_only_escapes_the_milvus_server_reads_the_same_way(value):
    # The server decodes double-quoted literals with Go's strconv.Unquote and forbids raw CR/LF.
    body = filters.string_literal(value)[1:-1]
    assert "\n" not in body and "\r" not in body
    i = 0
    while i < len(body):
        if body[i] == "\\":
            assert body[i + 1] in '\\"nrt', body
            i += 2
            continue
        assert body[i] != '"', body
        i += 1


def test_equality_with_a_hostile_value_is_one_comparison():
    expression = filters.eq("source_id", 'x" or id != "')
    assert [t.kind.name for t in lite_tokens(expression)] == ["IDENT", "EQ", "STRING"]


def test_in_list_keeps_every_hostile_value_a_single_list_item():
    expression = filters.in_list("source_id", HOSTILE)
    kinds = [t.kind.name for t in lite_tokens(expression)]
    assert kinds[:3] == ["IDENT", "IN", "LBRACKET"]
    assert kinds.count("STRING") == len(HOSTILE)
    assert "OR" not in kinds and "EQ" not in kinds and "NE" not in kinds


def test_lone_surrogate_is_refused():
    with pytest.raises(FilterValueError, match="not valid Unicode"):
        filters.string_literal("bad\udce9name")


@pytest.mark.parametrize("name", ["1abc", "a b", "and", "IN", "x or 1==1", 'source_id"', "", "meta[0]"])
def test_field_names_are_validated(name):
    with pytest.raises(FilterValueError, match="not a usable field name"):
        filters.eq(name, "v")


@pytest.mark.parametrize("key", ['a"]', "a/b", "~0", "", "k" * 256, "é"])
def test_json_keys_are_validated(key):
    with pytest.raises(FilterValueError, match="JSON key"):
        filters.json_path("metadata", key)


def test_json_path_renders_keys_and_indices():
    path = filters.json_path("metadata", "page_numbers", 0)
    assert filters.eq(path, 3) == 'metadata["page_numbers"][0] == 3'
    assert filters.compare(filters.json_path("metadata", "start"), ">=", 10) == 'metadata["start"] >= 10'
    with pytest.raises(FilterValueError, match="non-negative"):
        filters.json_path("metadata", -1)
    with pytest.raises(FilterValueError, match="string or an array index"):
        filters.json_path("metadata", True)
    with pytest.raises(FilterValueError, match="at least one key"):
        filters.json_path("metadata")


def test_numbers_are_type_checked():
    assert filters.compare("chunk_index", "<", 3) == "chunk_index < 3"
    assert filters.compare("chunk_index", ">", -2.5) == "chunk_index > -2.5"
    assert filters.number_literal(1e-5) == "1e-05"
    for bad in (True, "3", None, [1]):
        with pytest.raises(FilterValueError, match="expected a number"):
            filters.compare("chunk_index", "<", bad)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(FilterValueError, match="finite"):
            filters.number_literal(bad)
    with pytest.raises(FilterValueError, match="64-bit"):
        filters.number_literal(2**63)
    with pytest.raises(FilterValueError, match="unknown comparison operator"):
        filters.compare("chunk_index", "=", 1)  # type: ignore[arg-type]


def test_literals_of_each_kind():
    assert filters.literal(True) == "true"
    assert filters.literal(False) == "false"
    assert filters.literal(7) == "7"
    assert filters.literal("it's") == '"it\'s"'
    with pytest.raises(FilterValueError, match="cannot be used in a filter"):
        filters.literal(None)  # type: ignore[arg-type]


def test_in_list_requires_one_kind_and_allows_empty():
    assert filters.in_list("chunk_index", [1, 2]) == "chunk_index in [1, 2]"
    assert filters.in_list("source_id", []) == "source_id in []"
    with pytest.raises(FilterValueError, match="one kind"):
        filters.in_list("source_id", ["a", 1])
    with pytest.raises(FilterValueError, match="one kind"):
        filters.in_list("chunk_index", [1, True])


def test_combinators_parenthesise_each_part():
    a = filters.eq("source_id", "a")
    b = filters.compare("chunk_index", "<", 2)
    assert filters.all_of(a, "", b) == f"({a}) and ({b})"
    assert filters.all_of() == ""
    assert filters.any_of(a, b) == f"({a}) or ({b})"
    with pytest.raises(FilterValueError, match="at least one"):
        filters.any_of("")


# -- filters as data ---------------------------------------------------------------------------


def test_from_mapping_builds_one_conjunction_of_safe_parts():
    expression = filters.from_mapping(
        {
            "source_id": 'a" or 1==1 or "',
            "chunk_index": {"gte": 1, "lt": 3},
            "media_type": ["application/pdf", "text/html"],
        }
    )
    assert expression == (
        '(source_id == "a\\" or 1==1 or \\"") and (chunk_index >= 1) and (chunk_index < 3) and '
        '((metadata["media_type"] == "application/pdf") or (metadata["media_type"] == "text/html"))'
    )
    assert filters.from_mapping({}) == ""
    assert filters.from_mapping({"a.b": 1}) == '(metadata["a"]["b"] == 1)'
    assert filters.from_mapping({"headings": {"contains": "Setup"}}) == '(json_contains(metadata["headings"], "Setup"))'


def test_page_filters_match_chunks_by_their_page_list():
    pages = 'metadata["page_numbers"]'
    assert filters.from_mapping({"page": 3}) == f"(json_contains({pages}, 3))"
    assert filters.from_mapping({"page": {"gte": 2, "lte": 4}}) == f"(json_contains_any({pages}, [2, 3, 4]))"
    assert filters.from_mapping({"page": {"gt": 2, "lt": 5}}) == f"(json_contains_any({pages}, [3, 4]))"
    assert filters.from_mapping({"page": [1, 7]}) == f"(json_contains_any({pages}, [1, 7]))"


@pytest.mark.parametrize(
    ("conditions", "message"),
    [
        ({"source_id": {"like": "%"}}, "unknown operator"),
        ({"source_id": {}}, "unknown operator"),
        ({'x"] or 1==1 or ["': 1}, "not allowed in filters"),
        ({"source_id": []}, "at least one value"),
        ({"source_id": {"in": "a"}}, "takes a list"),
        ({"chunk_index": {"lt": "3"}}, "expected a number"),
        ({"page": {"gte": 2}}, "needs an upper bound"),
        ({"page": {"gte": 5, "lte": 2}}, "is empty"),
        ({"page": {"gte": 1, "lte": 10**6}}, "at most"),
        ({"page": "3"}, "non-negative integers"),
        ({"source_id": {"eq": ["a"]}}, "cannot be used in a filter"),
    ],
)
def test_from_mapping_refuses_what_it_cannot_express_safely(conditions, message):
    with pytest.raises(filters.FilterValueError, match=message):
        filters.from_mapping(conditions)


# -- filters as data (core.filters): parsed once, matched by stores that filter in Python ----------

ROW = {"id": "a#0", "source_id": "a.md", "chunk_index": 2, "metadata": {"page_numbers": [3, 4], "lang": "en"}}


@pytest.mark.parametrize(
    ("conditions", "matches"),
    [
        ({}, True),
        ({"source_id": "a.md"}, True),
        ({"source_id": ["b.md", "a.md"]}, True),
        ({"chunk_index": {"gte": 2, "lt": 3}}, True),
        ({"chunk_index": {"gt": 2}}, False),
        ({"page": 4}, True),
        ({"page": {"gte": 5, "lte": 9}}, False),
        ({"lang": {"ne": "de"}}, True),
        ({"missing": {"ne": "x"}}, False),  # a key the chunk lacks matches no condition
        ({"chunk_index": "2"}, False),  # text never equals a number
        ({"source_id": 'a.md" or "1"=="1'}, False),
    ],
)
def test_a_parsed_filter_matches_rows_by_value(conditions, matches):
    from core.filters import Filter

    assert Filter.parse(conditions).matches(ROW) is matches


def test_parsing_refuses_what_a_server_would():
    from core.filters import Filter

    for bad in ({"lang": float("nan")}, {"x/y": 1}, {"chunk_index": {"lt": 2**64}}, {"source_id": []}, {1: "x"}):
        with pytest.raises(FilterValueError):
            Filter.parse(bad)
