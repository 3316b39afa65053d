"""Session-wide tiny checkpoints, built once per test run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.engine.tiny_models import VARIANTS, make_tokenizer, make_variant


@pytest.fixture(scope="session")
def build_variant(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Return a function that builds a named variant once per session and returns its directory."""
    built: dict[str, Path] = {}

    def build(variant: str) -> Path:
        if variant not in built:
            built[variant] = make_variant(tmp_path_factory.mktemp(variant), variant)
        return built[variant]

    return build


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding only the tiny tokenizer files."""
    out = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(build_variant: Callable[[str], Path]) -> Path:
    """A tiny random Llama checkpoint."""
    return build_variant("llama")


@pytest.fixture(scope="session")
def tiny_qwen2(build_variant: Callable[[str], Path]) -> Path:
    """A tiny random Qwen2 checkpoint (q/k/v biases)."""
    return build_variant("qwen2")


@pytest.fixture(scope="session")
def tiny_mistral(build_variant: Callable[[str], Path]) -> Path:
    """A tiny random Mistral checkpoint (sliding window 4096, never reached)."""
    return build_variant("mistral")


@pytest.fixture(scope="session", params=list(VARIANTS))
def tiny_checkpoint(request: pytest.FixtureRequest, build_variant: Callable[[str], Path]) -> Path:
    """Every checkpoint variant in turn (architectures, rope scalings, tying, sharding)."""
    return build_variant(request.param)
