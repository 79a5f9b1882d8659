"""The receiver's listening sockets: the DICOM port, the optional DICOM TLS port, and the limits
applied to what a peer sends before pynetdicom buffers it.

Both ports belong to one AE, so ``node.max_associations`` counts the associations on both. The
plain server owns the TLS one: ``server_close()`` (and pynetdicom's ``shutdown()``) stop both, and
``active_associations`` lists both, so ``node.service`` stops a receiver the same way with or
without TLS.

pynetdicom reads a PDU of whatever length its header claims, keeps reading a stalled PDU past the
network timeout (its own timer only runs between PDUs) and holds a whole data set in memory before
the C-STORE handler runs. Each accepted socket therefore gets the network timeout as its socket
timeout and a ``PDULimits`` that aborts the association (PS3.8 9.3.8) when a PDU is longer than we
accept (PS3.8 D.1: a P-DATA-TF no longer than our Maximum Length) or a data set grows past
``node.max_dataset_bytes``.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
from dataclasses import dataclass
from typing import Any, ClassVar, cast

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from node.config import NodeConfig, ReceiverTLSConfig
from node.errors import ConfigError
from node.logging import clean
from node.status import ABORT_DATASET_TOO_LARGE, ABORT_PDU_TOO_LONG

log = logging.getLogger(__name__)

P_DATA_TF = 0x04  # PS3.8 9.3.1
PDU_TYPES = range(0x01, 0x08)  # A-ASSOCIATE-RQ .. A-ABORT; pynetdicom reads no body for others
MAX_CONTROL_PDU = 1 << 20  # any other PDU: an A-ASSOCIATE-RQ with 128 contexts is ~100 KiB
#: A DIMSE command set is a few hundred bytes (a C-MOVE with a long AE list, a few KiB).
MAX_COMMAND_SET = 1 << 16
TLS_MINIMUM = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True)
class Limits:
    max_pdu: int
    max_dataset_bytes: int
    network_timeout_s: float
    handshake_timeout_s: float

    @classmethod
    def of(cls, node: NodeConfig) -> Limits:
        return cls(node.max_pdu, node.max_dataset_bytes, node.network_timeout_s,
                   node.acse_timeout_s)


def abort_pdu(source_reason: tuple[int, int]) -> bytes:
    """An A-ABORT PDU (PS3.8 9.3.8) with this (source, reason)."""
    return struct.pack(">BxI2xBB", 0x07, 4, *source_reason)


class PDULimits:
    """Guards one accepted association's reads; replaces its ``AssociationSocket.recv``.

    pynetdicom reads each PDU as ``recv(6)`` (type and length) and then ``recv(length)``, and
    builds the socket inside ``RequestHandler._create_association`` with no hook for its class,
    hence the replaced method. A refusal sends the A-ABORT itself, then answers every read with
    nothing: pynetdicom takes the short PDU as a closed connection and ends the association.
    """

    def __init__(self, sock: AssociationSocket, limits: Limits, peer: str) -> None:
        self._sock, self._limits, self._peer = sock, limits, peer
        self._at_header, self._kind, self.refused = True, 0, False
        self._dataset = self._command = 0  # bytes of the message being received, by kind
        sock.recv = self.recv  # type: ignore[method-assign]

    def recv(self, nr_bytes: int) -> bytearray:
        if self.refused:
            return bytearray()
        data = self._read(nr_bytes)
        if self._at_header:
            if len(data) == 6 and data[0] in PDU_TYPES:
                self._kind, length = struct.unpack(">BxI", data)
                self._at_header = False
                limit = self._limits.max_pdu if self._kind == P_DATA_TF else MAX_CONTROL_PDU
                if length > limit:
                    self._refuse(ABORT_PDU_TOO_LONG, f"a PDU of {length} bytes (type "
                                 f"0x{self._kind:02X}) is above our maximum of {limit}")
            return data
        self._at_header = True
        if self._kind == P_DATA_TF:
            why = self._count(data)
            if why is not None:
                self._refuse(ABORT_DATASET_TOO_LARGE, why)
                return bytearray()
        return data

    def _read(self, nr_bytes: int) -> bytearray:
        """``nr_bytes`` from the socket, fewer if the peer closed first (what pynetdicom's own
        ``recv`` returns then); its timeout and errors as they come.

        pynetdicom reads 4 KiB per ``socket.recv``, each after a ``poll`` (the socket has a
        timeout): about 130 of each, and of its Python loop, for one 513 KiB data set. This
        reads into one buffer, as much as has arrived per call.
        """
        buffer = bytearray(nr_bytes)
        view, got = memoryview(buffer), 0
        sock = cast(socket.socket, self._sock.socket)
        with view:
            while got < nr_bytes:
                n = sock.recv_into(view[got:])
                if n == 0:  # the peer closed the connection
                    break
                got += n
        if got < nr_bytes:
            del buffer[got:]
        return buffer

    def _count(self, body: bytes | bytearray) -> str | None:
        """Add the fragments of a P-DATA-TF (PS3.8 9.3.5.1) to the message they belong to;
        why the association must end when a data set or a command set grows too large.

        pynetdicom buffers both until their last fragment: a command set never ends for a
        peer that sends no "last" bit, so it is held to ``MAX_COMMAND_SET`` bytes."""
        at = 0
        while at + 6 <= len(body):
            length, control = struct.unpack_from(">I", body, at)[0], body[at + 5]
            fragment = max(0, length - 2)
            if control & 0x01:  # a command fragment (PS3.8 E.2)
                self._command += fragment
                if self._command > MAX_COMMAND_SET:
                    return f"a command set of more than {MAX_COMMAND_SET} bytes"
                if control & 0x02:  # its last fragment
                    self._command = 0
            else:
                self._dataset += fragment
                if self._dataset > self._limits.max_dataset_bytes:
                    return ("the data set is larger than node.max_dataset_bytes "
                            f"({self._limits.max_dataset_bytes})")
                if control & 0x02:  # its last fragment: the next data set starts from zero
                    self._dataset = 0
            at += 4 + length
        return None

    def _refuse(self, source_reason: tuple[int, int], why: str) -> None:
        log.warning("aborting the association from %s: %s", self._peer, why)
        self.refused = True
        self._sock.send(abort_pdu(source_reason))


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's handler, with the socket timeout and ``PDULimits`` on each association."""

    server: _Server

    def _create_association(self) -> Association:
        request = cast(socket.socket, self.request)
        request.settimeout(self.server.limits.network_timeout_s)
        assoc = super()._create_association()
        PDULimits(cast(AssociationSocket, assoc.dul.socket), self.server.limits,
                  str(self.client_address[0]))
        return assoc


class _Server(ThreadedAssociationServer):
    limits: Limits
    #: SO_REUSEPORT before bind: several receiver processes share the port and the kernel
    #: spreads connections over them (``node.reuse_port``).
    reuse_port: ClassVar[bool] = False

    def server_bind(self) -> None:
        if self.reuse_port:
            if not hasattr(socket, "SO_REUSEPORT"):
                raise OSError("node.reuse_port needs SO_REUSEPORT, which this system lacks")
            cast(socket.socket, self.socket).setsockopt(socket.SOL_SOCKET,
                                                        socket.SO_REUSEPORT, 1)
        super().server_bind()


class TLSServer(_Server):
    """The DICOM TLS port: the handshake runs in the connection's own thread, within the ACSE
    timeout. (pynetdicom's ``get_request`` runs it in the accept loop without a timeout, so one
    connection that never sends a ClientHello would hold every other TLS peer off.)"""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = cast(socket.socket, self.socket).accept()
        context = cast(ssl.SSLContext, self.ssl_context)
        return context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(self.limits.handshake_timeout_s)
            request.do_handshake()
        except (OSError, ValueError) as exc:  # ssl.SSLError and timeouts are OSErrors
            log.warning("TLS handshake with %s refused: %s", client_address[0],
                        clean(exc, 200))
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)


class ReceiverServer(_Server):
    """The plain DICOM port; it owns the TLS server, if any, and stops it with itself."""

    tls: TLSServer | None = None
    _tls_closed: bool = False

    @property
    def active_associations(self) -> list[Association]:
        """The associations in progress on both ports (also once they are closed, so a stop
        can wait for the TLS port's associations to finish)."""
        own = super().active_associations
        return own + (self.tls.active_associations if self.tls is not None else [])

    def server_close(self) -> None:
        super().server_close()
        if self.tls is not None and not self._tls_closed:
            self._tls_closed = True
            self.tls.shutdown()  # stop its accept loop, close its socket, leave ae._servers
            log.info("DICOM TLS port closed")


class _SharedReceiverServer(ReceiverServer):
    reuse_port = True


class _SharedTLSServer(TLSServer):
    reuse_port = True


#: The same servers with ``reuse_port`` on (a class attribute: the constructor binds).
_PORT_SHARING: dict[type[_Server], type[_Server]] = {
    ReceiverServer: _SharedReceiverServer, TLSServer: _SharedTLSServer}


def server_context(tls: ReceiverTLSConfig) -> ssl.SSLContext:
    """The TLS server context: TLS >= ``min_version``, client certificates required (and
    verified against ``ca_bundle``) when a CA bundle is given. Raises ConfigError."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_MINIMUM[tls.min_version]
    try:
        context.load_cert_chain(tls.certificate, tls.private_key)
        if tls.ca_bundle is not None:
            context.load_verify_locations(cafile=tls.ca_bundle)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        why = f"node.tls: cannot load the certificate, key or CA bundle: {exc}"
        raise ConfigError([why]) from exc
    return context


def _serve(ae: AE, address: tuple[str, int], handlers: list[Any], server_class: type[_Server],
           limits: Limits, context: ssl.SSLContext | None = None,
           reuse_port: bool = False) -> Any:
    """What ``AE.start_server(block=False)`` does, with our server and request handler."""
    if reuse_port:
        server_class = _PORT_SHARING[server_class]
    server = cast(_Server, ae.make_server(
        address, ssl_context=context, evt_handlers=handlers, server_class=server_class,
        request_handler=GuardedRequestHandler))
    server.limits = limits
    thread = threading.Thread(target=server.serve_forever, daemon=True,
                              name=f"AcceptorServer@{server.server_address[1]}")
    thread.start()
    ae._servers.append(server)
    return server


def serve(ae: AE, address: tuple[str, int], handlers: list[Any], node: NodeConfig,
          ) -> ReceiverServer:
    """Listen on ``address`` and, when ``node.tls`` is set, on its TLS port on the same host;
    with ``node.reuse_port``, as one of several processes sharing those ports."""
    limits = Limits.of(node)
    context = server_context(node.tls) if node.tls is not None else None
    server: ReceiverServer = _serve(ae, address, handlers, ReceiverServer, limits,
                                    reuse_port=node.reuse_port)
    if node.tls is not None:
        try:
            server.tls = _serve(ae, (address[0], node.tls.port), handlers, TLSServer, limits,
                                context, reuse_port=node.reuse_port)
        except OSError:
            server.shutdown()
            raise
        mutual = "client certificates required" if node.tls.ca_bundle else "no client certificates"
        log.info("DICOM TLS on %s:%d (TLS >= %s, %s)", address[0],
                 server.tls.server_address[1], node.tls.min_version, mutual)
    return server


__all__ = ["GuardedRequestHandler", "Limits", "PDULimits", "ReceiverServer", "TLSServer",
           "serve", "server_context"]
