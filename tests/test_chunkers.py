"""Recursive and token chunkers: exact offsets, sizes, overlap, structure options, config.

Every chunk must satisfy ``document.text[start:end] == text`` exactly, on English, Chinese, emoji,
mixed and repeated text, and on a few hundred random texts from a seeded generator.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pytest
from pydantic import ValidationError

from chunkers.recursive import RecursiveChunker
from chunkers.spans import Span
from chunkers.token import TokenChunker

# pipeline is imported before chunkers: importing chunkers.base first currently runs into a
# circular import through pipeline/__init__ -> pipeline.runner -> chunkers.base.
from core.registry import resolve
from core.types import Chunk, Element, ParsedDocument


@pytest.fixture(scope="module", autouse=True)
def _private_tiktoken_cache(tmp_path_factory: pytest.TempPathFactory):
    # Keep the offline BPE files this module installs out of the user's cache folder.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken")))
        yield


@pytest.fixture(scope="module")
def cl100k():
    from core.tiktoken_data import get_encoding

    return get_encoding("cl100k_base")


def document(text: str, elements: Sequence[Element] = (), source_id: str = "docs/sample.md") -> ParsedDocument:
    return ParsedDocument(
        source_id=source_id,
        uri=f"file:///{source_id}",
        media_type="text/markdown",
        content_hash="0" * 64,
        text=text,
        elements=tuple(elements),
        metadata={"file_name": source_id.rsplit("/", 1)[-1]},
    )


def structured_document(blocks: Sequence[tuple[str, str]]) -> ParsedDocument:
    """A document whose text is the blocks joined by blank lines, with one element per block."""
    text = ""
    elements: list[Element] = []
    headings: tuple[str, ...] = ()
    for category, body in blocks:
        if text:
            text += "\n\n"
        if category == "Title":
            headings = (body,)
        elements.append(Element(body, category, len(text), len(text) + len(body), page_number=1, heading_path=headings))
        text += body
    return document(text, elements)


def assert_exact(doc: ParsedDocument, chunks: Sequence[Chunk]) -> None:
    for chunk in chunks:
        assert doc.text[chunk.start : chunk.end] == chunk.text
        assert chunk.text == chunk.text.strip(), "strip_whitespace is on by default"


def assert_covers(text: str, spans: Sequence[Span]) -> None:
    """Every non-whitespace character lies in some span (nothing lost between chunks)."""
    covered = [False] * len(text)
    for start, end in spans:
        covered[start:end] = [True] * (end - start)
    lost = [i for i, (c, hit) in enumerate(zip(text, covered)) if not hit and not c.isspace()]
    assert not lost, f"characters not in any chunk at {lost[:10]}: {[text[i] for i in lost[:10]]}"


def assert_in_order(spans: Sequence[Span]) -> None:
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(spans, spans[1:])), spans


ENGLISH = (
    "Retrieval-augmented generation grounds a language model in documents it was never trained on.\n\n"
    "An ingestion pipeline reads the documents, parses them into text with structure, cuts the text into "
    "chunks, embeds every chunk and writes the vectors into an index. Each stage can fail on its own.\n\n"
    "Chunk boundaries matter: a chunk that stops mid-sentence loses the context a reader needs, and one "
    "that is too long dilutes the embedding with unrelated material."
)
CHINESE = (
    "检索增强生成让语言模型能够使用它从未见过的文档。"
    "数据管道读取文档，把它们解析成带结构的文本，再切分成块；每个块都被编码成向量，写入索引。\n\n"
    "切分的位置很重要！在句子中间切断会丢失上下文？太长的块又会稀释向量的含义。"
    "“引号里的句子。”也应该保持完整。"
)
EMOJI = "Deploy 🚀 done ✅ then rest 😴😴😴. Family: 👨‍👩‍👧‍👦 flags 🇨🇳🇺🇸 and skin tones 👍🏽👍🏿. " * 6
MIXED = (
    "第一章 Introduction 介绍\n\nMilvus 是一个向量数据库 (vector database)，支持 BM25 和 dense 检索。"
    "It stores 384-d vectors; 每个 chunk 都有 exact offsets 🎯.\n\n"
    "Ünïcödé accents, ligatures ﬁ ﬂ, math 𝔸𝔹ℂ, rare CJK 𠀀𠀁𠀂, and <|endoftext|> as plain text."
)
REPEATED = "The same paragraph, again and again.\n\n" * 60

SAMPLES = {"english": ENGLISH, "chinese": CHINESE, "emoji": EMOJI, "mixed": MIXED, "repeated": REPEATED}


@pytest.mark.parametrize("name", SAMPLES)
@pytest.mark.parametrize("chunk_size,chunk_overlap", [(40, 10), (120, 30), (1000, 200)])
def test_recursive_offsets_exact_sizes_and_coverage(name: str, chunk_size: int, chunk_overlap: int):
    doc = document(SAMPLES[name])
    chunks = RecursiveChunker(chunk_size=chunk_size, chunk_overlap=chunk_overlap).chunk(doc)
    assert chunks
    assert_exact(doc, chunks)
    spans = [(c.start, c.end) for c in chunks]
    assert_in_order(spans)
    assert_covers(doc.text, spans)
    assert max(len(c.text) for c in chunks) <= chunk_size
    assert [c.index for c in chunks] == list(range(len(chunks)))


@pytest.mark.parametrize("name", SAMPLES)
@pytest.mark.parametrize("chunk_size,chunk_overlap", [(8, 2), (50, 10)])
def test_token_offsets_exact_sizes_and_coverage(name: str, chunk_size: int, chunk_overlap: int, cl100k):
    doc = document(SAMPLES[name])
    chunks = TokenChunker(chunk_size=chunk_size, chunk_overlap=chunk_overlap).chunk(doc)
    assert chunks
    assert_exact(doc, chunks)
    spans = [(c.start, c.end) for c in chunks]
    assert_in_order(spans)
    assert_covers(doc.text, spans)
    assert max(len(cl100k.encode(c.text, disallowed_special=())) for c in chunks) <= chunk_size


def test_repeated_paragraphs_each_chunk_is_located_at_its_own_occurrence():
    paragraph = "The same paragraph, again and again."
    doc = document(REPEATED)
    # Pieces are "\n\n" + paragraph: three of them fill a chunk, one is carried over.
    piece = len(paragraph) + 2
    chunks = RecursiveChunker(chunk_size=3 * piece, chunk_overlap=piece).chunk(doc)
    # Chunk texts repeat, but their positions must walk through the document without going back.
    assert len({c.text for c in chunks}) < len(chunks)
    assert_in_order([(c.start, c.end) for c in chunks])
    assert chunks[-1].end == len(REPEATED.rstrip())
    assert_covers(doc.text, [(c.start, c.end) for c in chunks])
    # Exactly three paragraphs per chunk, one shared with the next chunk.
    assert all(c.text.count(paragraph) == 3 for c in chunks[:-1])
    for previous, current in zip(chunks, chunks[1:]):
        assert doc.text[current.start : previous.end] == paragraph


def test_same_chunks_as_langchain_for_its_own_settings():
    """The split rule is LangChain's: on English text with its separators the chunk texts agree."""
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    rng = random.Random(7)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()
    for _ in range(150):
        parts = []
        for _ in range(rng.randint(0, 250)):
            parts.append(
                rng.choice(words)
                if rng.random() < 0.85
                else rng.choice(["\n\n", "\n", "  ", "x" * rng.randint(10, 60)])
            )
            parts.append(" ")
        text = "".join(parts)
        size = rng.randint(5, 300)
        overlap = rng.randint(0, size - 1)
        keep = rng.choice([True, "end"])
        theirs = RecursiveCharacterTextSplitter(chunk_size=size, chunk_overlap=overlap, keep_separator=keep).split_text(
            text
        )
        chunker = RecursiveChunker(chunk_size=size, chunk_overlap=overlap, keep_separator=keep)
        ours = [text[a:b] for a, b in chunker.split(document(text))]
        # LangChain sometimes emits a chunk that lies inside its neighbour; we drop those.
        assert without_nested(ours) == without_nested(theirs), (size, overlap, keep, text)


def without_nested(chunks: list[str]) -> list[str]:
    kept: list[str] = []
    for chunk in chunks:
        if kept and chunk in kept[-1]:
            continue
        while kept and kept[-1] in chunk:
            kept.pop()
        kept.append(chunk)
    return kept


def test_recursive_overlap_is_present_and_bounded():
    # One long paragraph: LangChain's rule carries overlap between pieces of the same split only,
    # never across a paragraph break chosen as the cut.
    doc = document(" ".join([ENGLISH.replace("\n\n", " ")] * 3))
    chunks = RecursiveChunker(chunk_size=150, chunk_overlap=40).chunk(doc)
    assert len(chunks) > 5
    for previous, current in zip(chunks, chunks[1:]):
        shared = previous.end - current.start
        assert 0 < shared <= 40, (previous.text, current.text)
        assert previous.text.endswith(doc.text[current.start : previous.end])


def test_recursive_without_overlap_tiles_the_text():
    doc = document(ENGLISH)
    spans = RecursiveChunker(chunk_size=100, chunk_overlap=0).split(doc)
    for (_, previous_end), (start, _) in zip(spans, spans[1:]):
        assert previous_end <= start and not doc.text[previous_end:start].strip()


def test_recursive_in_tokens_fills_chunks_to_the_token_limit(cl100k):
    doc = document(" ".join([ENGLISH.replace("\n\n", " ")] * 4))
    chunker = RecursiveChunker(chunk_size=60, chunk_overlap=20, size_unit="tokens")
    chunks = chunker.chunk(doc)
    sizes = [len(cl100k.encode(c.text)) for c in chunks]
    assert len(chunks) > 5 and all(doc.text[c.start : c.end] == c.text for c in chunks)
    # Counted on the document's tokenization, a chunk can hold a token that straddles its edge.
    assert max(sizes) <= 61 and min(sizes[:-1]) > 40, sizes
    for previous, current in zip(chunks, chunks[1:]):
        assert 0 < len(cl100k.encode(doc.text[current.start : previous.end])) <= 21
    by_characters = RecursiveChunker(chunk_size=60, chunk_overlap=20).chunk(doc)
    assert len(by_characters) > 3 * len(chunks)  # 60 characters hold far less than 60 tokens
    assert chunker.fingerprint_settings() != RecursiveChunker(chunk_size=60, chunk_overlap=20).fingerprint_settings()


def test_recursive_refuses_an_encoding_without_token_sizes_and_an_unknown_encoding():
    with pytest.raises(ValidationError, match="set size_unit: tokens"):
        RecursiveChunker(chunk_size=60, chunk_overlap=0, encoding="cl100k_base")
    with pytest.raises(ValidationError, match="neither a tiktoken encoding"):
        RecursiveChunker(chunk_size=60, chunk_overlap=0, size_unit="tokens", encoding="no-such-encoding")


def test_token_overlap_repeats_the_requested_number_of_tokens(cl100k):
    doc = document(ENGLISH * 2)
    chunks = TokenChunker(chunk_size=40, chunk_overlap=10).chunk(doc)
    assert len(chunks) > 3
    for previous, current in zip(chunks, chunks[1:]):
        shared = doc.text[current.start : previous.end]
        assert current.start < previous.end
        assert 8 <= len(cl100k.encode(shared)) <= 11, shared


def test_token_boundaries_inside_characters_lose_and_duplicate_nothing(cl100k):
    text = "𠀀𠀁𠀂 rare 👨‍👩‍👧‍👦 family 🇨🇳 flag 龘靐齉 complex" * 5
    # The test only means something if cl100k really starts tokens inside characters here.
    pieces = cl100k.decode_tokens_bytes(cl100k.encode(text))
    assert any(not _is_utf8(p) for p in pieces)
    doc = document(text)
    for size in (1, 2, 3, 5):
        spans = TokenChunker(chunk_size=size, chunk_overlap=0, strip_whitespace=False).split(doc)
        # Without overlap the chunks follow each other with nothing but whitespace between them.
        position = 0
        for start, end in spans:
            assert start >= position and not text[position:start].strip(), (size, position, start)
            position = end
        assert not text[position:].strip()


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_token_chunks_fit_when_a_character_needs_no_more_tokens_than_the_window(cl100k):
    text = "龘靐齉 complex characters and 👨‍👩‍👧‍👦 emoji " * 40
    chunks = TokenChunker(chunk_size=16, chunk_overlap=4).chunk(document(text))
    assert max(len(cl100k.encode(c.text)) for c in chunks) <= 16


def test_cjk_default_separators_cut_between_sentences():
    text = "".join(f"这是第{i}个句子，它有一些内容。" if i % 3 else f"第{i}句是问题吗？" for i in range(40))
    chunks = RecursiveChunker(chunk_size=60, chunk_overlap=0).chunk(document(text))
    assert len(chunks) > 3
    assert all(c.text[-1] in "。？" for c in chunks), [c.text for c in chunks]
    # LangChain's own defaults have no CJK separator: they cut mid-sentence on this text.
    plain = RecursiveChunker(chunk_size=60, chunk_overlap=0, separators=["\n\n", "\n", " ", ""]).chunk(document(text))
    assert any(c.text[-1] not in "。？" for c in plain)


def test_closing_quote_stays_with_its_sentence():
    text = "他说：“今天下雨。”我们留在家里。" * 10
    chunks = RecursiveChunker(chunk_size=20, chunk_overlap=0).chunk(document(text))
    assert not any(c.text.startswith("”") for c in chunks)


def test_keep_separator_false_keeps_separators_out_of_chunk_edges():
    text = "alpha|beta|gamma|delta|epsilon|zeta|eta|theta|iota|kappa"
    doc = document(text)
    chunks = RecursiveChunker(chunk_size=16, chunk_overlap=0, separators=["|"], keep_separator=False).chunk(doc)
    assert_exact(doc, chunks)
    assert all(not c.text.startswith("|") and not c.text.endswith("|") for c in chunks)
    assert [c.text for c in chunks][:2] == ["alpha|beta|gamma", "delta|epsilon"]


def test_keep_separator_end_puts_separators_at_chunk_ends():
    text = "one; two; three; four; five; six; seven; eight"
    chunks = RecursiveChunker(chunk_size=12, chunk_overlap=0, separators=[";"], keep_separator="end").chunk(
        document(text)
    )
    assert all(c.text.endswith(";") for c in chunks[:-1])


def test_regex_and_language_separators():
    text = "# Title\n\nIntro text here.\n\n## Part one\n\nBody of part one.\n\n## Part two\n\nBody of part two."
    chunks = RecursiveChunker(chunk_size=45, chunk_overlap=0, language="markdown").chunk(document(text))
    assert [c.text.split("\n")[0] for c in chunks] == ["# Title", "## Part one", "## Part two"]
    by_regex = RecursiveChunker(chunk_size=45, chunk_overlap=0, separators=[r"\n#{1,6} ", ""], is_separator_regex=True)
    assert by_regex.split(document(text)) == RecursiveChunker(
        chunk_size=45, chunk_overlap=0, language="markdown"
    ).split(document(text))


def random_text(rng: random.Random) -> str:
    """English words, CJK sentences, emoji, separators and verbatim repeats, in random proportions."""
    words = ["data", "vector", "index", "chunk", "milvus", "offset", "the", "a", "of", "retrieval"]
    cjk = [chr(code) for code in range(0x4E00, 0x4E00 + 3000)]  # common CJK ideographs
    emoji = ["😀", "🚀", "👍🏽", "🇨🇳", "👨‍👩‍👧‍👦", "✅", "𠀀"]
    pieces: list[str] = []
    for _ in range(rng.randint(0, 120)):
        roll = rng.random()
        if roll < 0.35:
            pieces.append(rng.choice(words) + " ")
        elif roll < 0.6:
            pieces.append("".join(rng.choice(cjk) for _ in range(rng.randint(1, 12))) + rng.choice("。！？；，、"))
        elif roll < 0.7:
            pieces.append(rng.choice(emoji))
        elif roll < 0.85:
            pieces.append(rng.choice(["\n\n", "\n", " ", "  ", "\t", "\n\n\n"]))
        elif pieces:
            pieces.append(rng.choice(pieces))  # verbatim repeats
    return "".join(pieces)


def random_elements(text: str, rng: random.Random) -> list[Element]:
    """Paragraph elements, some of them titles, with offsets into the text."""
    elements: list[Element] = []
    position = 0
    for paragraph in text.split("\n\n"):
        start = position + len(paragraph) - len(paragraph.lstrip())
        end = position + len(paragraph.rstrip())
        if start < end:
            elements.append(Element(text[start:end], "Title" if rng.random() < 0.2 else "NarrativeText", start, end))
        position += len(paragraph) + 2
    return elements


def check_properties(
    doc: ParsedDocument, spans: list[Span], limit: int, size_of: Callable[[str], int], overlap: int | None
) -> None:
    text = doc.text
    assert all(0 <= a < b <= len(text) for a, b in spans)
    assert all(text[a:b] == text[a:b].strip() and text[a:b] for a, b in spans)
    assert_in_order(spans)
    assert_covers(text, spans)
    assert all(size_of(text[a:b]) <= limit for a, b in spans), [
        text[a:b] for a, b in spans if size_of(text[a:b]) > limit
    ]
    if overlap is not None:
        assert all(previous_end - start <= overlap for (_, previous_end), (start, _) in zip(spans, spans[1:]))


@pytest.mark.parametrize("seed", range(4))
def test_recursive_properties_on_random_texts(seed: int):
    rng = random.Random(seed)
    for _ in range(60):
        text = random_text(rng)
        doc = document(text, random_elements(text, rng))
        size = rng.randint(1, 200)
        options = {
            "chunk_size": size,
            "chunk_overlap": rng.randint(0, size - 1),
            "keep_separator": rng.choice([True, "end"]),
            "respect_elements": rng.random() < 0.4,
            "split_on_headings": rng.random() < 0.4,
        }
        spans = RecursiveChunker(**options).split(doc)
        check_properties(doc, spans, size, len, options["chunk_overlap"])


@pytest.mark.parametrize("seed", range(2))
def test_token_properties_on_random_texts(seed: int, cl100k):
    rng = random.Random(100 + seed)
    for _ in range(40):
        text = random_text(rng)
        doc = document(text, random_elements(text, rng))
        # One character takes at most 4 byte tokens; a smaller window cannot always hold one.
        size = rng.randint(4, 120)
        options = {
            "chunk_size": size,
            "chunk_overlap": rng.randint(0, size - 1),
            "respect_elements": rng.random() < 0.4,
            "split_on_headings": rng.random() < 0.4,
        }
        spans = TokenChunker(**options).split(doc)
        check_properties(doc, spans, size, lambda t: len(cl100k.encode(t)), overlap=None)


def test_respect_elements_merges_small_elements_and_cuts_only_oversized_ones():
    long_paragraph = " ".join(f"sentence {i} of a very long paragraph." for i in range(20))
    doc = structured_document(
        [
            ("Title", "Installation"),
            ("NarrativeText", "Install the package with pip."),
            ("ListItem", "Python 3.10 or newer."),
            ("ListItem", "Two gigabytes of disk."),
            ("NarrativeText", long_paragraph),
            ("NarrativeText", "A short closing remark."),
        ]
    )
    chunks = RecursiveChunker(chunk_size=120, chunk_overlap=0, respect_elements=True).chunk(doc)
    assert_exact(doc, chunks)
    assert (
        chunks[0].text
        == "Installation\n\nInstall the package with pip.\n\nPython 3.10 or newer.\n\nTwo gigabytes of disk."
    )
    assert chunks[0].metadata["categories"] == ["ListItem", "NarrativeText", "Title"]
    big = doc.elements[4]
    inside = [c for c in chunks if big.start <= c.start and c.end <= big.end]
    assert len(inside) > 1 and "".join(c.text + " " for c in inside).strip() == long_paragraph
    # Every chunk boundary lies between elements, except inside the one element that is too long.
    for chunk in chunks:
        for element in doc.elements:
            if element is big:
                continue
            assert (
                chunk.end <= element.start
                or chunk.start >= element.end
                or (chunk.start <= element.start and element.end <= chunk.end)
            )
    assert chunks[-1].text == "A short closing remark."


def test_an_element_with_blank_lines_inside_stays_whole_only_when_respected():
    table = "row one a b c\n\nrow two d e f\n\nrow three g h"
    doc = structured_document([("NarrativeText", "x" * 70), ("Table", table), ("NarrativeText", "closing words")])
    element = doc.elements[1]
    plain = RecursiveChunker(chunk_size=100, chunk_overlap=0).split(doc)
    assert any(element.start < a < element.end or element.start < b < element.end for a, b in plain)
    respected = RecursiveChunker(chunk_size=100, chunk_overlap=0, respect_elements=True).split(doc)
    assert (element.start, element.end + len("\n\nclosing words")) in respected


def test_respect_elements_overlap_repeats_whole_elements_only():
    doc = structured_document([("ListItem", f"item number {i}") for i in range(12)])
    chunks = RecursiveChunker(chunk_size=50, chunk_overlap=20, respect_elements=True).chunk(doc)
    starts = {e.start for e in doc.elements}
    ends = {e.end for e in doc.elements}
    assert all(c.start in starts and c.end in ends for c in chunks)
    assert any(previous.end > current.start for previous, current in zip(chunks, chunks[1:]))


def test_respect_elements_keeps_text_no_element_covers():
    text = "Covered paragraph.\n\nloose text the parser skipped\n\nAnother covered one."
    elements = [
        Element("Covered paragraph.", "NarrativeText", 0, 18),
        Element("Another covered one.", "NarrativeText", 51, 71),
    ]
    assert text[51:71] == "Another covered one."
    doc = document(text, elements)
    spans = RecursiveChunker(chunk_size=30, chunk_overlap=0, respect_elements=True).split(doc)
    assert [text[a:b] for a, b in spans] == [
        "Covered paragraph.",
        "loose text the parser skipped",
        "Another covered one.",
    ]


@pytest.mark.parametrize(
    "chunker",
    [
        RecursiveChunker(chunk_size=200, chunk_overlap=50, split_on_headings=True),
        TokenChunker(chunk_size=50, chunk_overlap=10, split_on_headings=True),
    ],
)
def test_split_on_headings_never_spans_two_sections(chunker):
    doc = structured_document(
        [
            ("NarrativeText", "Preface before any heading."),
            ("Title", "Chapter one"),
            ("NarrativeText", "Short body one."),
            ("Title", "Chapter two"),
            ("NarrativeText", "Body two " * 30),
            ("Title", "Chapter three"),
            ("NarrativeText", "Short body three."),
        ]
    )
    chunks = chunker.chunk(doc)
    assert_exact(doc, chunks)
    titles = [e for e in doc.elements if e.category == "Title"]
    for title in titles:
        assert any(c.start == title.start for c in chunks), f"no chunk starts at {title.text!r}"
    for chunk in chunks:
        assert not any(chunk.start < title.start < chunk.end for title in titles), chunk.text
    assert chunks[0].text == "Preface before any heading."
    assert chunks[1].text == "Chapter one\n\nShort body one."
    assert chunks[1].metadata["headings"] == ["Chapter one"]
    # Without the option the short sections run together.
    merged = type(chunker)(chunk_size=chunker.config.chunk_size, chunk_overlap=chunker.config.chunk_overlap).chunk(doc)
    assert any(c.start < titles[0].start < c.end for c in merged)


def test_split_on_headings_with_respect_elements():
    doc = structured_document(
        [("Title", "A"), ("NarrativeText", "alpha " * 5), ("Title", "B"), ("NarrativeText", "beta " * 5)]
    )
    chunks = RecursiveChunker(chunk_size=500, chunk_overlap=0, split_on_headings=True, respect_elements=True).chunk(doc)
    assert [c.text for c in chunks] == ["A\n\n" + ("alpha " * 5).strip(), "B\n\n" + ("beta " * 5).strip()]


def test_hugging_face_tokenizer_shipped_minilm():
    from transformers import AutoTokenizer

    from core.models import resolve_model_path

    doc = document(MIXED + "\n\n" + ENGLISH)
    chunker = TokenChunker(chunk_size=24, chunk_overlap=6, tokenizer="sentence-transformers/all-MiniLM-L6-v2")
    chunks = chunker.chunk(doc)
    assert_exact(doc, chunks)
    assert_covers(doc.text, [(c.start, c.end) for c in chunks])
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    counts = [len(tokenizer(c.text, add_special_tokens=False)["input_ids"]) for c in chunks]
    assert max(counts) <= 24 and max(counts) >= 20
    # The tokenizer.json of this model truncates at 128 tokens; the chunker must see the whole text.
    assert chunks[-1].end == len(doc.text.rstrip())


@pytest.fixture(scope="module")
def byte_level_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory):
    """A small byte-level BPE (GPT-2 style) trained here: it splits multi-byte characters into tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([ENGLISH, CHINESE], trainer=trainer)
    folder = tmp_path_factory.mktemp("byte-bpe")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(str(folder))
    return folder


def test_hugging_face_byte_level_tokenizer_offsets_inside_characters(byte_level_tokenizer_dir):
    text = EMOJI + CHINESE
    doc = document(text)
    chunker = TokenChunker(
        chunk_size=5, chunk_overlap=0, strip_whitespace=False, tokenizer=str(byte_level_tokenizer_dir)
    )
    encoding = chunker.tokenization.tokenizer.encode(text, add_special_tokens=False)
    # Several tokens share a character: the offsets really fall inside characters.
    assert len({start for start, _ in encoding.offsets}) < len(encoding.offsets)
    spans = chunker.split(doc)
    position = 0
    for start, end in spans:
        assert start >= position and not text[position:start].strip()
        position = end
    assert not text[position:].strip()
    overlapping = TokenChunker(chunk_size=9, chunk_overlap=3, tokenizer=str(byte_level_tokenizer_dir)).chunk(doc)
    assert_exact(doc, overlapping)
    assert_covers(text, [(c.start, c.end) for c in overlapping])


def test_output_is_deterministic():
    doc = document(MIXED * 4)
    for make in (
        lambda: RecursiveChunker(chunk_size=80, chunk_overlap=20),
        lambda: TokenChunker(chunk_size=20, chunk_overlap=5),
    ):
        first, second = make().chunk(doc), make().chunk(doc)
        assert [(c.id, c.start, c.end, c.text, c.metadata) for c in first] == [
            (c.id, c.start, c.end, c.text, c.metadata) for c in second
        ]
        assert len({c.id for c in first}) == len(first)


@pytest.mark.parametrize(
    "cls,settings",
    [
        (RecursiveChunker, {}),
        (
            RecursiveChunker,
            {
                "chunk_size": 300,
                "chunk_overlap": 0,
                "separators": ["\n\n", "。", ""],
                "keep_separator": "end",
                "respect_elements": True,
            },
        ),
        (RecursiveChunker, {"language": "markdown", "split_on_headings": True, "strip_whitespace": False}),
        (TokenChunker, {"chunk_size": 128, "chunk_overlap": 16, "encoding": "o200k_base"}),
        (TokenChunker, {"tokenizer": "sentence-transformers/all-MiniLM-L6-v2", "respect_elements": True}),
    ],
)
def test_to_dict_from_dict_round_trip(cls, settings):
    chunker = cls(settings)
    data = chunker.to_dict()
    assert data == {"type": cls.type_name, **settings}
    rebuilt = cls.from_dict(data)
    assert rebuilt.to_dict() == data
    assert resolve("chunker", cls.type_name) is cls
    doc = structured_document([("Title", "Heading"), ("NarrativeText", ENGLISH), ("NarrativeText", CHINESE)])
    assert rebuilt.split(doc) == chunker.split(doc)


def test_fingerprint_names_the_default_encoding():
    assert TokenChunker().fingerprint_settings() == {"type": "token", "encoding": "cl100k_base"}
    assert TokenChunker(encoding="gpt-4o").fingerprint_settings()["encoding"] == "o200k_base"


@pytest.mark.parametrize("cls", [RecursiveChunker, TokenChunker])
@pytest.mark.parametrize("size,overlap", [(100, 100), (100, 150)])
def test_overlap_not_smaller_than_size_is_a_clear_error(cls, size, overlap):
    with pytest.raises(
        ValidationError, match=rf"chunk_overlap \({overlap}\) must be smaller than chunk_size \({size}\)"
    ):
        cls(chunk_size=size, chunk_overlap=overlap)


@pytest.mark.parametrize(
    "cls,settings,message",
    [
        (RecursiveChunker, {"chunk_size": 0}, "greater than 0"),
        (RecursiveChunker, {"chunk_overlap": -1}, "greater than or equal to 0"),
        (RecursiveChunker, {"chunk_sise": 10}, "Extra inputs are not permitted"),
        (RecursiveChunker, {"separators": []}, "at least one separator"),
        (RecursiveChunker, {"separators": ["("], "is_separator_regex": True}, "not a valid regular expression"),
        (RecursiveChunker, {"language": "klingon"}, "unknown language 'klingon'"),
        (RecursiveChunker, {"language": "markdown", "separators": ["\n"]}, "either separators or language"),
        (TokenChunker, {"encoding": "cl99k"}, "neither a tiktoken encoding"),
        (TokenChunker, {"encoding": "cl100k_base", "tokenizer": "bert-base-uncased"}, "either encoding"),
    ],
)
def test_bad_settings_are_rejected_with_the_reason(cls, settings, message):
    with pytest.raises(ValidationError, match=message):
        cls(settings)


@pytest.mark.parametrize("text", ["", "   \n\n\t  "])
@pytest.mark.parametrize(
    "chunker", [RecursiveChunker(), TokenChunker(), RecursiveChunker(respect_elements=True, split_on_headings=True)]
)
def test_empty_or_blank_document_gives_no_chunks(chunker, text):
    assert chunker.chunk(document(text)) == []


def test_element_offsets_outside_the_text_name_the_document():
    doc = document("short", [Element("short", "NarrativeText", 0, 50)], source_id="bad/offsets.md")
    with pytest.raises(ValueError, match=r"bad/offsets.md.*\(0, 50\)"):
        RecursiveChunker(respect_elements=True).split(doc)


def test_lone_surrogates_keep_offsets():
    text = "before \ud800 after " * 20
    spans = TokenChunker(chunk_size=6, chunk_overlap=2).split(document(text))
    assert_in_order(spans)
    assert_covers(text, spans)


def test_chunks_carry_what_the_source_and_parser_know_about_the_document():
    from connectors.parsing import UnstructuredParser
    from core.types import SourceDocument

    source = SourceDocument(
        "repo/docs/a.md",
        "git:repo/docs/a.md",
        "text/markdown",
        "h",
        b"# Title\n\nSome text here.",
        {"file_name": "a.md", "relative_path": "docs/a.md", "commit": "0123abc"},
    )
    parsed = UnstructuredParser().parse(source)
    [chunk] = RecursiveChunker(chunk_size=400, chunk_overlap=0).chunk(parsed)
    assert chunk.metadata["commit"] == "0123abc" and chunk.metadata["relative_path"] == "docs/a.md"
    assert chunk.metadata["headings"] == ["Title"] and chunk.metadata["media_type"] == "text/markdown"
