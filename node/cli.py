"""The admin CLI, ``aidnode``: serve, inspect and repair a node.

Tables for people, ``--json`` for scripts. Exit codes: 0 ok, 1 error, 2 usage or configuration.
Project errors become one line on stderr (the traceback goes to the log at DEBUG); this module
is the one place that does it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from inference.errors import InferenceError
from node import logging as node_logging
from node.config import Config, load_config
from node.errors import ConfigError, NodeError
from storage.errors import StorageError

try:  # recent typer vendors click as typer._click; older typer uses click itself
    from typer._click import exceptions as _click_exc
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as _click_exc  # type: ignore[no-redef]

ClickException = _click_exc.ClickException
UsageError = _click_exc.UsageError
#: click >= 8.2: a group called without its sub-command (shows the group's help)
NoArgsIsHelpError: Any = getattr(_click_exc, "NoArgsIsHelpError", ())

log = logging.getLogger(__name__)
# markup off: UIDs, descriptions and error messages may hold "[...]", which is data, not style.
out = Console(highlight=False, soft_wrap=True, markup=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)

app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                  help="aidnode: a DICOM node that analyses studies and sends results back.\n\n"
                       "Example: aidnode -c /etc/aidnode/config.toml status")

ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", "-c", envvar="AIDNODE_CONFIG",
    help="Config file (default: ./config.toml if present, else built-in defaults).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
YesOpt = Annotated[bool, typer.Option("--yes", help="Confirm a destructive action.")]


@dataclass
class State:
    config_path: Path | None = None
    _config: Config | None = None
    _storage: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        """Release the database connections opened for this command."""
        if self._storage is not None:
            self._storage[0].dispose()
            self._storage = None

    @property
    def config(self) -> Config:
        if self._config is None:
            path = self.config_path
            if path is None and Path("config.toml").is_file():
                path = Path("config.toml")
            self._config = load_config(path)
        return self._config

    def storage(self, check_schema: bool = True) -> Any:
        """(Database, FileStore) for the configured node; refuses an out-of-date schema."""
        if self._storage is None:
            from node.service import open_storage

            self._storage = open_storage(self.config)
            if check_schema:
                self._storage[0].check_schema()
        return self._storage


def state(ctx: typer.Context) -> State:
    root = ctx.find_root()
    if not isinstance(root.obj, State):
        root.obj = State()
        root.call_on_close(root.obj.close)
    return root.obj


@app.callback()
def _root(ctx: typer.Context, config: ConfigOpt = None,
          verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                                help="Log at DEBUG.")] = False) -> None:
    """aidnode: a DICOM node that analyses studies and sends the results back to the PACS."""
    st = state(ctx)
    st.config_path = config
    if verbose:
        node_logging.setup("DEBUG")


def emit(data: Any, as_json: bool, table: Table | str | None = None) -> None:
    """Print ``data`` as JSON, or the table/text for people."""
    if as_json:  # plain stdout: no colour codes and no wrapping, whatever the terminal
        typer.echo(json.dumps(data, indent=2, default=str))
    elif table is not None:
        out.print(table)


def make_table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, overflow="fold")  # fold, never truncate: a cut UID is useless
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    return t


def audit_admin(ctx: typer.Context, action: str, **detail: Any) -> None:
    from storage import audit

    db, _ = state(ctx).storage()
    with db.write() as s:
        audit.record(s, audit.AuditKind.ADMIN, ae_title=None, host=None, action=action,
                     user=os.environ.get("USER", "?"), **detail)


#: scheme://user:PASSWORD@host...; greedy up to the last "@", so an unescaped "@" leaks nothing
_URL_PASSWORD = re.compile(r"^(?P<head>[^:/]+://[^:@/]*:).*@(?P<tail>[^@]*)$", re.DOTALL)


def mask_password(url: str) -> str:
    """The URL with its password, if any, replaced by ``***``."""
    return _URL_PASSWORD.sub(r"\g<head>***@\g<tail>", url)


def require_yes(yes: bool, what: str) -> None:
    """A usage error (exit 2) unless the destructive action was confirmed with --yes."""
    if not yes:
        raise UsageError(f"{what} needs --yes to confirm")


# -- commands that live here: serve, db, config, echo, send ----------------------------------


@app.command()
def serve(
    ctx: typer.Context,
    role: Annotated[str, typer.Option(
        "--role", metavar="all|receiver|worker|sender",
        help="What this process runs: everything (default), or one role of several processes "
             "sharing the database and the file store (PostgreSQL across machines; SQLite "
             "only on one machine).")] = "all",
) -> None:
    """Run the node: receiver, assembler, workers, senders, metrics.

    With --role all the workers run in a child process that serve restarts if it dies
    ([inference] separate_process).

    Example: aidnode serve --role worker -c /etc/aidnode/config.toml
    """
    from node.service import Role, Service, leave, open_storage

    try:
        chosen = Role(role)
    except ValueError:
        raise typer.BadParameter(f"must be one of {', '.join(r.value for r in Role)}",
                                 param_hint="--role") from None
    cfg = state(ctx).config
    node_logging.setup(cfg.logging.level, cfg.logging.format)
    db, store = open_storage(cfg)
    if db.is_sqlite and db.current_revision() is None:
        db.upgrade()  # a brand-new SQLite node creates its schema; later changes need the CLI
    leave(Service(cfg, db, store, role=chosen).run_forever())


db_app = typer.Typer(no_args_is_help=True,
                     help="Database schema.\n\nExample: aidnode db upgrade")
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Apply pending schema migrations.

    Example: aidnode db upgrade
    """
    db, _ = state(ctx).storage(check_schema=False)
    rev = db.upgrade()
    out.print(f"database at revision {rev}")


@db_app.command("migrate-to")
def db_migrate_to(
    ctx: typer.Context,
    url: Annotated[str, typer.Argument(help="The target database, e.g. "
                                            "postgresql+psycopg://aidnode@db/aidnode")],
    as_json: JsonOpt = False,
) -> None:
    """Copy this node's studies, jobs, results and history into another (empty) database.

    Stop the service first; then point database.url at the target and start it again.

    Example: aidnode db migrate-to postgresql+psycopg://aidnode@db.example/aidnode
    """
    from pydantic import ValidationError
    from rich.progress import Progress

    from node.config import DatabaseConfig
    from storage import migrate, registry
    from storage.db import Database

    source, _ = state(ctx).storage()
    try:
        target_url = DatabaseConfig(url=url).url
    except ValidationError:
        raise UsageError("URL must start with postgresql+psycopg:// or sqlite:///") from None
    if target_url == source.url:
        raise UsageError("the target is the database this node already uses")
    with source.read() as s:
        running = registry.live(s)
    if running:
        raise UsageError("stop the service before migrating (running: " +
                         ", ".join(f"{p.name} {p.role}" for p in running) +
                         "); a copy taken while it receives would miss what arrives later")
    target = Database(target_url)
    try:
        with Progress(console=err, disable=as_json) as bar:
            tasks: dict[str, Any] = {}

            def progress(table: str, done: int, total: int) -> None:
                if table not in tasks:
                    tasks[table] = bar.add_task(table, total=max(total, 1))
                bar.update(tasks[table], completed=done if total else 1)

            report = migrate.copy_database(source, target, progress)
    finally:
        target.dispose()
    rows = [{"table": c.table, "rows": c.target_rows} for c in report]
    if as_json:
        return emit({"target": mask_password(target_url), "tables": rows}, True)
    out.print(make_table(f"copied into {mask_password(target_url)}", ["table", "rows"],
                         [[r["table"], r["rows"]] for r in rows]))
    out.print("now set database.url to the target and start the service")


config_app = typer.Typer(no_args_is_help=True,
                         help="Configuration.\n\nExample: aidnode config check")
app.add_typer(config_app, name="config")


@config_app.command("check")
def config_check(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Validate the config and print the effective values, secrets masked.

    Example: aidnode config check --json
    """
    cfg = state(ctx).config
    data = json.loads(cfg.model_dump_json())
    data["database"]["url"] = mask_password(cfg.database.url)
    if as_json:
        emit(data, True)
    else:
        out.print(f"configuration OK ({cfg.source or 'built-in defaults'})")
        out.print_json(json.dumps(data, default=str))


@app.command()
def echo(ctx: typer.Context, peer: Annotated[str, typer.Argument(help="AET@HOST:PORT")],
         calling_ae: Annotated[str, typer.Option("--aet", help="Our AE title.")] = "AIDNODE",
         as_json: JsonOpt = False) -> None:
    """C-ECHO a peer.

    Example: aidnode echo ORTHANC@127.0.0.1:4242
    """
    import time

    from node.scu import Peer
    from node.scu import echo as c_echo

    p = Peer.parse(peer)
    t = time.monotonic()
    status = c_echo(p, calling_ae)
    ms = (time.monotonic() - t) * 1000
    emit({"peer": str(p), "status": status, "ms": round(ms, 1)}, as_json,
         f"C-ECHO {p}: status 0x{status:04X} in {ms:.0f} ms")
    if status != 0:
        raise typer.Exit(1)


@app.command()
def send(ctx: typer.Context,
         paths: Annotated[list[Path], typer.Argument(help="Files or folders.")],
         to: Annotated[str, typer.Option("--to", help="AET@HOST:PORT")],
         calling_ae: Annotated[str, typer.Option("--aet", help="Our AE title.")] = "AIDNODE_CLI",
         as_json: JsonOpt = False) -> None:
    """C-STORE files or folders to a peer, with a progress bar.

    Example: aidnode send study/ --to AIDNODE@127.0.0.1:11112
    """
    from rich.progress import Progress

    from node.scu import Peer, dicom_files, send_files
    from node.status import is_success, is_warning

    p = Peer.parse(to)
    files = dicom_files(paths)
    if not files:
        raise NodeError("no files to send")
    with Progress(console=err, disable=as_json) as bar:
        task = bar.add_task(f"sending to {p}", total=len(files))
        results = send_files(p, files, calling_ae, on_sent=lambda f, s: bar.advance(task))
    ok = [f for f, s in results if is_success(s) or is_warning(s)]
    bad = [(f, s) for f, s in results if not (is_success(s) or is_warning(s))]
    emit({"sent": len(ok), "failed": [{"file": str(f), "status": s} for f, s in bad]}, as_json,
         f"{len(ok)} of {len(results)} sent to {p}"
         + "".join(f"\n  {f}: " + ("not a DICOM file" if s < 0 else f"status 0x{s:04X}")
                   for f, s in bad))
    if bad:
        raise typer.Exit(1)


def _register() -> None:
    from node import cli_model, cli_queue  # noqa: F401 - they add their commands to ``app``


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors, exit 1 for errors and 2 for configuration."""
    _register()
    try:
        # Outside standalone mode click *returns* the code of a ``typer.Exit`` (and --help).
        rc = app(args=argv, prog_name="aidnode", standalone_mode=False)
    except ConfigError as exc:
        err.print(f"error: {exc}")
        sys.exit(2)
    except (NodeError, StorageError, InferenceError, OSError) as exc:
        log.debug("command failed", exc_info=True)
        err.print(f"error: {exc}")
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(1)
    except NoArgsIsHelpError as exc:  # a group without its sub-command: show its help
        exc.show()
        sys.exit(exc.exit_code)
    except UsageError as exc:
        hint = f" (see: {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        err.print(f"error: {exc.format_message()}{hint}")
        sys.exit(exc.exit_code)
    except ClickException as exc:
        err.print(f"error: {exc.format_message()}")
        sys.exit(exc.exit_code)
    sys.exit(rc if isinstance(rc, int) else 0)
