"""A throwaway PostgreSQL cluster on loopback, for tests and benchmarks.

``initdb`` into a temporary folder, ``pg_ctl start`` on a free port (TCP on 127.0.0.1 only, its
Unix socket in the same folder), trust authentication, and ``pg_ctl stop -m immediate`` plus the
folder removed when the context exits. PostgreSQL refuses to run as root, so under root the
server runs as the ``postgres`` user that Debian's package creates.

The binaries come from Debian's ``postgresql`` package (``/usr/lib/postgresql/<major>/bin``).
Without them ``pg_binaries`` returns None; tests skip with a reason, except under ``CI=true``,
where a missing PostgreSQL is a failure: CI installs it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.peers import LOOPBACK, free_port

START_TIMEOUT_S = 60


def pg_binaries() -> Path | None:
    """The folder holding initdb and pg_ctl (the newest installed major version), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)
    if found:
        return found[-1].parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


@dataclass(frozen=True)
class PgCluster:
    host: str
    port: int
    user: str
    datadir: Path

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{dbname}"

    def create_database(self, name: str | None = None, template: str | None = None) -> str:
        """Create a database (optionally from a template) and return its SQLAlchemy URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        tpl = f" TEMPLATE {template}" if template else ""
        with psycopg.connect(host=self.host, port=self.port, user=self.user, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"{tpl}')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(host=self.host, port=self.port, user=self.user, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _demote(user: str) -> tuple[Callable[[], None] | None, str]:
    """A preexec function that drops root for ``user``, and the role name to connect as."""
    if os.geteuid() != 0:
        return None, pwd.getpwuid(os.geteuid()).pw_name
    pw = pwd.getpwnam(user)

    def preexec() -> None:
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)

    return preexec, user


@contextmanager
def pg_cluster(*, fsync: bool = False, max_connections: int = 200) -> Iterator[PgCluster]:
    """Start a throwaway cluster; ``fsync=False`` is for tests only (benchmarks keep it on)."""
    bindir = pg_binaries()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL server binaries not found (Debian: apt-get install "
                                "postgresql)")
    preexec, role = _demote("postgres")
    base = Path(tempfile.mkdtemp(prefix="aidnode-pg-"))
    datadir, logfile = base / "data", base / "server.log"
    if os.geteuid() == 0:
        pw = pwd.getpwnam(role)
        os.chown(base, pw.pw_uid, pw.pw_gid)
    port = free_port()
    env = {**os.environ, "LC_ALL": "C", "TZ": "UTC"}

    def stop() -> None:
        subprocess.run([str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "-w",
                        "stop"], check=False, capture_output=True, preexec_fn=preexec, env=env,
                       timeout=60)
        shutil.rmtree(base, ignore_errors=True)

    try:
        subprocess.run([str(bindir / "initdb"), "-D", str(datadir), "-U", role,
                        "--auth=trust", "-E", "UTF8", "--no-instructions"],
                       check=True, capture_output=True, preexec_fn=preexec, env=env, timeout=120)
        opts = [f"-c listen_addresses={LOOPBACK}", f"-c port={port}",
                f"-c unix_socket_directories={base}", f"-c max_connections={max_connections}"]
        if not fsync:  # a throwaway test cluster: durability buys nothing here
            opts += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        subprocess.run([str(bindir / "pg_ctl"), "-D", str(datadir), "-l", str(logfile),
                        "-o", " ".join(opts), "-w", "-t", str(START_TIMEOUT_S), "start"],
                       check=True, capture_output=True, preexec_fn=preexec, env=env,
                       timeout=START_TIMEOUT_S + 10)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        log = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
        out = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        stop()
        raise RuntimeError(f"PostgreSQL did not start: {out}\n{log}") from exc
    try:
        yield PgCluster(host=LOOPBACK, port=port, user=role, datadir=datadir)
    finally:
        stop()
