"""Certificates for TLS tests, made with the ``openssl`` command line in a temporary folder.

``make_pki`` writes ``ca.pem``/``ca.key``, ``server.pem``/``server.key`` (subjectAltName
IP:127.0.0.1) and ``client.pem``/``client.key``, all signed by that CA and valid for two days;
``make_ca`` and ``make_cert`` add more (another CA, a client it signed). A missing ``openssl``
skips the calling test.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def require_openssl() -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")


def make_ca(folder: Path, name: str = "ca") -> None:
    """A self-signed CA: ``<name>.pem`` and ``<name>.key`` in ``folder``."""
    require_openssl()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.pem", "-days", "2", "-subj", f"/CN=aidnode test {name}", cwd=folder)


def make_cert(folder: Path, name: str, *, ca: str = "ca", ext: str = "") -> None:
    """``<name>.pem`` and ``<name>.key`` signed by the CA ``<ca>``; ``ext`` is an x509 extension
    line such as ``subjectAltName=IP:127.0.0.1``."""
    require_openssl()
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
    (folder / f"{name}.ext").write_text(ext + "\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
            cwd=folder)


def make_pki(folder: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    make_ca(folder)
    make_cert(folder, "server", ext="subjectAltName=IP:127.0.0.1")
    make_cert(folder, "client")
    return folder
