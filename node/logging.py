"""Logging set-up for the service and the CLI, and ``clean`` for untrusted text in log lines.

Handlers are configured only here, called by the entry points. Logs go to stderr (journald).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean(text: object, limit: int = 120) -> str:
    """Untrusted text (AE titles, error messages) made safe for one log line."""
    s = _CONTROL.sub("?", str(text))
    return s if len(s) <= limit else s[: limit - 3] + "..."


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
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
