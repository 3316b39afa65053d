"""The engine against transformers on the same tiny random checkpoints: logits, greedy
continuations, batch invariance, bf16 loading and sliding-window attention."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from engine import Engine, SamplingParams
from tests.engine.tiny_models import make_checkpoint

LOGITS_ATOL = 1e-4
GREEDY_TOKENS = 32


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    """One CPU engine for the module; every variant is loaded into it under its own name."""
    eng = Engine(device="cpu")
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def load(engine: Engine) -> Callable[[Path], str]:
    """Load a checkpoint once (float32) and return its model name."""

    def load_once(path: Path, dtype: str = "float32") -> str:
        name = f"{path.name}-{dtype}"
        if name not in engine.model_names():
            engine.load_model(name, path, dtype=dtype, max_model_len=256, num_blocks=160)
        return name

    return load_once


@pytest.fixture(scope="module")
def hf_model() -> Callable[[Path], torch.nn.Module]:
    """The transformers model of a checkpoint, float32, loaded once, with EOS switched off."""
    from transformers import AutoModelForCausalLM

    models: dict[Path, torch.nn.Module] = {}

    def get(path: Path) -> torch.nn.Module:
        if path not in models:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            # No EOS, rather than min_new_tokens: that would mask EOS out of the argmax, while the
            # engine's ignore_eos lets EOS win and only keeps generating.
            model.generation_config.eos_token_id = None
            models[path] = model
        return models[path]

    return get


def random_ids(n: int, seed: int, vocab: int = 512) -> list[int]:
    """Deterministic prompt ids that avoid the special tokens (ids < 5)."""
    rng = random.Random(seed)
    return [rng.randrange(5, vocab) for _ in range(n)]


def hf_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Reference logits [len(ids), vocab]."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def hf_greedy(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    """Reference greedy continuation of exactly n tokens (the fixture switched EOS off)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
        )
    return out[0, len(ids) :].tolist()


def greedy(n: int = GREEDY_TOKENS) -> SamplingParams:
    """Greedy sampling of exactly n tokens."""
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_logits_match_transformers(tiny_checkpoint: Path, load, hf_model, engine: Engine):
    name = load(tiny_checkpoint)
    ids = random_ids(40, seed=1)
    ours = engine.logits(name, ids)
    ref = hf_logits(hf_model(tiny_checkpoint), ids)
    assert ours.shape == ref.shape
    assert ours.dtype == torch.float32
    diff = (ours - ref).abs().max().item()
    assert diff <= LOGITS_ATOL, f"{tiny_checkpoint.name}: max |engine - hf| = {diff:.3g}"


def test_greedy_matches_transformers(tiny_checkpoint: Path, load, hf_model, engine: Engine):
    name = load(tiny_checkpoint)
    ids = random_ids(20, seed=2)
    out = engine.generate([ids], greedy(), model=name)[0]
    ref = hf_greedy(hf_model(tiny_checkpoint), ids, GREEDY_TOKENS)
    assert len(ref) == GREEDY_TOKENS
    assert out.token_ids == ref
    assert out.finish_reason == "length"
    assert out.prompt_token_ids == ids
    assert out.text == engine.tokenizer(name).decode(out.token_ids)


def test_batch_invariance(tiny_checkpoint: Path, load, engine: Engine) -> None:
    name = load(tiny_checkpoint)
    prompts = [random_ids(3 + 4 * i, seed=100 + i) for i in range(16)]
    targets = (0, 7, 15)
    alone = {i: engine.generate([prompts[i]], greedy(), model=name)[0].token_ids for i in targets}
    batch = engine.generate(prompts, greedy(), model=name)
    for i in targets:
        assert batch[i].token_ids == alone[i], f"prompt {i} ({len(prompts[i])} tokens)"
    assert all(len(out.token_ids) == GREEDY_TOKENS for out in batch)


def test_bfloat16_load(tiny_llama: Path, load, engine: Engine) -> None:
    fp32 = load(tiny_llama, "float32")
    bf16 = load(tiny_llama, "bfloat16")
    assert engine.model_info(bf16).dtype == "bfloat16"
    ids = random_ids(40, seed=3)
    ref, ours = engine.logits(fp32, ids), engine.logits(bf16, ids)
    assert ours.dtype == torch.float32
    assert torch.isfinite(ours).all()
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() <= 0.05 * scale
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.9
    out = engine.generate([ids], greedy(8), model=bf16)[0]
    assert len(out.token_ids) == 8


def test_sliding_window_matches_transformers(
    tmp_path_factory: pytest.TempPathFactory, load, hf_model, engine: Engine
) -> None:
    # A window much shorter than the input, so the mask and the paged cache both matter.
    path = make_checkpoint(tmp_path_factory.mktemp("mistral-window"), "mistral", sliding_window=8)
    name = load(path)
    ids = random_ids(40, seed=4)
    diff = (engine.logits(name, ids) - hf_logits(hf_model(path), ids)).abs().max().item()
    assert diff <= LOGITS_ATOL, f"max |engine - hf| = {diff:.3g}"
    out = engine.generate([ids[:20]], greedy(), model=name)[0]
    assert out.token_ids == hf_greedy(hf_model(path), ids[:20], GREEDY_TOKENS)
