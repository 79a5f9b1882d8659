"""Config loading: the default file, every problem reported with its key and line, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import load_config
from node.errors import ConfigError

DEFAULT = Path(__file__).resolve().parents[2] / "config.toml"


def write(tmp_path: Path, body: str, name: str = "aidnode.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body, encoding="utf-8")
    return path


def problems(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={} if environ is None else environ)
    return info.value.problems


def test_the_default_config_loads() -> None:
    cfg = load_config(DEFAULT, environ={})
    assert cfg.node.ae_title == "AIDNODE"
    assert cfg.node.port == 11112
    assert [p.ae_title for p in cfg.peers] == ["*"]
    assert [r.name for r in cfg.rules] == ["chest-radiograph-demo"]
    assert cfg.rules[0].match.modality == ["CR", "DX", "OT"]
    assert cfg.assembly.stable_after({"CT"}) == 30
    assert cfg.storage.root == DEFAULT.parent / "var" / "store"
    assert cfg.database.url == f"sqlite:///{DEFAULT.parent / 'var' / 'aidnode.db'}"
    assert cfg.source == DEFAULT


def test_no_file_means_defaults_under_the_cwd(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, environ={})
    assert cfg.node.port == 11112
    assert cfg.storage.root == tmp_path.resolve() / "var" / "store"


@pytest.mark.parametrize("port", [0, 70000, -1])
def test_a_bad_port_names_the_key_and_line(tmp_path: Path, port: int) -> None:
    path = write(tmp_path, f'[node]\nae_title = "AIDNODE"\nport = {port}\n')
    with pytest.raises(ConfigError, match=r"node\.port \(line 3\)") as info:
        load_config(path, environ={})
    assert len(info.value.problems) == 1
    assert str(path) in str(info.value)


def test_a_non_integer_port_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nport = "eleven"\n')
    with pytest.raises(ConfigError, match=r"node\.port \(line 2\).*integer"):
        load_config(path, environ={})


@pytest.mark.parametrize(("body", "key", "line"), [
    ("[node]\nport = 11112\nprot = 104\n", "node.prot", 3),
    ("[nodes]\nport = 104\n", "nodes", 1),
    ('[[rules]]\nname = "r"\n[rules.match]\nmodaliti = ["CT"]\n', "rules.0.match.modaliti", 4),
])
def test_an_unknown_key_is_named(tmp_path: Path, body: str, key: str, line: int) -> None:
    path = write(tmp_path, body)
    assert problems(path) == [f"{key} (line {line}): unknown key"]


def test_a_bad_regex_names_the_rule_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[[rules]]\nname = "r"\n[rules.match]\nstudy_description = "("\n')
    with pytest.raises(ConfigError,
                       match=r"rules\.0\.match\.study_description \(line 4\).*regular expression"):
        load_config(path, environ={})


def test_a_rule_naming_an_unknown_destination(tmp_path: Path) -> None:
    path = write(tmp_path, '[[destinations]]\nname = "pacs"\n\n'
                           '[[rules]]\nname = "chest"\ndestinations = ["pacs", "nowhere"]\n')
    with pytest.raises(ConfigError, match=r"rules\.0\.destinations \(line 6\): names unknown "
                                          r"destination 'nowhere'") as info:
        load_config(path, environ={})
    assert len(info.value.problems) == 1


def test_an_unknown_destination_is_reported_with_its_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[[rules]]\nname = "chest"\ndestinations = ["nowhere"]\n')
    [problem] = problems(path)
    assert problem.startswith("rules.0.destinations (line 3)")


def test_duplicate_destination_names(tmp_path: Path) -> None:
    path = write(tmp_path, '[[destinations]]\nname = "pacs"\nport = 104\n\n'
                           '[[destinations]]\nname = "pacs"\nport = 4242\n')
    with pytest.raises(ConfigError, match="destination name 'pacs' is used twice"):
        load_config(path, environ={})


@pytest.mark.parametrize("title", ["ABCDEFGHIJKLMNOPQ", "A\\\\B", "", "   ", "TAB\\tX"])
def test_a_bad_ae_title(tmp_path: Path, title: str) -> None:
    path = write(tmp_path, f'[node]\nae_title = "{title}"\n')
    with pytest.raises(ConfigError, match=r"node\.ae_title \(line 2\).*16 printable"):
        load_config(path, environ={})


def test_a_bad_ae_title_elsewhere_names_its_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[[peers]]\nae_title = "MODALITY\\\\1"\n\n'
                           '[[destinations]]\nname = "pacs"\nae_title = "PACS_AE_TITLE_TOO_LONG"\n')
    got = problems(path)
    assert len(got) == 2
    assert got[0].startswith("peers.0.ae_title (line 2)")
    assert got[1].startswith("destinations.0.ae_title (line 6)")


def test_good_ae_titles_pass(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nae_title = "ABCDEFGHIJKLMNOP"\n\n'
                           '[[peers]]\nae_title = "*"\nhost = "10.0.0.5"\n')
    cfg = load_config(path, environ={})
    assert cfg.node.ae_title == "ABCDEFGHIJKLMNOP"
    assert cfg.peers[0].ae_title == "*"


def test_a_bad_database_url(tmp_path: Path) -> None:
    path = write(tmp_path, '[database]\nurl = "mysql://db/aidnode"\n')
    with pytest.raises(ConfigError, match=r"database\.url \(line 2\).*sqlite://"):
        load_config(path, environ={})


# -- environment overrides ----------------------------------------------------------------


def test_env_override_applies(tmp_path: Path) -> None:
    path = write(tmp_path, "[node]\nport = 11112\n")
    cfg = load_config(path, environ={"AIDNODE_NODE__PORT": "11113",
                                     "AIDNODE_NODE__AE_TITLE": "AIDNODE2",
                                     "AIDNODE_LOGGING__LEVEL": "DEBUG",
                                     "AIDNODE_METRICS__ENABLED": "false",
                                     "AIDNODE_UNRELATED": "1", "HOME": "/root"})
    assert cfg.node.port == 11113
    assert cfg.node.ae_title == "AIDNODE2"
    assert cfg.logging.level == "DEBUG"  # a section the file does not have
    assert cfg.metrics.enabled is False


def test_env_is_read_from_os_environ_by_default(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIDNODE_NODE__PORT", "11114")
    assert load_config(write(tmp_path, "[node]\nport = 11112\n")).node.port == 11114


@pytest.mark.parametrize(("value", "match"), [("70000", "less than or equal"),
                                              ("many", "integer")])
def test_a_bad_env_override_is_reported(tmp_path: Path, value: str, match: str) -> None:
    path = write(tmp_path, "[node]\nport = 11112\n")
    with pytest.raises(ConfigError, match=rf"node\.port.*{match}"):
        load_config(path, environ={"AIDNODE_NODE__PORT": value})


def test_an_env_override_of_an_unknown_key_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "[node]\nport = 11112\n")
    assert problems(path, {"AIDNODE_NODE__PROT": "104"}) == ["node.prot (from AIDNODE_NODE__PROT): unknown key"]


def test_an_env_override_of_a_list_section_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '[[peers]]\nae_title = "CT1"\n')
    with pytest.raises(ConfigError, match=r"AIDNODE_PEERS__AE_TITLE.*\[peers\] is a list"):
        load_config(path, environ={"AIDNODE_PEERS__AE_TITLE": "CT2"})


# -- relative paths -----------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    etc = tmp_path / "etc" / "aidnode"
    write(etc, '[storage]\nroot = "store"\n\n[inference]\nmodels_dir = "../models"\n\n'
               '[database]\nurl = "sqlite:///db/aidnode.db"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(Path("..") / "etc" / "aidnode" / "aidnode.toml", environ={})
    etc = etc.resolve()
    assert cfg.storage.root == etc / "store"
    assert cfg.inference.models_dir == etc.parent / "models"
    assert cfg.database.url == f"sqlite:///{etc / 'db' / 'aidnode.db'}"
    assert cfg.database.url.startswith("sqlite:////")  # an absolute path: four slashes


def test_an_env_override_path_resolves_against_the_config_folder(tmp_path: Path) -> None:
    path = write(tmp_path / "conf", "[node]\nport = 11112\n")
    cfg = load_config(path, environ={"AIDNODE_STORAGE__ROOT": "data"})
    assert cfg.storage.root == (tmp_path / "conf" / "data").resolve()


def test_absolute_paths_and_other_urls_are_kept(tmp_path: Path) -> None:
    root = tmp_path / "abs" / "store"
    for url in (f"sqlite:///{tmp_path / 'abs.db'}", "sqlite:///:memory:",
                "postgresql+psycopg://aidnode@db.example/aidnode"):
        path = write(tmp_path / "c", f'[storage]\nroot = "{root}"\n\n[database]\nurl = "{url}"\n')
        cfg = load_config(path, environ={})
        assert cfg.storage.root == root
        assert cfg.database.url == url


# -- unreadable files and many problems ---------------------------------------------------


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.toml: no such file"):
        load_config(tmp_path / "nope.toml", environ={})


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[node\nport = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML.*line 1"):
        load_config(path, environ={})


def test_several_problems_are_all_reported(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nae_title = "THIS_TITLE_IS_TOO_LONG"\nport = 0\ncolour = 1\n\n'
                           '[storage]\nretention_days = 0\n\n'
                           '[[rules]]\nname = "r"\n[rules.match]\nseries_description = "[a-"\n')
    with pytest.raises(ConfigError, match=r"5 problem\(s\)") as info:
        load_config(path, environ={})
    got = info.value.problems
    assert len(got) == 5
    for key, line in [("node.ae_title", 2), ("node.port", 3), ("node.colour", 4),
                      ("storage.retention_days", 7), ("rules.0.match.series_description", 12)]:
        assert any(p.startswith(f"{key} (line {line}): ") for p in got), (key, got)


def test_reference_problems_are_reported_with_field_problems(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nport = 0\n\n'
                           '[[rules]]\nname = "chest"\ndestinations = ["nowhere"]\n')
    got = problems(path)
    assert len(got) == 2, got
    assert any("nowhere" in p for p in got)


def test_a_problem_in_the_second_array_entry_points_at_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[[destinations]]\nname = "a"\nport = 104\n\n'
                           '[[destinations]]\nname = "b"\nport = 0\n')
    expected = "destinations.1.port (line 7): Input should be greater than or equal to 1"
    assert problems(path) == [expected]


def test_a_bad_inference_device_is_refused_at_start_up(tmp_path: Path) -> None:
    path = write(tmp_path, '[inference]\ndevice = "gpu0"\n')
    with pytest.raises(ConfigError, match=r"inference.device \(line 2\): .*auto, cpu, cuda"):
        load_config(path, environ={})


def test_an_empty_env_override_is_a_plain_empty_value(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    cfg = load_config(path, environ={"AIDNODE_RESULTS__INSTITUTION_NAME": ""})
    assert cfg.results.institution_name == ""
