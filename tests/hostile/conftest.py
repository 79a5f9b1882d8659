"""Fixtures for the hostile-input suite: hand-built peers, and the service's own log output.

Cases of DESIGN §5 already covered in tests/integration/test_receiver.py, and not repeated
here: the dataset UID differing from the command's (A900), a missing UID (C210), an undecodable
data set (C210), a path-like SOP Instance UID in the data set (C210), duplicates with the same
bytes (0000, one copy) and with different bytes (B006, the first kept), the free-disk floor
(A700), an unknown calling AE (RJ 1/1/3), a wrong called AE (RJ 1/1/7), an allowed AE from
another host (RJ 1/1/3) and one association over max_associations (RJ 2/3/2).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator

import pytest

from node import logging as node_logging
from tests.conftest import RunningNode
from tests.hostile.rawpdu import RawPeer

NOISY = ("pynetdicom", "highdicom", "alembic", "transformers", "PIL")


@pytest.fixture
def raw_peer() -> Iterator[Callable[[RunningNode], RawPeer]]:
    """Open hand-built connections to a node; every one is closed at teardown."""
    opened: list[RawPeer] = []

    def connect(node: RunningNode) -> RawPeer:
        peer = RawPeer(node.host, node.port)
        opened.append(peer)
        return peer

    yield connect
    for peer in opened:
        peer.close()


@pytest.fixture
def service_log() -> Iterator[io.StringIO]:
    """What the service's own handler (``node.logging.setup``, text format, DEBUG) writes."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, {n: logging.getLogger(n).level for n in NOISY}
    out = io.StringIO()
    node_logging.setup("DEBUG", "text", stream=out)
    yield out
    root.handlers[:], root.level = saved[0], saved[1]
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)
