"""BEIR evaluation end to end on a tiny dataset written by the test, plus the JSONL source."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from connectors.jsonl import JsonlSource
from pipeline import Pipeline
from pipeline.evaluate import EvaluationError, load_beir
from pipeline.spec import parse_spec

pytest.importorskip("ir_measures")
pytest.importorskip("milvus_lite")

REPO = Path(__file__).resolve().parents[1]
CORPUS = {
    "d1": ("Tea", "Green tea is steeped in hot water for two minutes."),
    "d2": ("Tyres", "Check tyre pressure monthly to save fuel."),
    "d3": ("Orbits", "Satellites in low orbit circle the Earth every ninety minutes."),
    "d4": ("Roses", "Prune roses in late winter above an outward bud."),
    # Long enough for several chunks: its best chunk must count once, as the document.
    "d5": (
        "Volcanoes",
        " ".join(["Volcanoes erupt when magma rises through the crust."] * 3 + ["Lava cools into basalt rock."] * 3),
    ),
}
QUERIES = {
    "q1": "how long to steep green tea",
    "q2": "when to prune roses",
    "q3": "what happens when magma rises",
    "q4": "unjudged",
}
QRELS = [("q1", "d1", 1), ("q2", "d4", 1), ("q3", "d5", 1)]


def write_beir(
    folder: Path,
    corpus: dict[str, tuple[str, str]] = CORPUS,
    queries: dict[str, str] = QUERIES,
    qrels: list[tuple[str, str, int]] = QRELS,
) -> Path:
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": k, "title": t, "text": x}) + "\n" for k, (t, x) in corpus.items())
    )
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items()))
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels)
    )
    return folder


def spec_dict() -> dict:
    return {
        "version": 1,
        "name": "eval-test",
        "stages": {
            "source": {"type": "local", "path": "docs"},  # replaced by the dataset's corpus
            "chunker": {"type": "recursive", "chunk_size": 60, "chunk_overlap": 0},
            "embedder": {"type": "huggingface"},
            "store": {"type": "milvus", "uri": "index.db", "collection": "prod", "bm25": {"analyzer": "english"}},
        },
        "runner": {"parse_workers": 0, "progress": "never"},
    }


def test_load_beir_keeps_judged_queries_and_names_missing_files(tmp_path):
    dataset = load_beir(write_beir(tmp_path / "tiny"))
    assert dataset.name == "tiny" and set(dataset.queries) == {"q1", "q2", "q3"}
    assert dataset.qrels["q3"] == {"d5": 1}
    with pytest.raises(EvaluationError, match=r"qrels/dev\.tsv is missing; splits found: test"):
        load_beir(tmp_path / "tiny", "dev")


def test_jsonl_source_joins_title_and_text_as_beir_does(tmp_path):
    write_beir(tmp_path)
    (tmp_path / "corpus.jsonl").open("a").write('not json\n{"_id": "d1", "text": "duplicate"}\n')
    source = JsonlSource(path=str(tmp_path / "corpus.jsonl"))
    refs = list(source.list())
    assert [r.source_id for r in refs[:5]] == list(CORPUS) and refs[0].media_type == "text/plain"
    assert source.read(refs[0]).decode() == "Tea Green tea is steeped in hot water for two minutes."
    for bad in refs[5:]:  # listed, so the run records them as failed instead of stopping
        with pytest.raises(ValueError, match="not a JSON object|duplicate _id 'd1'"):
            source.read(bad)


def test_every_mode_is_measured_and_chunks_map_to_documents(tmp_path):
    folder = write_beir(tmp_path / "tiny")
    spec = parse_spec(spec_dict(), base_dir=tmp_path)
    report = Pipeline(spec).evaluate(folder)
    assert report.collection == "prod_beir_tiny"  # never the production collection
    assert report.documents == 5 and report.chunks > 5  # d5 has several chunks
    assert [r.mode for r in report.results] == ["dense", "bm25", "hybrid"]
    for result in report.results:
        assert set(result.metrics) == {"nDCG@10", "R@10", "R@100", "RR@10"} and result.queries == 3
        assert result.metrics["R@100"] == 1.0  # 5 documents, all retrieved, each once
        assert 0.0 < result.metrics["nDCG@10"] <= 1.0
        assert 0 < result.latency_ms["p50"] <= result.latency_ms["p95"]
    assert report.results[0].metrics["RR@10"] == 1.0  # MiniLM gets these three right
    text = report.format()
    assert "nDCG@10" in text and "hybrid" in text
    again = Pipeline(spec).evaluate(folder, reuse_index=True, modes=["bm25"], max_queries=2)
    assert again.ingest_seconds is None and [r.queries for r in again.results] == [2]
    assert "embedder" in report.load_seconds and "models loaded before timing: embedder" in report.format()
    assert report.to_dict()["load_seconds"] == report.load_seconds
    with pytest.raises(EvaluationError, match="needs a reranker"):
        Pipeline(spec).evaluate(folder, reuse_index=True, modes=["hybrid+rerank"])


def test_cli_eval(tmp_path):
    folder = write_beir(tmp_path / "tiny")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec_dict()))
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "-q",
        "eval",
        str(tmp_path / "spec.yaml"),
        "--beir",
        str(folder),
        "--modes",
        "bm25",
        "--json",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["results"][0]["mode"] == "bm25" and report["results"][0]["metrics"]["R@100"] == 1.0
    missing = subprocess.run(
        command[:6] + ["--beir", str(tmp_path / "nowhere")], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert missing.returncode == 2 and "is not a BEIR dataset" in missing.stderr


def test_judged_queries_with_empty_text_are_skipped(tmp_path):
    folder = write_beir(tmp_path / "tiny")
    with (folder / "queries.jsonl").open("a") as queries:  # cmrc2018-zh's trial split holds two such queries
        queries.write(json.dumps({"_id": "q-empty", "text": "  "}) + "\n")
    with (folder / "qrels" / "test.tsv").open("a") as qrels:
        qrels.write("q-empty\td1\t1\n")
    dataset = load_beir(folder)
    assert set(dataset.queries) == {"q1", "q2", "q3"} and "q-empty" not in dataset.qrels


def test_validate_for_eval_accepts_a_spec_whose_sources_the_dataset_replaces(tmp_path, capsys):
    """Issue 24.4: `validate` refused an eval spec because its source folder does not exist."""
    from pipeline.cli import EXIT_BAD_SPEC, EXIT_OK, main

    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec_dict()))  # source path "docs" does not exist
    spec = str(tmp_path / "spec.yaml")
    assert main(["validate", spec]) == EXIT_BAD_SPEC
    assert "stages.source (local)" in capsys.readouterr().err
    assert main(["validate", spec, "--for", "eval"]) == EXIT_OK
    assert capsys.readouterr().out.strip().endswith(": ok")


def test_measures_are_chosen_by_name_and_an_unknown_name_is_refused_before_the_ingest(tmp_path, capsys):
    """Issue 24.2: --measures takes ir-measures names; a typo fails at once, not after the ingest."""
    from pipeline.cli import EXIT_BAD_SPEC, EXIT_OK, main

    folder = write_beir(tmp_path / "tiny")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec_dict()))
    command = ["-q", "eval", str(tmp_path / "spec.yaml"), "--beir", str(folder), "--modes", "bm25"]
    for bad, said in [("nDCG@x", "unknown measure 'nDCG@x'"), ("nDCG@0", "cutoff after @ must be at least 1")]:
        assert main([*command, "--measures", "R@100", bad]) == EXIT_BAD_SPEC
        assert said in capsys.readouterr().err
    assert not (tmp_path / "index.db").exists()  # refused before anything was ingested
    assert main([*command, "--measures", "P@1", "MAP", "--json"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["measures"] == ["P@1", "MAP"]
    metrics = report["results"][0]["metrics"]
    assert list(metrics) == ["P@1", "MAP"] and all(0.0 < value <= 1.0 for value in metrics.values())


def test_eval_json_carries_ingest_figures_and_says_when_the_index_was_reused(tmp_path, capsys):
    """Issue 24.2: per-stage ingest times, chunk and truncation counts in --json; null when reused."""
    from pipeline.cli import EXIT_OK, main

    folder = write_beir(tmp_path / "tiny")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec_dict()))
    command = ["-q", "eval", str(tmp_path / "spec.yaml"), "--beir", str(folder), "--modes", "dense", "--json"]
    assert main([*command, "--protocol", "documents"]) == EXIT_OK
    built = json.loads(capsys.readouterr().out)
    assert built["protocol"] == "documents" and built["collection"] == "prod_beir_tiny_documents"
    assert built["chunks"] == built["documents"] == 5  # one chunk per document, d5 too
    assert built["index_reused"] is False and built["chunks_truncated"] == 0  # every text fits MiniLM
    assert {"chunk", "embed", "write"} <= set(built["stage_seconds"]) and built["ingest_seconds"] > 0
    assert set(built["results"][0]["metrics"]) == {"nDCG@10", "R@10", "R@100", "RR@10"}
    assert main([*command, "--protocol", "documents", "--reuse-index"]) == EXIT_OK
    reused = json.loads(capsys.readouterr().out)
    assert reused["index_reused"] is True and reused["chunks"] == 5
    assert reused["ingest_seconds"] is None and reused["stage_seconds"] is None and reused["chunks_truncated"] is None


# A document whose answer lies past MiniLM's 256-token window, behind a paragraph break.
HARBOUR_LOG = " ".join(
    f"Ship {n} unloaded {n * 3} crates of timber at berth {n % 7} before the evening tide turned." for n in range(1, 25)
)
LONG_CORPUS = {
    "log": ("Harbour log", HARBOUR_LOG + "\n\nThe lighthouse keeper's cat is called Biscuit and sleeps on the stairs."),
    "cats": ("Cats", "Cats sleep for up to sixteen hours a day, often on warm stairs and window ledges."),
    "keeper": ("Lighthouse keepers", "A lighthouse keeper trims the lamp wick and records the weather every night."),
    "tea": CORPUS["d1"],
}


def test_chunks_protocol_finds_an_answer_that_the_documents_protocol_truncates_away(tmp_path):
    """Issue 24.9: documents (one chunk each, as BEIR tables) embed only a long document's first 256
    tokens; chunks (the spec's chunker) find its end. Both say which protocol they used."""
    folder = write_beir(
        tmp_path / "long", LONG_CORPUS, {"q1": "what is the name of the lighthouse keeper's cat"}, [("q1", "log", 1)]
    )
    data = spec_dict()
    data["stages"]["chunker"]["chunk_size"] = 100
    pipeline = Pipeline(parse_spec(data, base_dir=tmp_path))
    chunks = pipeline.evaluate(folder, modes=["dense"], measures=["R@1", "RR@10"])
    documents = pipeline.evaluate(folder, modes=["dense"], measures=["R@1", "RR@10"], protocol="documents")
    assert (chunks.protocol, documents.protocol) == ("chunks", "documents")
    assert chunks.chunks > documents.chunks == documents.documents == 4
    assert documents.chunks_truncated == 1 and chunks.chunks_truncated == 0
    assert chunks.results[0].metrics["R@1"] == 1.0  # the chunk holding the answer ranks first
    assert documents.results[0].metrics["R@1"] == 0.0  # the answer was cut off: two short documents rank above
    assert documents.results[0].metrics["RR@10"] < 1.0
    assert "protocol: documents (one chunk per document" in documents.format()
    assert "protocol: chunks (the spec's chunker" in chunks.format()
    assert "1 of 4 documents are longer than the embedder's window" in " ".join(documents.notes)
    assert documents.collection == chunks.collection + "_documents"  # --reuse-index never mixes the two
