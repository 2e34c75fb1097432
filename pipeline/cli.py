"""Command line: ``python -m pipeline {ingest,reindex,reconcile,status,validate,schema,query,eval} ...``
(also installed as ``rag-pipeline``).

Exit codes: 0 success; 1 the run finished but some documents failed; 2 the spec (or for query and
eval: a filter, mode or dataset) is invalid; 3 the run could not proceed (store unreachable, model
missing, collection mismatch, nothing ingested yet); 4 ingest/reindex/reconcile/status: another run holds
the collection's lock (or the Milvus Lite database is open in another process).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from core.secrets import scrub
from pipeline.logs import LOG_FORMATS, LogFormat, configure_logging

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_BAD_SPEC = 2
EXIT_FATAL = 3
EXIT_LOCK_HELD = 4  # ingest, reindex, reconcile: another run holds the collection's lock
DEFAULT_LOCK_TTL_S = 300.0  # pipeline.lease.DEFAULT_TTL_S, without importing the lease to build the parser
LOCK_TTL_HELP = (
    "how long the re-index lock of a run on another machine outlives its last heartbeat "
    "(a run that died on this machine frees it at once)"
)


def _configure_logging(verbose: bool, quiet: bool, log_format: LogFormat) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    configure_logging(level, log_format, verbose=verbose)


def _start_tracing() -> Callable[[], None] | None:
    """Export spans as the OTEL_* variables say (pipeline.telemetry); a tracing set-up that fails is
    logged and the command runs untraced."""
    from pipeline.telemetry import configure_tracing_from_env

    try:
        return configure_tracing_from_env()
    except Exception as exc:
        logging.getLogger("rag_pipeline").warning("tracing is off: %s", exc)
        return None


def _add_spec_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="path to the YAML spec")
    parser.add_argument(
        "--allow-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="allow the spec to name components by import path under MODULE (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline", description="Index documents into Milvus for retrieval."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="text lines, or one JSON object per line (time, level, logger, message, trace and span ids) on stderr",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    ingest = sub.add_parser("ingest", help="parse, chunk, embed and write every document the spec's sources list")
    _add_spec_args(ingest)
    ingest.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    ingest.add_argument("--progress", choices=["auto", "always", "never"], help="override runner.progress")
    ingest.add_argument("--lock-ttl", type=float, default=DEFAULT_LOCK_TTL_S, metavar="SECONDS", help=LOCK_TTL_HELP)

    validate = sub.add_parser("validate", help="check a spec (and the existing collection) without running it")
    _add_spec_args(validate)
    validate.add_argument(
        "--for",
        dest="purpose",
        choices=["ingest", "eval"],
        default="ingest",
        help="what the spec is for: eval replaces the spec's sources with the dataset, so they are not checked",
    )

    sub.add_parser("schema", help="print the JSON Schema of the spec format")

    reindex = sub.add_parser(
        "reindex", help="bring the index up to the sources: skip unchanged, redo changed, drop removed"
    )
    _add_spec_args(reindex)
    reindex.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    reindex.add_argument("--progress", choices=["auto", "always", "never"], help="override runner.progress")
    reindex.add_argument("--schedule", metavar="CRON", help='keep running, once per cron time, e.g. "*/30 * * * *"')
    reindex.add_argument(
        "--full-rebuild",
        action="store_true",
        help="build a new collection from scratch, then switch the collection name (an alias) to it; queries never "
        "see a half-built index",
    )
    reindex.add_argument("--lock-ttl", type=float, default=DEFAULT_LOCK_TTL_S, metavar="SECONDS", help=LOCK_TTL_HELP)

    reconcile = sub.add_parser(
        "reconcile", help="compare the index record with the collection's chunks, repair drift, then reindex"
    )
    _add_spec_args(reconcile)
    reconcile.add_argument("--dry-run", action="store_true", help="only report the drift")
    reconcile.add_argument("--lock-ttl", type=float, default=DEFAULT_LOCK_TTL_S, metavar="SECONDS", help=LOCK_TTL_HELP)

    status = sub.add_parser("status", help="show the index record: sources by status, the last run, failures")
    _add_spec_args(status)

    query = sub.add_parser("query", help="retrieve the best chunks for a question from the spec's collection")
    _add_spec_args(query)
    query.add_argument("text", help="the question")
    query.add_argument("-k", "--top-k", type=int, help="results to return (default: query.top_k)")
    query.add_argument(
        "--mode", choices=["auto", "dense", "bm25", "sparse", "hybrid"], help="retrieval mode (default: query.mode)"
    )
    query.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="restrict results; VALUE is JSON or a plain string, e.g. source_id=docs/a.md, "
        'page=\'{"gte": 2, "lte": 5}\', '
        "media_type='[\"application/pdf\"]' (repeatable, all must hold)",
    )
    query.add_argument("--no-rerank", action="store_true", help="skip the spec's reranker")
    query.add_argument(
        "--collection",
        help="search this collection instead of the spec's (e.g. the <collection>_beir_<dataset> that eval built)",
    )
    query.add_argument("--snippet", type=int, default=100, metavar="CHARS", help="snippet length in the table")
    query.add_argument("--json", action="store_true", help="print the full result as JSON")

    evaluate = sub.add_parser(
        "eval",
        help="ingest a BEIR dataset, or a corpus with questions and reference excerpts, with the spec's stages and "
        "measure each retrieval mode",
    )
    _add_spec_args(evaluate)
    dataset = evaluate.add_mutually_exclusive_group(required=True)
    dataset.add_argument("--beir", metavar="DIR", help="folder with corpus.jsonl, queries.jsonl and qrels/<split>.tsv")
    dataset.add_argument(
        "--excerpts",
        metavar="FILE",
        help="questions with reference excerpts as character spans (CSV: question, references, corpus_id; or JSONL "
        "with those keys), measured by span recall, precision and IoU; needs --corpus",
    )
    evaluate.add_argument("--corpus", metavar="DIR", help="with --excerpts: the folder of corpus files (<corpus_id>.*)")
    evaluate.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=[5, 10],
        metavar="K",
        help="with --excerpts: chunks retrieved per question (default: 5 10)",
    )
    evaluate.add_argument("--split", default="test", help="qrels split (default: test)")
    evaluate.add_argument(
        "--modes", help="comma-separated: dense, bm25, sparse, hybrid, <mode>+rerank (default: all the spec supports)"
    )
    evaluate.add_argument("--collection", help="collection to ingest into (default: <store collection>_beir_<dataset>)")
    evaluate.add_argument(
        "--reuse-index", action="store_true", help="skip the ingest when the collection already holds chunks"
    )
    evaluate.add_argument("--max-queries", type=int, help="evaluate only the first N judged queries")
    evaluate.add_argument(
        "--measures",
        nargs="+",
        metavar="MEASURE",
        help="ir-measures names, e.g. nDCG@10 R@100 P@5 MAP (default: nDCG@10 R@10 R@100 RR@10)",
    )
    evaluate.add_argument(
        "--protocol",
        choices=["chunks", "documents"],
        default="chunks",
        help="chunks: the spec's chunker cuts each document, which scores as its best chunk (default); documents: "
        "each document is one chunk, cut to the model's window, as published BEIR tables are measured",
    )
    evaluate.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    evaluate.add_argument(
        "--tune-fusion",
        nargs="?",
        const="auto",
        metavar="SPLIT",
        help="fit the hybrid fusion method and weights on a train/dev split (never test; default: train with dev "
        "held out, or one split cut into halves), report held-out nDCG@10 and print the spec lines to use",
    )
    return parser


def _parse_filters(items: Sequence[str]) -> dict[str, object]:
    filters: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--filter {item!r}: expected KEY=VALUE")
        try:
            filters[key] = json.loads(raw)
        except json.JSONDecodeError:
            filters[key] = raw  # a plain string such as docs/a.md
    return filters


def _run_query(pipeline, args) -> int:  # type: ignore[no-untyped-def]
    from pipeline.query import QueryError, QueryInputError, format_table

    try:
        filters = _parse_filters(args.filter)
        searched = pipeline
        if args.collection:  # the same stages, another collection (e.g. one that eval built)
            from pipeline.pipeline import Pipeline

            searched = Pipeline(pipeline.spec.with_collection(args.collection))
        try:
            rerank = False if args.no_rerank else None
            result = searched.query(args.text, top_k=args.top_k, filters=filters, mode=args.mode, rerank=rerank)
        finally:
            if searched is not pipeline:
                searched.close()
    except (ValueError, QueryInputError) as exc:
        print(scrub(f"query: {exc}"), file=sys.stderr)
        return EXIT_BAD_SPEC
    except QueryError as exc:
        print(scrub(f"query: {exc}"), file=sys.stderr)
        return EXIT_FATAL
    except Exception as exc:  # store unreachable, model missing ...
        logging.getLogger("rag_pipeline").debug("query failed", exc_info=True)
        print(scrub(f"query failed: {exc}"), file=sys.stderr)
        return EXIT_FATAL
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(format_table(result, args.snippet))
    return EXIT_OK


def _run_eval(pipeline, args) -> int:  # type: ignore[no-untyped-def]
    from pathlib import Path

    from pipeline.evaluate import EvaluationError
    from pipeline.fusion_tuning import tune_fusion

    modes = [m.strip() for m in args.modes.split(",") if m.strip()] if args.modes else None
    progress = None if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    if args.corpus and not args.excerpts:
        print("eval: --corpus goes with --excerpts (a BEIR folder holds its own corpus.jsonl)", file=sys.stderr)
        return EXIT_BAD_SPEC
    what = "eval"
    if args.excerpts:
        if not args.corpus:
            print(
                "eval: --excerpts needs --corpus DIR, the folder of the corpus files the questions name",
                file=sys.stderr,
            )
            return EXIT_BAD_SPEC
        action: Callable[[], Any] = lambda: pipeline.evaluate_excerpts(  # noqa: E731
            args.excerpts,
            args.corpus,
            modes=modes,
            ks=args.k,
            collection=args.collection,
            reuse_index=args.reuse_index,
            max_queries=args.max_queries,
            progress=progress,
        )
    elif args.tune_fusion:
        what = "eval --tune-fusion"
        action = lambda: tune_fusion(  # noqa: E731
            pipeline.spec,
            Path(args.beir),
            split=args.tune_fusion,
            collection=args.collection,
            reuse_index=args.reuse_index,
            max_queries=args.max_queries,
            protocol=args.protocol,
            progress=progress,
        )
    else:
        action = lambda: pipeline.evaluate(  # noqa: E731
            Path(args.beir),
            split=args.split,
            modes=modes,
            collection=args.collection,
            reuse_index=args.reuse_index,
            max_queries=args.max_queries,
            measures=args.measures,
            protocol=args.protocol,
            progress=progress,
        )
    try:
        report = action()
    except EvaluationError as exc:
        print(scrub(f"eval: {exc}"), file=sys.stderr)
        return EXIT_BAD_SPEC
    except Exception as exc:
        logging.getLogger("rag_pipeline").debug("%s failed", what, exc_info=True)
        print(scrub(f"{what} failed: {exc}"), file=sys.stderr)
        return EXIT_FATAL
    print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if args.json else report.format())
    if args.tune_fusion:  # a fit that ran is a result, whatever its ingest notes say
        return EXIT_OK
    return EXIT_PARTIAL if any("failed to ingest" in note for note in report.notes) else EXIT_OK


def _under_lock(command: str, action: Callable[[], int]) -> int:
    """Run ``action``, the work of a command that takes the re-index lock: another live run holding
    the lock is exit 4 ("<command> skipped"), anything else that stops it exit 3 ("<command> aborted")."""
    from core.errors import is_lock_conflict

    try:
        return action()
    except Exception as exc:
        if is_lock_conflict(exc):
            print(scrub(f"{command} skipped: {exc}"), file=sys.stderr)
            return EXIT_LOCK_HELD
        logging.getLogger("rag_pipeline").debug("%s aborted", command, exc_info=True)
        print(scrub(f"{command} aborted: {exc}"), file=sys.stderr)
        return EXIT_FATAL


def _print_summary(summary, as_json: bool) -> int:  # type: ignore[no-untyped-def]
    print(json.dumps(summary.to_dict(), indent=2, ensure_ascii=False) if as_json else summary.format(), flush=True)
    return EXIT_OK if summary.ok else EXIT_PARTIAL


def _run_reindex(pipeline, args) -> int:  # type: ignore[no-untyped-def]
    from pipeline.reindex_job import run_on_schedule

    def once() -> int:
        with pipeline.lease(args.lock_ttl) as lease:
            rebuild = pipeline.full_rebuild if args.full_rebuild else pipeline.reindex
            summary = rebuild(lease=lease)
        return _print_summary(summary, args.json)

    if not args.schedule:
        return _under_lock("reindex", once)
    try:
        return run_on_schedule(args.schedule, lambda: _under_lock("reindex", once))
    except ValueError as exc:
        print(f"reindex: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    except KeyboardInterrupt:
        return EXIT_OK


def _run_reconcile(pipeline, args) -> int:  # type: ignore[no-untyped-def]
    def reconcile() -> int:
        if args.dry_run:
            print(pipeline.reconcile(repair=False).format(), flush=True)
            return EXIT_OK
        with pipeline.lease(args.lock_ttl) as lease:
            report = pipeline.reconcile(lease=lease)
            print(report.format(), flush=True)
            if report.clean:
                return EXIT_OK
            summary = pipeline.reindex(lease=lease)  # redo what was marked, under the same lock
        return _print_summary(summary, as_json=False)

    return _under_lock("reconcile", reconcile)


def _run_status(pipeline) -> int:  # type: ignore[no-untyped-def]
    from core.errors import is_lock_conflict
    from pipeline.reindex_job import format_status

    try:
        record = pipeline.store.index_record()
        if record is None:
            raise TypeError(f"{type(pipeline.store).__name__} keeps no index record")
        print(format_status(record, pipeline.store.lock_claims()))
    except Exception as exc:
        print(scrub(f"status unavailable: {exc}"), file=sys.stderr)
        return EXIT_LOCK_HELD if is_lock_conflict(exc) else EXIT_FATAL
    return EXIT_OK


def _run_ingest(pipeline, args) -> int:  # type: ignore[no-untyped-def]
    def ingest() -> int:
        with pipeline.lease(args.lock_ttl) as lease:
            summary = pipeline.ingest(lease=lease)
        return _print_summary(summary, args.json)

    return _under_lock("ingest", ingest)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose, args.quiet, args.log_format)
    stop_tracing = _start_tracing()
    try:
        return _run_command(args)
    finally:
        if stop_tracing is not None:
            stop_tracing()  # flushes the spans still queued for export


def _run_command(args: argparse.Namespace) -> int:
    from core.errors import SpecError

    try:
        if args.command == "schema":
            from pipeline.spec import json_schema

            print(json.dumps(json_schema(), indent=2))
            return EXIT_OK
        from pipeline.pipeline import Pipeline

        pipeline = Pipeline.from_yaml(args.spec, allowed_modules=args.allow_module)
    except SpecError as exc:
        print(scrub(f"invalid spec:\n{exc}"), file=sys.stderr)
        return EXIT_BAD_SPEC

    with pipeline:
        if args.command == "query":
            return _run_query(pipeline, args)
        if args.command == "eval":
            return _run_eval(pipeline, args)
        if args.command == "validate":
            problems = pipeline.validate(args.purpose)
            for problem in problems:
                print(scrub(f"{args.spec}: {problem}"), file=sys.stderr)
            if problems:
                return EXIT_BAD_SPEC
            for warning in pipeline.validation_warnings(args.purpose):  # worth knowing; the spec still runs
                print(scrub(f"{args.spec}: warning: {warning}"), file=sys.stderr)
            print(f"{args.spec}: ok")
            return EXIT_OK

        if args.command == "status":
            return _run_status(pipeline)
        if args.command == "reconcile":
            return _run_reconcile(pipeline, args)
        if args.progress:
            pipeline.spec.runner.progress = args.progress
        if args.command == "reindex":
            return _run_reindex(pipeline, args)
        return _run_ingest(pipeline, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
