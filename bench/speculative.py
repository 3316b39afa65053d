"""Speculative decoding (issue #5): speculation on vs off in the same engine, the same run.

Prints one JSON object of figures on stdout (progress goes to stderr). The machine is shared
and noisy, so every figure is a ratio of measurements taken in the same process with the two
conditions interleaved prompt by prompt (order alternating).

Setup: one engine with demo-draft and demo-large (float32, speculative config
{method: draft, draft_model: demo-draft, num_tokens: K}); "off" is the per-request override
`speculative: {method: off}` on the same model, so both conditions share weights and caches.
  1. batch1_draft   greedy, one request at a time, held-out planner and extract prompts;
                    output tokens/s with the draft model vs without, the acceptance rate and
                    the speedup the formula predicts from it and the measured step costs.
  2. ngram_copy     prompt lookup (no draft model) on copy-heavy prompts: extraction (values
                    copied from the record) and quoting (repeat a passage); batch 1, greedy.
  3. batch16_mixed  16 concurrent requests of every task, half greedy, half sampled (seeded),
                    with the model's default (adaptive draft) vs off; throughput ratio.
  4. ngram_extract  the product's extraction model, demo-base:extract (base + LoRA adapter),
                    configured with prompt lookup {method: ngram, num_tokens: K}: held-out
                    extract prompts one at a time, greedy, on vs off, after a warm-up on other
                    held-out prompts (the history of past outputs fills there); free and under
                    the task's JSON-schema constraint (models/task_constraints.py, as the
                    product runs it); the same on a second copy of demo-base with the output
                    history off (prompt only).

Usage: .venv/bin/python bench/speculative.py [--quick] [--threads N] [--num-tokens K]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import logging
import os
import platform
import subprocess
import time

import torch

from engine import Engine, SamplingParams, SpeculativeConfig, SpeculativeOverride
from engine.speculative import expected_tokens
from models import tasks
from models.task_constraints import task_constraint
from tools.kb import generate_world

log = logging.getLogger("bench.speculative")

ROOT = Path(__file__).resolve().parents[1]
TARGET, DRAFT = "demo-large", "demo-draft"
BASE, EXTRACT = "demo-base", "demo-base:extract"
PROMPT_ONLY = "demo-base-prompt-only"  # the same weights, prompt lookup without the history
OFF = SpeculativeOverride(method="off")
NGRAM = SpeculativeOverride(method="ngram")


def load(num_tokens: int) -> Engine:
    """An engine with the draft and the target (speculating with it by default)."""
    eng = Engine(device="cpu")
    eng.load_model(DRAFT, ROOT / "models" / DRAFT, dtype="float32", num_blocks=1024)
    config = SpeculativeConfig(method="draft", draft_model=DRAFT, num_tokens=num_tokens)
    eng.load_model(
        TARGET, ROOT / "models" / TARGET, dtype="float32", num_blocks=1024, speculative=config
    )
    for name, history in ((BASE, True), (PROMPT_ONLY, False)):
        ngram = SpeculativeConfig(method="ngram", num_tokens=num_tokens, ngram_history=history)
        eng.load_model(
            name,
            ROOT / "models" / BASE,
            dtype="float32",
            num_blocks=1024,
            speculative=ngram,
            adapter_dir=ROOT / "models" / "adapters",
        )
    return eng


def chat_prompts(eng: Engine, task: str, n: int, skip: int = 0) -> list[list[int]]:
    """Held-out prompts of a task (after the first `skip`), rendered with the chat template."""
    tok = eng.tokenizer(TARGET)
    out = []
    for ex in tasks.generate(task, "heldout", skip + n)[skip:]:
        text = tok.apply_chat_template(ex.messages(with_answer=False), add_generation_prompt=True)
        out.append(tok.encode(text, add_special_tokens=False))
    return out


def quote_prompts(eng: Engine, n: int) -> list[list[int]]:
    """Quoting: a passage of world text followed by its own beginning, to be continued."""
    tok = eng.tokenizer(TARGET)
    texts = tasks.world_texts(generate_world(0), 1)[:n]
    return [tok.encode(f"{t}\n\n{t[: len(t) // 3]}", add_special_tokens=False) for t in texts]


def timed(eng: Engine, prompts, params, model: str = TARGET) -> tuple[float, list]:
    start = time.perf_counter()
    outs = eng.generate(prompts, params, model=model)
    return time.perf_counter() - start, outs


def one_by_one(eng: Engine, prompts, on, off, model: str = TARGET) -> dict:
    """Each prompt alone, on and off interleaved (alternating order); totals per condition.
    `on` and `off` are one SamplingParams for all prompts or a list, one per prompt."""
    t_on = t_off = 0.0
    n_on = n_off = drafts = accepted = 0
    identical = True
    for i, p in enumerate(prompts):
        p_on, p_off = _at(on, i), _at(off, i)
        order = [(True, p_on), (False, p_off)] if i % 2 else [(False, p_off), (True, p_on)]
        result = {}
        for is_on, params in order:
            seconds, [out] = timed(eng, [p], params, model)
            result[is_on] = out
            if is_on:
                t_on, n_on = t_on + seconds, n_on + len(out.token_ids)
                drafts, accepted = drafts + out.num_draft_tokens, accepted + out.num_accepted_tokens
            else:
                t_off, n_off = t_off + seconds, n_off + len(out.token_ids)
        identical &= result[True].token_ids == result[False].token_ids
    return {
        "requests": len(prompts),
        "tokens_per_s_on": round(n_on / t_on, 2),
        "tokens_per_s_off": round(n_off / t_off, 2),
        "speedup": round((n_on / t_on) / (n_off / t_off), 3),
        "acceptance_rate": round(accepted / drafts, 4) if drafts else None,
        "draft_tokens": drafts,
        "accepted_tokens": accepted,
        "outputs_identical": identical,
    }


def predicted(eng: Engine, before: dict) -> dict:
    """The speedup the formula gives from the measured acceptance and step costs."""
    stats = eng.speculative_stats(TARGET)
    rounds = stats["rounds"] - before["rounds"]
    drafts = stats["draft_tokens"] - before["draft_tokens"]
    accepted = stats["accepted_tokens"] - before["accepted_tokens"]
    k = round(drafts / max(rounds, 1))
    per_round = (accepted + rounds) / max(rounds, 1)  # each round also emits the target's token
    alpha = _solve_alpha(per_round, k)
    speed = eng._worker(TARGET).speculator.speed  # the engine's own step-time measurements
    decode, verify = speed.decode.predict(1), speed.multi.predict(1 + k)
    draft = speed.draft.predict(1) or 0.0
    tokens = expected_tokens(alpha, k)
    return {
        "mean_draft_length": round(drafts / max(rounds, 1), 2),
        "tokens_per_round": round(per_round, 3),
        "alpha_per_token": round(alpha, 4),
        "step_ms": {
            "decode": round(decode * 1e3, 2),
            "verify": round(verify * 1e3, 2),
            "draft_forward": round(draft * 1e3, 2),
        },
        # Leviathan et al.: E[tokens] / (k c + 1), c = draft forward / target decode step ...
        "predicted_speedup_formula": round(tokens / (k * draft / decode + 1), 3),
        # ... and with the measured cost of verifying k + 1 tokens instead of decoding one.
        "predicted_speedup_measured_costs": round(tokens * decode / (verify + k * draft), 3),
    }


def _solve_alpha(per_round: float, k: int) -> float:
    """The per-token acceptance alpha with expected_tokens(alpha, k) == per_round (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens(mid, k) < per_round else (lo, mid)
    return (lo + hi) / 2


def batch1_draft(eng: Engine, n: int) -> dict:
    prompts = [p for task in ("planner", "extract") for p in chat_prompts(eng, task, n)]
    greedy = SamplingParams(max_tokens=128, temperature=0.0)
    before = eng.speculative_stats(TARGET)
    figures = one_by_one(eng, prompts, greedy, _with(greedy, OFF))
    figures["prediction"] = predicted(eng, before)
    figures["target"] = ">= 1.8x"
    return figures


def ngram_copy(eng: Engine, n: int) -> dict:
    prompts = chat_prompts(eng, "extract", n) + chat_prompts(eng, "planner", n)
    greedy = SamplingParams(max_tokens=128, temperature=0.0)
    figures = one_by_one(eng, prompts, _with(greedy, NGRAM), _with(greedy, OFF))
    figures["target"] = ">= 1.5x"
    quotes = quote_prompts(eng, max(2, n // 2))
    figures["quoting"] = one_by_one(eng, quotes, _with(greedy, NGRAM), _with(greedy, OFF))
    return figures


def batch16_mixed(eng: Engine, rounds: int) -> dict:
    prompts = []
    for task in tasks.TASKS:
        prompts += chat_prompts(eng, task, 4)
    params = [
        SamplingParams(max_tokens=96, temperature=0.0)
        if i % 2
        else SamplingParams(max_tokens=96, temperature=0.8, seed=i)
        for i in range(len(prompts))
    ]
    t = {True: 0.0, False: 0.0}
    n = {True: 0, False: 0}
    for r in range(rounds):
        for on in (True, False) if r % 2 else (False, True):
            ps = params if on else [_with(p, OFF) for p in params]
            seconds, outs = timed(eng, prompts, ps)
            t[on] += seconds
            n[on] += sum(len(o.token_ids) for o in outs)
    on_rate, off_rate = n[True] / t[True], n[False] / t[False]
    return {
        "requests": len(prompts),
        "rounds": rounds,
        "tokens_per_s_on": round(on_rate, 2),
        "tokens_per_s_off": round(off_rate, 2),
        "speedup": round(on_rate / off_rate, 3),
        "target": ">= 0.95x",
    }


def ngram_extract(eng: Engine, n: int, warm: int) -> dict:
    """demo-base:extract with prompt lookup vs off, free and under the task's JSON-schema
    constraint (how the product runs extraction); the history of past outputs vs none."""
    examples = tasks.generate("extract", "heldout", warm + n)
    prompts = chat_prompts(eng, "extract", warm + n)
    figures: dict = {"warmup_requests": warm}
    for constrained in (False, True):
        params = [
            SamplingParams(
                max_tokens=128,
                temperature=0.0,
                **(task_constraint("extract", e.user) if constrained else {}),
            )
            for e in examples
        ]
        runs = figures["constrained" if constrained else "free"] = {}
        for key, base in (("with_history", BASE), ("prompt_only", PROMPT_ONLY)):
            runs[key] = _extract_run(eng, f"{base}:extract", prompts, params, warm)
    figures["speedup_constrained"] = figures["constrained"]["with_history"]["speedup"]
    figures["speedup_free"] = figures["free"]["with_history"]["speedup"]
    figures["target"] = ">= 1.5x"
    return figures


def _extract_run(eng: Engine, model: str, prompts, params, warm: int) -> dict:
    """Warm up on the first `warm` prompts (one at a time, as measured: fills the output
    history and the speed model), then measure the rest on vs off."""
    base = model.partition(":")[0]
    for p, sp in zip(prompts[:warm], params[:warm], strict=True):
        eng.generate([p], sp, model=model)
    before = eng.speculative_stats(base)
    on = params[warm:]
    figures = one_by_one(eng, prompts[warm:], on, [_with(p, OFF) for p in on], model=model)
    after = eng.speculative_stats(base)
    rounds = after["rounds"] - before["rounds"]
    accepted = after["accepted_tokens"] - before["accepted_tokens"]
    figures["tokens_per_round"] = round((accepted + rounds) / max(rounds, 1), 3)
    return figures


def _at(params, i: int) -> SamplingParams:
    return params[i] if isinstance(params, list) else params


def _with(params: SamplingParams, spec: SpeculativeOverride) -> SamplingParams:
    fields = {f: getattr(params, f) for f in params.__struct_fields__}
    return SamplingParams(**{**fields, "speculative": spec})


SECTIONS = ["batch1_draft", "ngram_copy", "batch16_mixed", "ngram_extract"]


def _commit() -> str:
    try:
        return (
            subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT)
            .decode()
            .strip()
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few prompts, for a smoke run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--num-tokens", type=int, default=8)
    parser.add_argument(
        "--only", choices=SECTIONS, nargs="+", default=SECTIONS, help="run these sections only"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    torch.set_num_threads(args.threads)
    n, rounds = (2, 2) if args.quick else (8, 4)
    eng = load(args.num_tokens)
    try:
        # Warm-up: lets the speed model measure plain and speculative steps.
        warm = chat_prompts(eng, "planner", 2)
        eng.generate(warm, SamplingParams(max_tokens=64, temperature=0.0), model=TARGET)
        figures = {
            "bench": "speculative",
            "commit": _commit(),
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "threads": args.threads,
                "load_avg_1m": round(os.getloadavg()[0], 2),
            },
            "num_tokens": args.num_tokens,
        }
        runs = {
            "batch1_draft": lambda: batch1_draft(eng, n),
            "ngram_copy": lambda: ngram_copy(eng, n),
            "batch16_mixed": lambda: batch16_mixed(eng, rounds),
            "ngram_extract": lambda: ngram_extract(eng, 4 * n, warm=16),
        }
        for section in args.only:
            log.info("%s", section)
            figures[section] = runs[section]()
        figures["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    finally:
        eng.shutdown()
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
