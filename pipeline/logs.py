"""Log set-up shared by the command line and the service example: plain text lines, or one JSON object per line.

JSON lines are for log shippers (Loki, Elasticsearch, Cloud Logging) that index fields rather than
parse text: each record carries its time, level, logger and message, the traceback when there is
one, and the trace and span ids of the OpenTelemetry span active when it was logged, so a log line
leads to its trace; Python's warnings are logged too (logger ``py.warnings``), so that stderr holds
nothing else. Every handler gets the secrets filter (:mod:`core.secrets`), which scrubs the message
and traceback before either formatter sees them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone
from typing import Literal

from core.secrets import install_log_filter

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Libraries' own chatter (HTTP clients, model loading) stays out of the run log unless asked for.
NOISY_LOGGERS = (
    "httpx",
    "urllib3",
    "transformers",
    "huggingface_hub",
    "filelock",
    "unstructured",
    "faiss",
    "milvus_lite",
    "pymilvus",
    "botocore",
    "aiobotocore",
    "s3fs",
    "fsspec",
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, and
    ``exception``, ``trace_id``, ``span_id`` when there are some."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        entry.update(_trace_ids())
        return json.dumps(entry, ensure_ascii=False, default=str)


def _trace_ids() -> dict[str, str]:
    """The active span's ids in W3C hex form; none without OpenTelemetry or outside a span."""
    try:
        from opentelemetry import trace
    except ImportError:
        return {}
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}


def formatter(log_format: LogFormat) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(level: int, log_format: LogFormat = "text", *, verbose: bool = False) -> None:
    """Log to stderr at ``level`` in ``log_format``, through the secrets filter, libraries kept to
    warnings unless ``verbose``. As :func:`logging.basicConfig`, it leaves a root logger that already
    has handlers (a host program's, pytest's) as it is, apart from adding the filter."""
    if not verbose:
        # Milvus Lite's embedded gRPC server turns down the client's keepalive pings and gRPC's C
        # core prints each refusal to stderr; real failures still arrive as Python exceptions.
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    logging.basicConfig(level=level, handlers=[handler])
    if log_format == "json":
        # Python's warnings print straight to stderr otherwise: a line no log shipper could read.
        logging.captureWarnings(True)
    # Every record any logger emits, at DEBUG too, with its traceback: a library or a server's
    # answer quoted in a message may hold a credential in some encoding (core.secrets).
    install_log_filter()
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
