"""The sentence splitter: exact offsets, English + Chinese + mixed text, nothing dropped or altered."""

from __future__ import annotations

import random

import pytest

from chunkers.sentences import detect_language, split_sentences


def sentences(text: str) -> list[str]:
    return [text[start:end] for start, end in split_sentences(text)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("First one. Second one! Third one? Fourth", ["First one.", "Second one!", "Third one?", "Fourth"]),
        # abbreviations, initials and dotted abbreviations do not end a sentence
        (
            "See Fig. 2 and e.g. the work of J. Smith et al. (2010) in the U.S. Army. Next.",
            ["See Fig. 2 and e.g. the work of J. Smith et al. (2010) in the U.S. Army.", "Next."],
        ),
        # numbers, lower-case continuations and URLs are not sentence ends
        (
            "It rose 3.5 percent. approx. ten of them. Visit example.com now.",
            ["It rose 3.5 percent. approx. ten of them.", "Visit example.com now."],
        ),
        # closing quotes and brackets stay with the sentence they close
        (
            'He said "stop." Then he left. (It was late.) Done.',
            ['He said "stop."', "Then he left.", "(It was late.)", "Done."],
        ),
        # a blank line ends a heading or list item without a full stop
        ("Results\n\nThe model works.\nIt is fast.", ["Results", "The model works.", "It is fast."]),
    ],
)
def test_english(text: str, expected: list[str]) -> None:
    assert sentences(text) == expected


def test_chinese_terminators_and_closers() -> None:
    text = "今天天气很好。我们去公园吧！你来吗？他说：“我来了。”然后走了；再见"
    assert sentences(text) == ["今天天气很好。", "我们去公园吧！", "你来吗？", "他说：“我来了。”", "然后走了；", "再见"]


def test_mixed_scripts_in_one_pass() -> None:
    text = "Meta-Chunking works well.它使用小模型。 It splits where perplexity dips. 然后合并。"
    assert sentences(text) == [
        "Meta-Chunking works well.",
        "它使用小模型。",
        "It splits where perplexity dips.",
        "然后合并。",
    ]


def test_list_numbers_before_chinese_do_not_split() -> None:
    assert sentences("请看系列1.由于时间关系，从略。") == ["请看系列1.由于时间关系，从略。"]


@pytest.mark.parametrize("text", ["", " ", "\n\n\t  \n"])
def test_empty_or_whitespace_has_no_sentences(text: str) -> None:
    assert split_sentences(text) == []


def test_offsets_are_exact_with_surrounding_whitespace() -> None:
    text = "  \n Alpha beta.   Gamma delta.\n\n  Epsilon.  "
    spans = split_sentences(text)
    assert spans == [(4, 15), (18, 30), (34, 42)]
    assert [text[s:e] for s, e in spans] == ["Alpha beta.", "Gamma delta.", "Epsilon."]


_ALPHABET = (
    list("abcdefghijklmnopqrstuvwxyz") * 3
    + list("ABCDEFGHIJ0123456789")
    + list("的一是在不了有和人这中大为上个国")
    + list(".!?;,:。！？；，、…")
    + list("\"'“”‘’「」（）()[]《》")
    + [" "] * 12
    + ["\n", "\n\n", "\t", "\u3000", "\xa0"]
    + ["e.g.", "Dr.", "U.S.", "3.5", "😀", "é"]
)


def test_property_never_drops_or_alters_text() -> None:
    rng = random.Random(20241012)
    for _ in range(600):
        text = "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 120)))
        spans = split_sentences(text)
        position = 0
        for start, end in spans:
            assert position <= start < end <= len(text)
            assert text[position:start].strip() == "", "only whitespace may lie between sentences"
            piece = text[start:end]
            assert piece == piece.strip() and piece, "sentences are stripped and non-empty"
            position = end
        assert text[position:].strip() == ""
        # Nothing dropped: the sentences hold every non-space character, in order.
        assert "".join("".join(text[s:e].split()) for s, e in spans) == "".join(text.split())


def test_detect_language() -> None:
    assert detect_language("这是一个中文段落，其中有 BERT 模型。") == "zh"
    assert detect_language("An English paragraph that mentions 北京 once.") == "en"
    assert detect_language("") == "en"
