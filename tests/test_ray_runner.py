"""The Ray runner against one local Ray instance (2 CPUs): same rows, failures, caps, record and
summary as the local runner."""

import logging
import os
import sys
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")

from core.component import MissingDependencyError  # noqa: E402
from pipeline import Pipeline, SpecError, parse_spec  # noqa: E402
from pipeline.ray_runner import (  # noqa: E402
    RAY_EXTRA_HINT,
    BatchLedger,
    ClusterPlan,
    EmbeddedBatch,
    EmbedderNotes,
    runner_problems,
)
from pipeline.spec import RaySettings, RunnerConfig  # noqa: E402
from tests.plugins.components import PLUGINS, HashEmbedder, base_spec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # Ray puts the driver's working directory on its workers' import path: the checkout, so that
    # workers import the test plugins (tests.plugins) wherever pytest was started.
    started_in = Path.cwd()
    os.chdir(REPO)
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    finally:
        os.chdir(started_in)
    yield
    ray.shutdown()


def plugin_spec(documents, runner_type="ray", embedder=None, **runner):
    spec = base_spec()
    spec["stages"]["source"]["documents"] = dict(documents)
    spec["stages"]["embedder"].update(embedder or {})
    spec["runner"].update(type=runner_type, **runner)
    return spec


def milvus_spec(tmp_path, documents, runner_type="ray", **runner):
    spec = plugin_spec(documents, runner_type, **runner)
    spec["stages"]["store"] = {"type": "milvus", "uri": str(tmp_path / "index.db"), "collection": "docs"}
    return spec


def rows(store):
    return {cid: (row["source_id"], row["text"], row["dense"].tobytes()) for cid, row in store.table.items()}


def test_same_rows_and_summary_as_the_local_runner():
    docs = {f"d{i}.txt": "\n".join(f"line {i}.{j}" for j in range(i % 4 + 1)) for i in range(9)}
    local = Pipeline(plugin_spec(docs, "local", batch_size=4), allowed_modules=PLUGINS)
    on_ray = Pipeline(plugin_spec(docs, "ray", batch_size=4, ray={"parse_batch_size": 2}), allowed_modules=PLUGINS)
    expected, summary = local.ingest(), on_ray.ingest()
    assert rows(on_ray.store) == rows(local.store) and len(rows(local.store)) == summary.chunks_written == 21
    counts = ("documents_seen", "documents_indexed", "documents_failed", "chunks_written")
    assert [getattr(summary, c) for c in counts] == [getattr(expected, c) for c in counts] == [9, 9, 0, 21]
    assert set(summary.stage_seconds) >= {"read", "parse", "chunk", "embed", "write", "ray start", "ray wait"}
    assert summary.to_dict().keys() == expected.to_dict().keys()


def test_every_failure_is_recorded_at_its_stage_and_the_run_goes_on(tmp_path):
    docs = {
        "bad-parse.txt": "<corrupt>",
        "bug.txt": "<crash>",
        "empty.txt": "   ",
        "locked.txt": "<unreadable>",
        "poison.txt": "fine\nPOISON here",
        "unwritable.txt": "WRITEFAIL",
        "z-good.txt": "good text",
    }
    spec = plugin_spec(docs, embedder={"fail_on": "POISON"}, failures_file="failures.jsonl", batch_size=10)
    pipeline = Pipeline(spec, allowed_modules=PLUGINS, base_dir=tmp_path)
    upsert = pipeline.store.upsert

    def refuse_marked_chunks(chunks):  # the store runs in the driver, so a local patch reaches it
        if any("WRITEFAIL" in c.text for c in chunks):
            raise OSError("disk quota exceeded")
        return upsert(chunks)

    pipeline.store.upsert = refuse_marked_chunks
    summary = pipeline.ingest()
    assert {f.source_id: (f.stage, f.reason) for f in summary.failures} == {
        "mem/bad-parse.txt": ("parse", "corrupt file: no lines could be read"),
        "mem/bug.txt": ("parse", "RuntimeError: parser bug"),
        "mem/locked.txt": ("read", "PermissionError: locked.txt: permission denied"),
        "mem/poison.txt": ("embed", "ValueError: cannot embed text containing 'POISON'"),
        "mem/unwritable.txt": ("write", "OSError: disk quota exceeded"),
    }
    assert {row["source_id"] for row in pipeline.store.table.values()} == {"mem/z-good.txt"}
    assert "documents: 7 seen, 2 indexed (1 empty, with no chunks), 5 failed" in summary.format()
    assert len((tmp_path / "failures.jsonl").read_text().splitlines()) == 5


def test_a_large_document_is_written_slice_by_slice_with_the_rows_and_failures_of_the_local_runner():
    lines = [f"line {i} " + "word " * (i % 7 + 3) for i in range(60)]
    docs = {
        "big.txt": "\n".join(lines),
        "poisoned.txt": "\n".join([*lines, "POISON near the end", *lines[:9]]),
        "small.txt": "one line",
    }
    runs = {}
    for runner_type in ("local", "ray"):
        spec = plugin_spec(docs, runner_type, embedder={"fail_on": "POISON"}, slice_chunks=4)
        spec["stages"]["chunker"] = {"type": "recursive", "chunk_size": 40, "chunk_overlap": 8}
        pipeline = Pipeline(spec, allowed_modules=PLUGINS)
        runs[runner_type] = (pipeline, pipeline.ingest())
    (local, expected), (on_ray, summary) = runs["local"], runs["ray"]
    assert rows(on_ray.store) == rows(local.store)
    assert {row["source_id"] for row in on_ray.store.table.values()} >= {"mem/big.txt", "mem/small.txt"}
    counts = ("documents_seen", "documents_indexed", "documents_failed", "chunks_written")
    assert [getattr(summary, c) for c in counts] == [getattr(expected, c) for c in counts]
    assert summary.documents_indexed == 2 and summary.chunks_written > 4 * 4
    (failure,) = summary.failures
    assert [(f.source_id, f.stage, f.reason) for f in expected.failures] == [
        (failure.source_id, failure.stage, failure.reason)
    ]
    assert failure.source_id == "mem/poisoned.txt" and "its previous version stays searchable" in failure.reason


def test_languages_counted_on_the_embed_actors_reach_the_summary_as_the_local_runner_counts_them():
    chinese = "北京是中华人民共和国的首都，也是全国的政治中心和文化中心。"
    english = "The cells which were treated with the compound grew more slowly than the others."
    docs = {**{f"zh{i}.txt": chinese for i in range(3)}, **{f"en{i}.txt": english for i in range(4)}, "n.txt": "1 2"}
    embedder = {"languages": ["en"]}
    local = Pipeline(plugin_spec(docs, "local", embedder, batch_size=2), allowed_modules=PLUGINS).ingest()
    on_ray = Pipeline(
        plugin_spec(docs, "ray", embedder, batch_size=2, ray={"parse_batch_size": 2}), allowed_modules=PLUGINS
    ).ingest()
    assert on_ray.languages == local.languages == {"en": 4, "zh": 3, "unknown": 1}
    assert on_ray.notes == local.notes
    assert on_ray.notes[0].startswith("mixed-language corpus (en 4, zh 3, unknown 1 documents): dense retrieval")


def test_parse_caps_kill_hung_and_dying_parsers_and_the_run_goes_on():
    docs = {"a-hang.txt": "<hang>", "b-exit.txt": "<exit>", "c-ok.txt": "all good", "d-ok.txt": "fine"}
    spec = plugin_spec(docs, parse_workers=1, parse_timeout_s=3, batch_size=2, ray={"parse_batch_size": 1})
    summary = Pipeline(spec, allowed_modules=PLUGINS).ingest()
    assert {f.source_id: (f.stage, f.reason) for f in summary.failures} == {
        "mem/a-hang.txt": ("parse", "parse timed out after 3 s; the parser process was killed"),
        "mem/b-exit.txt": ("parse", "parser process died (exit code 7)"),
    }
    assert (summary.documents_seen, summary.documents_indexed) == (4, 2)


def test_a_worker_that_dies_without_caps_loses_documents_that_are_still_recorded():
    """parse_workers 0 parses inside the Ray task: a parser that ends the process takes the task with it."""
    docs = {"a.txt": "one", "b-exit.txt": "<exit>", "c.txt": "three", "d.txt": "four"}
    pipeline = Pipeline(plugin_spec(docs, parse_workers=0, ray={"parse_batch_size": 1}), allowed_modules=PLUGINS)
    summary = pipeline.ingest()
    failed = {f.source_id: (f.stage, f.reason) for f in summary.failures}
    assert failed["mem/b-exit.txt"] == (
        "parse",
        "lost in the Ray cluster: a worker that held it died before its result reached the driver",
    )
    assert {stage for stage, _ in failed.values()} == {"parse"}
    # every document is accounted for: indexed, or recorded as failed (and so redone by the next reindex)
    assert summary.documents_seen == 4 and summary.documents_indexed + summary.documents_failed == 4
    assert {row["source_id"] for row in pipeline.store.table.values()} == {f"mem/{name}" for name in docs} - set(failed)


def test_reindex_after_a_ray_ingest_skips_the_unchanged_and_redoes_an_edit(tmp_path):
    docs = {"a.txt": "alpha\nbeta", "b.txt": "gamma", "c.txt": "delta\nepsilon"}
    pipeline = Pipeline(milvus_spec(tmp_path, docs), allowed_modules=PLUGINS)
    try:
        first = pipeline.ingest()
        assert first.ok and first.changes.added == 3 and pipeline.store.count() == 5
        again = pipeline.reindex()
        assert again.documents_seen == 0 and (again.changes.unchanged, again.changes.updated) == (3, 0)
        pipeline.spec.sources[0].config.documents["b.txt"] = "gamma\nzeta"
        pipeline._components.pop("sources")
        edited = pipeline.reindex()
        assert edited.documents_seen == 1 and (edited.changes.updated, edited.changes.unchanged) == (1, 2)
        assert pipeline.store.count() == 6
        assert sorted(pipeline.store.chunk_ids_by_source()) == ["mem/a.txt", "mem/b.txt", "mem/c.txt"]
    finally:
        pipeline.close()


def write_texts(folder: Path) -> None:
    folder.mkdir()
    topics = ["solar panels", "river deltas", "sourdough bread", "chess openings", "glacier retreat"]
    for i, topic in enumerate(topics):
        paragraphs = [
            f"{topic.title()} note {i}.{j}: {topic} are discussed here in plain words, sentence {j}." * 3
            for j in range(3)
        ]
        (folder / f"{i}-{topic.replace(' ', '-')}.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")


def real_spec(docs: Path, index: Path, runner_type: str) -> dict:
    return {
        "name": "real",
        "stages": {
            "source": {"type": "local", "path": str(docs), "include": ["*.txt"]},
            "parser": {"type": "unstructured"},
            "chunker": {"type": "recursive", "chunk_size": 300, "chunk_overlap": 30},
            "embedder": {"type": "huggingface", "model": "all-MiniLM-L6-v2"},
            "store": {"type": "milvus", "uri": str(index), "collection": "docs"},
        },
        "runner": {"type": runner_type, "progress": "never", "failures_file": ""},
    }


def test_real_files_give_the_same_index_as_the_local_runner(tmp_path):
    """.txt files -> unstructured -> recursive -> shipped MiniLM -> Milvus Lite, once per runner."""
    docs = tmp_path / "docs"
    write_texts(docs)
    results = {}
    for runner_type in ("local", "ray"):
        with Pipeline(real_spec(docs, tmp_path / f"{runner_type}.db", runner_type)) as pipeline:
            summary = pipeline.ingest()
            assert summary.ok, summary.format()
            hits = pipeline.query("how are glaciers changing?", top_k=5, mode="dense").hits
            results[runner_type] = (
                summary.chunks_written,
                pipeline.store.chunk_ids_by_source(),
                [(h.id, round(h.score, 4)) for h in hits],
            )
    assert results["ray"][0] == results["local"][0] > 5
    assert {s: sorted(ids) for s, ids in results["ray"][1].items()} == {
        s: sorted(ids) for s, ids in results["local"][1].items()
    }
    assert results["ray"][2] == results["local"][2]


def test_missing_ray_is_reported_by_validate_and_ingest(tmp_path, monkeypatch, capsys):
    from pipeline.cli import EXIT_BAD_SPEC, main

    monkeypatch.setitem(sys.modules, "ray", None)  # what an install without the extra looks like
    monkeypatch.setitem(sys.modules, "ray.data", None)
    assert runner_problems(RunnerConfig(type="ray")) == [RAY_EXTRA_HINT] and runner_problems(RunnerConfig()) == []
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(plugin_spec({"a.txt": "one"})))
    assert main(["validate", str(path), "--allow-module", "tests.plugins"]) == EXIT_BAD_SPEC
    assert f"spec.yaml: runner: {RAY_EXTRA_HINT}" in capsys.readouterr().err
    with pytest.raises(MissingDependencyError, match=r"runner type ray needs the ray extra: pip install '\.\[ray\]'"):
        Pipeline(plugin_spec({"a.txt": "one"}), allowed_modules=PLUGINS).ingest()


def test_runner_settings_are_checked_and_round_trip():
    spec = parse_spec(plugin_spec({}, ray={"embed_actors": 2, "parse_batch_size": 4}), allowed_modules=PLUGINS)
    assert spec.to_dict()["runner"]["type"] == "ray"
    assert spec.to_dict()["runner"]["ray"] == {"embed_actors": 2, "parse_batch_size": 4}
    with pytest.raises(SpecError, match="runner.ray settings apply only with runner type: ray"):
        parse_spec(plugin_spec({}, "local", ray={"embed_actors": 2}), allowed_modules=PLUGINS)
    with pytest.raises(SpecError, match="num_cpus sizes a local instance"):
        parse_spec(plugin_spec({}, ray={"address": "ray://head:10001", "num_cpus": 4}), allowed_modules=PLUGINS)
    with pytest.raises(SpecError, match=r"runner.ray.workers: unknown key"):
        parse_spec(plugin_spec({}, ray={"workers": 4}), allowed_modules=PLUGINS)


def test_cluster_plan_gives_one_embed_actor_per_gpu_when_the_embedder_can_use_one():
    from embedders.huggingface import HuggingFaceEmbedder

    gpu_node = {"CPU": 16.0, "GPU": 4.0}
    assert ClusterPlan.for_cluster(RaySettings(), gpu_node, HuggingFaceEmbedder()) == ClusterPlan(4, 1.0, 12)
    assert ClusterPlan.for_cluster(RaySettings(), gpu_node, HuggingFaceEmbedder(device="cpu")) == ClusterPlan(
        1, 0.0, 15
    )
    assert ClusterPlan.for_cluster(RaySettings(), gpu_node, HashEmbedder()) == ClusterPlan(1, 0.0, 15)
    shared = RaySettings(gpus_per_actor=0.5, parse_concurrency=3)
    assert ClusterPlan.for_cluster(shared, gpu_node, HuggingFaceEmbedder()) == ClusterPlan(8, 0.5, 3)
    assert ClusterPlan.for_cluster(RaySettings(), {"CPU": 2.0}, HuggingFaceEmbedder()) == ClusterPlan(1, 0.0, 1)
    with pytest.raises(ValueError, match="need 2 GPUs; the cluster has 0"):
        ClusterPlan.for_cluster(RaySettings(embed_actors=2, gpus_per_actor=1), {"CPU": 8.0}, HuggingFaceEmbedder())
    with pytest.raises(ValueError, match="one parse task need 3 CPUs; the cluster has 2"):
        ClusterPlan.for_cluster(RaySettings(embed_cpus=2), {"CPU": 2.0}, HashEmbedder())


def test_notes_of_several_embed_actors_are_kept_apart():
    notes = EmbedderNotes()
    for actor, said in [("a", ["1 text truncated"]), ("b", []), ("a", ["3 texts truncated"])]:
        notes.update(EmbeddedBatch([], [], BatchLedger(), actor, said))
    assert notes.merged() == ["3 texts truncated"]
    notes.update(EmbeddedBatch([], [], BatchLedger(), "b", ["2 texts truncated"]))
    assert notes.merged() == ["embed actor 1: 3 texts truncated", "embed actor 2: 2 texts truncated"]


def test_truncation_counts_of_several_embed_actors_add_up():
    notes = EmbedderNotes()
    assert notes.truncated() is None  # no actor has reported
    for actor, count in [("a", 1), ("b", None), ("a", 3), ("b", 2)]:
        notes.update(EmbeddedBatch([], [], BatchLedger(), actor, [], truncated=count))
    assert notes.truncated() == 5  # each actor's latest count (its run so far), summed


def test_a_ray_run_has_the_local_runners_metrics_and_a_span_per_batch_with_the_actors_steps(tmp_path):
    prometheus_client = pytest.importorskip("prometheus_client")
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter, provider = InMemorySpanExporter(), TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = prometheus_client.CollectorRegistry()
    docs = {"a.txt": "alpha\nbeta", "b.txt": "gamma", "bad.txt": "<corrupt>"}
    spec = milvus_spec(tmp_path, docs, batch_size=8, ray={"parse_batch_size": 8})
    with Pipeline(spec, allowed_modules=PLUGINS, metrics_registry=registry, tracer_provider=provider) as pipeline:
        summary = pipeline.ingest()
    assert (summary.documents_seen, summary.documents_indexed, summary.chunks_written) == (3, 2, 3)
    seen = registry.get_sample_value("rag_documents_seen_total", {"collection": "docs"})
    chunks = registry.get_sample_value("rag_chunks_written_total", {"collection": "docs"})
    failed = registry.get_sample_value(
        "rag_documents_failed_total", {"collection": "docs", "stage": "parse", "reason": "refused"}
    )
    assert (seen, chunks, failed) == (3, 3, 1)
    spans = exporter.get_finished_spans()
    (run,) = [s for s in spans if s.name == "rag.run"]
    assert run.attributes["rag.runner"] == "ray" and run.attributes["rag.documents.indexed"] == 2
    batches = [s for s in spans if s.name == "rag.batch"]
    assert batches and all(b.parent.span_id == run.context.span_id and b.attributes["rag.ray.actor"] for b in batches)
    # The embed actor's steps, timed there, come back as spans under the batch that carried them.
    embeds = [s for s in spans if s.name == "rag.embed"]
    assert {e.parent.span_id for e in embeds} <= {b.context.span_id for b in batches}
    assert sum(e.attributes["rag.chunks"] for e in embeds) == 3 and all(e.end_time >= e.start_time for e in embeds)
    provider.shutdown()
