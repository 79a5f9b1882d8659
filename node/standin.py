"""A stand-in PACS for ``aidnode demo`` and tests: a Storage SCP that writes what it receives.

Not a PACS: it keeps files in a folder and answers Success, nothing more.
"""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.scp import configure_pynetdicom, set_nodelay


@dataclass
class StandInPACS:
    folder: Path
    ae_title: str = "STANDIN_PACS"
    received: list[Path] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: Any = None

    def _store(self, event: evt.Event) -> int:
        path = self.folder / f"{len(self.received):04d}.dcm"
        path.write_bytes(event.encoded_dataset())
        with self._lock:
            self.received.append(path)
        return 0x0000

    def start(self, host: str = "127.0.0.1", port: int = 0,
              ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen (port 0: any free port), with TLS when given a context; returns the port."""
        configure_pynetdicom()
        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(self.ae_title)
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self._server = ae.start_server((host, port), block=False, ssl_context=ssl_context,
                                       evt_handlers=[
            (evt.EVT_CONN_OPEN, lambda e: set_nodelay(getattr(e.assoc.dul.socket, "socket",
                                                              None))),
            (evt.EVT_C_STORE, self._store)])
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
