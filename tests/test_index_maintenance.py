"""Keeping a Milvus index right: full rebuilds (behind an alias, or a new Lite file), reconcile,
transient write failures.

Runs against Milvus Lite with the in-memory test source, parser and hash embedder.
"""

import pytest

from core.records import MemoryRecords
from pipeline import Pipeline
from pipeline.cli import EXIT_OK, main
from stores.base import IndexSchema
from stores.milvus import MilvusStore
from tests.plugins.components import PLUGINS, base_spec


def milvus_pipeline(tmp_path, documents, **store):
    spec = base_spec()
    spec["stages"]["source"]["documents"] = dict(documents)
    spec["stages"]["store"] = {"type": "milvus", "uri": str(tmp_path / "index.db"), "collection": "docs", **store}
    return Pipeline(spec, allowed_modules=PLUGINS)


def texts(store: MilvusStore) -> dict[str, set[str]]:
    """Chunk texts by source, read through the configured name (an alias after a rebuild)."""
    client = store.client()
    store.exists()  # describes and loads whatever the name serves
    out: dict[str, set[str]] = {}
    for row in client.query("docs", filter="", output_fields=["source_id", "text"], limit=10_000):
        out.setdefault(row["source_id"], set()).add(row["text"])
    return out


def collections(store: MilvusStore) -> list[str]:
    """The collections of chunks and records (the re-index lock's ``docs_lock`` is not the index's)."""
    return sorted(name for name in store.client().list_collections() if name != "docs_lock")


def rebuild_files(tmp_path) -> list[str]:
    """Milvus Lite 2.5 builds beside the served file; none may be left once a rebuild is over."""
    return sorted(p.name for p in tmp_path.glob("index__rebuild_*"))


def test_rebuild_switches_to_the_new_index_and_drops_the_old_one_and_its_record(tmp_path):
    with milvus_pipeline(tmp_path, {"a.txt": "alpha\nbeta", "b.txt": "gamma"}) as pipeline:
        pipeline.reindex()
        store = pipeline.store
        engine_before = pipeline.query_engine  # a service's query engine, made before the switch
        assert store.serving_collection() == "docs"
        pipeline.sources[0].config.documents = {"a.txt": "alpha\ndelta", "c.txt": "epsilon"}

        first = pipeline.full_rebuild()
        assert first.ok, first.format()
        serving = store.serving_collection()
        if store.has_aliases:
            # The name is now an alias of the build; the real collection "docs" and its record are gone.
            assert serving.startswith("docs__rebuild_") and any("now serves" in note for note in first.notes)
        else:
            # Milvus Lite 2.5: the rebuilt database file replaced the served one.
            assert serving == "docs" and any("replaced by the rebuilt database" in note for note in first.notes)
            assert rebuild_files(tmp_path) == []
        assert collections(store) == sorted([serving, f"{serving}_records"])
        assert texts(store) == {"mem/a.txt": {"alpha", "delta"}, "mem/c.txt": {"epsilon"}}
        records = store.index_record()
        assert records.name == f"{serving}_records"
        assert {r.source_id for r in records.all()} == {"mem/a.txt", "mem/c.txt"}
        assert engine_before.query("epsilon", top_k=1).hits[0].source_id == "mem/c.txt"

        # A second rebuild switches again (one alter_alias where there are aliases) and drops the first build.
        pipeline.sources[0].config.documents["d.txt"] = "zeta"
        second = pipeline.full_rebuild(records=records)
        assert second.ok
        newest = store.serving_collection()
        assert collections(store) == sorted([newest, f"{newest}_records"])
        assert newest != serving if store.has_aliases else rebuild_files(tmp_path) == []
        assert set(texts(store)) == {"mem/a.txt", "mem/c.txt", "mem/d.txt"}
        # The incremental job carries on from the rebuilt record: nothing to redo.
        assert pipeline.reindex().changes.unchanged == 3


def test_rebuild_that_would_lose_indexed_data_is_not_switched(tmp_path):
    with milvus_pipeline(tmp_path, {"a.txt": "alpha", "b.txt": "beta"}) as pipeline:
        pipeline.reindex()
        store = pipeline.store
        pipeline.sources[0].config.documents["a.txt"] = "<corrupt>"  # the test parser refuses it
        summary = pipeline.full_rebuild()
        assert not summary.ok and any("not switched" in note and "mem/a.txt" in note for note in summary.notes)
        assert store.serving_collection() == "docs"
        assert texts(store) == {"mem/a.txt": {"alpha"}, "mem/b.txt": {"beta"}}
        assert collections(store) == ["docs", "docs_records"]  # the failed build was dropped
        assert rebuild_files(tmp_path) == []

        # A source that was never indexed may fail without blocking the switch.
        pipeline.sources[0].config.documents = {"a.txt": "ALPHA", "b.txt": "beta", "new.txt": "<corrupt>"}
        summary = pipeline.full_rebuild()
        assert summary.documents_failed == 1 and texts(store) == {"mem/a.txt": {"ALPHA"}, "mem/b.txt": {"beta"}}
        assert (
            store.serving_collection().startswith("docs__rebuild_")
            if store.has_aliases
            else rebuild_files(tmp_path) == []
        )


def test_listing_failure_keeps_the_serving_collection(tmp_path):
    with milvus_pipeline(tmp_path, {"a.txt": "alpha", "b.txt": "beta"}) as pipeline:
        pipeline.reindex()
        pipeline.sources[0].config.fail_listing_after = 1
        summary = pipeline.full_rebuild()
        assert any("not switched" in note and "listing" in note for note in summary.notes)
        assert pipeline.store.serving_collection() == "docs" and set(texts(pipeline.store)) == {
            "mem/a.txt",
            "mem/b.txt",
        }


def test_leftover_of_a_crashed_rebuild_is_dropped_by_the_next(tmp_path):
    with milvus_pipeline(tmp_path, {"a.txt": "alpha"}) as pipeline:
        pipeline.reindex()
        store = pipeline.store
        dimension, model = pipeline.embedder.dimension, pipeline.embedder.model_id
        if store.has_aliases:
            crashed = store.with_collection("docs__rebuild_20260101T000000")
            crashed.prepare(IndexSchema(dimension, model))
            crashed.close()
            assert "docs__rebuild_20260101T000000" in collections(store)
        else:
            crashed = store.with_lite_path(store.lite_build_path("20260101T000000"))
            crashed.prepare(IndexSchema(dimension, model))
            crashed.close()
            assert rebuild_files(tmp_path) == ["index__rebuild_20260101T000000.db"]
        pipeline.full_rebuild()
        assert "docs__rebuild_20260101T000000" not in collections(store) and rebuild_files(tmp_path) == []
        assert len([name for name in collections(store) if not name.endswith("_records")]) == 1


def test_rebuild_of_a_store_that_is_not_milvus_is_refused(tmp_path):
    spec = base_spec()
    spec["stages"]["source"]["documents"] = {"a.txt": "alpha"}
    with Pipeline(spec, allowed_modules=PLUGINS) as pipeline:
        with pytest.raises(TypeError, match="cannot build an index beside the served one"):
            pipeline.full_rebuild(records=MemoryRecords())
        with pytest.raises(TypeError, match="keeps no index record"):
            pipeline.full_rebuild()


def test_cli_full_rebuild(tmp_path, capsys):
    import yaml

    spec = base_spec()
    spec["stages"]["source"]["documents"] = {"a.txt": "alpha"}
    spec["stages"]["store"] = {"type": "milvus", "uri": str(tmp_path / "index.db"), "collection": "docs"}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["reindex", str(path), "--full-rebuild", *[f"--allow-module={m}" for m in PLUGINS]]) == EXIT_OK
    out = capsys.readouterr().out
    assert "now serves 'docs__rebuild_" in out or "replaced by the rebuilt database" in out


def test_reconcile_deletes_orphans_and_redoes_sources_whose_chunks_drifted(tmp_path):
    with milvus_pipeline(tmp_path, {"a.txt": "alpha\nbeta", "b.txt": "gamma", "c.txt": "delta"}) as pipeline:
        pipeline.reindex()
        store = pipeline.store
        assert pipeline.reconcile().clean
        client = store.client()
        # Drift made behind the pipeline's back: a chunk of a.txt deleted, b.txt's chunks gone,
        # chunks of an unknown source written.
        a_ids = store.chunk_ids_by_source()["mem/a.txt"]
        client.delete("docs", ids=[a_ids[0]])
        client.delete("docs", filter='source_id == "mem/b.txt"')
        stray = [
            dict(row, id=f"{row['id'][:-4]}beef", source_id="mem/ghost.txt")
            for row in client.query("docs", filter='source_id == "mem/c.txt"', output_fields=["*"])
        ]
        client.insert("docs", stray)

        dry = pipeline.reconcile(repair=False)
        assert (dry.orphan_sources, dry.drifted_sources) == (["mem/ghost.txt"], ["mem/a.txt", "mem/b.txt"])
        assert "mem/ghost.txt" in texts(store)  # a dry run changes nothing

        report = pipeline.reconcile()
        assert report.repaired and report.orphan_chunks == 1 and "mem/ghost.txt" not in texts(store)
        redo = pipeline.reindex()
        assert (redo.changes.updated, redo.changes.unchanged) == (2, 1)
        assert texts(store) == {"mem/a.txt": {"alpha", "beta"}, "mem/b.txt": {"gamma"}, "mem/c.txt": {"delta"}}
        assert pipeline.reconcile().clean


def test_plain_ingest_records_what_it_indexed(tmp_path):
    with milvus_pipeline(tmp_path, {"a.txt": "alpha", "b.txt": "beta"}) as pipeline:
        first = pipeline.ingest()
        assert first.changes.added == 2
        again = pipeline.ingest()  # ingest processes everything, even unchanged sources
        assert again.documents_seen == 2
        assert pipeline.reindex().changes.unchanged == 2  # and a reindex then skips them


class FlakyCalls:
    """Makes chosen client methods fail with a transient Milvus error on chosen call numbers
    (counting only calls on the chunk collection "docs", not on its record)."""

    def __init__(self, monkeypatch, client, failing: dict[str, set[int]]):
        from pymilvus.exceptions import MilvusException

        self.calls: dict[str, int] = {}
        for name, numbers in failing.items():
            real = getattr(client, name)

            def flaky(*args, _name=name, _real=real, _numbers=numbers, **kwargs):
                if (args[0] if args else kwargs.get("collection_name")) != "docs":
                    return _real(*args, **kwargs)
                self.calls[_name] = self.calls.get(_name, 0) + 1
                if self.calls[_name] in _numbers:
                    raise MilvusException(code=2, message="Fail connecting to server")  # what a lost connection raises
                return _real(*args, **kwargs)

            monkeypatch.setattr(client, name, flaky)


def test_transient_write_failures_are_retried_and_the_index_converges(tmp_path, monkeypatch, caplog):
    documents = {f"{name}.txt": f"{name} one\n{name} two" for name in "abcdef"}
    with milvus_pipeline(tmp_path, documents, max_attempts=3, retry_max_wait_s=0.01) as pipeline:
        pipeline.reindex()
        pipeline.sources[0].config.documents = {**documents, "a.txt": "a changed", "g.txt": "g new"}
        del pipeline.sources[0].config.documents["b.txt"]
        client = pipeline.store.client()
        # Every write path fails once or twice in a row, always within the three attempts.
        flaky = FlakyCalls(monkeypatch, client, {"upsert": {1, 2}, "delete": {1, 3}})
        summary = pipeline.reindex()
        assert summary.ok, summary.format()
        assert flaky.calls["upsert"] >= 3 and flaky.calls["delete"] >= 3 and "retrying" in caplog.text
        monkeypatch.undo()
        expected = {f"mem/{name}.txt": {f"{name} one", f"{name} two"} for name in "cdef"}
        expected.update({"mem/a.txt": {"a changed"}, "mem/g.txt": {"g new"}})
        assert texts(pipeline.store) == expected
        assert pipeline.reconcile(repair=False).clean


def test_write_failure_beyond_the_retries_keeps_the_old_version_and_heals_next_run(tmp_path, monkeypatch):
    with milvus_pipeline(
        tmp_path, {"a.txt": "alpha", "b.txt": "beta"}, max_attempts=2, retry_max_wait_s=0.01
    ) as pipeline:
        pipeline.reindex()
        pipeline.sources[0].config.documents = {"a.txt": "alpha v2", "b.txt": "beta"}
        client = pipeline.store.client()
        FlakyCalls(monkeypatch, client, {"upsert": {1, 2}})  # both attempts of the only chunk write fail
        summary = pipeline.reindex()
        assert summary.documents_failed == 1 and summary.failures[0].stage == "write"
        monkeypatch.undo()
        assert texts(pipeline.store)["mem/a.txt"] == {"alpha"}  # the indexed version is never lost
        healed = pipeline.reindex()
        assert healed.ok and texts(pipeline.store)["mem/a.txt"] == {"alpha v2"}
        assert pipeline.reconcile(repair=False).clean
