"""Ingest throughput on SciFact: the whole pipeline versus the pure model time for the same chunks.

    python benchmarks/ingest_throughput.py [--limit N] [--datasets DIR] [--runner local|ray|local,ray]
        [--ray-embed-actors N] [--telemetry off|on|off,on] [--repeat N]

Writes SciFact's abstracts (title + text, as BEIR joins them) to a folder of .txt files, ingests
it into a fresh Milvus Lite index with the spec below (local source -> unstructured parser ->
recursive chunker -> packaged all-MiniLM-L6-v2 -> Milvus Lite), then embeds the same chunk texts by
calling the encoder directly (tokenizer + model forward + pooling, the best of several batchings:
length-sorted batches of 16 to 128 texts, or token-sorted batches under a budget of 2,048 to 8,192
padded tokens) in the same process. Prints documents/s and chunks/s per stage and
``pipeline X s vs pure model time Y s: ratio Z``.

``--runner local,ray`` ingests with each runner in turn (each into its own fresh index), then
times the pure model once, so both ratios share one baseline. ``--runner ray`` runs the same spec
on a local Ray instance (or the cluster in RAY_ADDRESS). Ray is started before the clock starts (a
cluster is normally up already) and its start time is printed apart; the actors' and tasks'
start-up in each run is part of the pipeline time. Ray gives an actor as many torch threads as CPUs
it reserves (OMP_NUM_THREADS), so the spec sets the embedder's ``num_threads`` to the thread count
the pure model timing uses, in both runners.

``--telemetry off,on`` ingests with each runner twice, without and with the instrumentation of
:mod:`pipeline.telemetry`: Prometheus metrics kept in a registry and written as a node-exporter
textfile after the run (``runner.metrics.textfile``), and OpenTelemetry spans recorded by the SDK
through a batch span processor into an in-memory exporter (what an OTLP export does, short of the
network). It prints ``telemetry on X s vs off Y s: ratio Z`` for the wall time and for the CPU time (this
process's threads and the parser workers it reaped during the run), the steadier of the two on a
machine other work shares. An untimed ingest runs first, so that neither variant pays the first
run's costs (lazy imports, a cold file cache); ``--repeat N`` runs the pair N times, in alternating
order (off, on, on, off, ...) so that a drift in the machine's load falls on both, and the ratios
are of the summed times; the spread between repeats shows the noise.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline import Pipeline  # noqa: E402


def write_corpus(corpus: Path, folder: Path, limit: int | None) -> int:
    count = 0
    with corpus.open(encoding="utf-8") as lines:
        for line in lines:
            if limit is not None and count >= limit:
                break
            record = json.loads(line)
            text = f"{record['title']}\n\n{record['text']}".strip()
            (folder / f"{record['_id']}.txt").write_text(text, encoding="utf-8")
            count += 1
    return count


def scifact_folder_spec(name: str, docs: Path, index: Path, runner: dict) -> dict:
    """The benchmarks' spec: SciFact .txt files -> unstructured -> recursive 1000/100 -> MiniLM -> Milvus Lite."""
    return {
        "name": name,
        "stages": {
            "source": {"type": "local", "path": str(docs), "include": ["*.txt"]},
            "parser": {"type": "unstructured"},
            "chunker": {"type": "recursive", "chunk_size": 1000, "chunk_overlap": 100},
            "embedder": {"type": "huggingface", "model": "all-MiniLM-L6-v2"},
            "store": {"type": "milvus", "uri": str(index), "collection": "scifact"},
        },
        "runner": {"progress": "never", "failures_file": "", **runner},
    }


def pure_model_seconds(texts: list[str], batch_sizes: list[int], token_budgets: list[int]) -> tuple[float, str]:
    """Fastest time to embed ``texts`` with the bare encoder, and the batching that gave it.

    Candidates: length-sorted batches of a fixed number of texts, and batches sorted by token
    count under a padded-token budget (up to 64 texts, the way the embedder batches on a CPU;
    counting the tokens is part of the time).
    """
    import torch

    from core.models import load_encoder, resolve_model_path
    from embedders.huggingface import token_budget_batches
    from embedders.pooling import mean_pool

    tokenizer, model = load_encoder(resolve_model_path("all-MiniLM-L6-v2"))

    def fixed(size: int) -> Callable[[list[str]], list[list[str]]]:
        def plan(items: list[str]) -> list[list[str]]:
            ordered = sorted(items, key=len)
            return [ordered[i : i + size] for i in range(0, len(ordered), size)]

        return plan

    def budget(tokens: int) -> Callable[[list[str]], list[list[str]]]:
        def plan(items: list[str]) -> list[list[str]]:
            lengths = [len(ids) for ids in tokenizer(items, truncation=True, max_length=256)["input_ids"]]
            return [[items[i] for i in group] for group in token_budget_batches(lengths, 64, tokens)]

        return plan

    plans = {f"{size} texts": fixed(size) for size in batch_sizes} | {
        f"<= {tokens} tokens": budget(tokens) for tokens in token_budgets
    }

    def run(plan: Callable[[list[str]], list[list[str]]], items: list[str]) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            for texts_of_batch in plan(items):
                batch = tokenizer(texts_of_batch, padding=True, truncation=True, max_length=256, return_tensors="pt")
                pooled = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
                torch.nn.functional.normalize(pooled, dim=-1)
        return time.perf_counter() - started

    # Choose the batching on an evenly spread sample, then time the full set with it.
    sample = sorted(texts, key=len)[:: max(1, len(texts) // 600)]
    best = min(plans, key=lambda name: run(plans[name], sample))
    return run(plans[best], texts), best


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def runner_settings(runner: str, args: argparse.Namespace) -> dict:
    settings: dict = {"batch_size": args.batch_size, "parse_workers": args.parse_workers}
    if runner == "ray":
        settings["type"] = "ray"
        if args.ray_embed_actors is not None:
            settings["ray"] = {"embed_actors": args.ray_embed_actors}
    return settings


def start_ray(spec: dict) -> float:
    """Start (or attach to) Ray the way the runner would, before the timed run; returns the seconds it took."""
    from pipeline.ray_runner import connect, import_ray
    from pipeline.spec import RunnerConfig

    started = time.perf_counter()
    connect(import_ray(), RunnerConfig.model_validate(spec["runner"]).ray)
    return time.perf_counter() - started


def cpu_seconds() -> float:
    """CPU time of this process (every thread) and of its children waited for so far (parser workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def telemetry_options(enabled: bool, tmp_path: Path, spec: dict) -> dict:
    """Pipeline keyword arguments (and the spec's metrics textfile) for a run with or without instrumentation."""
    if not enabled:
        return {}
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from prometheus_client import CollectorRegistry

    spec["runner"]["metrics"] = {"textfile": str(tmp_path / "metrics" / "ingest.prom")}
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(InMemorySpanExporter()))
    return {"metrics_registry": CollectorRegistry(), "tracer_provider": provider}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--datasets",
        type=Path,
        default=Path(os.environ.get("RAG_PIPELINE_DATASETS", ROOT.parent / "shared" / "datasets")),
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N abstracts")
    parser.add_argument("--parse-workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256, help="documents per pipeline batch")
    parser.add_argument(
        "--runner", default="local", help="which runners ingest, one after the other: local, ray or local,ray"
    )
    parser.add_argument(
        "--ray-embed-actors", type=int, default=None, help="embed actors of the Ray runner (default: its own choice)"
    )
    parser.add_argument(
        "--telemetry", default="off", help="each runner without (off) and/or with (on) metrics and tracing: off,on"
    )
    parser.add_argument("--repeat", type=int, default=1, help="run the whole sequence N times, interleaved")
    args = parser.parse_args()

    corpus = args.datasets / "scifact" / "corpus.jsonl"
    if not corpus.is_file():
        print(f"SciFact not found at {corpus}; set --datasets or RAG_PIPELINE_DATASETS")
        return

    runners = [name.strip() for name in args.runner.split(",") if name.strip()]
    unknown = sorted(set(runners) - {"local", "ray"})
    if unknown or not runners:
        parser.error(f"--runner takes local, ray or local,ray, not {args.runner!r}")
    variants = [name.strip() for name in args.telemetry.split(",") if name.strip()]
    if not variants or set(variants) - {"off", "on"}:
        parser.error(f"--telemetry takes off, on or off,on, not {args.telemetry!r}")
    if len(variants) == 2:  # alternate the order of the pair: off, on, then on, off ...
        orders = [variants if repeat % 2 == 0 else variants[::-1] for repeat in range(args.repeat)]
    else:
        orders = [variants] * args.repeat
    plan = [(runner, variant == "on") for order in orders for runner in runners for variant in order]

    runs: list[tuple[str, float, object, float | None]] = []  # run name, seconds, summary, Ray start-up
    cpu: dict[str, list[float]] = {}  # run name -> CPU seconds of each of its runs
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        tmp_path = Path(tmp)
        docs = tmp_path / "scifact"
        docs.mkdir()
        n_docs = write_corpus(corpus, docs, args.limit)
        if len(variants) == 2:
            warm_up = scifact_folder_spec("ingest-bench", docs, tmp_path / "warm-up.db", runner_settings("local", args))
            with Pipeline(warm_up, base_dir=tmp_path) as pipeline:
                pipeline.ingest()
        for number, (runner, instrumented) in enumerate(plan):
            name = f"{runner}+telemetry" if instrumented else runner
            index = tmp_path / f"{runner}-{number}.db"
            spec = scifact_folder_spec("ingest-bench", docs, index, runner_settings(runner, args))
            spec["stages"]["embedder"]["num_threads"] = torch_threads()
            pipeline = Pipeline(spec, base_dir=tmp_path, **telemetry_options(instrumented, tmp_path, spec))
            ray_start_seconds = start_ray(spec) if runner == "ray" else None
            started, cpu_started = time.perf_counter(), cpu_seconds()
            summary = pipeline.ingest()
            seconds = time.perf_counter() - started
            cpu.setdefault(name, []).append(cpu_seconds() - cpu_started)
            assert summary.documents_failed == 0, summary.format()
            runs.append((name, seconds, summary, ray_start_seconds))
            print(f"{name}: {seconds:.1f} s (CPU {cpu[name][-1]:.1f} s)", flush=True)
            if number != len(plan) - 1:
                pipeline.close()
        if "ray" in runners:  # its idle daemons take a few percent of the CPU the pure model timing needs
            import ray

            ray.shutdown()

        # The same chunk texts, produced again (untimed) by the same parser and chunker.
        from pipeline.parse_pool import parse_one

        texts = []
        for ref in pipeline.sources[0].list():
            parsed, error = parse_one(pipeline.parser, pipeline.sources[0].load(ref))
            texts.extend(c.text for c in pipeline.chunker.chunk(parsed))
        assert all(len(texts) == summary.chunks_written for _, _, summary, _ in runs), (
            len(texts),
            [r[2].chunks_written for r in runs],
        )
        model_seconds, best_batching = pure_model_seconds(texts, [16, 32, 64, 128], [2048, 4096, 8192])
        pipeline.close()

    print(
        f"corpus: SciFact, {n_docs} documents, {len(texts)} chunks (recursive 1000/100), all-MiniLM-L6-v2, Milvus Lite"
    )
    print(
        f"cpu threads: torch {torch_threads()}, cores {os.cpu_count()}; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    for runner, seconds, summary, ray_start_seconds in runs:
        print(
            f"runner: {runner}"
            + (
                f" (Ray started in {ray_start_seconds:.1f} s before the clock; not counted)"
                if ray_start_seconds is not None
                else ""
            )
        )
        for stage, stage_seconds in summary.stage_seconds.items():
            rate = (
                f"{n_docs / stage_seconds:.0f} documents/s, {summary.chunks_written / stage_seconds:.0f} chunks/s"
                if stage_seconds
                else "-"
            )
            print(f"  {stage:<11} {stage_seconds:7.1f} s  ({rate})")
        print(f"  whole run: {n_docs / seconds:.1f} documents/s, {summary.chunks_written / seconds:.1f} chunks/s")
    for runner, seconds, _, _ in runs:
        print(
            f"{runner} pipeline {seconds:.1f} s vs pure model time {model_seconds:.1f} s (batches of {best_batching}): "
            f"ratio {seconds / model_seconds:.2f}"
        )
    if len(variants) == 2:
        for runner in runners:
            on = [seconds for name, seconds, _, _ in runs if name == f"{runner}+telemetry"]
            off = [seconds for name, seconds, _, _ in runs if name == runner]
            for what, on_times, off_times in (
                ("wall", on, off),
                ("CPU", cpu[f"{runner}+telemetry"], cpu[runner]),
            ):
                print(
                    f"{runner}: telemetry on {sum(on_times):.1f} s vs off {sum(off_times):.1f} s {what} time over "
                    f"{args.repeat} run(s) each: ratio {sum(on_times) / sum(off_times):.3f} "
                    f"(on {' '.join(f'{s:.1f}' for s in on_times)}; off {' '.join(f'{s:.1f}' for s in off_times)})"
                )


if __name__ == "__main__":
    main()
