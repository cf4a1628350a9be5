"""Settings: precedence CLI > environment > TOML > defaults, backend parsing, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from lbproxy.config import ConfigError, load_settings
from lbproxy.observe import MAX_BACKENDS


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("LBPROXY_"):
            monkeypatch.delenv(key)


def test_defaults() -> None:
    s = load_settings({})
    assert s.mode == "serve" and s.policy == "round_robin"
    assert s.port == 8080 and s.admin_port == 9180 and s.admin_host == "127.0.0.1"
    assert s.eject_consecutive_failures == 5 and s.panic_threshold_percent == 50.0
    assert s.backends == []


def test_backends_with_weights() -> None:
    s = load_settings({"backends": "http://127.0.0.1:8081, http://127.0.0.1:8082=2.5,"})
    assert [(b.url, b.weight, b.name) for b in s.backends] == [
        ("http://127.0.0.1:8081", 1.0, "127.0.0.1:8081"),
        ("http://127.0.0.1:8082", 2.5, "127.0.0.1:8082"),
    ]


def test_precedence_cli_over_env_over_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "lbproxy.toml"
    toml.write_text('policy = "p2c"\nport = 7000\nadmin_port = 7001\nretry = false\n')
    s = load_settings({"config": str(toml)})
    assert (s.policy, s.port, s.admin_port, s.retry) == ("p2c", 7000, 7001, False)
    monkeypatch.setenv("LBPROXY_PORT", "7100")
    monkeypatch.setenv("LBPROXY_POLICY", "least_conn")
    s = load_settings({"config": str(toml)})
    assert (s.policy, s.port, s.admin_port) == ("least_conn", 7100, 7001)
    s = load_settings({"config": str(toml), "port": "7200"})
    assert (s.policy, s.port, s.admin_port) == ("least_conn", 7200, 7001)


def test_config_file_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('policy = "sed"\n')
    monkeypatch.setenv("LBPROXY_CONFIG", str(toml))
    assert load_settings({}).policy == "sed"


def test_toml_backends_as_tables(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('[[backends]]\nurl = "http://127.0.0.1:8081"\nweight = 3\n[[backends]]\nurl = "http://b:80"\n')
    s = load_settings({"config": str(toml)})
    assert [(b.url, b.weight) for b in s.backends] == [("http://127.0.0.1:8081", 3.0), ("http://b:80", 1.0)]


def test_cluster_file_gives_backends_weighted_by_workers_times_speed(tmp_path: Path) -> None:
    cluster = tmp_path / "cluster.toml"
    cluster.write_text("[[server]]\nport = 8081\nworkers = 4\nspeed = 2.0\n[[server]]\nname = 'b'\nport = 8082\n")
    s = load_settings({"cluster_file": str(cluster)})
    assert [(b.url, b.weight) for b in s.backends] == [("http://127.0.0.1:8081", 8.0), ("http://127.0.0.1:8082", 4.0)]


@pytest.mark.parametrize(
    ("overrides", "toml_text", "expected"),
    [
        ({"policy": "fastest"}, None, "invalid setting --policy (LBPROXY_POLICY): unknown policy 'fastest'"),
        ({"backends": "127.0.0.1:8081"}, None, "invalid setting --backends (LBPROXY_BACKENDS): malformed backend URL"),
        ({"backends": "http://h:notaport"}, None, "invalid setting --backends"),
        ({"port": "70000"}, None, "invalid setting --port (LBPROXY_PORT)"),
        ({}, "policy = ", "cannot read configuration"),
        ({}, "polcy = 'p2c'\n", "unknown setting 'polcy'"),
    ],
)
def test_bad_settings_give_one_line(
    tmp_path: Path, overrides: dict[str, str], toml_text: str | None, expected: str
) -> None:
    if toml_text is not None:
        path = tmp_path / "bad.toml"
        path.write_text(toml_text)
        overrides = {**overrides, "config": str(path)}
    with pytest.raises(ConfigError) as info:
        load_settings(overrides)
    msg = str(info.value)
    assert expected in msg
    assert "\n" not in msg


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings({"config": str(tmp_path / "nope.toml")})


def test_too_many_backends() -> None:
    urls = ",".join(f"http://127.0.0.1:{8000 + i}" for i in range(MAX_BACKENDS + 1))
    with pytest.raises(ConfigError, match=f"at most {MAX_BACKENDS}"):
        load_settings({"backends": urls})


def test_model_implies_dqn_policy(tmp_path: Path) -> None:
    model = tmp_path / "dqn_final.pth"
    assert load_settings({"mode": "serve", "model": str(model)}).policy == "dqn"
    with pytest.raises(ConfigError, match="only used by --policy dqn"):
        load_settings({"mode": "serve", "model": str(model), "policy": "p2c"})
