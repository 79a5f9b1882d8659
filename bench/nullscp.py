"""A pynetdicom Storage SCP that answers Success and keeps nothing: the ceiling of the library.

    python bench/nullscp.py PORT COUNTER_FILE [--paced]

It negotiates what aidnode negotiates (every storage SOP class, every transfer syntax, a 256 KiB
maximum PDU), does not decode the data set, and appends one byte per C-STORE to COUNTER_FILE
(no fsync) so the benchmark can count what arrived. Whatever aidnode does on top of this
(checks, durable file, database row) is what it costs beyond pynetdicom itself. With
``--paced`` its reactors poll as aidnode's do (``node.pacing``, what ``node.adaptive_polling``
turns on).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

# Run as a script from any folder: the repository's packages come first, as in common.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from node import pacing


def main() -> None:
    port, counter = int(sys.argv[1]), open(sys.argv[2], "ab", buffering=0)  # noqa: SIM115
    paced = "--paced" in sys.argv[3:] and pacing.install()

    def handle_store(event: evt.Event) -> int:
        with pacing.storing(event.assoc) if paced else contextlib.nullcontext():
            counter.write(b".")
        return 0x0000

    ae = AE(ae_title="NULLSCP")
    ae.maximum_pdu_size = 262144
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    ae.start_server(("127.0.0.1", port), block=True,
                    evt_handlers=[(evt.EVT_C_STORE, handle_store)])


if __name__ == "__main__":
    main()
