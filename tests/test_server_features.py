"""The table of Milvus features by server version, and the refusal a store's settings get from it (no server needed)."""

from __future__ import annotations

import pytest

from stores import server_features
from stores.milvus import MilvusStore
from stores.server_features import (
    BM25_FUNCTION,
    HYBRID_SEARCH,
    SPARSE_VECTORS,
    parse_version,
    public_uri,
    supports,
    unsupported,
)

SERVER = "http://127.0.0.1:19530"


@pytest.mark.parametrize(
    ("reported", "expected"),
    [
        ("v2.3.5-lite", (2, 3, 5)),
        ("v2.3.5", (2, 3, 5)),
        ("2.5.4", (2, 5, 4)),
        (" v2.4.0-rc.1 ", (2, 4, 0)),
        ("2.6", (2, 6, 0)),
        ("Zilliz Cloud Vector Database(Compatible with Milvus 2.5)", (2, 5, 0)),
        ("Zilliz Cloud Vector Database(Compatible with Milvus v2.4.3)", (2, 4, 3)),
        ("master-20240101-abcdef", None),
        ("", None),
        ("Zilliz Cloud Vector Database", None),
    ],
)
def test_parse_version(reported, expected):
    assert parse_version(reported) == expected


def test_features_are_compared_by_release_not_by_text():
    assert not supports("v2.3.5-lite", SPARSE_VECTORS) and not supports("v2.3.5-lite", HYBRID_SEARCH)
    assert supports("v2.4.0", SPARSE_VECTORS) and supports("2.4.13", HYBRID_SEARCH)
    assert not supports("v2.4.13", BM25_FUNCTION) and supports("v2.5.0", BM25_FUNCTION)
    assert supports("v2.10.0", BM25_FUNCTION)  # 10 > 5 as a number, not as text
    assert supports("a development build", BM25_FUNCTION)  # an unreadable version never blocks


def config(**settings):
    return MilvusStore(uri=SERVER, **settings).config


def test_a_plain_dense_store_runs_on_2_3():
    assert unsupported("v2.3.5-lite", config(), SERVER) == []
    assert unsupported("v2.3.5-lite", config(index={"type": "HNSW", "metric": "IP"}), SERVER) == []


def test_bm25_and_learned_sparse_name_the_server_version_and_the_one_needed():
    problems = unsupported("v2.3.5-lite", config(bm25={}, learned_sparse={}), SERVER)
    assert problems == [
        "the Milvus server at http://127.0.0.1:19530 runs v2.3.5-lite; the store's bm25 field needs Milvus >= 2.5 "
        "(the built-in BM25 function). Use a newer server, or remove that setting from the spec",
        "the Milvus server at http://127.0.0.1:19530 runs v2.3.5-lite; the store's learned_sparse field needs Milvus "
        ">= 2.4 (sparse float vectors). Use a newer server, or remove that setting from the spec",
    ]
    on_2_4 = unsupported("v2.4.5", config(bm25={}, learned_sparse={}), SERVER)
    assert len(on_2_4) == 1 and "bm25 field needs Milvus >= 2.5" in on_2_4[0]
    assert unsupported("v2.5.4", config(bm25={}, learned_sparse={}), SERVER) == []


def test_servers_older_than_2_3_lack_upsert_and_cosine():
    first, second = unsupported("v2.2.16", config(), SERVER)
    assert "runs v2.2.16; the store needs Milvus >= 2.3 (upsert)" in first
    assert "the store's index metric needs Milvus >= 2.3 (the COSINE metric)" in second
    assert unsupported("v2.2.16", config(index={"metric": "L2"}), SERVER) == [first]


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        (
            "https://user:s3cret@in03-x.zillizcloud.com:443/db?token=s3cret#frag",
            "https://in03-x.zillizcloud.com:443/db",
        ),
        ("http://127.0.0.1:19530", "http://127.0.0.1:19530"),
        ("http://[::1]:19530?token=s3cret", "http://[::1]:19530"),
        ("unix:/tmp/milvus.sock?token=s3cret", "unix:/tmp/milvus.sock"),
    ],
)
def test_printed_uris_carry_no_credentials(uri, shown):
    assert public_uri(uri) == shown
    assert "s3cret" not in " ".join(unsupported("v2.3.5", config(bm25={}), uri))


class _Client:
    def __init__(self, reported=None, error=None):
        self.reported, self.error = reported, error

    def get_server_version(self, timeout=None):
        if self.error:
            raise self.error
        return self.reported


def test_a_server_that_will_not_tell_its_version_is_trusted():
    assert (
        server_features.server_problems(_Client(error=RuntimeError("unimplemented")), config(bm25={}), SERVER, 5) == []
    )
    assert len(server_features.server_problems(_Client("v2.3.5-lite"), config(bm25={}), SERVER, 5)) == 1


def test_milvus_lite_is_not_asked_for_a_server_version(tmp_path):
    store = MilvusStore(uri=str(tmp_path / "index.db"), bm25={})
    assert store._server_problems(_Client("v2.3.5-lite")) == []


def test_float16_vectors_need_2_4_and_binary_vectors_run_on_2_3():
    (problem,) = unsupported("v2.3.5-lite", config(vector_storage="float16"), SERVER)
    assert "vector_storage float16 needs Milvus >= 2.4 (float16 vector fields)" in problem
    assert unsupported("v2.4.0", config(vector_storage="float16"), SERVER) == []
    assert unsupported("v2.3.5-lite", config(vector_storage="binary"), SERVER) == []
