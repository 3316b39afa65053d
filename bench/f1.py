"""F1 reasoning endpoint: the `f1` pipeline against the sequential ReAct-style baseline.

Starts `compound serve` in-process (uvicorn on a loopback port, the demo zoo, compound.yaml's
settings with a scratch database and demo-base only) and asks every question through
`POST /v1/chat/completions` with the stock `openai` client, once with `"model": "f1"` and
once with `"model": "react_baseline"` (alternating which goes first). Questions are the
planner task's held-out split (`models.tasks.generate("planner", "heldout", N)`), never seen
in training; the gold answer comes from running the gold plan on the knowledge base
(`models.tasks.execute_plan` / `final_answer`). Branches = independent lookups of the gold
plan (lines that reference no other line), 1 to 5.

`--tool-latency-ms` makes every tool call wait that long first, modelling tools that are
remote services (a search API, a database across the network), the setting LLMCompiler
measures; with 0 the knowledge base answers in microseconds and only model time counts.

Figures (one JSON object on stdout):
  accuracy            fraction of answers equal to the gold one (numbers compared as numbers).
  latency_s           mean seconds per question, by branch count and overall; speedup is
                      baseline / f1 (target >= 1.8 at 3-5 branches). A run that fails ends
                      early (a rejected plan stops the planner), so `answered` repeats the
                      comparison on the questions both pipelines answered.
  tokens              mean tokens per question (the run's total over every model call).
  failed_runs         runs that ended in an error (counted wrong), by the last round's reason:
                      an entity name not in the question, plan syntax, a tool's error
                      (unknown entity or field, bad argument), or other.

Usage: .venv/bin/python bench/f1.py [--n 200] [--tool-latency-ms 0] [--warmup 3]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import json
import logging
import socket
import statistics
import tempfile
import threading
import time
from typing import Any

import msgspec
import openai
import uvicorn

import server.app
from models.tasks import execute_plan, final_answer, generate
from planner.plan_format import parse_plan
from server.app import create_app
from server.config import load_config
from tools import default_registry
from tools.kb import generate_world
from tools.registry import ToolRegistry

log = logging.getLogger("bench.f1")
REPO = Path(__file__).resolve().parents[1]
PIPELINES = ("f1", "react_baseline")


class RemoteTools:
    """A tool registry whose calls are answered `latency_s` late (tools behind a network)."""

    def __init__(self, inner: ToolRegistry, latency_s: float) -> None:
        self.inner, self.latency_s = inner, latency_s

    async def call(self, name: str, args: dict[str, Any], *, timeout_s: float | None = None) -> Any:
        """Wait, then call the tool (the registry still validates the arguments)."""
        await asyncio.sleep(self.latency_s)
        return await self.inner.call(name, args, timeout_s=timeout_s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def remote_registry(latency_s: float) -> Any:
    """`default_registry`, its calls delayed by `latency_s`."""
    return lambda config=None: RemoteTools(default_registry(config), latency_s)


def serve(latency_s: float) -> tuple[str, uvicorn.Server]:
    """The server of compound.yaml (demo-base only, scratch database) on a free port."""
    config = load_config(REPO / "compound.yaml")
    scratch = Path(tempfile.mkdtemp(prefix="bench-f1-"))
    config = msgspec.structs.replace(
        config,
        models=tuple(m for m in config.models if m.name == "demo-base"),
        database_url=f"sqlite:///{scratch / 'compound.db'}",
    )
    # Only here: the server builds its tools through this name at start-up.
    server.app.default_registry = remote_registry(latency_s)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(config)
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True).start()
    deadline = time.monotonic() + 300
    while not uv.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.1)
    return f"http://127.0.0.1:{port}", uv


def questions(n: int) -> list[dict[str, Any]]:
    """Held-out planner questions with their gold answers and branch counts."""
    world = generate_world(0)
    out = []
    for ex in generate("planner", "heldout", n, world):
        plan = parse_plan(ex.answer)
        gold = final_answer(plan, execute_plan(plan, world), ex.meta["kind"])
        branches = sum(1 for s in plan.steps if s.tool == "kb.lookup" and not s.deps)
        out.append({"question": ex.user, "gold": gold, "branches": branches})
    return out


def correct(answer: str, gold: str) -> bool:
    """Equal text, or equal numbers."""
    answer, gold = answer.strip(), gold.strip()
    if answer == gold:
        return True
    try:
        return abs(float(answer) - float(gold)) <= 1e-9 * max(1.0, abs(float(gold)))
    except ValueError:
        return False


def ask(client: openai.OpenAI, model: str, question: str) -> dict[str, Any]:
    """One chat completion: answer, seconds, tokens (errors count as wrong answers)."""
    started = time.perf_counter()
    try:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}]
        )
    except openai.APIError as e:
        return {
            "answer": "",
            "seconds": time.perf_counter() - started,
            "tokens": 0,
            "error": str(e),
        }
    seconds = time.perf_counter() - started
    tokens = reply.usage.total_tokens if reply.usage else 0
    return {"answer": reply.choices[0].message.content or "", "seconds": seconds, "tokens": tokens}


def run(client: openai.OpenAI, items: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Every question through both pipelines, alternating which goes first."""
    results: dict[str, list[dict[str, Any]]] = {p: [] for p in PIPELINES}
    for i, item in enumerate(items):
        order = PIPELINES if i % 2 == 0 else PIPELINES[::-1]
        for model in order:
            got = ask(client, model, item["question"])
            got["correct"] = correct(got["answer"], item["gold"])
            got["branches"] = item["branches"]
            results[model].append(got)
        if (i + 1) % 20 == 0:
            log.info("%d/%d questions", i + 1, len(items))
    return results


def mean(rows: list[dict[str, Any]], key: str) -> float:
    """Mean of one figure over rows (0 for none)."""
    return statistics.mean(r[key] for r in rows) if rows else 0.0


def latency(f1: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean seconds of both pipelines on the same questions, by branch count; speedups."""
    by_branch = {}
    for b in sorted({r["branches"] for r in f1}):
        fs = [r for r in f1 if r["branches"] == b]
        bs = [r for r in base if r["branches"] == b]
        by_branch[str(b)] = {
            "n": len(fs),
            "f1_s": round(mean(fs, "seconds"), 4),
            "baseline_s": round(mean(bs, "seconds"), 4),
            "speedup": round(mean(bs, "seconds") / max(mean(fs, "seconds"), 1e-9), 3),
        }
    wide = [r for r in f1 if r["branches"] >= 3]
    wide_base = [r for r in base if r["branches"] >= 3]
    return {
        "n": len(f1),
        "f1": round(mean(f1, "seconds"), 4),
        "baseline": round(mean(base, "seconds"), 4),
        "speedup": round(mean(base, "seconds") / max(mean(f1, "seconds"), 1e-9), 3),
        "speedup_3_to_5_branches": round(mean(wide_base, "seconds") / mean(wide, "seconds"), 3)
        if wide
        else None,
        "by_branches": by_branch,
    }


FAILURES = (  # the first match names the reason
    ("ungrounded_name", "is not in the question"),
    ("tool_error", "(kb.lookup):"),
    ("tool_error", "(calc):"),
    ("no_join", "does not end with join()"),
    ("syntax", "plan line"),
)


def failures(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Failed runs by the reason of their last round."""
    counts = {"total": 0}
    for row in rows:
        if "error" not in row:
            continue
        last = row["error"].rsplit("round(s): ", 1)[-1]
        kind = next((k for k, text in FAILURES if text in last), "other")
        counts["total"] += 1
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def figures(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Accuracy, latency by branch count, tokens; baseline / f1 ratios."""
    f1, base = results["f1"], results["react_baseline"]
    both = [
        i
        for i, (a, b) in enumerate(zip(f1, base, strict=True))
        if "error" not in a and "error" not in b
    ]
    return {
        "questions": len(f1),
        "accuracy": {
            "f1": round(mean(f1, "correct"), 4),
            "baseline": round(mean(base, "correct"), 4),
            "f1_by_branches": {
                str(b): round(mean([r for r in f1 if r["branches"] == b], "correct"), 4)
                for b in sorted({r["branches"] for r in f1})
            },
        },
        "failed_runs": {"f1": failures(f1), "baseline": failures(base)},
        "latency_s": {
            "all": latency(f1, base),
            "answered": latency([f1[i] for i in both], [base[i] for i in both]),
        },
        "tokens": {
            "f1": round(mean(f1, "tokens"), 1),
            "baseline": round(mean(base, "tokens"), 1),
            "baseline_over_f1": round(mean(base, "tokens") / max(mean(f1, "tokens"), 1e-9), 3),
        },
    }


def main() -> None:
    """Serve, warm up, ask, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--tool-latency-ms", type=float, default=0.0)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    url, uv = serve(args.tool_latency_ms / 1000)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
    # Warm-up on training-split questions (compiles, loads the adapters): not counted.
    warm = [
        {"question": ex.user, "gold": "", "branches": 0}
        for ex in generate("planner", "train", args.warmup)
    ]
    run(client, warm)
    started = time.perf_counter()
    results = run(client, questions(args.n))
    body = figures(results)
    body["settings"] = {
        "tool_latency_ms": args.tool_latency_ms,
        "wall_s": round(time.perf_counter() - started, 1),
        "endpoint": "POST /v1/chat/completions (stock openai client)",
    }
    uv.should_exit = True
    print(json.dumps(body, indent=2))


if __name__ == "__main__":
    main()
