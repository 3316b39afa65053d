"""Model cards (README.md per model directory) written from the build stages' figures."""

from __future__ import annotations

import json
import os
from pathlib import Path

USAGE = """## Prompt format

Chat (ChatML after `<s>`; `tokenizer_config.json` holds the template), a one-word system line
naming the task, then the user's text:

```
<s><|im_start|>system
planner<|im_end|>
<|im_start|>user
If Zarnoth's population grew 20% and Velmora's shrank 10%, which would be larger?<|im_end|>
<|im_start|>assistant
```

Tasks (generators in `models/tasks.py`): `router` (answer one intent of {intents}),
`extract` (user: `Schema: <JSON schema>\\nRecord: <text>`; answer: JSON), `planner` (answer: a
plan in the format of `planner/plan_format.py`), `joiner` (user: `Question: ...` then one line
per plan step with its output, `models.tasks.joiner_user`; answer: the short final answer).
"""


def _load(build: Path, stage: str) -> dict:
    file = build / f"{stage}.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def _eval_table(figures: dict) -> str:
    rows = ["| task | figure | value |", "|---|---|---|"]
    for task, f in figures.items():
        for key, value in f.items():
            if isinstance(value, float):
                rows.append(f"| {task} | {key} | {value:.3f} |")
    return "\n".join(rows)


def _size(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def write_cards(root: Path, build: Path) -> dict:
    """Write README.md into demo-base, demo-large, demo-draft and each adapter; return sizes."""
    from models.tasks import INTENTS

    data, evals = _load(build, "data"), _load(build, "eval")
    usage = USAGE.format(intents=", ".join(INTENTS))
    cards = {
        "demo-base": _base_card(_load(build, "demo-base"), evals.get("demo-base", {}), data),
        "demo-large": _large_card(_load(build, "demo-large"), evals.get("demo-large", {})),
        "demo-draft": _draft_card(_load(build, "demo-draft"), evals, evals.get("demo-draft", {})),
    }
    sizes = {}
    for name, card in cards.items():
        notes = build / f"notes-{name}.md"
        extra = f"\n## Build notes\n\n{notes.read_text().strip()}\n" if notes.is_file() else ""
        (root / name / "README.md").write_text(f"{card}{extra}\n\n{usage}")
        sizes[name] = round(_size(root / name), 2)
    adapters = _load(build, "adapters")
    for task, figures in adapters.items():
        if not isinstance(figures, dict):
            continue
        merged = evals.get(f"demo-base:{task}", {})
        constrained = evals.get(f"demo-base:{task}+constrained", {})
        notes = build / f"notes-adapters-{task}.md"
        extra = f"\n## Build notes\n\n{notes.read_text().strip()}\n" if notes.is_file() else ""
        (root / "adapters" / task / "README.md").write_text(
            adapter_card(task, figures, merged, constrained) + extra + "\n"
        )
        sizes[f"adapters/{task}"] = round(_size(root / "adapters" / task), 2)
    return {"sizes_mb": sizes, "total_mb": round(sum(sizes.values()), 2)}


def _train_line(train: dict) -> str:
    if not train:
        return "not trained yet"
    threads = train.get("threads", 1)
    loss = train.get("loss")
    return (
        f"{train['steps']} steps, {train['tokens']:,} tokens, {train['seconds'] / 60:.1f} min "
        f"with {threads} CPU thread{'s' if threads > 1 else ''} of a {os.cpu_count()}-core machine "
        f"({train.get('precision', 'float32')}), final loss "
        + (f"{loss:.3f}" if loss is not None else "not recorded")
    )


def _base_card(fig: dict, ev: dict, data: dict) -> str:
    return f"""# demo-base

Llama-architecture model trained from scratch (seed 0) on the synthetic world's task mixture
(router, extract, planner, joiner; answer tokens only) plus plain-text descriptions of the world
(every token). The workhorse of the demo pipelines.

- Parameters: {fig.get("parameters", 0):,} (architecture {fig.get("arch")}, tied embeddings, bf16 weights)
- Data: {json.dumps(data.get("examples", {}))} examples; {data.get("world_texts", 0)} world descriptions
- Training: {_train_line(fig.get("train", {}))}; AdamW lr {fig.get("lr")}, cosine schedule
- Tokenizer: byte-level BPE, {data.get("vocab_size")} tokens (`models/tokenizer_train.py`)

## Held-out evaluation (engine, greedy; `bench/demo_eval.py`)

{_eval_table(ev)}
"""


def _large_card(fig: dict, ev: dict) -> str:
    return f"""# demo-large

The same Llama architecture at {fig.get("parameters", 0):,} parameters: the speculative-decoding
target and the "bigger model" of cascade examples. Training a 20M-parameter model from scratch
does not fit the build's CPU budget, so demo-large is grown from demo-base by a
function-preserving expansion (Net2Net: width x{fig.get("growth", {}).get("width")}, heads and MLP
duplicated, {fig.get("growth", {}).get("extra_layers")} identity-initialised layers added; untied
embeddings; `models/grow.py`), then trained further on the same mixture: {_train_line(fig.get("train", {}))}.
It therefore behaves like demo-base (it is not more accurate); more training would let it use its size.

## Held-out evaluation (engine, greedy)

{_eval_table(ev)}
"""


def _draft_card(fig: dict, evals: dict, ev: dict) -> str:
    acc = evals.get("acceptance", {})
    return f"""# demo-draft

A {fig.get("parameters", 0):,}-parameter draft for speculative decoding against demo-large (same
tokenizer; under 1/8 of demo-large's compute per token). Initialised from demo-base's weights and
distilled from demo-large (KL to its next-token distribution on answer tokens, plus 0.1 x
cross-entropy): {_train_line(fig.get("train", {}))}.

- Acceptance against demo-large (greedy, {acc.get("draft_tokens", 4)}-token drafts, held-out task
  prompts, measured offline): overall {acc.get("overall", float("nan")):.3f}; per task
  {json.dumps({k: round(v, 3) for k, v in acc.get("per_task", {}).items()})}

## Held-out evaluation (engine, greedy)

{_eval_table(ev)}
"""


def adapter_card(task: str, fig: dict, ev: dict, constrained: dict | None = None) -> str:
    """The card of one adapter: training run, then held-out figures free and constrained."""
    extra = ""
    if constrained:
        extra = f"""
## Held-out evaluation with constrained decoding

`bench/demo_eval.py --constrained on`: the engine decodes under the task's constraint from
`models/task_constraints.py` (built from the prompt alone).

{_eval_table(constrained)}
"""
    return f"""# adapters/{task}

LoRA adapter of demo-base for the `{task}` task, trained with `compound finetune` on
`models/.build/data/{task}.train.jsonl` (rank {fig.get("rank")}, alpha {fig.get("alpha")}, targets
{", ".join(fig.get("target_modules", []))}; {fig.get("trainable_parameters", 0):,} trainable parameters):
{_train_line(fig)}. PEFT format: `PeftModel.from_pretrained(model, "models/adapters/{task}")`.

## Held-out evaluation (engine, greedy, adapter merged into demo-base)

{_eval_table(ev)}
{extra}"""
