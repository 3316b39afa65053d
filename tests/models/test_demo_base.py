"""The shipped demo-base: same logits in our engine and in transformers (skipped before a build)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import Engine

DEMO_BASE = Path(__file__).resolve().parents[2] / "models" / "demo-base"

pytestmark = pytest.mark.skipif(
    not (DEMO_BASE / "model.safetensors").is_file(), reason="models/demo-base not built"
)


def test_demo_base_logits_match_transformers() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(DEMO_BASE)
    messages = [
        {"role": "system", "content": "planner"},
        {"role": "user", "content": "What is the combined population of Ralgor and Besfein?"},
    ]
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(DEMO_BASE, dtype=torch.float32)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    engine = Engine(device="cpu")
    try:
        engine.load_model("demo-base", DEMO_BASE, dtype="float32", max_model_len=256, num_blocks=32)
        assert engine.tokenizer("demo-base").encode(text, add_special_tokens=False) == ids
        got = engine.logits("demo-base", ids)
    finally:
        engine.shutdown()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
