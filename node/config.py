"""Configuration: ``config.toml`` parsed once into validated, frozen objects.

Every problem is reported at once, each with its dotted key and, where it can be found, the line
of the file. Environment variables ``AIDNODE_<SECTION>__<KEY>`` override values (for example
``AIDNODE_NODE__PORT=11113``); relative paths resolve against the config file's folder.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from node.errors import ConfigError

AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2: no backslash, no control chars


def _check_ae(value: str) -> str:
    if not AE_TITLE.match(value) or not value.strip():
        raise ValueError("must be 1 to 16 printable characters without backslash")
    return value.strip()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


TLS_VERSIONS = ("1.2", "1.3")  # DESIGN §9; BCP 195 (RFC 8996, PS3.15 B.9) retires 1.0 and 1.1


class ReceiverTLSConfig(_Section):
    """``[node.tls]``: a second, TLS-only port for the receiver (PS3.15 Annex B).

    2762 is the port IANA registered for DICOM over TLS. With ``ca_bundle`` every client must
    present a certificate signed by it (mutual TLS); without it any client may connect.
    """

    port: int = Field(2762, ge=1, le=65535)
    certificate: Path
    private_key: Path
    ca_bundle: Path | None = None
    min_version: str = "1.2"

    @field_validator("min_version", mode="before")
    @classmethod
    def _version(cls, v: object) -> object:
        if isinstance(v, float):  # min_version = 1.2 written as a TOML number
            v = str(v)
        if isinstance(v, str) and v not in TLS_VERSIONS:
            raise ValueError(f'must be "1.2" or "1.3" (TLS below 1.2 is refused), not {v!r}')
        return v


class NodeConfig(_Section):
    ae_title: str = "AIDNODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    max_associations: int = Field(16, ge=1, le=1000)
    acse_timeout_s: float = Field(30, gt=0)
    dimse_timeout_s: float = Field(60, gt=0)
    network_timeout_s: float = Field(60, gt=0)
    max_pdu: int = Field(262144, ge=4096, le=4_194_304)
    max_dataset_bytes: int = Field(2 * 1024**3, gt=0)
    max_pixel_bytes: int = Field(1024**3, gt=0)
    # SO_REUSEPORT: several `serve --role receiver` processes on one host listen on the same
    # port(s) and the kernel spreads associations over them (Linux).
    reuse_port: bool = False
    # pynetdicom's reactors woken by what they wait for, not 1 ms polls (node.pacing).
    adaptive_polling: bool = True
    tls: ReceiverTLSConfig | None = None

    _ae = field_validator("ae_title")(_check_ae)


class PeerConfig(_Section):
    ae_title: str  # "*" allows any calling AE title (then bind it to a host)
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)  # where it listens, for reply_to_sender

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return v if v == "*" else _check_ae(v)


class StorageConfig(_Section):
    root: Path = Path("var/store")
    min_free_mb: int = Field(1024, ge=0)
    retention_days: int = Field(30, ge=1)
    duplicate_policy: Literal["keep_first", "replace"] = "keep_first"


class DatabaseConfig(_Section):
    url: str = "sqlite:///var/aidnode.db"
    busy_timeout_ms: int = Field(5000, ge=100)

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if v.startswith("postgresql://"):  # the driver aidnode ships with is psycopg 3
            return "postgresql+psycopg://" + v[len("postgresql://"):]
        if not v.startswith(("sqlite:///", "postgresql+psycopg://")):
            raise ValueError("must start with sqlite:/// or postgresql+psycopg://")
        return v


class AssemblyConfig(_Section):
    stable_after_s: float = Field(30, ge=0)
    modality_stable_after_s: dict[str, float] = Field(default_factory=dict)
    check_interval_s: float = Field(1.0, gt=0)

    def stable_after(self, modalities: set[str]) -> float:
        """The wait for a study holding these modalities: the longest that applies."""
        waits = [self.modality_stable_after_s[m] for m in modalities
                 if m in self.modality_stable_after_s]
        return max(waits, default=self.stable_after_s)


class RuleMatch(_Section):
    modality: list[str] = Field(default_factory=list)
    body_part: str | None = None  # regex, BodyPartExamined
    sop_class_uid: list[str] = Field(default_factory=list)
    study_description: str | None = None  # regex
    series_description: str | None = None  # regex
    image_type: str | None = None  # a value ImageType must contain, e.g. "ORIGINAL"
    min_instances: int = Field(1, ge=1)
    max_instances: int | None = Field(None, ge=1)
    calling_ae: list[str] = Field(default_factory=list)
    called_ae: list[str] = Field(default_factory=list)

    @field_validator("body_part", "study_description", "series_description")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"is not a valid regular expression: {exc}") from None
        return v


class RuleConfig(_Section):
    name: str
    model: str = "demo"
    destinations: list[str] = Field(default_factory=list)
    mode: Literal["active", "shadow"] = "active"
    match: RuleMatch = RuleMatch()  # frozen: sharing the default is safe


class TLSConfig(_Section):
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    verify_peer: bool = True


class DestinationConfig(_Section):
    name: str
    ae_title: str = "PACS"
    host: str = "127.0.0.1"
    port: int = Field(104, ge=1, le=65535)
    reply_to_sender: bool = False
    max_attempts: int = Field(8, ge=1)
    backoff_base_s: float = Field(5, gt=0)
    backoff_max_s: float = Field(900, gt=0)
    breaker_failures: int = Field(5, ge=1)
    breaker_cooldown_s: float = Field(60, gt=0)
    tls: TLSConfig | None = None

    _ae = field_validator("ae_title")(_check_ae)


class InferenceConfig(_Section):
    device: str = "auto"
    batch_size: int = Field(8, ge=1, le=512)
    models_dir: Path = Path("var/models")
    workers: int = Field(1, ge=0, le=64)
    # `aidnode serve` (role all) runs its workers in a child process of their own, which it
    # restarts if it dies; false: in threads of the receiver's process (node/workerproc.py).
    separate_process: bool = True
    lease_s: float = Field(300, gt=0)
    heatmap_when_negative: Literal["none", "top"] = "none"
    # CPU threads for the model; 0: one fewer than the machine's cores (at least 1), so the
    # receiver keeps a core while the model runs.
    cpu_threads: int = Field(0, ge=0, le=256)
    # Niceness of the worker threads (Linux): receiving, which answers scanners, goes first.
    nice: int = Field(10, ge=0, le=19)
    # Where the worker has a process of its own (serve's child, --role worker), the thread
    # that decodes, runs the model and builds the results (Linux; node/priority.py):
    # "adaptive": under SCHED_IDLE while this host receives (a C-STORE in the last 2 s): CPU
    # time nothing else wants, taken back at once by a receiver thread that wakes; at `nice`
    # otherwise. Needs RLIMIT_NICE >= 20 - nice (systemd LimitNICE=+10) or CAP_SYS_NICE to
    # move back; without it the model stays at `nice` ("normal"), with a warning.
    # "idle": under SCHED_IDLE always (analyses wait while other processes keep the CPUs
    # busy: none ran for 2 minutes beside a training run). "normal": niceness only.
    # Database work stays at `nice` in every case.
    scheduling: Literal["adaptive", "idle", "normal"] = "adaptive"
    # Load the rules' models and build one throwaway result when a worker starts, so the
    # first study does not wait for them.
    warm_up: bool = True

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v

    demo_steps: int = Field(700, ge=1)  # inference.train.DEMO_STEPS


class ResultsConfig(_Section):
    sr_series_number: int = Field(9901, ge=1)
    sr_series_description: str = "AI findings (aidnode, not for diagnostic use)"
    sc_series_number: int = Field(9902, ge=1)
    sc_series_description: str = "AI heatmaps (aidnode, not for diagnostic use)"
    institution_name: str | None = None


class MetricsConfig(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class Config(_Section):
    node: NodeConfig = NodeConfig()  # frozen: sharing the default is safe
    peers: list[PeerConfig] = Field(default_factory=list)
    storage: StorageConfig = StorageConfig()  # frozen: sharing the default is safe
    database: DatabaseConfig = DatabaseConfig()  # frozen: sharing the default is safe
    assembly: AssemblyConfig = AssemblyConfig()  # frozen: sharing the default is safe
    rules: list[RuleConfig] = Field(default_factory=list)
    destinations: list[DestinationConfig] = Field(default_factory=list)
    inference: InferenceConfig = InferenceConfig()  # frozen: sharing the default is safe
    results: ResultsConfig = ResultsConfig()  # frozen: sharing the default is safe
    metrics: MetricsConfig = MetricsConfig()  # frozen: sharing the default is safe
    logging: LoggingConfig = LoggingConfig()  # frozen: sharing the default is safe
    source: Path | None = None  # the file this was read from

    def destination(self, name: str) -> DestinationConfig:
        for d in self.destinations:
            if d.name == name:
                return d
        raise KeyError(name)


_PATH_KEYS = (("storage", "root"), ("inference", "models_dir"))


def _env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, value in environ.items():
        if not name.startswith("AIDNODE_") or "__" not in name:
            continue
        section, _, key = name[len("AIDNODE_"):].lower().partition("__")
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError([f"{name}: section [{section}] is a list and cannot be overridden"])
        if value.startswith(("[", "{")):  # a list or table, written as TOML
            try:
                target[key] = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                raise ConfigError([f"{name}: not a valid TOML list or table"]) from None
        else:
            target[key] = value  # pydantic converts "11113" or "true" to the field's type


_HEADER = re.compile(r"^\[(\[)?\s*([A-Za-z0-9_.\- ]+?)\s*\]?\]\s*(#.*)?$")
_KEY = re.compile(r"^([A-Za-z0-9_\-]+)\s*=")


def _line_index(text: str) -> dict[str, int]:
    """Dotted key (array entries numbered, e.g. ``rules.0.match.modality``) -> line number."""
    index: dict[str, int] = {}
    counts: dict[str, int] = {}
    path = ""
    for no, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        header = _HEADER.match(s)
        if header:
            name = header.group(2)
            if header.group(1):  # [[array]]: a new entry
                counts[name] = counts.get(name, -1) + 1
                path = f"{name}.{counts[name]}"
            else:  # [table] or [array.sub]: sub-tables belong to the array's last entry
                head, _, rest = name.partition(".")
                path = f"{head}.{counts[head]}" + (f".{rest}" if rest else "") \
                    if head in counts else name
            index.setdefault(path, no)
            continue
        key = _KEY.match(s)
        if key:
            index.setdefault(f"{path}.{key.group(1)}" if path else key.group(1), no)
    return index


def _line_of(index: dict[str, int], loc: tuple[Any, ...]) -> int | None:
    """The line of the key at ``loc``, or of its closest enclosing table."""
    parts = [str(p) for p in loc]
    while parts:
        if ".".join(parts) in index:
            return index[".".join(parts)]
        parts.pop()
    return None


def _reference_problems(data: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """Cross-references the field validators cannot see: rule -> destination names."""
    out: list[tuple[tuple[Any, ...], str]] = []
    dests = data.get("destinations") or []
    names = [d.get("name") for d in dests if isinstance(d, dict)]
    for i, n in enumerate(names):
        if n is not None and names.index(n) != i:
            out.append((("destinations", i, "name"), f"destination name {n!r} is used twice"))
    for i, rule in enumerate(data.get("rules") or []):
        if not isinstance(rule, dict):
            continue
        for d in rule.get("destinations") or []:
            if d not in names:
                out.append((("rules", i, "destinations"), f"names unknown destination {d!r}"))
    node = data.get("node")
    tls = node.get("tls") if isinstance(node, dict) else None
    if isinstance(node, dict) and isinstance(tls, dict):
        port = str(node.get("port", NodeConfig.model_fields["port"].default))
        if str(tls.get("port", ReceiverTLSConfig.model_fields["port"].default)) == port:
            out.append((("node", "tls", "port"), f"must differ from node.port ({port})"))
    return out


def _file_problems(cfg: Config) -> list[tuple[tuple[Any, ...], str]]:
    """Files the node must read at start: the TLS listener's certificate, key and CA bundle."""
    out: list[tuple[tuple[Any, ...], str]] = []
    if cfg.node.tls is not None:
        for key in ("certificate", "private_key", "ca_bundle"):
            path = getattr(cfg.node.tls, key)
            if path is not None and not path.is_file():
                out.append((("node", "tls", key), f"no such file: {path}"))
    return out


def _resolve(cfg: Config, base: Path) -> Config:
    updates: dict[str, Any] = {}
    for section, key in _PATH_KEYS:
        sec = getattr(cfg, section)
        value = getattr(sec, key)
        if not value.is_absolute():
            updates[section] = sec.model_copy(update={key: (base / value).resolve()})
    tls = cfg.node.tls
    if tls is not None:
        paths = {k: (base / v).resolve() for k in ("certificate", "private_key", "ca_bundle")
                 if (v := getattr(tls, k)) is not None and not v.is_absolute()}
        updates["node"] = cfg.node.model_copy(update={"tls": tls.model_copy(update=paths)})
    dests = []
    for d in cfg.destinations:
        if d.tls is not None:
            paths = {k: (base / v).resolve() for k in ("cert", "key", "ca")
                     if (v := getattr(d.tls, k)) is not None and not v.is_absolute()}
            d = d.model_copy(update={"tls": d.tls.model_copy(update=paths)})
        dests.append(d)
    updates["destinations"] = dests
    url = cfg.database.url
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////") and ":memory:" not in url:
        path = (base / url[len("sqlite:///"):]).resolve()
        updates["database"] = cfg.database.model_copy(update={"url": f"sqlite:///{path}"})
    return cfg.model_copy(update=updates)


def load_config(path: Path | str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read, override from the environment, validate and resolve a config file.

    ``path`` None means the embedded defaults with paths under the current directory.
    Raises ConfigError listing every problem.
    """
    environ = os.environ if environ is None else environ
    text = ""
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            data: dict[str, Any] = tomllib.loads(text)
        except FileNotFoundError:
            raise ConfigError([f"{path}: no such file"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
        base = path.resolve().parent
    else:
        data, base = {}, Path.cwd()
    _env_overrides(data, environ)
    found: list[tuple[tuple[Any, ...], str]] = []
    cfg = None
    try:
        cfg = Config.model_validate({**data, "source": path})
    except ValidationError as exc:
        found += [(tuple(e["loc"]), "unknown key" if e["type"] == "extra_forbidden"
                   else e["msg"]) for e in exc.errors()]
    found += _reference_problems(data)
    resolved = None if cfg is None else _resolve(cfg, base)
    if resolved is not None:
        found += _file_problems(resolved)
    if found or resolved is None:
        index = _line_index(text)
        problems = []
        for loc, msg in found:
            key = ".".join(str(p) for p in loc) or "(top level)"
            env = f"AIDNODE_{loc[0]}__{loc[1]}".upper() if len(loc) == 2 else ""
            if env in environ:
                where = f" (from {env})"
            else:
                line = _line_of(index, loc)
                where = f" (line {line})" if line else ""
            problems.append(f"{key}{where}: {msg}")
        raise ConfigError(problems, source=path) from None
    return resolved
