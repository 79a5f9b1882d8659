"""The one seam for time: every timestamp aidnode writes comes from ``now()``.

Tests replace it with ``monkeypatch.setattr(storage.clock, "now", ...)``; callers therefore use
``clock.now()`` through the module, never ``from storage.clock import now``.
"""

from __future__ import annotations

from datetime import UTC, datetime


def now() -> datetime:
    """Naive UTC now (the database stores naive UTC)."""
    return datetime.now(UTC).replace(tzinfo=None)
