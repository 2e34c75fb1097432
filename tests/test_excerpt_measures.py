"""Span-level evaluation without an index: the measures, mapping parsed offsets back to the file,
and reading questions with reference excerpts (and refusing or skipping bad ones by row)."""

from __future__ import annotations

import csv
import json

import pytest

from pipeline.evaluate import EvaluationError
from pipeline.excerpts import (
    OffsetMap,
    covered,
    load_excerpts,
    merged,
    parsed_text_of,
    precision_omega,
    span_scores,
)

CORPUS = "# Tea\n\nGreen tea is steeped for two minutes.\n\n* Black tea  takes **four** minutes.\n"


def test_ranges_merge_and_cover_counting_each_character_once():
    assert merged([(5, 9), (0, 3), (2, 4), (9, 9), (8, 12)]) == [(0, 4), (5, 12)]
    # two overlapping chunks over one reference: its characters count once
    assert covered([(0, 10), (5, 15)], [(8, 20)]) == [(8, 15)]


def test_span_scores_follow_the_benchmark_definitions():
    references = [(10, 20), (40, 50)]  # 20 reference characters
    retrieved = [("a", (0, 15)), ("a", (12, 30)), ("b", (10, 20))]  # the last is another corpus
    scores = span_scores(retrieved, "a", references)
    # covered: 10-20 (10 chars); retrieved chars 15 + 18 + 10 = 43 (overlap and other corpus count)
    assert scores["recall"] == pytest.approx(10 / 20)
    assert scores["precision"] == pytest.approx(10 / 43)
    assert scores["iou"] == pytest.approx(10 / (43 + 10))  # 40-50 was not covered
    assert span_scores([], "a", references) == {"recall": 0.0, "precision": 0.0, "iou": 0.0}


def test_precision_omega_retrieves_exactly_the_chunks_that_touch_a_reference():
    chunks = [(0, 10), (10, 20), (20, 30), (30, 40)]
    # touches the 2nd and 3rd chunk: 20 characters retrieved, 8 of them reference
    assert precision_omega(chunks, [(15, 23)]) == pytest.approx(8 / 20)
    assert precision_omega(chunks, [(10, 20)]) == 1.0
    assert precision_omega([], [(0, 5)]) == 0.0


def test_offset_map_is_exact_where_the_parser_kept_the_words():
    parsed = "Tea\n\nGreen tea is steeped for two minutes.\n\nBlack tea takes four minutes."
    mapping = OffsetMap(parsed, CORPUS)
    start = parsed.index("Green")
    span = mapping.span(start, start + len("Green tea is steeped"))
    assert span is not None and CORPUS[span[0] : span[1]] == "Green tea is steeped"
    # "takes four" crosses a collapsed double space and stripped ** markup: the span keeps both ends
    start = parsed.index("tea takes")
    span = mapping.span(start, start + len("tea takes four minutes."))
    assert span is not None and CORPUS[span[0] : span[1]] == "tea  takes **four** minutes."
    # a span inside a word maps inside it; a span of whitespace only maps to nothing
    start = parsed.index("steeped")
    assert mapping.span(start + 2, start + 5) == (CORPUS.index("steeped") + 2, CORPUS.index("steeped") + 5)
    assert mapping.span(3, 5) is None
    assert OffsetMap(CORPUS, CORPUS).span(3, 7) == (3, 7)


def test_offset_map_survives_a_word_the_parser_changed():
    source = "alpha beta gamma delta epsilon " * 50 + "zeta omega"
    parsed = source.replace("gamma", "GAMMA", 1)
    mapping = OffsetMap(parsed, source)
    end = len(parsed)
    assert mapping.span(end - len("zeta omega"), end) == (len(source) - len("zeta omega"), len(source))
    assert mapping.span(parsed.index("GAMMA"), parsed.index("GAMMA") + 5) is None


def test_parsed_text_is_rebuilt_from_overlapping_chunks_with_gaps_as_spaces():
    text = parsed_text_of([(6, 11, "world"), (0, 5, "hello"), (8, 14, "rld ok")])
    assert text == "hello world ok"


def write_questions(path, rows, header=("question", "references", "corpus_id")):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def reference(text: str, part: str, **override) -> str:
    start = text.index(part)
    return json.dumps([{"content": part, "start_index": start, "end_index": start + len(part), **override}])


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpora"
    folder.mkdir()
    (folder / "tea.md").write_text(CORPUS, encoding="utf-8")
    (folder / "rivers.txt").write_text("The Nile flows north.\n\nThe Amazon carries the most water.\n")
    return folder


def test_questions_are_read_and_bad_rows_skipped_by_row_number(tmp_path, corpus):
    rivers = (corpus / "rivers.txt").read_text()
    questions = write_questions(
        tmp_path / "q.csv",
        [
            ("How long is green tea steeped?", reference(CORPUS, "Green tea is steeped for two minutes."), "tea"),
            ("Which river carries most water?", reference(rivers, "The Amazon carries the most water."), "rivers"),
            ("Offsets counted in bytes?", json.dumps([{"content": "four", "start_index": 0, "end_index": 4}]), "tea"),
            ("Not in the text?", json.dumps([{"content": "white tea", "start_index": 0, "end_index": 9}]), "tea"),
            ("Unknown corpus?", reference(CORPUS, "Tea"), "coffee"),
            ("Broken JSON?", "[{", "tea"),
            ("", reference(CORPUS, "Tea"), "tea"),
            ("Span outside the text?", json.dumps([{"start_index": 10, "end_index": 10_000}]), "tea"),
        ],
    )
    found = load_excerpts(questions, corpus)
    assert [q.row for q in found.questions] == [1, 2, 3]
    assert found.questions[0].references == ((CORPUS.index("Green"), CORPUS.index("Green") + 37),)
    # moved to where its content really is, and counted
    assert found.questions[2].references == ((CORPUS.index("four"), CORPUS.index("four") + 4),) and found.relocated == 1
    assert found.skipped == [
        "row 4: reference 1: its content is not found verbatim in tea",
        "row 5: corpus 'coffee': no file named coffee.* in the corpus folder",
        "row 6: references is not JSON (Expecting property name enclosed in double quotes)",
        "row 7: empty question",
        f"row 8: reference 1: span 10-10000 is outside tea ({len(CORPUS)} characters)",
    ]
    assert sorted(found.corpus_files) == ["rivers", "tea"]


def test_jsonl_questions_may_give_content_only(tmp_path, corpus):
    path = tmp_path / "q.jsonl"
    path.write_text(
        json.dumps({"question": "steeping time?", "corpus_id": "tea", "references": [{"content": "two minutes"}]})
        + "\n\nnot json\n",
        encoding="utf-8",
    )
    found = load_excerpts(path, corpus)
    at = CORPUS.index("two minutes")
    assert found.questions[0].references == ((at, at + len("two minutes")),)
    assert found.skipped[0].startswith("row 3: not JSON")


def test_a_missing_column_a_non_utf8_file_and_an_empty_corpus_are_errors_naming_the_file(tmp_path, corpus):
    missing = write_questions(tmp_path / "m.csv", [("q", "[]")], header=("question", "references"))
    with pytest.raises(EvaluationError, match=r"m\.csv: missing column\(s\) corpus_id \(found: question, references\)"):
        load_excerpts(missing, corpus)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("question,references,corpus_id\nCaf\xe9?,[],tea\n".encode("latin-1"))
    with pytest.raises(EvaluationError, match=r"latin\.csv: not UTF-8 \(line 2, byte 33\)"):
        load_excerpts(latin, corpus)
    (corpus / "empty.txt").write_text("  \n")
    empty = write_questions(tmp_path / "e.csv", [("q?", json.dumps([{"content": "x"}]), "empty")])
    with pytest.raises(EvaluationError, match=r"corpus file .*empty\.txt is empty"):
        load_excerpts(empty, corpus)
    nothing = write_questions(tmp_path / "n.csv", [("q?", "[]", "tea")])
    with pytest.raises(EvaluationError, match=r"no question can be evaluated \(row 1: no references"):
        load_excerpts(nothing, corpus)
    with pytest.raises(EvaluationError, match="does not exist"):
        load_excerpts(tmp_path / "absent.csv", corpus)
