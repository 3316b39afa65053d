"""`compound.yaml` parsing: defaults, path resolution, errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import LimitsConfig, ServerConfig, load_config, parse_config
from server.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_shipped_config_lists_demo_base(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMPOUND_DATABASE_URL", raising=False)
    config = load_config(REPO / "compound.yaml")
    assert (config.host, config.port) == ("127.0.0.1", 8080)
    # The SQLite file lives next to the config file, wherever the server is started from.
    assert config.database_url == f"sqlite:///{REPO / 'compound.db'}"
    assert config.pipelines_dir == str(REPO / "pipelines")
    assert config.limits == LimitsConfig()
    assert [m.name for m in config.models] == ["demo-base", "demo-large", "demo-draft"]
    assert config.models[0].path == str(REPO / "models" / "demo-base")
    assert config.models[0].adapter_dir == str(REPO / "models" / "adapters")
    assert all(Path(m.path, "config.json").is_file() for m in config.models)


def test_empty_file_gives_defaults() -> None:
    config = parse_config("")
    assert config == ServerConfig()
    assert config.limits.max_body_bytes == 1 << 20 and config.limits.max_tokens == 4096
    assert config.engine.device is None and config.engine.memory_budget_bytes is None


def test_relative_model_paths_resolve_against_the_file(tmp_path: Path) -> None:
    file = tmp_path / "conf" / "server.yaml"
    file.parent.mkdir()
    file.write_text("models:\n  - {name: a, path: ../ckpt/a}\n  - {name: b, path: /abs/b}\n")
    config = load_config(file)
    assert [m.path for m in config.models] == [str(tmp_path / "ckpt" / "a"), "/abs/b"]


def test_load_kwargs_leave_unset_values_to_the_engine() -> None:
    config = parse_config("models:\n  - {name: a, path: x, max_model_len: 256}\n")
    assert config.models[0].load_kwargs() == {"dtype": "auto", "max_model_len": 256}


@pytest.mark.parametrize(
    ("text", "path", "words"),
    [
        ("limits: {max_tokens: many}", "limits.max_tokens", "Expected `int`"),
        ("limits: {max_tokens: 0}", "limits.max_tokens", ">= 1"),
        ("port: 70000", "port", "<= 65535"),
        ("engine: {gpu: true}", "engine", "unknown field `gpu`"),
        ("colour: blue", None, "unknown field `colour`"),
        ("models: [{path: x}]", "models[0]", "missing required field `name`"),
        ("models: [{name: a, path: x, dtype: int3}]", "models[0].dtype", "int3"),
        ("models: [{name: a, path: x}, {name: a, path: y}]", "models[1].name", "duplicate"),
    ],
)
def test_errors_name_the_field(text: str, path: str | None, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, file="c.yaml")
    assert info.value.path == path
    assert words in str(info.value)
    assert str(info.value).startswith(f"c.yaml: {path}:" if path else "c.yaml:")


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid YAML"):
        parse_config("limits: [", file="c.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
