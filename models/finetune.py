"""LoRA supervised fine-tuning on our engine's model code, saved as a PEFT adapter.

`compound finetune --base DIR --data FILE.jsonl --out DIR` trains low-rank updates B @ A of the
chosen linear layers (the base weights stay frozen) on the assistant turns of chat examples, and
writes `adapter_config.json` + `adapter_model.safetensors` in the layout `peft` reads. Each JSONL
line is `{"messages": [{"role": ..., "content": ...}, ...]}` (the last message, the assistant's,
is the target) or `{"prompt": ..., "completion": ...}`. Training is resumable: rerunning the
same command continues from `<out>/.checkpoint/state.pt`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from engine.checkpoint import load_model
from engine.model import Transformer
from engine.tokenizer import Tokenizer
from models.train import Doc, TrainConfig, batches, train

log = logging.getLogger(__name__)

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ALL_TARGETS
PEFT_PREFIX = "base_model.model."


class FinetuneError(Exception):
    """A fine-tuning input that cannot be used (bad data line, unknown target module)."""


@dataclass
class FinetuneConfig:
    """LoRA and optimisation settings; `epochs` (when set) decides the number of steps."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    lr: float = 2e-3
    steps: int | None = None
    epochs: float | None = None
    seq_len: int = 256
    rows: int = 8
    seed: int = 0
    checkpoint_every: int = 50
    precision: str | None = None  # auto, float32 or bf16 (None: TrainConfig's default)
    extra: dict = field(default_factory=dict)


class LoRALinear(nn.Module):
    """y = base(x) + (x @ A.T @ B.T) * alpha / r, with the base layer frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.scaling = alpha / rank
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling


def add_lora(model: Transformer, cfg: FinetuneConfig) -> dict[str, LoRALinear]:
    """Swap the target linears of every layer for LoRALinear; returns them by module path."""
    unknown = set(cfg.target_modules) - set(ALL_TARGETS)
    if unknown:
        raise FinetuneError(f"unknown target modules {sorted(unknown)}; choose from {ALL_TARGETS}")
    swapped = {}
    for i, layer in enumerate(model.model.layers):
        for parent_name, parent in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for name in cfg.target_modules:
                base = getattr(parent, name, None)
                if isinstance(base, nn.Linear):
                    lora = LoRALinear(base, cfg.rank, cfg.alpha)
                    setattr(parent, name, lora)
                    swapped[f"model.layers.{i}.{parent_name}.{name}"] = lora
    return swapped


def read_examples(file: Path, tokenizer: Tokenizer) -> list[Doc]:
    """Tokenised examples: weight 1 on the target text and the end-of-turn token."""
    eos = tokenizer.id_to_token(tokenizer.eos_token_ids[0]) if tokenizer.eos_token_ids else ""
    docs = []
    for n, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            prompt, target = _prompt_and_target(json.loads(line), tokenizer)
        except (json.JSONDecodeError, KeyError, TypeError, IndexError) as e:
            raise FinetuneError(f"{file}:{n}: not a chat or prompt/completion example ({e})") from e
        p = tokenizer.encode(prompt, add_special_tokens=False)
        a = tokenizer.encode(target + (eos or ""), add_special_tokens=False)
        docs.append(Doc(p + a, [0.0] * (len(p) - 1) + [1.0] * len(a) + [0.0]))
    if not docs:
        raise FinetuneError(f"{file}: no examples")
    return docs


def _prompt_and_target(row: dict, tokenizer: Tokenizer) -> tuple[str, str]:
    if "messages" in row:
        messages = row["messages"]
        if messages[-1]["role"] != "assistant":
            raise KeyError("the last message must be the assistant's")
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
        return prompt, messages[-1]["content"]
    return str(row["prompt"]), str(row["completion"])


def finetune(
    base: str | Path,
    data: str | Path,
    out: str | Path,
    cfg: FinetuneConfig,
    *,
    work_dir: str | Path | None = None,
) -> dict:
    """Train a LoRA adapter of `base` on `data` and save it in PEFT format to `out`."""
    base, data, out = Path(base), Path(data), Path(out)
    work = Path(work_dir) if work_dir else out / ".checkpoint"
    tokenizer = Tokenizer.from_dir(base)
    _, model = load_model(base, "float32", torch.device("cpu"))
    torch.manual_seed(cfg.seed)
    loras = add_lora(model, cfg)
    params = [p for m in loras.values() for p in (m.lora_A.weight, m.lora_B.weight)]
    for p in params:
        p.requires_grad_(True)
    docs = read_examples(data, tokenizer)
    steps = cfg.steps or _steps_for_epochs(docs, cfg)
    tc = TrainConfig(
        steps=steps,
        lr=cfg.lr,
        seq_len=cfg.seq_len,
        rows=cfg.rows,
        warmup=min(20, max(1, steps // 10)),
        weight_decay=0.0,
        seed=cfg.seed,
        checkpoint_every=cfg.checkpoint_every,
        **({"precision": cfg.precision} if cfg.precision else {}),
    )
    figures = train(
        model,
        params,
        lambda start: batches(docs, seq_len=tc.seq_len, rows=tc.rows, seed=tc.seed, start=start),
        tc,
        work,
        label=f"finetune {out.name}",
    )
    save_adapter(loras, cfg, base, out)
    return {**figures, "examples": len(docs), "rank": cfg.rank, "alpha": cfg.alpha,
            "target_modules": list(cfg.target_modules), "trainable_parameters": sum(p.numel() for p in params)}  # fmt: skip


def _steps_for_epochs(docs: list[Doc], cfg: FinetuneConfig) -> int:
    tokens = sum(min(len(d.ids), cfg.seq_len) for d in docs)
    per_step = cfg.seq_len * cfg.rows * 0.9  # packing leaves ~10% of each row empty
    return max(1, math.ceil((cfg.epochs or 1.0) * tokens / per_step))


def save_adapter(loras: dict[str, LoRALinear], cfg: FinetuneConfig, base: Path, out: Path) -> None:
    """Write adapter_model.safetensors (PEFT tensor names) and adapter_config.json."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, m in loras.items():
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = m.lora_B.weight.detach().contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base.name,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(cfg.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """A full checkpoint with W + B @ A * alpha / r folded in (for engines without LoRA)."""
    import shutil

    from safetensors.torch import load_file

    base, adapter, out = Path(base), Path(adapter), Path(out)
    config = json.loads((adapter / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    state = load_file(str(base / "model.safetensors"))
    for name, a in lora.items():
        if not name.endswith(".lora_A.weight"):
            continue
        module = name.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
        b = lora[name.replace(".lora_A.", ".lora_B.")]
        weight = state[f"{module}.weight"]
        state[f"{module}.weight"] = (weight.float() + b.float() @ a.float() * scaling).to(
            weight.dtype
        )
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
