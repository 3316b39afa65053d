"""A broken checkpoint fails `Engine.load_model` with a `CheckpointError` naming the file and
field, and leaves the engine as it was."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from engine import CheckpointError, Engine, UnsupportedArchitectureError
from tests.engine.tiny_models import rewrite_config


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    """One CPU engine for the module."""
    eng = Engine(device="cpu")
    yield eng
    eng.shutdown()


@pytest.fixture
def checkpoint(tiny_llama: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny Llama that a test may break."""
    return Path(shutil.copytree(tiny_llama, tmp_path / "ckpt"))


@pytest.fixture
def sharded(build_variant, tmp_path: Path) -> Path:
    """A private copy of the sharded tiny Llama."""
    return Path(shutil.copytree(build_variant("llama-sharded"), tmp_path / "sharded"))


def load_error(engine: Engine, path: Path) -> CheckpointError:
    """Load `path`, expect a CheckpointError, check nothing was loaded, return the error."""
    with pytest.raises(CheckpointError) as info:
        engine.load_model("broken", path)
    assert "broken" not in engine.model_names()
    return info.value


def test_intact_copy_loads(engine: Engine, checkpoint: Path) -> None:
    engine.load_model("intact", checkpoint)
    assert "intact" in engine.model_names()
    engine.unload_model("intact")


def test_missing_config(engine: Engine, checkpoint: Path) -> None:
    (checkpoint / "config.json").unlink()
    err = load_error(engine, checkpoint)
    assert err.file == str(checkpoint / "config.json")
    assert err.field is None


def test_invalid_config_json(engine: Engine, checkpoint: Path) -> None:
    (checkpoint / "config.json").write_text('{"architectures": [')
    err = load_error(engine, checkpoint)
    assert err.file == str(checkpoint / "config.json")


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "MixtralForCausalLM"])
def test_unsupported_architecture(engine: Engine, checkpoint: Path, arch: str) -> None:
    rewrite_config(checkpoint, architectures=[arch])
    err = load_error(engine, checkpoint)
    assert isinstance(err, UnsupportedArchitectureError)
    assert err.file == str(checkpoint / "config.json")
    assert err.field == "architectures"
    assert arch in str(err)


@pytest.mark.parametrize(
    "field",
    [
        "architectures",
        "hidden_size",
        "num_attention_heads",
        "num_hidden_layers",
        "intermediate_size",
        "vocab_size",
    ],
)
def test_missing_required_field(engine: Engine, checkpoint: Path, field: str) -> None:
    rewrite_config(checkpoint, **{field: None})
    err = load_error(engine, checkpoint)
    assert err.file == str(checkpoint / "config.json")
    assert err.field == field


def test_wrongly_typed_field(engine: Engine, checkpoint: Path) -> None:
    rewrite_config(checkpoint, hidden_size="64")
    err = load_error(engine, checkpoint)
    assert (err.file, err.field) == (str(checkpoint / "config.json"), "hidden_size")


def test_missing_weights(engine: Engine, checkpoint: Path) -> None:
    (checkpoint / "model.safetensors").unlink()
    err = load_error(engine, checkpoint)
    assert "model.safetensors" in f"{err.file} {err}"


def test_missing_shard(engine: Engine, sharded: Path) -> None:
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (sharded / shard).unlink()
    err = load_error(engine, sharded)
    assert err.file == str(sharded / shard)


def test_missing_tensor(engine: Engine, checkpoint: Path) -> None:
    file = checkpoint / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    err = load_error(engine, checkpoint)
    assert err.field == "model.layers.1.mlp.down_proj.weight"
    assert err.file == str(file)


def test_shape_mismatch(engine: Engine, checkpoint: Path) -> None:
    rewrite_config(checkpoint, intermediate_size=96)
    err = load_error(engine, checkpoint)
    assert err.field is not None
    assert "mlp" in err.field


def test_missing_tokenizer(engine: Engine, checkpoint: Path) -> None:
    (checkpoint / "tokenizer.json").unlink()
    err = load_error(engine, checkpoint)
    assert err.file == str(checkpoint / "tokenizer.json")
