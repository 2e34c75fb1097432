"""The index record in Milvus Lite (``<collection>_records``) and incremental runs against real Milvus."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from core.errors import LockHeldError, LockLostError
from core.leases import LockClaim, MemoryClaims
from core.records import MemoryRecords, SourceRecord, chunk_digest
from pipeline import Pipeline
from pipeline.lease import Lease, index_lock, process_started, this_machine
from pipeline.reindex_job import format_status, run_on_schedule
from stores.milvus import MilvusStore
from stores.milvus.records import MilvusRecords
from tests.plugins.components import PLUGINS, MemoryStore, base_spec

REPO = Path(__file__).resolve().parents[1]


def milvus_pipeline(tmp_path, documents, **store):
    spec = base_spec()
    spec["stages"]["source"]["documents"] = dict(documents)
    spec["stages"]["store"] = {"type": "milvus", "uri": str(tmp_path / "index.db"), "collection": "docs", **store}
    return Pipeline(spec, allowed_modules=PLUGINS)


def chunk_rows(store: MilvusStore) -> list[tuple[str, str, str]]:
    return sorted((r["source_id"], r["text"], r["id"]) for r in store.rows(["id", "source_id", "text"]))


def test_records_round_trip_in_the_companion_collection(tmp_path):
    store = MilvusStore(uri=str(tmp_path / "index.db"), collection="docs")
    try:
        records = store.index_record()
        assert isinstance(records, MilvusRecords) and records.name == "docs_records"
        a = SourceRecord(
            "root/a.txt",
            "root/",
            content_hash="h1",
            change_signal="s1",
            fingerprint="f",
            chunk_count=2,
            chunk_digest=chunk_digest(["x", "y"]),
            status="indexed",
        )
        b = SourceRecord("other/b.txt", "other/", status="failed", stage="parse", reason="corrupt", attempts=1)
        records.put([a, b])
        assert records.get(["root/a.txt", "missing"]) == {"root/a.txt": a}
        assert [r.source_id for r in records.in_scope("other/")] == ["other/b.txt"]
        assert {r.source_id for r in records.all()} == {"root/a.txt", "other/b.txt"}
        records.put_run({"documents_seen": 3})
        assert records.last_run() == {"documents_seen": 3}
        assert {r.source_id for r in records.all()} == {"root/a.txt", "other/b.txt"}  # the run row is no source
        records.delete(["root/a.txt"])
        assert records.get(["root/a.txt"]) == {}
        assert store.client().has_collection("docs_records")
        assert list(records.all()) == list(records.in_scope("other/"))
    finally:
        store.close()


def test_record_reads_grow_their_pages_and_return_every_row_once(tmp_path, monkeypatch):
    # Scaled down: a first page of 40 rows, then pages of what 1.6 MB holds at twice the largest row
    # seen (a few hundred bytes), capped at 500 rows.
    monkeypatch.setattr(MilvusRecords, "_PAGE", 40)
    monkeypatch.setattr(MilvusRecords, "_MAX_READ_PAGE", 500)
    monkeypatch.setattr(MilvusRecords, "_READ_PAGE_BYTES", 1_600_000)
    store = MilvusStore(uri=str(tmp_path / "index.db"), collection="docs")
    try:
        records = store.index_record()
        # One long row among short ones, read wherever its digest id puts it.
        written = [SourceRecord(f"root/{i:04d}.txt", "root/", change_signal=f"s{i}") for i in range(1, 1000)]
        written.append(SourceRecord("root/" + "x" * 3000, "root/"))
        records.put(written)
        records.put([SourceRecord("other/a.txt", "other/")])
        pages: list[int] = []
        query_pages = store.query_pages

        def counted(client, collection, expression, fields, page_size):
            pages.append(page_size)
            return query_pages(client, collection, expression, fields, page_size)

        monkeypatch.setattr(store, "query_pages", counted)
        read = [r.source_id for r in records.in_scope("root/")]
        assert sorted(read) == sorted(r.source_id for r in written)  # each exactly once
        # One resize, after the first page: to the cap, or to what fits twice the long row if it was read first.
        assert pages[0] == 40 and len(pages) == 2 and 1_600_000 // (2 * 3200) <= pages[1] <= 500
        assert len(list(records.all())) == 1001
    finally:
        store.close()


def test_records_need_a_store_that_can_keep_them():
    assert MemoryStore().index_record() is None and MemoryStore().lock_claims() is None
    pipeline = Pipeline(base_spec(), allowed_modules=PLUGINS)
    with pytest.raises(TypeError, match="keeps no index record"):
        pipeline.reindex()
    assert pipeline.ingest().documents_indexed == 1  # an ingest needs no record and takes no lock


def test_incremental_runs_against_milvus_converge_to_a_clean_build(tmp_path):
    # write_batch_size=2: a five-chunk source is written over three upsert requests
    long_doc = "\n".join(f"line {i}" for i in range(5))
    docs = {"a.txt": "alpha\nbeta", "b.txt": long_doc, "c.txt": "gamma", "d.txt": "gamma"}
    pipeline = milvus_pipeline(tmp_path / "inc", docs, write_batch_size=2)
    source = pipeline.sources[0].config
    try:
        first = pipeline.reindex()
        assert first.changes.added == 4
        assert pipeline.reindex().documents_seen == 0

        source.documents["b.txt"] = "\n".join(f"line {i}" for i in range(2, 9))  # edit across batches
        source.documents["e.txt"] = source.documents.pop("a.txt")  # rename
        del source.documents["c.txt"]  # delete
        summary = pipeline.reindex()
        assert (summary.changes.added, summary.changes.updated, summary.changes.deleted, summary.changes.unchanged) == (
            1,
            1,
            2,
            1,
        )

        clean = milvus_pipeline(tmp_path / "clean", source.documents, write_batch_size=2)
        try:
            clean.ingest()
            assert chunk_rows(pipeline.store) == chunk_rows(clean.store)
        finally:
            clean.store.close()
        records = pipeline.store.index_record()
        assert {r.source_id: r.status for r in records.all()} == {
            "mem/b.txt": "indexed",
            "mem/d.txt": "indexed",
            "mem/e.txt": "indexed",
        }
        assert records.get(["mem/b.txt"])["mem/b.txt"].chunk_count == 7
        assert records.last_run()["changes"]["deleted"] == 2
    finally:
        pipeline.store.close()


# -- the lock -------------------------------------------------------------------------------------


def dead_process() -> tuple[int, str]:
    """The pid and start time of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = process_started(child.pid)
    child.wait()
    return child.pid, started


def claim(
    owner: str, *, machine: str = "another-machine", pid: int = 1, started: str = "", expires_in: float = 60.0
) -> LockClaim:
    now = time.time()
    return LockClaim(owner, "other-host", machine, pid, started, now, now + expires_in)


def test_lock_is_exclusive_and_released():
    claims = MemoryClaims()
    with index_lock(claims, ttl_s=60) as lease:
        assert [c.owner for c in claims.claims()] == [lease.claim.owner]
        with pytest.raises(LockHeldError, match=f"pid {os.getpid()}"):
            with index_lock(claims, ttl_s=60):
                pass
        assert [c.owner for c in claims.claims()] == [lease.claim.owner]  # the loser took nothing away
    assert claims.claims() == []


def test_a_killed_run_on_this_machine_frees_the_lock_at_once():
    claims = MemoryClaims()
    pid, started = dead_process()
    claims.put(claim("killed", machine=this_machine(), pid=pid, started=started, expires_in=300))
    with index_lock(claims, ttl_s=60) as lease:  # not 300 s later: the pid is gone
        assert [c.owner for c in claims.claims()] == [lease.claim.owner]


def test_a_reused_pid_does_not_keep_a_dead_claim_alive():
    # The claim names this very process's pid, but with another start time: a different process.
    claims = MemoryClaims()
    claims.put(claim("old", machine=this_machine(), pid=os.getpid(), started="1", expires_in=300))
    with index_lock(claims, ttl_s=60):
        pass


def test_a_claim_from_another_machine_lives_until_its_expiry():
    claims = MemoryClaims()
    claims.put(claim("remote", expires_in=60))
    with pytest.raises(LockHeldError, match="pid 1 on other-host"):
        with index_lock(claims, ttl_s=60):
            pass
    claims.put(claim("remote", expires_in=-1))  # its heartbeat stopped a TTL ago
    with index_lock(claims, ttl_s=60):
        assert [c.owner for c in claims.claims()] != ["remote"]


class InterleavedClaims(MemoryClaims):
    """Claims whose second read (step 3 of the protocol) happens after a rival's claim was written."""

    def __init__(self, rival: LockClaim):
        super().__init__()
        self.rival, self.reads = rival, 0

    def claims(self) -> list[LockClaim]:
        self.reads += 1
        if self.reads == 2:
            self.put(self.rival)  # the rival wrote between our write and our read
        return super().claims()


def test_two_runs_claiming_at_once_never_both_hold_the_lock():
    # Our claim and the rival's land together: we see the rival's claim on our check, back off,
    # and find the rival still there on the next attempt.
    store = InterleavedClaims(claim("rival", expires_in=60))
    with pytest.raises(LockHeldError):
        Lease(store, ttl_s=60).acquire()
    assert [c.owner for c in store.claims()] == ["rival"]  # ours was withdrawn


def test_heartbeat_refreshes_and_a_lost_lock_fences_writes():
    claims = MemoryClaims()
    with index_lock(claims, ttl_s=0.6) as lease:
        first = claims.claims()[0].expires_at
        time.sleep(0.45)
        assert claims.claims()[0].expires_at > first
        lease.ensure_held()
        claims.delete(lease.claim.owner)  # another run judged this one dead and took over
        lease.refresh()
        with pytest.raises(LockLostError, match="gone"):
            lease.ensure_held()


def test_a_lease_that_cannot_refresh_stops_writing_before_others_may_take_over():
    class Unreachable(MemoryClaims):
        broken = False

        def claims(self) -> list[LockClaim]:
            if self.broken:
                raise ConnectionError("store unreachable")
            return super().claims()

    claims = Unreachable()
    with index_lock(claims, ttl_s=0.3) as lease:
        claims.broken = True
        time.sleep(0.35)  # past 2/3 of the TTL without a refresh
        with pytest.raises(LockLostError, match="last refreshed"):
            lease.ensure_held()
        claims.broken = False


def test_a_run_that_loses_its_lock_stops_writing(tmp_path):
    documents = {"a.txt": "alpha", "b.txt": "beta", "c.txt": "gamma"}
    with milvus_pipeline(tmp_path, documents) as pipeline:
        pipeline.spec.runner.batch_size = 1
        with pipeline.lease(60) as lease:
            checks = []

            def lost_after_the_first_write() -> None:  # the run's own check, then the first batch's
                checks.append(1)
                if len(checks) > 2:
                    raise LockLostError("another run took over")

            lease.ensure_held = lost_after_the_first_write
            with pytest.raises(Exception, match="LockLostError: another run took over"):
                pipeline.reindex(lease=lease)
        written = {source_id for source_id, _, _ in chunk_rows(pipeline.store)}
        assert written == {"mem/a.txt"}
        statuses = {r.source_id: r.status for r in pipeline.store.index_record().all()}
        assert statuses == {"mem/a.txt": "indexed"}  # nothing recorded after the loss, not even failures


def test_status_shows_counts_last_run_and_failures():
    records = MemoryRecords()
    records.put(
        [
            SourceRecord("m/a", "m/", status="indexed", chunk_count=3),
            SourceRecord("m/b", "m/", status="failed", stage="embed", reason="ValueError: boom", attempts=2),
        ]
    )
    assert "last run: none recorded" in format_status(records)
    records.put_run({"finished_at": 0, "seconds": 1.5, "documents_failed": 1, "changes": {"added": 1, "deleted": 4}})
    text = format_status(records)
    assert "sources: 2 (1 indexed, 0 pending, 1 failed)" in text and "chunks: 3" in text
    assert "1 added, 0 updated, 0 unchanged, 4 deleted, 1 failed" in text
    assert "m/b: embed: ValueError: boom (2 attempts)" in text


def test_schedule_rejects_a_bad_cron_expression_and_stops_on_request():
    with pytest.raises(ValueError, match="not a cron expression"):
        run_on_schedule("every half hour", lambda: 0)
    stop = threading.Event()
    stop.set()
    assert run_on_schedule("*/30 * * * *", lambda: 9, stop=stop) == 0  # stopped before the first time came


# -- the command line -------------------------------------------------------------------------------


def write_spec(folder: Path, documents: dict[str, str], *, store: dict | None = None, **runner) -> Path:
    spec = base_spec()
    spec["stages"]["source"]["documents"] = documents
    spec["stages"]["store"] = {"type": "milvus", **(store or {"uri": str(folder / "index.db"), "collection": "docs"})}
    spec["runner"].update(runner)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args, "--allow-module", "tests.plugins"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err


def test_reindex_and_status_commands(tmp_path):
    spec = write_spec(tmp_path, {"a.txt": "one\ntwo", "b.txt": "<corrupt>"})
    code, out, err = finish(cli("reindex", str(spec)))
    assert code == 1, err  # partial: one source failed
    assert "1 added" in out and "1 failed" in out
    code, out, err = finish(cli("reindex", str(spec)))
    assert code == 1 and "1 unchanged" in out, err
    code, out, err = finish(cli("status", str(spec)))
    assert code == 0, err
    assert "sources: 2 (1 indexed, 0 pending, 1 failed)" in out
    assert "mem/b.txt: parse: corrupt file" in out and "(2 attempts)" in out


def test_two_reindex_processes_at_once_one_exits_with_the_lock_code(tmp_path):
    # The slow document keeps the first run busy (its parse is killed after 3 s) while the second starts.
    spec = write_spec(tmp_path, {"a.txt": "one", "slow.txt": "<hang>"}, parse_workers=1, parse_timeout_s=3)
    first, second = cli("reindex", str(spec)), cli("reindex", str(spec))
    results = sorted([finish(first), finish(second)])
    assert [code for code, _, _ in results] == [1, 4], results
    assert "in use by another process" in results[1][2] or "lock is held" in results[1][2]


# -- crash safety ------------------------------------------------------------------------------------


def corpus_after(round_number: int, rng) -> dict[str, str]:
    """40 small documents; each round edits, adds, deletes and renames a few of them."""
    documents = {f"doc{i:02d}.txt": "\n".join(f"doc {i} line {j}" for j in range(1 + i % 4)) for i in range(40)}
    for step in range(round_number):
        for name in rng.sample(sorted(documents), 3):
            documents[name] += f"\nedit {step}"
        del documents[rng.choice(sorted(documents))]
        documents[f"new{step:02d}.txt"] = f"added in round {step}"
        renamed = rng.choice(sorted(documents))
        documents[f"renamed{step:02d}.txt"] = documents.pop(renamed)
    return documents


@pytest.mark.slow
@pytest.mark.parametrize("tier", ["lite", "server"])
def test_sigkill_at_random_points_then_one_clean_run_equals_a_clean_build(tmp_path, request, tier):
    import random

    if tier == "server":
        server = request.getfixturevalue("milvus_server")
        killed_collection, clean_collection = server.new_collection_name(), server.new_collection_name()
        request.addfinalizer(lambda: [server.drop_collections(name) for name in (killed_collection, clean_collection)])
        killed_settings = {"uri": server.uri, "collection": killed_collection}
        clean_settings = {"uri": server.uri, "collection": clean_collection}
    else:
        killed_settings = {"uri": str(tmp_path / "killed" / "index.db"), "collection": "docs"}
        clean_settings = {"uri": str(tmp_path / "clean" / "index.db"), "collection": "docs"}
    rng = random.Random(5)
    folder = tmp_path / "killed"
    folder.mkdir()
    killed = 0
    for round_number in range(20):
        documents = corpus_after(round_number, random.Random(round_number))
        spec = write_spec(folder, documents, store=killed_settings, batch_size=4)
        # Each run starts right after the last one was killed: the dead run's lock claim (pid gone
        # on this machine) must not keep it waiting out the TTL, and it must not exit with 4.
        process = cli("reindex", str(spec))
        try:
            process.wait(timeout=rng.uniform(1.0, 3.5))  # runs are short: a no-change reindex loads no chunks
        except subprocess.TimeoutExpired:
            process.kill()  # SIGKILL: no cleanup, no lock release, no flush
            killed += 1
        _, err = process.communicate()
        assert process.returncode != 4, err
    assert killed >= 5  # the test must really interrupt runs, not only watch them finish

    final = corpus_after(20, random.Random(20))
    code, out, err = finish(cli("reindex", str(write_spec(folder, final, store=killed_settings))))
    assert code == 0, err

    clean_folder = tmp_path / "clean"
    clean_folder.mkdir()
    code, _, err = finish(cli("ingest", str(write_spec(clean_folder, final, store=clean_settings))))
    assert code == 0, err
    killed_store, clean_store = MilvusStore(**killed_settings), MilvusStore(**clean_settings)
    try:
        rows = chunk_rows(killed_store)
        assert len(rows) == len({r[2] for r in rows})  # no duplicates
        assert rows == chunk_rows(clean_store)  # no missing, no stale
        statuses = {r.source_id: r.status for r in killed_store.index_record().all()}
        assert statuses == {f"mem/{name}": "indexed" for name in final}
    finally:
        killed_store.close()
        clean_store.close()
