"""Logging set-up for the service and the CLI, and ``clean`` for untrusted text in log lines.

Handlers are configured only here, called by the entry points. Logs go to stderr (journald).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from datetime import UTC, datetime
from typing import TextIO

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean(text: object, limit: int = 120) -> str:
    """Untrusted text (AE titles, error messages) made safe for one log line."""
    s = _CONTROL.sub("?", str(text))
    return s if len(s) <= limit else s[: limit - 3] + "..."


def format_exception(exc: BaseException) -> str:
    """A traceback like ``logging``'s, with each exception's message made safe by ``clean``.

    Exception messages often quote what a peer sent (pynetdicom's "Invalid 'Calling AE Title'
    value ..."); the frames are our code's file names and lines, kept as they are.
    """
    chain: list[tuple[BaseException, str]] = []  # newest first, each with its link to the next
    seen: set[int] = set()
    current: BaseException | None = exc
    link = ""
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, _CONTEXT
        else:
            current = None
    parts: list[str] = []
    for item, link in reversed(chain):
        kind = type(item)
        name = kind.__qualname__ if kind.__module__ == "builtins" else \
            f"{kind.__module__}.{kind.__qualname__}"
        parts.append("Traceback (most recent call last):\n")
        parts += traceback.format_tb(item.__traceback__)
        parts.append(f"{name}: {clean(item, 2000)}\n" if str(item) else f"{name}\n")
        if link:
            parts.append(f"\n{link}\n\n")
    return "".join(parts).rstrip("\n")


_CAUSE = "The above exception was the direct cause of the following exception:"
_CONTEXT = "During handling of the above exception, another exception occurred:"


class SafeText(logging.Filter):
    """Makes every record that reaches a handler safe: no control characters in its message or
    in its exception's messages, wherever the text came from (pynetdicom and pydicom log what
    peers send as it is). A traceback keeps its own line breaks."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = _CONTROL.sub("?", record.getMessage())
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = format_exception(record.exc_info[1])
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(out)


def setup(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Log to ``stream`` (stderr by default) through ``SafeText``, in ``fmt`` text or json."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.addFilter(SafeText())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("pynetdicom", "highdicom", "alembic", "transformers", "PIL"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
