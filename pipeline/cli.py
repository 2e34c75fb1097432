"""Command line: ``python -m pipeline {ingest,validate,schema} ...`` (also installed as ``rag-pipeline``).

Exit codes: 0 success; 1 the run finished but some documents failed; 2 the spec is invalid;
3 the run could not proceed (store unreachable, model missing, collection mismatch).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_BAD_SPEC = 2
EXIT_FATAL = 3


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # Libraries' own chatter (HTTP clients, model loading) stays out of the run log unless asked for.
    for noisy in ("httpx", "urllib3", "transformers", "huggingface_hub", "filelock", "unstructured", "faiss", "milvus_lite", "pymilvus"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)


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
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="Index documents into Milvus for retrieval.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)

    ingest = sub.add_parser("ingest", help="parse, chunk, embed and write every document the spec's sources list")
    _add_spec_args(ingest)
    ingest.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    ingest.add_argument("--progress", choices=["auto", "always", "never"], help="override runner.progress")

    validate = sub.add_parser("validate", help="check a spec (and the existing collection) without running it")
    _add_spec_args(validate)

    sub.add_parser("schema", help="print the JSON Schema of the spec format")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    from pipeline.errors import SpecError

    try:
        if args.command == "schema":
            from pipeline.spec import json_schema

            print(json.dumps(json_schema(), indent=2))
            return EXIT_OK
        from pipeline.pipeline import Pipeline

        pipeline = Pipeline.from_yaml(args.spec, allowed_modules=args.allow_module)
    except SpecError as exc:
        print(f"invalid spec:\n{exc}", file=sys.stderr)
        return EXIT_BAD_SPEC

    with pipeline:
        if args.command == "validate":
            problems = pipeline.validate()
            for problem in problems:
                print(f"{args.spec}: {problem}", file=sys.stderr)
            if not problems:
                print(f"{args.spec}: ok")
            return EXIT_BAD_SPEC if problems else EXIT_OK

        if args.progress:
            pipeline.spec.runner.progress = args.progress
        try:
            summary = pipeline.ingest()
        except Exception as exc:  # the run could not start or continue at all
            logging.getLogger("rag_pipeline").debug("run aborted", exc_info=True)
            print(f"ingest aborted: {exc}", file=sys.stderr)
            return EXIT_FATAL
        if args.json:
            print(json.dumps(summary.to_dict(), indent=2, ensure_ascii=False))
        else:
            print(summary.format())
        return EXIT_OK if summary.ok else EXIT_PARTIAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
