"""Held-out accuracy of the demo zoo through the engine (greedy), and draft acceptance.

    python bench/demo_eval.py [--models models] [--limit 200] [--constrained off|on|both]
                              [--adapters-only] [--tasks extract,joiner]

Prints one JSON object. Per model (demo-base, demo-large, each adapter merged into demo-base):
router accuracy, extract exact match (parsed JSON equal), planner parse rate / exact match /
execution accuracy (the plan, run with kb.lookup and calc over the world, gives the gold plan's
final value), joiner accuracy (answer equal given the gold tool results). Draft acceptance is
measured offline: demo-large's greedy answers are scored by demo-draft in one forward pass, and
each 4-token window accepts the draft's greedy tokens up to the first disagreement.

`--constrained on` decodes through the engine's grammar constraints
(`models/task_constraints.py`: router choice, extract JSON schema with strings from the record,
planner plan grammar with the question's names, joiner choice of cited spans); `both` reports
free and constrained figures side by side (keys `<model>` and `<model>+constrained`).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import math
import time

from engine import Engine, SamplingParams
from models import tasks
from models.task_constraints import task_constraint
from models.tokenizer_train import render_chat
from planner.plan_format import PlanSyntaxError, parse_plan
from tools.errors import ToolError
from tools.kb import World, generate_world

MAX_TOKENS = {"router": 8, "extract": 96, "planner": 160, "joiner": 24}
DRAFT_TOKENS = 4
TARGETS = {"router": 0.97, "extract": 0.95, "planner": 0.90, "joiner": 0.95, "acceptance": 0.7}


def read_heldout(data: Path, task: str, limit: int, split: str = "heldout") -> list[tasks.Example]:
    """The first `limit` examples of a task's held-out (or validation) split."""
    from models.zoo import read_jsonl

    file = data / f"{task}.{split}.jsonl"
    if not file.is_file():  # not built here: the same examples, generated from the same seed
        return tasks.generate(task, split, limit, generate_world(0))
    return read_jsonl(file)[:limit]


def prompt_ids(engine: Engine, model: str, example: tasks.Example) -> list[int]:
    """Token ids of the chat prompt, ending where the assistant's answer starts."""
    text = render_chat(example.messages(with_answer=False), add_generation_prompt=True)
    return engine.tokenizer(model).encode(text, add_special_tokens=False)


def generate(
    engine: Engine,
    model: str,
    examples: list[tasks.Example],
    task: str,
    *,
    constrained: bool = False,
) -> list[str]:
    """Greedy answers, in order; constrained by the task's grammar when asked."""
    prompts = [prompt_ids(engine, model, e) for e in examples]
    params = [
        SamplingParams(
            temperature=0.0,
            max_tokens=MAX_TOKENS[task],
            **(task_constraint(task, e.user) if constrained else {}),
        )
        for e in examples
    ]
    return [o.text.strip() for o in engine.generate(prompts, params, model=model)]


def score(task: str, examples: list[tasks.Example], answers: list[str], world: World) -> dict:
    """The task's figures for these answers."""
    if task == "planner":
        return score_plans(examples, answers, world)
    if task == "extract":
        ok = [_json_equal(a, e.answer) for e, a in zip(examples, answers, strict=True)]
        return {"exact_match": _mean(ok), "n": len(ok)}
    ok = [a == e.answer for e, a in zip(examples, answers, strict=True)]
    return {"accuracy": _mean(ok), "n": len(ok)}


def _json_equal(text: str, gold: str) -> bool:
    try:
        return json.loads(text) == json.loads(gold)
    except json.JSONDecodeError:
        return False


def score_plans(examples: list[tasks.Example], answers: list[str], world: World) -> dict:
    """Parse rate, exact match, and execution accuracy of emitted plans."""
    parsed = exact = correct = 0
    for e, a in zip(examples, answers, strict=True):
        exact += a == e.answer
        try:
            plan = parse_plan(a)
        except PlanSyntaxError:
            continue
        parsed += 1
        correct += _same_result(plan, parse_plan(e.answer), world)
    n = len(examples)
    return {
        "parse_rate": parsed / n,
        "exact_match": exact / n,
        "execution_accuracy": correct / n,
        "n": n,
    }


def _same_result(plan, gold, world: World) -> bool:
    try:
        got = tasks.execute_plan(plan, world)
    except (ToolError, ValueError, KeyError, TypeError):
        return False
    want = tasks.execute_plan(gold, world)
    if not plan.steps:
        return False
    a, b = got[plan.steps[-1].index], want[gold.steps[-1].index]
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)
    return a == b


def _mean(xs: list[bool]) -> float:
    return sum(xs) / max(1, len(xs))


def evaluate_model(
    engine: Engine,
    model: str,
    data: Path,
    limit: int,
    world: World,
    *,
    only=None,
    constrained: bool = False,
    split: str = "heldout",
) -> dict:
    """Every task's figures (or just `only`) for one loaded model."""
    figures = {}
    for task in only or tasks.TASKS:
        examples = read_heldout(data, task, limit, split)
        t0 = time.perf_counter()
        answers = generate(engine, model, examples, task, constrained=constrained)
        figures[task] = {
            **score(task, examples, answers, world),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        figures[task]["samples"] = [
            {"want": e.answer, "got": a} for e, a in list(zip(examples, answers, strict=True))[:2]
        ]
    return figures


def acceptance(
    engine: Engine, target: str, draft: str, data: Path, limit: int, *, split: str = "heldout"
) -> dict:
    """Offline acceptance rate of `draft` against `target`'s greedy answers, per task and overall."""
    per_task, accepted_all, drafted_all = {}, 0, 0
    for task in tasks.TASKS:
        examples = read_heldout(data, task, limit, split)
        prompts = [prompt_ids(engine, target, e) for e in examples]
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS[task])
        outs = engine.generate(prompts, params, model=target)
        accepted = drafted = 0
        for prompt, out in zip(prompts, outs, strict=True):
            a, d = _windows(engine, draft, prompt, list(out.token_ids))
            accepted, drafted = accepted + a, drafted + d
        per_task[task] = accepted / max(1, drafted)
        accepted_all, drafted_all = accepted_all + accepted, drafted_all + drafted
    return {
        "overall": accepted_all / max(1, drafted_all),
        "per_task": per_task,
        "draft_tokens": DRAFT_TOKENS,
    }


def _windows(engine: Engine, draft: str, prompt: list[int], answer: list[int]) -> tuple[int, int]:
    """(accepted, drafted) over the answer: draft k tokens, accept the agreeing prefix, +1 bonus."""
    if not answer:
        return 0, 0
    logits = engine.logits(draft, prompt + answer[:-1])
    guesses = (
        logits[len(prompt) - 1 :].argmax(-1).tolist()
    )  # the draft's next token at each answer position
    accepted = drafted = pos = 0
    while pos < len(answer):
        k = 0
        while k < DRAFT_TOKENS and pos + k < len(answer) and guesses[pos + k] == answer[pos + k]:
            k += 1
        accepted, drafted = accepted + k, drafted + DRAFT_TOKENS
        pos += k + 1  # the target's own token after the accepted prefix
    return accepted, drafted


MODES = {"off": (False,), "on": (True,), "both": (False, True)}


def evaluate_zoo(
    models: Path,
    data: Path,
    merged: Path,
    limit: int = 200,
    *,
    constrained: str = "off",
    adapters_only: bool = False,
    only: tuple[str, ...] = tasks.TASKS,
    split: str = "heldout",
) -> dict:
    """Figures for the base, large, draft and adapter models under `models`.

    `constrained` is off, on or both (see the module docstring); `adapters_only` skips the
    three bare models and the acceptance measurement; `only` names the adapters evaluated;
    `split` is heldout (reported figures) or validation (for choosing between variants).
    """
    world = generate_world(0)
    engine = Engine(device="cpu")
    results: dict = {"limit": limit, "constrained": constrained, "split": split}
    modes = MODES[constrained]
    try:
        if not adapters_only:
            _evaluate_bare(
                engine,
                results,
                models=models,
                data=data,
                limit=limit,
                world=world,
                modes=modes,
                split=split,
            )
        _evaluate_adapters(
            engine,
            results,
            models=models,
            data=data,
            merged=merged,
            limit=limit,
            world=world,
            modes=modes,
            only=only,
            split=split,
        )
        if not adapters_only:
            results["acceptance"] = acceptance(
                engine, "demo-large", "demo-draft", data, min(limit, 100), split=split
            )
    finally:
        engine.shutdown()
    results["targets"] = TARGETS
    return results


def _key(name: str, constrained: bool) -> str:
    return f"{name}+constrained" if constrained else name


def _evaluate_bare(engine, results, *, models, data, limit, world, modes, split) -> None:
    for name in ("demo-base", "demo-large", "demo-draft"):
        engine.load_model(name, models / name, dtype="float32", max_model_len=512)
    for name in ("demo-base", "demo-large", "demo-draft"):
        for c in modes:
            results[_key(name, c)] = evaluate_model(
                engine, name, data, limit, world, constrained=c, split=split
            )


def _evaluate_adapters(
    engine, results, *, models, data, merged, limit, world, modes, only=tasks.TASKS, split="heldout"
) -> None:
    from models.finetune import merge_adapter

    for task in tasks.TASKS:
        adapter = models / "adapters" / task
        if task not in only or not (adapter / "adapter_config.json").is_file():
            continue
        path = merge_adapter(models / "demo-base", adapter, merged / task)
        engine.load_model(f"demo-base-{task}", path, dtype="float32", max_model_len=512)
        for c in modes:
            results[_key(f"demo-base:{task}", c)] = evaluate_model(
                engine,
                f"demo-base-{task}",
                data,
                limit,
                world,
                only=[task],
                constrained=c,
                split=split,
            )
        engine.unload_model(f"demo-base-{task}")


def main() -> None:
    """Run the evaluation and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=str(Path(__file__).resolve().parents[1] / "models"))
    parser.add_argument("--data", help="held-out JSONL folder (default: MODELS/.build/data)")
    parser.add_argument("--limit", type=int, default=200, help="examples per task")
    parser.add_argument("--constrained", choices=sorted(MODES), default="off")
    parser.add_argument("--adapters-only", action="store_true", help="skip the bare models")
    parser.add_argument(
        "--split",
        choices=("heldout", "validation"),
        default="heldout",
        help="validation: the split for choosing between variants (held-out stays for figures)",
    )
    parser.add_argument(
        "--tasks", default=",".join(tasks.TASKS), help="adapters to evaluate (comma-separated)"
    )
    ns = parser.parse_args()
    models = Path(ns.models)
    data = Path(ns.data) if ns.data else models / ".build" / "data"
    results = evaluate_zoo(
        models,
        data,
        models / ".build" / "merged",
        ns.limit,
        constrained=ns.constrained,
        adapters_only=ns.adapters_only,
        only=_task_list(ns.tasks),
        split=ns.split,
    )
    print(json.dumps(results, indent=2))


def _task_list(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = sorted(set(names) - set(tasks.TASKS))
    if unknown:
        raise SystemExit(f"unknown tasks {unknown}; choose from {', '.join(tasks.TASKS)}")
    return names


if __name__ == "__main__":
    main()
