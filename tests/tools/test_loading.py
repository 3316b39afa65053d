"""Operator tools from configured modules and installed entry points; the default registry."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from tools import ENTRY_POINT_GROUP, ToolsConfig, default_registry, load_entry_points, load_modules
from tools.errors import ToolError, ToolRegistrationError
from tools.registry import ToolRegistry

BUILT_INS = {"calc", "http.get", "kb.describe", "kb.lookup", "kb.search"}


def _install_distribution(site: Path, entry_points: str) -> None:
    # A minimal installed distribution: what `pip install` of an operator's package leaves.
    info = site / "compound_operator_tools-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: compound-operator-tools\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entry_points}\n")


async def test_load_modules() -> None:
    registry = ToolRegistry()
    load_modules(registry, ["tests.tools.operator_tools"])
    assert registry.names() == ["operator.shout"]
    assert await registry.call("operator.shout", {"text": "hi", "times": 2}) == "HI HI"
    assert registry.get("operator.shout").parameters["properties"]["times"]["default"] == 1


@pytest.mark.parametrize(
    ("module", "message"),
    [
        ("tests.tools.no_such_module", "cannot be imported"),
        ("tests.tools", "has no register(registry) function"),
        ("tests.tools.broken_tools", "failed while registering: no such thing"),
        ("os; rm -rf", "not a dotted module name"),
    ],
)
def test_load_modules_errors(module: str, message: str) -> None:
    with pytest.raises(ToolRegistrationError) as caught:
        load_modules(ToolRegistry(), [module])
    assert message in str(caught.value)
    assert module in str(caught.value)


def test_load_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_distribution(tmp_path, "shout = tests.tools.operator_tools:register")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = ToolRegistry()
    assert load_entry_points(registry) == ["shout"]
    assert "operator.shout" in registry


def test_broken_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_distribution(tmp_path, "gone = tests.tools.no_such_module:register")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ToolRegistrationError, match=r"entry point 'gone'.*cannot be loaded"):
        load_entry_points(ToolRegistry())


async def test_default_registry(tmp_path: Path) -> None:
    config = ToolsConfig(
        kb_path=str(tmp_path / "kb.sqlite"), modules=("tests.tools.operator_tools",)
    )
    registry = default_registry(config)
    assert set(registry.names()) == BUILT_INS | {"operator.shout"}
    assert not (tmp_path / "kb.sqlite").exists()  # built on first use, not at start-up
    assert await registry.call("calc", {"expression": "2 * 21"}) == 42
    hits = await registry.call("kb.search", {"query": "granite"})
    assert hits["hits"] and (tmp_path / "kb.sqlite").exists()
    with pytest.raises(ToolError, match="host not allowed"):
        await registry.call("http.get", {"url": "http://127.0.0.1/"})
    assert set(registry.schemas()) == set(registry.names())


def test_default_registry_without_config() -> None:
    assert set(default_registry().names()) >= BUILT_INS


def test_tools_config_from_yaml_data() -> None:
    raw = {"http_allow_hosts": ["api.example.com"], "modules": ["pkg.tools"], "kb_seed": 7}
    config = msgspec.convert(raw, ToolsConfig)
    assert config.http_allow_hosts == ("api.example.com",)
    assert (config.kb_seed, config.kb_path, config.entry_points) == (7, None, True)
    with pytest.raises(msgspec.ValidationError, match="http_allow_host"):
        msgspec.convert({"http_allow_host": []}, ToolsConfig)
    with pytest.raises(ToolRegistrationError, match="invalid host entry"):
        default_registry(ToolsConfig(http_allow_hosts=("http://x/y",), entry_points=False))
