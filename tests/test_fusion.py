"""Fusion maths (core.fusion), client-side fusion in the query engine, and language-aware auto mode,
on the in-memory store (tests/plugins/memory_store.py) so nothing here needs Milvus or a model."""

from __future__ import annotations

import math

import pytest

from core.fusion import adaptive_weights, confidence, dbsf, fuse, minmax, rrf, weighted_sum
from core.search import Hit, RRFFusion
from core.types import Chunk
from pipeline.query import FusionConfig, QueryConfig, QueryEngine, fuse_hits
from stores.base import IndexSchema
from tests.plugins.components import HashEmbedder
from tests.plugins.memory_store import MemoryStore

# -- the maths -------------------------------------------------------------------------------------


def test_rrf_sums_reciprocal_ranks_and_breaks_ties_by_id():
    fused = rrf([[("a", 9.0), ("b", 5.0)], [("b", 0.3), ("c", 0.2)]], k=60)
    assert fused[0] == ("b", pytest.approx(1 / 62 + 1 / 61))
    # a (rank 1 of branch 1) and c (rank 2 of branch 2) do not tie; a and a rank-1-only id would.
    assert [i for i, _ in fused] == ["b", "a", "c"]
    tied = rrf([[("z", 1.0)], [("y", 1.0)]], k=60)
    assert tied == [("y", 1 / 61), ("z", 1 / 61)]  # equal scores: by id, whatever the branch order
    assert rrf([[("y", 1.0)], [("z", 1.0)]], k=60) == tied


def test_rrf_weights_and_limit():
    fused = rrf([[("a", 1.0)], [("b", 1.0)]], k=1, weights=[1.0, 3.0])
    assert fused == [("b", 1.5), ("a", 0.5)]
    assert rrf([[("a", 1), ("b", 1), ("c", 1)]], limit=2) == [("a", 1 / 61), ("b", 1 / 62)]
    with pytest.raises(ValueError, match="one weight per branch"):
        rrf([[("a", 1.0)]], weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="non-negative"):
        rrf([[("a", 1.0)]], weights=[-1.0])
    with pytest.raises(ValueError, match="at least 1"):
        rrf([[("a", 1.0)]], k=0)


def test_empty_branches_and_a_branch_that_returns_nothing():
    assert rrf([]) == [] and weighted_sum([]) == [] and fuse([], "dbsf") == []
    assert rrf([[], []]) == []
    only = [("a", 0.9), ("b", 0.5)]
    for method in ("rrf", "minmax", "dbsf"):
        # One branch silent: the other's order, whatever the method.
        assert [i for i, _ in fuse([only, []], method)] == ["a", "b"]
        assert [i for i, _ in fuse([[], only], method, adaptive=True)] == ["a", "b"]


def test_a_single_branch_keeps_its_order():
    ranking = [("c", 3.0), ("a", 2.0), ("b", 1.0)]
    for method in ("rrf", "minmax", "dbsf"):
        assert [i for i, _ in fuse([ranking], method)] == ["c", "a", "b"]


def test_duplicate_ids_within_a_branch_count_once_and_across_branches_add_up():
    assert rrf([[("a", 2.0), ("a", 1.0), ("b", 0.5)]]) == [("a", 1 / 61), ("b", 1 / 62)]
    fused = weighted_sum([[("a", 2.0), ("b", 0.0)], [("b", 10.0), ("a", 0.0)]], normalization="minmax")
    assert fused == [("a", 1.0), ("b", 1.0)]  # each best in one branch, worst in the other: a tie, by id


def test_minmax_and_dbsf_normalisations():
    assert minmax([]) == [] and minmax([5.0]) == [1.0] and minmax([2.0, 2.0]) == [1.0, 1.0]
    assert minmax([3.0, 2.0, 1.0]) == [1.0, 0.5, 0.0]
    assert dbsf([]) == [] and dbsf([4.0]) == [1.0]
    values = dbsf([1.0, 2.0, 3.0])
    assert values[1] == pytest.approx(0.5) and values[0] < 0.5 < values[2] and all(0 <= v <= 1 for v in values)
    # An outlier is clipped at 1, the rest stay spread: DBSF is not dominated by one extreme score.
    spread = dbsf([100.0] + [1.0] * 20 + [0.0] * 20)
    assert spread[0] == 1.0 and 0 < spread[-1] < spread[1] < 1


def test_weighted_sum_follows_the_weights():
    dense = [("a", 0.9), ("b", 0.8), ("c", 0.1)]
    bm25 = [("c", 12.0), ("b", 6.0), ("a", 1.0)]
    assert [i for i, _ in weighted_sum([dense, bm25], [1.0, 0.0])] == ["a", "b", "c"]
    assert [i for i, _ in weighted_sum([dense, bm25], [0.0, 1.0])] == ["c", "b", "a"]
    assert weighted_sum([dense, bm25], [1.0, 1.0], "dbsf")[0][0] in {"a", "b", "c"}
    with pytest.raises(ValueError, match="unknown score normalisation"):
        weighted_sum([dense], normalization="zscore")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_scores_are_refused_by_score_fusions_and_ignored_by_rrf(bad):
    ranking = [("a", bad), ("b", 1.0)]
    for method in ("minmax", "dbsf"):
        with pytest.raises(ValueError, match="not a finite number"):
            fuse([ranking], method)
    with pytest.raises(ValueError, match="not a finite number"):
        fuse([ranking], "rrf", adaptive=True)
    assert [i for i, _ in rrf([ranking])] == ["a", "b"]  # ranks only: the store's order stands


def test_confidence_trusts_a_branch_whose_best_score_stands_out():
    assert confidence([]) == 0.0 and confidence([1.0]) == 0.0 and confidence([0.5, 0.5, 0.5]) == 0.0
    clear = [10.0] + [1.0] * 9
    flat = [0.52, 0.51, 0.51, 0.50, 0.50, 0.50, 0.49, 0.49, 0.49, 0.48]
    assert confidence(clear) > confidence(flat) > 0
    peaked = [("x", 10.0)] + [(f"n{i}", 1.0) for i in range(9)]
    level = [(f"d{i}", s) for i, s in enumerate(flat)]
    weights = adaptive_weights([level, peaked])
    assert weights[1] > weights[0]
    assert adaptive_weights([[], []], [0.3, 0.7]) == [0.3, 0.7]  # no confidence anywhere: as given
    assert fuse([level, peaked], "minmax", adaptive=True)[0][0] == "x"


def test_fusion_is_deterministic_whatever_the_input_order_of_ties():
    one = [("b", 1.0), ("a", 1.0)]
    two = [("d", 1.0), ("c", 1.0)]
    for method in ("rrf", "minmax", "dbsf"):
        assert fuse([one, two], method) == fuse([one, two], method)
        assert [i for i, _ in fuse([[("q", 1.0)], [("p", 1.0)]], method)] == ["p", "q"]
    with pytest.raises(ValueError, match="unknown fusion method"):
        fuse([one], "borda")


# -- the query engine on the memory store ----------------------------------------------------------

ENGLISH = {
    "tea": "Green tea is steeped in hot water for two minutes before it is poured into the cup.",
    "tyres": "Check the tyre pressure every month, because under-inflated tyres wear faster and waste fuel.",
    "roses": "Prune the roses in late winter, cutting above an outward bud with a sharp pair of shears.",
    "orbit": "A satellite in low orbit circles the Earth every ninety minutes and is seen at dusk.",
}
CHINESE = {
    "cha": "绿茶用热水冲泡两分钟，然后倒入杯中饮用，这是最常见的喝茶方法。",
    "luntai": "每个月检查一次轮胎气压，因为气压不足的轮胎磨损更快，也更费油。",
    "meigui": "在冬末修剪玫瑰，在朝外的芽上方用锋利的剪刀剪断枝条。",
}


def memory_engine(texts: dict[str, str], languages: list[str] | None, **fusion) -> QueryEngine:
    embedder = HashEmbedder(dimension=16, languages=languages)
    store = MemoryStore(bm25=True)
    store.prepare(IndexSchema(embedder.dimension, embedder.model_id))
    store.upsert(
        [
            Chunk(f"{key}#0", key, 0, text, 0, len(text), vectors={"dense": embedder.embed_query(text)})
            for key, text in texts.items()
        ]
    )
    config = QueryConfig(top_k=3, candidates=10, fusion=FusionConfig(**fusion))
    return QueryEngine(store, embedder, config)


def test_client_side_rrf_gives_exactly_the_store_hybrid_search():
    engine = memory_engine(ENGLISH, ["en"])
    for query in ("hot water tea", "tyre pressure every month", "the Earth"):
        requests = [engine._request(b, query, 10) for b in ("dense", "bm25")]
        server = engine.store.hybrid_search(requests, RRFFusion(60), 10)
        found = [engine.store.search(r) for r in requests]
        client = fuse_hits(found, FusionConfig(method="rrf"), ["dense", "bm25"], 10)
        assert [(h.id, h.score) for h in client] == [(h.id, h.score) for h in server]


def test_client_side_methods_run_through_the_query_path():
    for method in ("minmax", "dbsf"):
        engine = memory_engine(ENGLISH, ["en"], method=method, weights={"dense": 0.0, "bm25": 1.0})
        result = engine.query("green tea in hot water", mode="hybrid")
        assert result.mode == "hybrid" and result.branches == ["dense", "bm25"]
        assert result.hits[0].source_id == "tea" and 0 < result.hits[0].score <= 1.0
        assert method == "dbsf" or result.hits[0].score == 1.0  # min-max: the bm25 branch's best is 1
    adaptive = memory_engine(ENGLISH, ["en"], adaptive=True)
    assert adaptive.config.fusion.client_side()
    assert adaptive.query("tyre pressure", mode="hybrid").hits[0].source_id == "tyres"
    assert FusionConfig().client_side() and FusionConfig(method="rrf", weights={"dense": 2.0}).client_side()
    assert not FusionConfig(method="rrf").client_side() and not FusionConfig(method="weighted").client_side()
    with pytest.raises(ValueError, match="server-side"):
        fuse_hits([[Hit("a", 1.0, {})]], FusionConfig(method="weighted"))


def test_auto_leaves_out_a_dense_branch_whose_model_does_not_cover_the_corpus_language():
    engine = memory_engine(CHINESE, ["en"])
    result = engine.query("绿茶用热水冲泡多久")
    assert result.mode == "bm25" and result.branches == ["bm25"]
    assert "dense left out" in result.notes[0] and "zh" in result.notes[0]
    assert engine.corpus_languages == {"zh": 3}
    # Asked for by name, hybrid still fuses both: only auto decides for the user.
    assert engine.query("绿茶用热水冲泡多久", mode="hybrid").branches == ["dense", "bm25"]
    # A multilingual model, or a model that claims nothing, keeps the dense branch.
    assert memory_engine(CHINESE, ["multilingual"]).query("绿茶用热水冲泡多久").branches == ["dense", "bm25"]
    assert memory_engine(CHINESE, None).query("绿茶用热水冲泡多久").notes == []
    # Turned off, auto is plain hybrid again.
    assert memory_engine(CHINESE, ["en"], language_aware=False).query("绿茶").branches == ["dense", "bm25"]


def test_auto_judges_each_query_by_its_script_on_an_english_or_mixed_corpus():
    engine = memory_engine(ENGLISH, ["en"])
    english = engine.query("green tea")
    assert english.mode == "hybrid" and english.notes == []
    chinese = engine.query("绿茶用热水冲泡多久才好喝呢")
    assert chinese.branches == ["bm25"] and "the query is zh" in chinese.notes[0]
    # A short Latin-script query is never judged (it could be any Latin-script language).
    assert engine.query("tee grüner").branches == ["dense", "bm25"]
    mixed = memory_engine({**ENGLISH, **CHINESE}, ["en"])  # 4 en, 3 zh chunks: mixed, judged per query
    assert mixed.query("green tea").branches == ["dense", "bm25"]
    assert mixed.query("绿茶用热水冲泡多久才好喝呢").branches == ["bm25"]
