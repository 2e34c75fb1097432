"""Incremental re-indexing: change detection, update order, cleanup modes and the dead-letter record.

Runs the real runner with the in-memory test components and MemoryRecords; the Milvus-backed
record and the end-to-end run against Milvus Lite are in tests/test_records.py.
"""

import pytest

from core.records import MemoryRecords, SourceRecord
from pipeline import Pipeline
from tests.plugins.components import PLUGINS, base_spec


def make(documents, embedder=None, namespace="mem", **runner):
    spec = base_spec()
    spec["stages"]["source"].update(documents=dict(documents), namespace=namespace)
    if embedder:
        spec["stages"]["embedder"].update(embedder)
    spec["runner"].update(runner)
    return Pipeline(spec, allowed_modules=PLUGINS)


class Index:
    """One pipeline plus its record, re-run after edits to the in-memory source."""

    def __init__(self, documents, **runner):
        self.pipeline = make(documents, **runner)
        self.records = MemoryRecords()
        self.embedded: list[str] = []
        embedder = self.pipeline.embedder
        original = embedder.embed_documents

        def counting(texts):
            self.embedded.extend(texts)
            return original(texts)

        embedder.embed_documents = counting

    @property
    def documents(self) -> dict[str, str]:
        return self.pipeline.sources[0].config.documents

    def run(self):
        self.embedded.clear()
        return self.pipeline.reindex(records=self.records)

    def texts_by_source(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for row in self.pipeline.store.table.values():
            out.setdefault(row["source_id"], set()).add(row["text"])
        return out


def test_unchanged_rerun_reads_parses_and_embeds_nothing():
    index = Index({"a.txt": "one\ntwo", "b.txt": "three"})
    first = index.run()
    assert (first.changes.added, first.changes.unchanged) == (2, 0) and index.embedded
    second = index.run()
    assert second.documents_seen == 0 and second.chunks_written == 0 and index.embedded == []
    assert (second.changes.added, second.changes.updated, second.changes.unchanged, second.changes.deleted) == (
        0,
        0,
        2,
        0,
    )
    assert index.pipeline.store.count() == 3
    assert "2 unchanged" in second.format()
    assert index.records.last_run()["changes"]["unchanged"] == 2


def test_edited_source_alone_is_reembedded_and_loses_its_old_chunks():
    index = Index({"a.txt": "one\ntwo", "b.txt": "three"})
    index.run()
    index.documents["a.txt"] = "one\ntwo changed\nfour"
    summary = index.run()
    assert sorted(index.embedded) == ["four", "one", "two changed"]
    assert (summary.changes.updated, summary.changes.unchanged) == (1, 1)
    assert index.texts_by_source() == {"mem/a.txt": {"one", "two changed", "four"}, "mem/b.txt": {"three"}}
    record = index.records.get(["mem/a.txt"])["mem/a.txt"]
    assert record.status == "indexed" and record.chunk_count == 3


def test_touched_source_with_same_bytes_is_not_parsed_but_its_signal_is_refreshed():
    index = Index({"a.txt": "one"})
    index.run()
    index.pipeline.sources[0].config.signal_suffix = "-touched"
    summary = index.run()
    assert summary.documents_seen == 0 and index.embedded == [] and summary.changes.unchanged == 1
    assert index.records.get(["mem/a.txt"])["mem/a.txt"].change_signal.endswith("-touched")


@pytest.mark.parametrize("cleanup, kept", [("full", False), ("incremental", True), ("none", True)])
def test_removed_source_is_deleted_only_under_full_cleanup(cleanup, kept):
    index = Index({"a.txt": "one", "b.txt": "two"}, cleanup=cleanup)
    index.run()
    del index.documents["b.txt"]
    summary = index.run()
    assert ("mem/b.txt" in index.texts_by_source()) is kept
    assert ("mem/b.txt" in index.records.records) is kept
    assert summary.changes.deleted == (0 if kept else 1)


def test_cleanup_none_keeps_stale_chunks_of_an_edited_source():
    index = Index({"a.txt": "one\ntwo"}, cleanup="none")
    index.run()
    index.documents["a.txt"] = "one\nthree!"
    index.run()
    assert index.texts_by_source()["mem/a.txt"] == {"one", "two", "three!"}


def test_rename_drops_the_old_source_and_adds_the_new():
    index = Index({"old.txt": "same words"})
    index.run()
    index.documents["new.txt"] = index.documents.pop("old.txt")
    summary = index.run()
    assert index.texts_by_source() == {"mem/new.txt": {"same words"}}
    assert set(index.records.records) == {"mem/new.txt"}
    assert (summary.changes.added, summary.changes.deleted) == (1, 1)


def test_identical_content_in_two_sources_gives_two_records_and_two_chunk_sets():
    index = Index({"a.txt": "twin text", "b.txt": "twin text"})
    index.run()
    assert set(index.records.records) == {"mem/a.txt", "mem/b.txt"}
    assert index.texts_by_source() == {"mem/a.txt": {"twin text"}, "mem/b.txt": {"twin text"}}
    del index.documents["a.txt"]
    index.run()
    assert index.texts_by_source() == {"mem/b.txt": {"twin text"}}


def test_stage_fingerprint_change_redoes_every_source():
    index = Index({"a.txt": "one", "b.txt": "two"})
    index.run()
    index.pipeline.chunker.config.chunk_size = 50
    summary = index.run()
    assert sorted(index.embedded) == ["one", "two"] and summary.changes.updated == 2
    again = index.run()
    assert again.changes.unchanged == 2 and index.embedded == []


def test_failing_source_keeps_its_previous_chunks_is_dead_lettered_and_retried():
    index = Index({"a.txt": "good", "b.txt": "fine"})
    index.run()
    index.documents["a.txt"] = "<corrupt>"
    summary = index.run()
    assert summary.documents_failed == 1
    assert index.texts_by_source()["mem/a.txt"] == {"good"}  # the old version stays searchable
    record = index.records.get(["mem/a.txt"])["mem/a.txt"]
    assert (record.status, record.stage, record.attempts) == ("failed", "parse", 1)
    assert "corrupt file" in record.reason
    # Same bytes again: a failed record is never 'unchanged', so the next run retries it.
    index.run()
    assert index.records.get(["mem/a.txt"])["mem/a.txt"].attempts == 2
    index.documents["a.txt"] = "good again"
    index.run()
    record = index.records.get(["mem/a.txt"])["mem/a.txt"]
    assert record.status == "indexed" and index.texts_by_source()["mem/a.txt"] == {"good again"}


def test_new_source_that_fails_is_recorded_failed_and_has_no_chunks():
    index = Index({"a.txt": "fine"}, embedder={"fail_on": "POISON"})
    index.documents["p.txt"] = "POISON"
    index.run()
    assert index.records.get(["mem/p.txt"])["mem/p.txt"].stage == "embed"
    assert "mem/p.txt" not in index.texts_by_source()


def test_interrupted_listing_deletes_nothing():
    index = Index({"a.txt": "one", "b.txt": "two", "c.txt": "three"})
    index.run()
    del index.documents["a.txt"]
    index.pipeline.sources[0].config.fail_listing_after = 1
    summary = index.run()
    assert summary.changes.deleted == 0 and set(index.texts_by_source()) == {"mem/b.txt", "mem/c.txt", "mem/a.txt"}
    index.pipeline.sources[0].config.fail_listing_after = None
    assert index.run().changes.deleted == 1


def test_full_cleanup_is_scoped_to_the_source_root():
    records = MemoryRecords()
    team_a = make({"a.txt": "one"}, namespace="team-a")
    team_b = make({"b.txt": "two"}, namespace="team-b")
    team_b.store.table = team_a.store.table  # the two specs share one collection and its record
    team_a.reindex(records=records)
    team_b.reindex(records=records)
    team_a.reindex(records=records)
    assert {row["source_id"] for row in team_a.store.table.values()} == {"team-a/a.txt", "team-b/b.txt"}
    assert set(records.records) == {"team-a/a.txt", "team-b/b.txt"}


def test_pending_record_of_a_source_that_vanished_is_removed():
    """A crash between 'pending' and the first commit leaves a pending record; full cleanup clears it."""
    index = Index({"a.txt": "one"})
    index.run()
    index.records.put([SourceRecord("mem/ghost.txt", "mem/", status="pending")])
    assert index.run().changes.deleted == 1
    assert set(index.records.records) == {"mem/a.txt"}
