"""Span-level evaluation end to end: a corpus folder and questions with reference excerpts, ingested
with the spec's own stages into Milvus Lite, measured in every mode, from Python and the CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import Pipeline
from pipeline.evaluate import EvaluationError

pytest.importorskip("milvus_lite")

REPO = Path(__file__).resolve().parents[1]
GARDEN = """# Roses

Prune   roses in late winter, just above an **outward-facing** bud.

Feed them with a balanced fertiliser in spring.

# Lawns

Mow the lawn weekly in summer and never cut more than a third of the blade.
"""
ORBITS = """Satellites in low Earth orbit circle the planet every ninety minutes.

A geostationary satellite stays above one point of the equator.
"""
QUESTIONS = [
    ("When should roses be pruned?", "garden", "Prune   roses in late winter, just above an **outward-facing** bud."),
    ("How often does a low orbit satellite circle the Earth?", "orbits", "every ninety minutes"),
    ("How much of the grass blade may be cut?", "garden", "never cut more than a third of the blade"),
]


def write_dataset(folder: Path) -> tuple[Path, Path]:
    corpus = folder / "corpora"
    corpus.mkdir(parents=True)
    (corpus / "garden.md").write_text(GARDEN, encoding="utf-8")
    (corpus / "orbits.txt").write_text(ORBITS, encoding="utf-8")
    (corpus / "unused.txt").write_text("No question names this file, so it is not ingested.")
    texts = {"garden": GARDEN, "orbits": ORBITS}
    questions = folder / "questions.csv"
    with open(questions, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "references", "corpus_id"])
        for question, corpus_id, excerpt in QUESTIONS:
            start = texts[corpus_id].index(excerpt)
            references = [{"content": excerpt, "start_index": start, "end_index": start + len(excerpt)}]
            writer.writerow([question, json.dumps(references), corpus_id])
        writer.writerow(["Where is the missing excerpt?", json.dumps([{"content": "no such words"}]), "garden"])
    return questions, corpus


def spec_dict(folder: Path) -> dict:
    return {
        "version": 1,
        "name": "excerpt-eval-test",
        "stages": {
            "source": {"type": "local", "path": "docs"},  # replaced by the corpus files
            "parser": {"type": "unstructured", "markdown_parser": "native"},
            "chunker": {"type": "recursive", "chunk_size": 90, "chunk_overlap": 0},
            "embedder": {"type": "huggingface"},
            "store": {
                "type": "milvus",
                "uri": str(folder / "index.db"),
                "collection": "prod",
                "bm25": {"analyzer": "english"},
            },
        },
        "runner": {"parse_workers": 0, "progress": "never"},
    }


def test_every_mode_is_measured_on_file_spans_at_each_k(tmp_path):
    questions, corpus = write_dataset(tmp_path)
    with Pipeline(spec_dict(tmp_path)) as pipeline:
        report = pipeline.evaluate_excerpts(questions, corpus, ks=(1, 3))
        assert report.collection == "prod_excerpts_corpora" and report.questions == 3
        assert report.corpora == ["garden", "orbits"]  # unused.txt was not ingested
        assert report.skipped == ["row 4: reference 1: its content is not found verbatim in garden"]
        assert [(r.mode, r.k) for r in report.results] == [
            ("dense", 1),
            ("dense", 3),
            ("bm25", 1),
            ("bm25", 3),
            ("hybrid", 1),
            ("hybrid", 3),
        ]
        bm25 = {r.k: r for r in report.results if r.mode == "bm25"}
        # Each excerpt lies inside one chunk, which BM25 ranks first: all of it retrieved at k = 1.
        # The parser collapsed "Prune   roses" and stripped the ** markup: the span still maps onto the file.
        assert bm25[1].overall["recall"] == (1.0, 0.0)
        precision = {k: r.overall["precision"][0] for k, r in bm25.items()}
        assert 0 < precision[1] < 1 and precision[3] < precision[1]
        assert set(bm25[1].per_corpus) == {"garden", "orbits"}
        omega, _ = report.precision_omega["all"]
        assert bm25[1].overall["precision"][0] <= omega <= 1.0
        assert report.mean_chunk_tokens > 5 and report.ingest_seconds is not None
        assert {"parse", "chunk", "embed"} <= set(report.stage_seconds or {})

        reused = pipeline.evaluate_excerpts(questions, corpus, ks=(1,), modes=["bm25"], reuse_index=True)
        assert reused.index_reused and reused.ingest_seconds is None
        assert reused.results[0].overall["recall"] == (1.0, 0.0)
        with pytest.raises(EvaluationError, match="'sparse'"):
            pipeline.evaluate_excerpts(questions, corpus, modes=["sparse"], reuse_index=True)
        with pytest.raises(EvaluationError, match="k must be between"):
            pipeline.evaluate_excerpts(questions, corpus, ks=(0,), reuse_index=True)


def test_cli_eval_with_excerpts(tmp_path):
    questions, corpus = write_dataset(tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(spec_dict(tmp_path)))
    command = [sys.executable, "-m", "pipeline", "--quiet", "eval", str(spec)]
    run = subprocess.run(
        [*command, "--excerpts", str(questions), "--corpus", str(corpus), "--k", "2", "--modes", "bm25", "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["questions"] == 3 and report["results"][0]["mode"] == "bm25" and report["results"][0]["k"] == 2
    assert report["results"][0]["overall"]["recall"][0] == 1.0
    assert report["skipped"] == ["row 4: reference 1: its content is not found verbatim in garden"]

    table = subprocess.run(
        [*command, "--excerpts", str(questions), "--corpus", str(corpus), "--modes", "bm25", "--reuse-index"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert table.returncode == 0, table.stderr
    assert "existing index reused" in table.stdout and "recall / IoU per corpus" in table.stdout

    alone = subprocess.run([*command, "--excerpts", str(questions)], capture_output=True, text=True, cwd=REPO)
    assert alone.returncode == 2 and "--excerpts needs --corpus" in alone.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("question,corpus_id\nq,garden\n")
    missing = subprocess.run(
        [*command, "--excerpts", str(bad), "--corpus", str(corpus)], capture_output=True, text=True, cwd=REPO
    )
    assert missing.returncode == 2 and "missing column(s) references" in missing.stderr
