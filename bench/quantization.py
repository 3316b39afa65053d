"""Weight-only quantization against float in the same run: weight bytes, batch-1 decode speed on
CPU, perplexity on held-out world text, greedy agreement, and (optionally) demo task accuracy.

    python bench/quantization.py [--models models] [--random-millions 100] [--texts 48]
                                 [--decode-tokens 64] [--task-limit 0] [--threads 1]

Prints one JSON object. For each model (demo-large, demo-base, and a random Llama of about
`--random-millions` million parameters built with tests/engine/tiny_models.py) and each scheme
(float32 = the baseline, bf16, int8, int4-g64): `weight_bytes` of the loaded engine model (scales
and zero points included) and its ratio to bf16; decode tokens/s at batch 1 through the engine
(float32 activations; the ratio is against float32 in this run); perplexity of held-out world text
(paraphrase variants the zoo never trained on: `world.describe(..., variant>=4)`) and its change
against float32; the fraction of greedy tokens equal to float32's.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import math
import tempfile
import time

import torch
import torch.nn.functional as F

from engine import Engine, SamplingParams
from models import tasks
from tools.kb import generate_world

SCHEMES = ("float32", "bf16", "int8", "int4-g64")
TARGETS = {
    "int8": {
        "bytes_vs_bf16_max": 0.52,
        "decode_speedup_min": 1.3,
        "ppl_delta_max": 0.005,
        "task_delta_points_min": -1,
    },
    "int4-g64": {"bytes_vs_bf16_max": 0.30, "decode_speedup_min": 1.3, "ppl_delta_max": 0.03},
}
HELDOUT_VARIANTS = (4, 5)  # the zoo trains on variants 0..3 (models/zoo.py, "full" budget)
WORLD_SEED = 0


def heldout_texts(n: int) -> list[str]:
    """`n` held-out paraphrases of the world's entity descriptions."""
    world = generate_world(WORLD_SEED)
    texts = [world.describe(e.name, variant=v) for v in HELDOUT_VARIANTS for e in world.entities]
    return texts[:: max(1, len(texts) // n)][:n]


def load(engine: Engine, name: str, path: Path, scheme: str) -> dict:
    """Load one model under one scheme; its info as a dict."""
    dtype = "bfloat16" if scheme == "bf16" else "float32"
    quant = None if scheme in ("float32", "bf16") else scheme
    info = engine.load_model(
        name, path, dtype=dtype, quantization=quant, max_model_len=512, num_blocks=256
    )  # few KV blocks: every scheme of a model fits one engine
    return {"weight_bytes": info.weight_bytes, "parameters": info.num_parameters}


def perplexity(engine: Engine, name: str, texts: list[str]) -> float:
    """exp(mean next-token NLL) over the texts (each scored on its own, BOS first)."""
    tok = engine.tokenizer(name)
    nll, count = 0.0, 0
    for text in texts:
        ids = tok.encode(text)[:512]
        logits = engine.logits(name, ids)[:-1]
        target = torch.tensor(ids[1:])
        nll += F.cross_entropy(logits.float(), target, reduction="sum").item()
        count += len(ids) - 1
    return math.exp(nll / count)


def decode_seconds(engine: Engine, name: str, prompt: list[int], tokens: int) -> tuple[float, list]:
    """Seconds to decode `tokens` tokens at batch 1 (prefill subtracted) and the greedy tokens."""
    long = SamplingParams(temperature=0.0, max_tokens=tokens + 1, ignore_eos=True)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    t0 = time.perf_counter()
    engine.generate([prompt], one, model=name)
    t1 = time.perf_counter()
    out = engine.generate([prompt], long, model=name)[0]
    t2 = time.perf_counter()
    return (t2 - t1) - (t1 - t0), list(out.token_ids)


def bench_model(path: Path, texts: list[str], ns: argparse.Namespace, *, tasks_too: bool) -> dict:
    """Every scheme of one checkpoint in one engine. Decode timings alternate between the
    schemes round by round and keep each one's best, so load from other processes on this
    shared machine hits every scheme alike."""
    figures: dict = {}
    engine = Engine(device="cpu")
    try:
        for scheme in SCHEMES:
            figures[scheme] = load(engine, scheme, path, scheme)
        engine.unload_model("bf16")  # loaded for its bytes: CPU bf16 GEMMs are not the baseline
        timed = [s for s in SCHEMES if s != "bf16"]
        prompt = engine.tokenizer("float32").encode(texts[0])[:32]
        best = dict.fromkeys(timed, math.inf)
        for _ in range(ns.reps):
            for scheme in timed:
                seconds, figures[scheme]["greedy"] = decode_seconds(
                    engine, scheme, prompt, ns.decode_tokens
                )
                best[scheme] = min(best[scheme], seconds)
        for scheme in timed:
            figures[scheme]["tokens_per_s"] = ns.decode_tokens / best[scheme]
            figures[scheme]["perplexity"] = perplexity(engine, scheme, texts)
            if tasks_too and ns.task_limit and scheme in ("float32", "int8"):
                figures[scheme]["tasks"] = task_accuracy(engine, scheme, ns.task_limit)
    finally:
        engine.shutdown()
    return summarize(figures)


def task_accuracy(engine: Engine, name: str, limit: int) -> dict:
    """Router and joiner accuracy on freshly generated held-out examples (bench/demo_eval.py)."""
    from bench.demo_eval import evaluate_model
    from models.zoo import write_jsonl

    world = generate_world(WORLD_SEED)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        for task in ("router", "joiner"):
            write_jsonl(
                data / f"{task}.heldout.jsonl", tasks.generate(task, "heldout", limit, world)
            )
        figures = evaluate_model(engine, name, data, limit, world, only=["router", "joiner"])
    return {task: f["accuracy"] for task, f in figures.items()}


def summarize(figures: dict) -> dict:
    """Ratios against the baselines of the same run."""
    base, bf16 = figures["float32"], figures["bf16"]
    for scheme in ("int8", "int4-g64"):
        row = figures[scheme]
        row["bytes_vs_bf16"] = row["weight_bytes"] / bf16["weight_bytes"]
        row["decode_speedup_vs_float32"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["ppl_delta"] = row["perplexity"] / base["perplexity"] - 1
        same = sum(a == b for a, b in zip(row["greedy"], base["greedy"], strict=True))
        row["greedy_agreement"] = same / len(base["greedy"])
    if "tasks" in base and "tasks" in figures["int8"]:
        figures["int8"]["task_delta_points"] = {
            task: 100 * (acc - base["tasks"][task])
            for task, acc in figures["int8"]["tasks"].items()
        }
    for row in figures.values():
        row.pop("greedy", None)
        for k, v in row.items():
            if isinstance(v, float):
                row[k] = round(v, 4)
    return figures


def random_llama(out: Path, millions: float) -> Path:
    """A random Llama of about `millions` million parameters (gpt-2-small-like shape)."""
    from tests.engine.tiny_models import make_checkpoint

    per_layer = 2 * 768 * 768 + 2 * 768 * 256 + 3 * 768 * 2048
    layers = max(1, round(millions * 1e6 / per_layer))
    return make_checkpoint(
        out, "llama", hidden=768, layers=layers, heads=12, kv_heads=4, intermediate=2048, std=0.02
    )


def main() -> None:
    """Run the benchmark and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=str(Path(__file__).resolve().parents[1] / "models"))
    parser.add_argument("--only", nargs="*", default=["demo-large", "demo-base", "random"])
    parser.add_argument("--random-millions", type=float, default=100)
    parser.add_argument("--texts", type=int, default=48, help="held-out texts for perplexity")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--task-limit", type=int, default=0, help="demo task examples (0: skip)")
    parser.add_argument("--threads", type=int, default=1)
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    texts = heldout_texts(ns.texts)
    results: dict = {"threads": ns.threads, "decode_tokens": ns.decode_tokens, "texts": len(texts)}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ns.only:
            path = random_llama(Path(tmp), ns.random_millions) if name == "random" else None
            # A random model answers no task: accuracy only for the trained demo models.
            results[name] = bench_model(
                path or Path(ns.models) / name, texts, ns, tasks_too=path is None
            )
    results["targets"] = TARGETS
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
