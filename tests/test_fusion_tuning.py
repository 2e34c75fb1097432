"""``eval --tune-fusion``: which split it fits on (never test), the candidates, and the command end to end
on a tiny BEIR folder with Milvus Lite and the packaged MiniLM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.evaluate import EvaluationError
from pipeline.fusion_tuning import Candidate, candidates, choose_split, halves, weight_grid
from pipeline.query import QueryConfig

REPO = Path(__file__).resolve().parents[1]


def qrels_folder(tmp_path: Path, *splits: str) -> Path:
    (tmp_path / "qrels").mkdir(parents=True)
    for split in splits:
        (tmp_path / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n")
    return tmp_path


def test_the_fit_split_is_never_test(tmp_path):
    assert choose_split(qrels_folder(tmp_path / "a", "train", "dev", "test"), None) == ("train", "dev")
    assert choose_split(qrels_folder(tmp_path / "b", "train", "test"), None) == ("train", None)
    assert choose_split(qrels_folder(tmp_path / "c", "trial"), "auto") == ("trial", None)
    assert choose_split(qrels_folder(tmp_path / "d", "dev", "test"), "dev") == ("dev", None)
    with pytest.raises(EvaluationError, match="never on the test split"):
        choose_split(qrels_folder(tmp_path / "e", "test"), None)
    with pytest.raises(EvaluationError, match="never fits on the test split"):
        choose_split(tmp_path / "a", "test")
    with pytest.raises(EvaluationError, match="no qrels/nope.tsv"):
        choose_split(tmp_path / "a", "nope")


def test_halves_are_disjoint_complete_and_stable():
    ids = [f"q{i}" for i in range(11)]
    fit, held = halves(ids)
    assert not set(fit) & set(held) and set(fit) | set(held) == set(ids) and len(fit) == 6
    assert halves(list(reversed(ids))) == (fit, held)


def test_candidates_start_simple_and_their_spec_lines_are_valid_specs():
    grid = weight_grid(["dense", "bm25"])
    assert len(grid) == 9 and all(abs(sum(w for _, w in weights) - 1) < 1e-9 for weights in grid)
    tried = candidates(["dense", "bm25"])
    assert tried[0] == Candidate("rrf") and len(tried) == len(set(tried))
    for candidate in tried:
        query = yaml.safe_load(candidate.spec_lines())["query"]
        config = QueryConfig.model_validate(query)
        assert config.fusion == candidate.config()


def write_tiny(folder: Path) -> Path:
    corpus = {
        "tea": "Green tea is steeped in hot water for two minutes.",
        "tyres": "Check tyre pressure monthly to save fuel.",
        "orbit": "Satellites in low orbit circle the Earth every ninety minutes.",
        "roses": "Prune roses in late winter above an outward bud.",
        "fault": "Fault ZX9004: the flux capacitor overheated and the reactor shut down.",
        "brew": "Steep the dried leaves in freshly boiled water, then pour the drink.",
    }
    queries = {
        "t1": "how long to steep green tea",
        "t2": "when to prune roses",
        "t3": "what does fault ZX9004 mean",
        "t4": "how often should tyre pressure be checked",
        "t5": "how fast does a satellite orbit",
        "t6": "brewing leaves in boiled water",
        "x1": "a test query that must never be read",
    }
    train = [("t1", "tea"), ("t2", "roses"), ("t3", "fault"), ("t4", "tyres"), ("t5", "orbit"), ("t6", "brew")]
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in corpus.items()))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items()))
    header = "query-id\tcorpus-id\tscore\n"
    (folder / "qrels" / "train.tsv").write_text(header + "".join(f"{q}\t{d}\t1\n" for q, d in train))
    (folder / "qrels" / "test.tsv").write_text(header + "x1\ttea\t1\n")
    return folder


def test_cli_tune_fusion_fits_on_train_halves_and_prints_spec_lines(tmp_path):
    pytest.importorskip("ir_measures")
    pytest.importorskip("milvus_lite")
    folder = write_tiny(tmp_path / "tiny")
    spec = {
        "version": 1,
        "name": "tune-test",
        "stages": {
            "source": {"type": "local", "path": "docs"},
            "chunker": {"type": "recursive", "chunk_size": 1000, "chunk_overlap": 0},
            "embedder": {"type": "huggingface"},
            "store": {"type": "milvus", "uri": "index.db", "collection": "prod", "bm25": {"analyzer": "english"}},
        },
        "runner": {"parse_workers": 0, "progress": "never"},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    command = [sys.executable, "-m", "pipeline", "-q", "eval", str(tmp_path / "spec.yaml"), "--beir", str(folder)]
    result = subprocess.run(
        [*command, "--tune-fusion", "--json"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["fit_split"] == "train (first half)" and report["held_out_split"] == "train (second half)"
    assert report["fit_queries"] + report["held_out_queries"] == 6  # the test query x1 was never read
    assert [b["label"] for b in report["baselines"]] == ["dense", "bm25", "minmax (the default)"]
    assert len(report["results"]) == len(candidates(["dense", "bm25"]))
    assert all(0.0 <= r["held_out"] <= 1.0 for r in report["results"])
    # The best on the fit half, unless it falls below the default on the held-out half (then the default).
    kept_default = any("keep the default" in note for note in report["notes"])
    assert kept_default or report["chosen"]["fit"] >= max(b["fit"] for b in report["baselines"]) - 1e-9
    QueryConfig.model_validate(yaml.safe_load(report["spec_lines"])["query"])
    # The table form, reusing the index; and the test split refused by name.
    table = subprocess.run(
        [*command, "--tune-fusion", "--reuse-index"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert table.returncode == 0, table.stderr
    assert "held out: train (second half)" in table.stdout and "put in the spec:" in table.stdout
    assert "query:" in table.stdout.split("put in the spec:")[1]
    refused = subprocess.run([*command, "--tune-fusion", "test"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "never fits on the test split" in refused.stderr
