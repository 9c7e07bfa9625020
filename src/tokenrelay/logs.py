"""Logging set-up: the request id on every record, plain or JSON lines.

The request id (the client's ``X-Request-Id`` or a generated one) lives in a contextvar
that the route sets; a filter stamps it on each record, so a line from deep inside a
provider still says which request it belongs to.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
client_name: contextvars.ContextVar[str | None] = contextvars.ContextVar("client_name", default=None)
"""The client key's name (never the key), set by ``access.AccessMiddleware`` when keys are on."""


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        client = client_name.get()
        record.client = client
        record.client_tag = f" client={client}" if client else ""
        return True


class _AbortFilter(logging.Filter):
    """A plain-text stream aborted on purpose (see ``streaming.relay``) is already logged
    as ``failed_midway``; the server's traceback for it is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return type(exc).__name__ != "StreamAborted"


# Control characters (and Unicode's line breaks) in a text log line, as escapes, but for
# LF, which becomes LF and an indent: a record's first line starts with its time, so a CR or
# LF in a model name or a header cannot start a line that reads as a record of its own,
# while a multi-line message (uvicorn logs tracebacks as messages) stays readable.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F) if c not in (0x09, 0x0A)} | {
    c: f"\\u{c:04x}" for c in (0x85, 0x2028, 0x2029)} | {0x0A: "\n    "}


def escape_controls(text: str) -> str:
    # Nearly every line is printable throughout: one scan in C instead of a lookup per character.
    return text if text.isprintable() else text.translate(_ESCAPES)


class _TextFormatter(logging.Formatter):
    """The record's line with control characters escaped (the traceback, appended after
    this by ``format``, is the formatter's own)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            # ISO 8601 in UTC with its offset: log stores parse it as is, from any machine.
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        client = getattr(record, "client", None)
        if client:
            line["client"] = client
        # The request line's values as fields of their own (``streaming.relay._log_request``).
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def setup_logging(level: str = "info", *, json: bool = False) -> None:
    # Every record would otherwise walk the stack for its caller's file and line, and ask
    # for its thread, process id (a system call) and process name: none of which a line
    # here shows. The switches are the logging HOWTO's own ("Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if json:
        handler.setFormatter(_JSONFormatter())
    else:
        handler.setFormatter(
            _TextFormatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]%(client_tag)s %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.error").addFilter(_AbortFilter())
    # One line per request comes from tokenrelay itself; uvicorn's access log repeats it.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
