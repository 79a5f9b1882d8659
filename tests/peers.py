"""Real DICOM peers on loopback for integration tests: dcmtk and Orthanc.

Every peer runs as a subprocess on a free port, with ``TCP_NODELAY=1`` in its environment (Debian's
dcmtk and Orthanc stall at ~20 images/s otherwise: Nagle's algorithm meets delayed ACK on every
C-STORE-RSP, see shared/BASELINES.md). The context managers wait on conditions (the port accepts,
the REST API answers), never on fixed sleeps, and always terminate and reap what they started.

A missing binary skips the calling test with a reason. The dcmtk tools are looked up by their
``--version`` banner, because pynetdicom installs console scripts of the same names (``storescu``,
``storescp``, ``echoscu``) that may come first on ``PATH``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
TOOL_TIMEOUT_S = 60.0
# Directories searched after PATH: Orthanc lives in /usr/sbin, which a non-root PATH may lack.
_EXTRA_BIN_DIRS = ("/usr/bin", "/usr/sbin", "/bin", "/sbin")


class PeerError(RuntimeError):
    """A peer process failed to start or to answer in time."""


@dataclass(frozen=True)
class Peer:
    """A running DICOM peer: where to reach it, and its process."""

    aet: str
    host: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        """Return what the peer has written to stdout/stderr so far (only inside the context)."""
        return self.log_path.read_text(errors="replace")


@dataclass(frozen=True)
class OrthancPeer:
    """A running Orthanc: DICOM and REST endpoints on loopback."""

    aet: str
    host: str
    dicom_port: int
    http_port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def port(self) -> int:
        """The DICOM port, so an OrthancPeer can stand wherever a Peer is expected."""
        return self.dicom_port

    def rest(self, path: str, body: Any = None, *, timeout: float = 10.0) -> Any:
        """GET ``path`` (or POST ``body`` as JSON when given) and return the decoded JSON answer."""
        url = f"http://{self.host}:{self.http_port}/{path.lstrip('/')}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")

    def instances_in_study(self, study_uid: str) -> list[str]:
        """Return the Orthanc IDs of the instances stored for Study Instance UID ``study_uid``."""
        found = self.rest(
            "/tools/find",
            {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}},
        )
        return list(found)

    def log(self) -> str:
        """Return what Orthanc has logged so far (only inside the context)."""
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    """Return a TCP port on loopback that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    host: str,
    port: int,
    timeout: float = START_TIMEOUT_S,
    *,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Wait until ``host:port`` accepts a TCP connection; raise PeerError after ``timeout`` s.

    With ``proc``, fail at once if that process exits first (a bad option, a port taken).
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise PeerError(f"process exited with {proc.returncode} before {host}:{port} opened")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise PeerError(f"{host}:{port} did not accept within {timeout} s") from None
            time.sleep(0.02)  # poll interval while waiting on the condition


def _peer_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def _candidates(name: str) -> list[str]:
    dirs = os.environ.get("PATH", "").split(os.pathsep) + list(_EXTRA_BIN_DIRS)
    seen: list[str] = []
    for directory in dirs:
        path = os.path.join(directory, name)
        real = os.path.realpath(path)
        if os.access(path, os.X_OK) and os.path.isfile(path) and real not in seen:
            seen.append(real)
    return seen


def _is_script(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(2) == b"#!"
    except OSError:
        return True


@cache
def _find_dcmtk(name: str) -> str | None:
    # Native binaries first: pynetdicom's namesakes are Python scripts (or pyenv shims).
    for path in sorted(_candidates(name), key=_is_script):
        try:
            done = subprocess.run(
                [path, "--version"], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "$dcmtk:" in done.stdout + done.stderr:
            return path
    return None


def dcmtk_binary(name: str) -> str:
    """Return the path of dcmtk's ``name`` (not pynetdicom's namesake); skip the test if absent."""
    path = _find_dcmtk(name)
    if path is None:
        pytest.skip(f"dcmtk {name} not installed (Debian package dcmtk)")
    return path


def orthanc_binary() -> str:
    """Return the path of the Orthanc server binary; skip the test if absent."""
    path = shutil.which("Orthanc") or next(iter(_candidates("Orthanc")), None)
    if path is None:
        pytest.skip("Orthanc not installed (Debian package orthanc)")
    return path


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate ``proc`` and reap it; kill it if it ignores SIGTERM."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


@contextmanager
def dcmtk_storescp(
    out_dir: Path | str,
    *,
    aet: str = "PACS",
    extra_args: Sequence[str] = (),
    accept_all: bool = True,
) -> Iterator[Peer]:
    """Run dcmtk ``storescp`` on a free loopback port, writing received files into ``out_dir``.

    ``extra_args`` go before the port, e.g. ``["--refuse"]``, ``["--abort-after"]`` or
    ``["--sleep-during", "5"]`` to play a failing PACS. ``storescp`` listens on all interfaces
    (it has no bind option); tests only ever connect through loopback. With ``accept_all`` it
    accepts every transfer syntax it knows (``+xa``), so compressed files arrive as they are;
    without it, only uncompressed ones (dcmtk's default).
    """
    binary = dcmtk_binary("storescp")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="storescp-log-") as log_dir:
        log_path = Path(log_dir) / "storescp.log"
        port = free_port()
        accept = ["+xa"] if accept_all else []
        cmd = [binary, "-aet", aet, "-od", str(out), "-dhl", *accept, *extra_args, str(port)]
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=_peer_env(),
            )
        try:
            try:
                wait_for_port(LOOPBACK, port, proc=proc)
            except PeerError as exc:
                raise PeerError(f"storescp did not start: {exc}\n{_tail(log_path)}") from exc
            yield Peer(aet=aet, host=LOOPBACK, port=port, proc=proc, log_path=log_path)
        finally:
            _stop(proc)


def orthanc_config(tmp_dir: Path, *, aet: str, dicom_port: int, http_port: int) -> dict[str, Any]:
    """Return an Orthanc configuration for a throwaway test instance rooted in ``tmp_dir``."""
    return {
        "Name": f"aidnode-test-{aet}",
        "StorageDirectory": str(tmp_dir / "storage"),
        "IndexDirectory": str(tmp_dir / "index"),
        "Plugins": [],
        "LuaScripts": [],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        # Any calling AE, any called AE, any host: tests send from ad-hoc AE titles.
        "DicomCheckCalledAet": False,
        "DicomCheckModalityHost": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomModalities": {},
        "UnknownSopClassAccepted": True,
        "SaveJobs": False,
        "ConcurrentJobs": 1,
        "StableAge": 1,
    }


@contextmanager
def orthanc(tmp_dir: Path | str, *, aet: str = "ORTHANC") -> Iterator[OrthancPeer]:
    """Run Orthanc on free DICOM and HTTP ports with its storage and index in ``tmp_dir``.

    Yields once the REST API answers ``/system``; REST is reachable from loopback only.
    Orthanc 1.10 takes about 3 s to stop gracefully, so a module that needs it many times may
    share one instance through a module-scoped fixture (query by each test's own study UID).
    """
    binary = orthanc_binary()
    root = Path(tmp_dir)
    root.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    while http_port == dicom_port:
        http_port = free_port()
    config_path = root / "orthanc.json"
    config = orthanc_config(root, aet=aet, dicom_port=dicom_port, http_port=http_port)
    config_path.write_text(json.dumps(config, indent=2))
    log_path = root / "orthanc.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [binary, str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_peer_env(),
            cwd=root,
        )
    peer = OrthancPeer(
        aet=aet,
        host=LOOPBACK,
        dicom_port=dicom_port,
        http_port=http_port,
        proc=proc,
        log_path=log_path,
    )
    try:
        _wait_for_rest(peer)
        wait_for_port(LOOPBACK, dicom_port, proc=proc)
        yield peer
    finally:
        _stop(proc)


def _wait_for_rest(peer: OrthancPeer, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if peer.proc.poll() is not None:
            raise PeerError(f"Orthanc exited with {peer.proc.returncode}:\n{_tail(peer.log_path)}")
        try:
            peer.rest("/system", timeout=1.0)
            return
        except OSError as exc:  # URLError and connection errors are OSErrors
            if time.monotonic() >= deadline:
                raise PeerError(
                    f"Orthanc REST did not answer within {timeout} s:\n{_tail(peer.log_path)}"
                ) from exc
            time.sleep(0.05)  # poll interval while waiting on the condition


# storescu proposes one compressed transfer syntax family at most, chosen by option; without it,
# it decompresses (and fails on what it cannot decompress, such as JPEG 2000).
STORESCU_PROPOSAL_OPTION = {
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG Lossless, SV1
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG Baseline (8 bit)
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG Extended (12 bit)
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.5": "-xr",  # RLE Lossless
    "1.2.840.10008.1.2.1.99": "-xd",  # Deflated Explicit VR Little Endian
}


def _expand_inputs(files: Sequence[Path | str] | Path | str) -> tuple[list[str], bool]:
    items = [files] if isinstance(files, (str, Path)) else list(files)
    if not items:
        raise ValueError('Argument "files" must name at least one file or folder.')
    paths = [str(item) for item in items]
    return paths, any(Path(p).is_dir() for p in paths)


def _proposal_for(paths: Sequence[str]) -> list[str]:
    """Return the storescu option that proposes the compressed syntax of ``paths``, if any."""
    options = set()
    for item in map(Path, paths):
        for path in sorted(item.rglob("*")) if item.is_dir() else [item]:
            if not path.is_file():
                continue
            try:
                syntax = str(read_file_meta_info(path).get("TransferSyntaxUID", ""))
            except (InvalidDicomError, OSError):
                continue  # not a DICOM file: storescu reports it itself
            if syntax in STORESCU_PROPOSAL_OPTION:
                options.add(STORESCU_PROPOSAL_OPTION[syntax])
    if len(options) > 1:
        raise ValueError(
            f"storescu proposes one compressed syntax per association; got {sorted(options)}: "
            "send each kind in its own call"
        )
    return sorted(options)


def storescu(
    host: str,
    port: int,
    files: Sequence[Path | str] | Path | str,
    *,
    aet: str = "STORESCU",
    called_aet: str = "ANY-SCP",
    extra_args: Sequence[str] = (),
    timeout: float = TOOL_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` (files and/or folders, folders recursively) with dcmtk ``storescu``.

    Returns the finished process (stdout/stderr as text); the caller checks ``returncode``, and
    should count what arrived on the receiving side too. storescu proposes only the SOP classes
    of the files (``-R``), each with every uncompressed syntax; when the files are compressed,
    the matching proposal option (``-xs``, ``-xv``, ...: STORESCU_PROPOSAL_OPTION) is added so
    they go as they are rather than being decompressed. A ``-x`` option in ``extra_args`` is
    taken as given instead.
    """
    paths, has_dir = _expand_inputs(files)
    cmd = [dcmtk_binary("storescu"), "-aet", aet, "-aec", called_aet, "-ll", "info", "-R"]
    if has_dir:
        cmd += ["+sd", "+r"]
    if not any(arg.startswith("-x") for arg in extra_args):
        cmd += _proposal_for(paths)
    cmd += [*extra_args, host, str(port), *paths]
    return _run_tool(cmd, timeout)


def echoscu(
    host: str,
    port: int,
    *,
    aet: str = "ECHOSCU",
    called_aet: str = "ANY-SCP",
    extra_args: Sequence[str] = (),
    timeout: float = TOOL_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """Send one C-ECHO with dcmtk ``echoscu``; exit status 0 means the peer answered Success."""
    cmd = [dcmtk_binary("echoscu"), "-aet", aet, "-aec", called_aet, *extra_args, host, str(port)]
    return _run_tool(cmd, timeout)


def _run_tool(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a dcmtk client with TCP_NODELAY=1, no stdin, output captured as text."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=_peer_env(), stdin=subprocess.DEVNULL, check=False)


def wait_for(
    predicate: Callable[[], object],
    timeout: float = START_TIMEOUT_S,
    *,
    what: str = "condition",
) -> None:
    """Poll ``predicate()`` until it is truthy; raise AssertionError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
