"""`compound finetune` on a tiny random checkpoint: the adapter it writes loads in `peft`, and
peft's logits equal our engine's on the checkpoint with the adapter merged in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine import Engine
from models.finetune import merge_adapter
from server.cli import main as cli_main
from tests.engine.tiny_models import make_checkpoint

EXAMPLES = [
    {
        "messages": [
            {"role": "user", "content": f"red {i}"},
            {"role": "assistant", "content": "blue"},
        ]
    }
    for i in range(12)
] + [{"prompt": "the river", "completion": " runs fast"}]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("finetune")
    base = make_checkpoint(root / "base", "llama", hidden=32, heads=4, kv_heads=2, intermediate=64)
    data = root / "data.jsonl"
    data.write_text("\n".join(json.dumps(e) for e in EXAMPLES) + "\n")
    out = root / "adapter"
    argv = ["finetune", "--base", str(base), "--data", str(data), "--out", str(out), "--steps", "3"]
    assert cli_main([*argv, "--rank", "4", "--alpha", "8", "--lr", "0.05"]) == 0
    return base, out


def test_adapter_files_in_peft_layout(adapter: tuple[Path, Path]) -> None:
    _, out = adapter
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert (out / "adapter_model.safetensors").is_file()


def test_peft_loads_adapter_and_matches_merged_engine(
    adapter: tuple[Path, Path], tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, out = adapter
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ids = [1, 5, 9, 17, 33, 2, 7]
    with torch.no_grad():
        plain = hf(torch.tensor([ids])).logits[0]
        peft_model = PeftModel.from_pretrained(hf, out)
        tuned = peft_model(torch.tensor([ids])).logits[0]
    assert not torch.allclose(plain, tuned, atol=1e-4), "training moved no weight"
    merged = merge_adapter(base, out, tmp_path / "merged")
    engine = Engine(device="cpu")
    try:
        engine.load_model("merged", merged, dtype="float32", max_model_len=64, num_blocks=16)
        ours = engine.logits("merged", ids)
    finally:
        engine.shutdown()
    torch.testing.assert_close(ours, tuned, atol=1e-4, rtol=1e-4)


def test_resume_is_a_no_op_when_done(adapter: tuple[Path, Path], tmp_path: Path) -> None:
    base, out = adapter
    before = (out / "adapter_model.safetensors").read_bytes()
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(e) for e in EXAMPLES) + "\n")
    argv = ["finetune", "--base", str(base), "--data", str(data), "--out", str(out), "--steps", "3"]
    assert cli_main([*argv, "--rank", "4", "--alpha", "8", "--lr", "0.05"]) == 0
    assert (out / "adapter_model.safetensors").read_bytes() == before


def test_bad_data_line_exits_2(adapter: tuple[Path, Path], tmp_path: Path) -> None:
    base, _ = adapter
    data = tmp_path / "bad.jsonl"
    data.write_text('{"nothing": 1}\n')
    argv = ["finetune", "--base", str(base), "--data", str(data), "--out", str(tmp_path / "o")]
    assert cli_main(argv) == 2


def test_a_finished_run_reports_its_figures_on_resume(
    adapter: tuple[Path, Path], tmp_path: Path
) -> None:
    from models.finetune import FinetuneConfig, finetune

    base, _ = adapter
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(e) for e in EXAMPLES) + "\n")
    cfg = FinetuneConfig(steps=2, rank=4, alpha=8, precision="float32")
    first = finetune(base, data, tmp_path / "out", cfg)
    again = finetune(base, data, tmp_path / "out", cfg)  # resumes at the end: no step runs
    assert again["steps"] == first["steps"] == 2
    assert again["loss"] == first["loss"] is not None
    assert again["precision"] == "float32"
