"""`compound quantize` and the `quantization` / `kv_cache_dtype` model settings of compound.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.cli import main
from server.config import parse_config
from server.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_quantize_writes_a_checkpoint_the_engine_loads(tmp_path: Path, capsys) -> None:
    out = tmp_path / "q"
    assert (
        main(
            [
                "quantize",
                "--model",
                str(ROOT / "models/demo-base"),
                "--scheme",
                "int4-g64",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    figures = json.loads(capsys.readouterr().out)
    assert figures["scheme"] == "int4-g64" and figures["bytes_out"] < 0.35 * figures["bytes_in"]
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["scheme"] == "int4-g64" and cfg["group_size"] == 64

    from engine import Engine

    with Engine(device="cpu") as eng:
        assert eng.load_model("q", out, dtype="float32").quantization == "int4-g64"


def test_quantize_reports_bad_input_with_status_2(tmp_path: Path) -> None:
    assert (
        main(
            [
                "quantize",
                "--model",
                str(tmp_path / "missing"),
                "--scheme",
                "int8",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    with pytest.raises(SystemExit):
        main(["quantize", "--model", "x", "--scheme", "int3", "--out", "y"])


def test_model_config_passes_quantization_to_load_model() -> None:
    config = parse_config(
        "models:\n  - {name: a, path: x, quantization: int8, kv_cache_dtype: int8}\n"
        "  - {name: b, path: y}\n"
    )
    a, b = config.models
    assert a.load_kwargs()["quantization"] == "int8" and a.load_kwargs()["kv_cache_dtype"] == "int8"
    assert "quantization" not in b.load_kwargs() and "kv_cache_dtype" not in b.load_kwargs()


@pytest.mark.parametrize(("field", "value"), [("quantization", "int3"), ("kv_cache_dtype", "int4")])
def test_model_config_rejects_unknown_schemes(field: str, value: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(f"models:\n  - {{name: a, path: x, {field}: {value}}}\n", file="c.yaml")
    assert e.value.path == f"models[0].{field}"
