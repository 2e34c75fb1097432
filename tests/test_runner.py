import json
import os
from pathlib import Path

import pytest

from pipeline import Pipeline
from tests.plugins.components import PLUGINS, base_spec


def make(documents, tmp_path=None, embedder=None, **runner):
    spec = base_spec()
    spec["stages"]["source"]["documents"] = documents
    if embedder:
        spec["stages"]["embedder"].update(embedder)
    spec["runner"].update(runner)
    return Pipeline(spec, allowed_modules=PLUGINS, base_dir=tmp_path)


def test_ingest_counts_and_upserts_idempotently():
    pipeline = make({"a.txt": "one\ntwo", "b.txt": "three"}, batch_size=1)
    summary = pipeline.ingest()
    assert (summary.documents_seen, summary.documents_indexed, summary.documents_failed) == (2, 2, 0)
    assert summary.chunks_written == 3 and pipeline.store.count() == 3
    assert set(summary.stage_seconds) >= {"chunk", "embed", "write", "parse"}
    ids = set(pipeline.store.table)
    pipeline.ingest()
    assert set(pipeline.store.table) == ids


def test_failures_are_recorded_and_never_stop_the_run(tmp_path):
    docs = {
        "bad-parse.txt": "<corrupt>",
        "bug.txt": "<crash>",
        "empty.txt": "   ",
        "locked.txt": "<unreadable>",
        "poison.txt": "fine\nPOISON here",
        "z-good.txt": "good text",
    }
    pipeline = make(docs, tmp_path, embedder={"fail_on": "POISON"}, failures_file="failures.jsonl", batch_size=10)
    summary = pipeline.ingest()
    assert summary.documents_seen == 6
    # The whitespace-only document is no failure: it is indexed with no chunks.
    assert summary.documents_indexed == 2 and summary.documents_empty == 1 and summary.documents_failed == 4
    assert not summary.ok
    by_source = {f.source_id: (f.stage, f.reason) for f in summary.failures}
    assert by_source == {
        "mem/bad-parse.txt": ("parse", "corrupt file: no lines could be read"),
        "mem/bug.txt": ("parse", "RuntimeError: parser bug"),
        "mem/locked.txt": ("read", "PermissionError: locked.txt: permission denied"),
        "mem/poison.txt": ("embed", "ValueError: cannot embed text containing 'POISON'"),
    }
    # the good document of the same embed batch made it in
    assert {row["source_id"] for row in pipeline.store.table.values()} == {"mem/z-good.txt"}
    lines = [json.loads(line) for line in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert {line["source_id"] for line in lines} == set(by_source)
    text = summary.format()
    assert "documents: 6 seen, 2 indexed (1 empty, with no chunks), 4 failed" in text and "failures.jsonl" in text


def test_chunker_gets_the_batch_at_once_and_a_failing_document_fails_alone():
    spec = base_spec()
    spec["stages"]["source"]["documents"] = {"a.txt": "one", "b.txt": "BREAK it", "c.txt": "three"}
    spec["stages"]["chunker"]["fail_on"] = "BREAK"
    spec["runner"]["batch_size"] = 10
    pipeline = Pipeline(spec, allowed_modules=PLUGINS)
    summary = pipeline.ingest()
    assert pipeline.chunker.batches == [3]  # one call for the whole batch (then one by one after its failure)
    assert [(f.source_id, f.stage) for f in summary.failures] == [("mem/b.txt", "chunk")]
    assert "cannot chunk text containing 'BREAK'" in summary.failures[0].reason
    assert {row["source_id"] for row in pipeline.store.table.values()} == {"mem/a.txt", "mem/c.txt"}


def test_summary_counts_the_chunks_this_run_truncated():
    """Issue 24.2: eval reports the truncation count as data (the run notes only say it in words)."""
    documents = {"a.txt": "short", "b.txt": "a line far longer than the eight tokens the model may read"}
    pipeline = make(documents, embedder={"type": "huggingface", "device": "cpu", "max_length": 8})
    assert pipeline.ingest().chunks_truncated == 1
    assert pipeline.ingest().chunks_truncated == 1  # this run's count, not the kept embedder's total
    assert make(documents).ingest().chunks_truncated is None  # an embedder that keeps no count says none


def test_edited_document_loses_its_stale_chunks():
    pipeline = make({"a.txt": "one\ntwo\nthree"})
    pipeline.ingest()
    assert pipeline.store.count() == 3
    pipeline.spec.sources[0].config.documents["a.txt"] = "one\nTWO"
    pipeline._components.pop("sources")
    pipeline.ingest()
    assert sorted(r["text"] for r in pipeline.store.table.values()) == ["TWO", "one"]


def test_worker_pool_kills_hung_and_dying_parsers():
    docs = {
        "a-hang.txt": "<hang>",
        "b-exit.txt": "<exit>",
        "c-ok.txt": "all good",
        "d-bug.txt": "<crash>",
        "e-ok.txt": "fine",
    }
    pipeline = make(docs, parse_workers=2, parse_timeout_s=3, batch_size=2)
    summary = pipeline.ingest()
    reasons = {f.source_id: f.reason for f in summary.failures}
    assert reasons["mem/a-hang.txt"] == "parse timed out after 3 s; the parser process was killed"
    assert reasons["mem/b-exit.txt"] == "parser process died (exit code 7)"
    assert reasons["mem/d-bug.txt"] == "RuntimeError: parser bug"
    assert summary.documents_indexed == 2 and summary.documents_seen == 5


def test_worker_pool_memory_cap():
    from core.types import SourceDocument
    from pipeline.parse_pool import ParserPool
    from tests.plugins.components import LineParser

    pool = ParserPool(LineParser(), workers=1, timeout_s=30, memory_mb=1)  # any real process exceeds 1 MB
    source = SourceDocument("mem/x", "memory:x", "text/plain", "h", b"<hang>")
    (outcome,) = list(pool.imap([source]))
    assert outcome.parsed is None
    assert outcome.error == "parser used more than 1 MB of memory; the parser process was killed"


def test_worker_pool_parses_ahead_only_up_to_its_character_budget():
    """Parsed documents wait for a slow consumer up to ``max_pending_chars``, not ``max_pending``."""
    import time

    from core.types import SourceDocument
    from pipeline.parse_pool import ParserPool
    from tests.plugins.components import LineParser

    pulled = []

    def sources(count):
        for number in range(count):
            pulled.append(number)
            yield SourceDocument(f"mem/{number}", f"memory:{number}", "text/plain", "h", b"x" * 1000)

    def pulled_while_consumer_waits(pool):
        outcomes = pool.imap(sources(40))
        first = next(outcomes)
        time.sleep(3)  # the consumer is busy; the feeder parses ahead as far as it may
        ahead = len(pulled)
        rest = list(outcomes)
        assert first.error is None and len(rest) == 39 and all(outcome.error is None for outcome in rest)
        pulled.clear()
        return ahead

    # Room for two waiting documents by characters: the taken one, two queued, one in the feeder's
    # hand waiting for room, one in the worker.
    assert pulled_while_consumer_waits(ParserPool(LineParser(), workers=1, max_pending=64, max_pending_chars=2000)) <= 5
    assert pulled_while_consumer_waits(ParserPool(LineParser(), workers=1, max_pending=64)) == 40


GUARDLESS_SCRIPT = """
from pipeline import Pipeline
from tests.plugins.components import PLUGINS, base_spec

spec = base_spec()
spec["stages"]["source"]["documents"] = {"a.txt": "one", "b.txt": "two"}
spec["runner"]["parse_workers"] = 1
print(Pipeline(spec, allowed_modules=PLUGINS).ingest().format())
"""


def test_script_without_main_guard_gets_a_clear_error_not_a_failure_per_document(tmp_path):
    """Spawned parser workers import such a script again and die starting; the run stops at once."""
    import subprocess
    import sys

    script = tmp_path / "index_docs.py"
    script.write_text(GUARDLESS_SCRIPT)
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith("core.errors.ParserStartupError: parse: 3 parser worker processes in a row exited")
    assert 'if __name__ == "__main__":' in last_line and "parse_workers: 0" in last_line
    assert "documents:" not in done.stdout  # no run summary: nothing was recorded as parsed or failed


def test_a_document_sent_to_a_worker_that_already_died_is_kept_not_a_broken_pipe():
    """The worker of a script without the main guard can die before the pool writes to it; the
    write must not surface as a raw BrokenPipeError (the pool then reports ParserStartupError)."""
    import multiprocessing

    from core.errors import ParserStartupError
    from core.types import SourceDocument
    from pipeline.parse_pool import ParserPool, _Worker
    from tests.plugins.components import LineParser

    worker = _Worker(multiprocessing.get_context("spawn"), "tests.plugins.no_such_module:Parser", {}, ".")
    worker.process.join(60)
    assert worker.process.exitcode not in (None, 0)  # it could not import its parser
    document = SourceDocument("s/big", "file:///big", "text/plain", "h", b"x" * 4_000_000)
    worker.assign(document)  # raised BrokenPipeError before
    assert worker.task == document  # kept whole, for a fresh worker
    worker.kill()
    pool = ParserPool(LineParser(), workers=1)
    pool._target = "tests.plugins.no_such_module:Parser"  # every worker dies starting, as in such a script
    with pytest.raises(ParserStartupError, match="3 parser worker processes in a row exited"):
        list(pool.imap([document]))


def test_worker_that_dies_starting_does_not_fail_the_document(monkeypatch):
    """One worker exiting before its parser is ready is retried with a fresh one; the document parses."""
    from core.types import SourceDocument
    from pipeline import parse_pool
    from pipeline.parse_pool import ParserPool
    from tests.plugins.components import LineParser

    real_worker = parse_pool._Worker
    started = []

    def first_dies_starting(ctx, target, settings, base_dir):
        started.append(target)
        if len(started) == 1:  # a parser class that cannot be imported: the worker exits before it is ready
            target = "tests.plugins.no_such_module:LineParser"
        return real_worker(ctx, target, settings, base_dir)

    monkeypatch.setattr(parse_pool, "_Worker", first_dies_starting)
    pool = ParserPool(LineParser(), workers=1, timeout_s=60)
    source = SourceDocument("mem/x", "memory:x", "text/plain", "h", b"alpha\nbeta")
    (outcome,) = list(pool.imap([source]))
    assert outcome.error is None and [e.text for e in outcome.parsed.elements] == ["alpha", "beta"]
    assert len(started) == 2


def test_cli_exit_codes(tmp_path, capsys):
    import yaml

    from pipeline.cli import EXIT_OK, EXIT_PARTIAL, main

    spec = base_spec()
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["ingest", str(path), "--allow-module", "tests.plugins"]) == EXIT_OK
    assert "documents: 1 seen, 1 indexed, 0 failed" in capsys.readouterr().out
    spec["stages"]["source"]["documents"]["b.txt"] = "<corrupt>"
    path.write_text(yaml.safe_dump(spec))
    assert main(["ingest", str(path), "--allow-module", "tests.plugins", "--json"]) == EXIT_PARTIAL
    out = json.loads(capsys.readouterr().out)
    assert out["documents_failed"] == 1 and out["failures"][0]["stage"] == "parse"


def test_writes_overlap_with_embedding_the_next_batch():
    """The first batch's upsert can only finish once the second batch is being embedded."""
    import threading

    pipeline = make({"a.txt": "one", "b.txt": "two"}, batch_size=1)
    second_batch_embedding = threading.Event()
    embed_calls = []
    embed_documents = pipeline.embedder.embed_documents

    def embed_and_signal(texts):
        embed_calls.append(list(texts))
        if len(embed_calls) == 2:
            second_batch_embedding.set()
        return embed_documents(texts)

    upsert = pipeline.store.upsert
    overlapped = []

    def upsert_after_next_embed(chunks):
        overlapped.append(second_batch_embedding.wait(timeout=20))
        return upsert(chunks)

    pipeline.embedder.embed_documents = embed_and_signal
    pipeline.store.upsert = upsert_after_next_embed
    summary = pipeline.ingest()
    assert summary.ok and pipeline.store.count() == 2
    assert overlapped == [True, True]
    assert "write wait" in summary.stage_seconds


def test_write_behind_bounds_its_queue_and_reraises_writer_errors():
    import threading

    from pipeline.runner import WriteBehind

    release = threading.Event()
    written = []

    def slow_write(batch):
        release.wait(timeout=20)
        written.append(batch)

    writer = WriteBehind(slow_write, depth=2)
    submitted = []

    def submit_five():
        for i in range(5):
            writer.submit([i])
            submitted.append(i)

    feeder = threading.Thread(target=submit_five)
    feeder.start()
    feeder.join(timeout=1.0)
    # one batch in the writer's hands, two queued: the fourth submit waits
    assert feeder.is_alive() and submitted == [0, 1, 2]
    release.set()
    feeder.join(timeout=20)
    writer.close()
    assert written == [[0], [1], [2], [3], [4]]

    def broken_write(batch):
        raise OSError("disk full")

    failing = WriteBehind(broken_write, depth=1)
    failing.submit([1])
    with pytest.raises(RuntimeError, match="the store writer stopped: OSError: disk full"):
        failing.close()


def test_batches_close_at_the_document_count_or_the_text_budget():
    from core.types import ParsedDocument
    from pipeline.parse_pool import ParseOutcome
    from pipeline.runner import outcome_batches

    def outcome(name: str, chars: int | None) -> ParseOutcome:
        parsed = None if chars is None else ParsedDocument(name, name, "text/plain", "", "x" * chars, ())
        return ParseOutcome(name, name, parsed, None if parsed else "broken", 0.0)

    outcomes = [
        outcome("a", 10),
        outcome("b", 10),
        outcome("failed", None),
        outcome("c", 10),
        outcome("huge", 500),
        outcome("d", 10),
    ]
    names = lambda batches: [[o.source_id for o in batch] for batch in batches]  # noqa: E731
    assert names(outcome_batches(outcomes, 3, 1_000)) == [["a", "b", "failed"], ["c", "huge", "d"]]
    # 25 characters close a batch; a failed parse counts as a document without text; a document
    # over the budget closes the batch it joins.
    assert names(outcome_batches(outcomes, 10, 25)) == [["a", "b", "failed", "c"], ["huge"], ["d"]]
    assert names(outcome_batches([], 3, 25)) == []
