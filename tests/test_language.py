"""Issue 20, item 2: the corpus' language is told at ingest and recorded, and a run, ``status`` and
``validate`` say when the embedder's model or the BM25 analyzer does not fit it."""

import json

import pytest
import yaml

from core.language import (
    MULTILINGUAL,
    LanguageTally,
    covers,
    detect_language,
)
from embedders.catalog import CATALOG
from pipeline import Pipeline
from pipeline.languages import bm25_analyzer, language_notes
from pipeline.reindex_job import format_status
from stores.milvus.store import MilvusStore
from tests.plugins.components import PLUGINS, HashEmbedder, MemoryStore, base_spec

CHINESE = "北京是中华人民共和国的首都，也是全国的政治中心和文化中心。研究表明，使用 Python 训练的模型表现良好。"
JAPANESE = "東京は日本の首都であり、政治と経済の中心地です。この研究では、新しい方法で文書を検索しました。"
KOREAN = "서울은 대한민국의 수도이며 정치와 경제의 중심지입니다. 이 연구에서는 새로운 방법을 조사했습니다."
RUSSIAN = "Москва является столицей Российской Федерации и крупнейшим городом страны."
ENGLISH = (
    "The results show that cells which were treated with the compound grew more slowly than those of the "
    "control group, and it has been proposed that this depends on the availability of nutrients."
)
FRENCH = (
    "Les résultats montrent que les cellules traitées avec le composé ont grandi plus lentement que celles du "
    "groupe témoin, et on a proposé que cela dépend de la disponibilité des nutriments."
)
GERMAN = (
    "Die Ergebnisse zeigen, dass die behandelten Zellen langsamer wuchsen als die der Kontrollgruppe, und es "
    "wurde vorgeschlagen, dass dies von der Verfügbarkeit von Nährstoffen abhängt."
)


# -- the detector -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "language", "script"),
    [
        (CHINESE, "zh", "Hani"),  # quoting an English name does not make it English
        (JAPANESE, "ja", "Jpan"),  # Han with kana
        ("カタカナとひらがなだけのぶんしょうです", "ja", "Kana"),
        (KOREAN, "ko", "Hang"),
        (RUSSIAN, "cyrillic", "Cyrl"),
        (ENGLISH, "en", "Latn"),
        (FRENCH, "latin", "Latn"),
        (GERMAN, "latin", "Latn"),
        ("Η Αθήνα είναι η πρωτεύουσα της Ελλάδας και η μεγαλύτερη πόλη της χώρας.", "el", "Grek"),
        ("القاهرة هي عاصمة جمهورية مصر العربية وأكبر مدنها من حيث عدد السكان.", "arabic", "Arab"),
        ("नई दिल्ली भारत की राजधानी है और यह देश का एक प्रमुख राजनीतिक केंद्र है।", "devanagari", "Deva"),
        ("ירושלים היא עיר הבירה של מדינת ישראל והעיר הגדולה ביותר בה.", "he", "Hebr"),
        ("กรุงเทพมหานครเป็นเมืองหลวงและนครที่มีประชากรมากที่สุดของประเทศไทย", "th", "Thai"),
        ("சென்னை தமிழ்நாட்டின் தலைநகரம் ஆகும். இது இந்தியாவின் முக்கிய நகரங்களில் ஒன்றாகும்.", "other", "Zzzz"),
    ],
)
def test_the_language_is_told_by_the_script_of_the_letters(text, language, script):
    guess = detect_language(text)
    assert (guess.language, guess.script) == (language, script)
    assert guess.confidence > 0.85


def test_digits_punctuation_and_short_texts_are_unknown():
    assert detect_language("12345 67890 -- 3.14159, 2.71828; 42 / 1024 = 0.041 ...").language == "unknown"
    assert detect_language("").language == "unknown"
    assert detect_language("OK 42").language == "unknown"  # too few letters to tell
    assert detect_language("   \n\t").confidence == 0.0


def test_a_mixed_text_goes_to_its_larger_part_with_less_confidence():
    guess = detect_language(f"{ENGLISH} {CHINESE}")
    assert guess.language == "en" and 0.5 < guess.confidence < 0.7
    assert detect_language(f"{ENGLISH} {CHINESE} {CHINESE}").language == "zh"


def test_a_chinese_text_with_a_few_kana_names_stays_chinese():
    assert (
        detect_language(
            "宫崎骏执导的动画电影《となりのトトロ》于一九八八年在日本上映，讲述了两姐妹在乡下的故事。"
        ).language
        == "zh"
    )


def test_only_the_beginning_of_a_long_text_is_read():
    assert detect_language(ENGLISH * 40 + CHINESE * 200).language == "en"
    assert detect_language(ENGLISH * 40 + CHINESE * 200, max_chars=10**6).language == "zh"


def test_coverage_is_unknown_without_a_claim_and_complete_for_multilingual():
    assert covers(None, "zh") is None
    assert covers({"en"}, "unknown") is None
    assert covers({"en"}, "zh") is False and covers({"en"}, "en") is True
    assert covers({MULTILINGUAL}, "th") is True


# -- the tally ----------------------------------------------------------------------------------


def test_the_tally_names_the_dominant_language_and_leaves_unknown_documents_out_of_the_shares():
    tally = LanguageTally({"zh": 90, "en": 10, "unknown": 50})
    assert tally.dominant() == "zh" and tally.known == 100 and tally.share("zh") == 0.9
    assert not tally.mixed() and tally.notable() == ["zh"]
    assert tally.describe() == "zh 90, unknown 50, en 10"
    assert LanguageTally({"unknown": 3}).dominant() is None and not LanguageTally({"unknown": 3}).mixed()


def test_a_corpus_is_mixed_when_no_language_holds_eighty_percent():
    tally = LanguageTally({"en": 55, "zh": 30})
    tally.add("ja", 15)
    assert tally.mixed() and tally.dominant() == "en"
    assert tally.notable() == ["en", "zh"]  # ja has under 20% of the documents
    assert not LanguageTally({"en": 80, "zh": 20}).mixed()


# -- what covers which language -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "languages"),
    [
        ("sentence-transformers/all-MiniLM-L6-v2", {"en"}),
        ("BAAI/bge-small-en-v1.5", {"en"}),
        ("intfloat/e5-base-v2", {"en"}),
        ("intfloat/multilingual-e5-small", {MULTILINGUAL}),  # the e5 family's conventions, another language claim
        ("BAAI/bge-m3", {MULTILINGUAL}),
        ("Qwen/Qwen3-Embedding-0.6B", {MULTILINGUAL}),
        ("jinaai/jina-embeddings-v3", {MULTILINGUAL}),
        ("BAAI/bge-base-zh-v1.5", {"zh"}),
        ("thenlper/gte-base-zh", {"zh"}),
        ("thenlper/gte-base", {"en"}),
        ("jinaai/jina-embeddings-v2-base-code", None),  # no claim
    ],
)
def test_the_catalog_says_which_languages_a_model_covers(model, languages):
    family = CATALOG.match(model)
    assert family is not None and family.languages_of(model) == (None if languages is None else frozenset(languages))


def test_the_analyzer_is_read_from_the_milvus_store_settings():
    assert bm25_analyzer(MilvusStore()) is None  # no BM25 branch
    default = bm25_analyzer(MilvusStore(bm25={}))
    assert default is not None and default.name == "'standard'" and "zh" not in default.languages
    assert {"en", "latin", "cyrillic"} <= default.languages
    assert bm25_analyzer(MilvusStore(bm25={"analyzer": "english"})).languages == {"en"}
    assert bm25_analyzer(MilvusStore(bm25={"analyzer": "jieba"})).languages == {"zh"}
    params = {"tokenizer": {"type": "lindera", "dict_kind": "ko-dic"}}
    assert bm25_analyzer(MilvusStore(bm25={"analyzer": params})).languages == {"ko"}
    assert bm25_analyzer(MilvusStore(bm25={"analyzer": {"type": "chinese"}})).languages == {"zh"}
    assert bm25_analyzer(MilvusStore(bm25={"analyzer": {"tokenizer": "icu"}})).languages == {MULTILINGUAL}
    stemmed = {"tokenizer": "standard", "filter": ["lowercase", {"type": "stemmer", "language": "english"}]}
    assert bm25_analyzer(MilvusStore(bm25={"analyzer": stemmed})).languages == {"en"}
    french = {"tokenizer": "standard", "filter": [{"type": "stemmer", "language": "french"}]}
    assert bm25_analyzer(MilvusStore(bm25={"analyzer": french})).languages is None  # no claim
    assert bm25_analyzer(MemoryStore(bm25=True)).languages is None  # a store without the setting


def test_notes_name_what_misfits_and_what_to_do():
    english_only = HashEmbedder(languages=["en"])
    (dense,) = language_notes({"zh": 9, "unknown": 1}, english_only, MemoryStore(bm25=True))
    assert dense.startswith("dense retrieval will be poor on zh text (9 of 9 documents)")
    assert "covers en only" in dense and "multilingual model (docs/models.md#languages) or query mode bm25" in dense
    dense, keywords = language_notes({"zh": 9}, english_only, MilvusStore(bm25={"analyzer": "english"}))
    assert "or query mode bm25" not in dense  # BM25 misfits the same text
    assert keywords.startswith("BM25 will match poorly on zh text (9 of 9 documents): the analyzer 'english'")
    (keywords,) = language_notes({"en": 9}, english_only, MilvusStore(bm25={"analyzer": "jieba"}))
    assert "the analyzer 'jieba' (Chinese word segmentation) does not fit it" in keywords
    assert (
        language_notes({"zh": 9}, HashEmbedder(languages=[MULTILINGUAL]), MilvusStore(bm25={"analyzer": "jieba"})) == []
    )
    assert language_notes({"zh": 9}, HashEmbedder(), MilvusStore(bm25={})) != []  # the analyzer alone misfits
    assert language_notes({"zh": 9}, HashEmbedder(), MemoryStore()) == []  # nothing claimed, nothing said
    assert language_notes({}, english_only, MemoryStore()) == []


def test_a_mixed_corpus_gets_one_note_with_its_counts_and_the_parts_not_covered():
    english_only = HashEmbedder(languages=["en"])
    (note,) = language_notes({"en": 6, "zh": 4}, english_only, MilvusStore(bm25={"analyzer": "english"}))
    assert note.startswith("mixed-language corpus (en 6, zh 4 documents): dense retrieval will be poor on zh text")
    assert "BM25 will match poorly on zh text (4 of 10 documents)" in note
    (note,) = language_notes({"en": 6, "zh": 4}, HashEmbedder(languages=[MULTILINGUAL]), MemoryStore())
    assert note == (
        "mixed-language corpus (en 6, zh 4 documents): neither the embedder nor the BM25 analyzer is known to "
        "misfit any of them"
    )


# -- at ingest, in the record, in status and validate --------------------------------------------


def chinese_corpus(count):
    return {f"zh{i}.txt": f"第{i}篇。{CHINESE}" for i in range(count)}


def pipeline_for(documents, embedder_languages=None, **store):
    spec = base_spec()
    spec["stages"]["source"]["documents"] = documents
    if embedder_languages is not None:
        spec["stages"]["embedder"]["languages"] = embedder_languages
    spec["stages"]["store"].update(store)
    return spec


def test_ingest_counts_the_languages_and_warns_when_the_embedder_does_not_cover_them():
    documents = {**chinese_corpus(5), "empty.txt": "   ", "numbers.txt": "1 2 3"}
    summary = Pipeline(pipeline_for(documents, ["en"]), allowed_modules=PLUGINS).ingest()
    assert summary.languages == {"zh": 5, "unknown": 2}
    (note,) = summary.notes
    assert note.startswith("dense retrieval will be poor on zh text (5 of 5 documents)")
    assert "languages: zh 5, unknown 2 (documents parsed)" in summary.format()
    assert summary.to_dict()["languages"] == {"zh": 5, "unknown": 2}
    unclaimed = Pipeline(pipeline_for(chinese_corpus(2)), allowed_modules=PLUGINS).ingest()
    assert unclaimed.languages == {"zh": 2} and unclaimed.notes == []


def test_a_mixed_corpus_is_counted_and_noted_once():
    documents = {**chinese_corpus(3), **{f"en{i}.txt": ENGLISH for i in range(4)}, "fr.txt": FRENCH}
    summary = Pipeline(pipeline_for(documents, ["en"]), allowed_modules=PLUGINS).ingest()
    assert summary.languages == {"zh": 3, "en": 4, "latin": 1}
    (note,) = summary.notes
    assert note.startswith("mixed-language corpus (en 4, zh 3, latin 1 documents): dense retrieval will be poor on zh")


def test_the_run_record_keeps_the_languages_and_status_shows_them():
    pipeline = Pipeline(pipeline_for(chinese_corpus(3), keep_record=True), allowed_modules=PLUGINS)
    pipeline.reindex()
    record = pipeline.store.index_record()
    assert record.last_run()["languages"] == {"zh": 3}
    assert "languages of the documents it parsed: zh 3" in format_status(record)
    pipeline.reindex()  # nothing changed: nothing parsed
    assert record.last_run()["languages"] == {}
    assert "languages of" not in format_status(record)


def test_validate_warns_from_a_sample_and_still_passes(tmp_path, capsys):
    from pipeline.cli import EXIT_OK, main

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(pipeline_for({**chinese_corpus(30), "bad.txt": "<corrupt>"}, ["en"])))
    assert main(["validate", str(path), "--allow-module", "tests.plugins"]) == EXIT_OK
    out, err = capsys.readouterr()
    assert out.strip() == f"{path}: ok"
    # 20 of the 31 documents are sampled; the one that cannot be parsed is left out
    assert f"{path}: warning: dense retrieval will be poor on zh text (19 of 19 sampled documents)" in err
    path.write_text(yaml.safe_dump(pipeline_for(chinese_corpus(3), [MULTILINGUAL])))
    assert main(["validate", str(path), "--allow-module", "tests.plugins"]) == EXIT_OK
    assert "warning" not in capsys.readouterr().err


def test_a_validate_for_eval_samples_nothing():
    pipeline = Pipeline(pipeline_for(chinese_corpus(3), ["en"]), allowed_modules=PLUGINS)
    assert pipeline.validation_warnings("eval") == []
    assert len(pipeline.validation_warnings()) == 1


def test_the_json_summary_carries_the_languages(tmp_path, capsys):
    from pipeline.cli import EXIT_OK, main

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(pipeline_for(chinese_corpus(2), ["en"])))
    assert main(["ingest", str(path), "--allow-module", "tests.plugins", "--json"]) == EXIT_OK
    out = json.loads(capsys.readouterr().out)
    assert out["languages"] == {"zh": 2} and out["notes"][0].startswith("dense retrieval will be poor on zh")
