"""Logging setup: plain lines by default, JSON lines with --log-format json; request ids on both.

One record is one line in either format: the plain format escapes control characters (a newline
in anything a client sent cannot start a line of its own), JSON escapes them by construction.
Tracebacks keep their lines.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import sys
import time

__all__ = ["JsonFormatter", "PlainFormatter", "configure_logging", "one_line"]


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = "-"
        return True


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char)
    return named or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def one_line(text: str) -> str:
    """``text`` with its control characters (newlines included) escaped."""
    return _CONTROL.sub(_escape, text) if _CONTROL.search(text) else text


class PlainFormatter(logging.Formatter):
    """``time level logger [request id] message``, one line per record (but for tracebacks)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        safe = copy.copy(record)  # other handlers see the record as it was
        safe.message = one_line(record.message)
        safe.request_id = one_line(str(getattr(record, "request_id", "-")))
        return super().formatMessage(safe)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(level: str = "info", fmt: str = "plain") -> None:
    """Configures the root logger once, writing to stderr."""
    if fmt not in ("plain", "json"):
        raise ValueError(f"log format must be plain or json, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
