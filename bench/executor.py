"""Executor scheduling: makespan against the critical path on DAGs of sleeping tools.

Prints one JSON object of figures on stdout (progress goes to stderr). Every DAG is written as
a spec, compiled with the real planner and run by `executor.execute` with limits high enough
that the critical path is the lower bound on the makespan.

Shapes, each at 10, 100 and 1000 steps (tools sleep `--sleep-ms`, 20 ms by default):
  wide      one source, N-2 independent steps, one join (critical path: 3 steps).
  chains    ~sqrt(N) independent chains of ~sqrt(N) steps.
  diamonds  ParallelQA-like: plan -> 1-5 parallel questions -> join, diamonds chained in
            ~sqrt(#diamonds) independent lanes (seeded).

Figures per DAG (median of `--repeat` runs; the machine may be shared, so CPU-time figures,
which other processes barely disturb, back the wall-clock ones):
  ratio               makespan / critical path (target <= 1.05 at 100 steps); best_ratio from
                      the fastest run.
  ratio_to_cpu_bound  makespan / max(critical path, CPU time of a 0-ms run): one event loop
                      does every step's own work in turn, so a wide DAG is CPU-bound.
  overhead_us         (makespan - critical path) / steps.
  zero_ms_us          wall time per step with 0-ms tools (target <= 200 us), and
  zero_ms_cpu_us      its CPU time: scheduling, template rendering, the tool registry's
                      argument validation and result round trip, events.
  bare_cpu_us         the same with tools answered on the spot without validation;
  render_cpu_us       of which template rendering (the steps' args replayed outside a run);
  executor_cpu_us     bare_cpu_us - render_cpu_us: scheduler, operators, policies, events.
  speedup             the serial time (steps x sleep) / makespan.

Usage: .venv/bin/python bench/executor.py [--quick] [--repeat 5] [--sleep-ms 20]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import json
import logging
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from executor import Backends, RunLimits, execute
from planner import Catalog, PhysicalPlan, compile_spec
from planner.expressions import render_value
from planner.spec import PipelineSpec
from tools.registry import ToolRegistry

log = logging.getLogger("bench.executor")

SIZES = (10, 100, 1000)
LIMITS = RunLimits(max_concurrency=4096, per_resource={"tool:*": 100_000})


def make_tools() -> ToolRegistry:
    """One async tool that sleeps and answers "ok"."""
    registry = ToolRegistry()

    async def nap(ms: float, tag: str = "") -> str:
        """Sleep `ms` milliseconds (0: just yield)."""
        await asyncio.sleep(ms / 1000)
        return "ok"

    registry.register("nap", nap)
    return registry


class BareTools:
    """Tools answered on the spot, without argument validation: isolates the executor's cost."""

    async def call(self, name: str, args: dict[str, Any], *, timeout_s: float | None = None) -> str:
        """Answer "ok"."""
        return "ok"


def nap(tag: str, reads: Sequence[str] = ()) -> dict[str, Any]:
    """A step that sleeps and depends on `reads`; the tag keeps calls distinct (no merging)."""
    text = tag + "".join(f"{{{{ steps.{r}.output }}}}" for r in reads)
    return {"tool": "nap", "args": {"ms": "{{ inputs.ms }}", "tag": text}}


def wide(n: int) -> dict[str, dict[str, Any]]:
    """Source, n-2 independent steps, join."""
    middle = [f"m{i}" for i in range(n - 2)]
    steps = {"src": nap("src")}
    steps |= {m: nap(m, ["src"]) for m in middle}
    steps["join"] = nap("join", middle)
    return steps


def chains(n: int) -> dict[str, dict[str, Any]]:
    """About sqrt(n) independent chains of about sqrt(n) steps."""
    lanes = max(1, round(math.sqrt(n)))
    steps: dict[str, dict[str, Any]] = {}
    for i in range(n):
        lane, depth = i % lanes, i // lanes
        prev = [f"c{lane}_{depth - 1}"] if depth else []
        steps[f"c{lane}_{depth}"] = nap(f"c{lane}_{depth}", prev)
    return steps


def diamonds(n: int, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Chains of plan -> 1-5 questions -> join diamonds, in about sqrt(#diamonds) lanes."""
    rng = random.Random(seed)
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(min(2 + rng.randint(1, 5), n - sum(sizes)))
    lanes = max(1, round(math.sqrt(len(sizes))))
    steps: dict[str, dict[str, Any]] = {}
    last: dict[int, str] = {}
    for d, size in enumerate(sizes):
        lane = d % lanes
        entry = [last[lane]] if lane in last else []
        steps[f"p{d}"] = nap(f"p{d}", entry)
        branches = [f"q{d}_{b}" for b in range(max(0, size - 2))]
        steps |= {q: nap(q, [f"p{d}"]) for q in branches}
        if size >= 2:
            steps[f"j{d}"] = nap(f"j{d}", branches or [f"p{d}"])
        last[lane] = f"j{d}" if size >= 2 else f"p{d}"
    return steps


SHAPES: dict[str, Callable[[int], dict[str, dict[str, Any]]]] = {
    "wide": wide,
    "chains": chains,
    "diamonds": diamonds,
}


def spec_of(name: str, steps: dict[str, dict[str, Any]]) -> PipelineSpec:
    """A spec over `steps` whose outputs read every sink, so that no step is pruned."""
    read = {r for s in steps.values() for r in _reads(s)}
    sinks = [s for s in steps if s not in read]
    body = {
        "name": name,
        "tools": ["nap"],
        "inputs": {"ms": {"type": "number"}},
        "steps": steps,
        "outputs": {s: f"{{{{ steps.{s}.output }}}}" for s in sinks},
        "limits": {"max_concurrency": 4096},
    }
    return msgspec.convert(body, PipelineSpec)


def _reads(step: dict[str, Any]) -> list[str]:
    tag = step["args"]["tag"]
    return [part.split(".output", 1)[0] for part in tag.split("{{ steps.")[1:]]


def depth(plan: PhysicalPlan) -> int:
    """Tasks on the longest path (each sleeps the same time)."""
    longest: dict[str, int] = {}
    for task in plan.topological():
        longest[task.id] = 1 + max((longest[d] for d in task.deps), default=0)
    return max(longest.values())


async def timed_run(
    plan: PhysicalPlan, tools: ToolRegistry | BareTools, ms: float
) -> tuple[float, float]:
    """Wall-clock and CPU seconds of one run of the plan."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = await execute(plan, {"ms": ms}, backends=Backends(), tools=tools, limits=LIMITS)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if result.status != "succeeded":
        raise RuntimeError(f"run of {plan.spec.name} failed: {result.error}")
    return wall, cpu


async def median_run(
    plan: PhysicalPlan, tools: ToolRegistry | BareTools, ms: float, repeat: int
) -> tuple[float, float, float]:
    """Median wall, best wall and median CPU seconds of `repeat` runs."""
    runs = [await timed_run(plan, tools, ms) for _ in range(repeat)]
    walls = [w for w, _ in runs]
    return statistics.median(walls), min(walls), statistics.median(c for _, c in runs)


def render_cpu_s(plan: PhysicalPlan, repeat: int) -> float:
    """CPU seconds per step spent rendering the steps' templates (replayed, outside a run)."""
    scope = {
        "inputs": {"ms": 0},
        "steps": {sid: {"output": "ok", "status": "succeeded"} for sid in plan.step_task},
    }
    args = [dict(task.step.args) for task in plan.topological()]
    start = time.process_time()
    for _ in range(repeat):
        for a in args:
            render_value(a, scope)
    return (time.process_time() - start) / repeat / len(args)


async def measure(shape: str, n: int, *, sleep_ms: float, repeat: int) -> dict[str, Any]:
    """Figures of one DAG."""
    tools = make_tools()
    start = time.perf_counter()
    plan = compile_spec(
        spec_of(f"{shape}-{n}", SHAPES[shape](n)), catalog=Catalog(tools=tools.schemas())
    )
    compile_s = time.perf_counter() - start
    steps = len(plan.graph)
    await timed_run(plan, tools, 0)  # warm caches (compiled templates, validators)
    zero_wall, _, zero_cpu = await median_run(plan, tools, 0, repeat)
    _, _, bare_cpu = await median_run(plan, BareTools(), 0, repeat)
    render = render_cpu_s(plan, repeat)
    makespan, best, _ = await median_run(plan, tools, sleep_ms, repeat)
    critical = depth(plan) * sleep_ms / 1000
    # One event loop runs every step's own work one after another: the makespan is also
    # bounded below by the CPU time of the whole run.
    bound = max(critical, zero_cpu)
    per_step = 1e6 / steps
    figures = {
        "shape": shape,
        "steps": steps,
        "depth": depth(plan),
        "compile_s": round(compile_s, 4),
        "critical_path_s": round(critical, 4),
        "makespan_s": round(makespan, 4),
        "ratio": round(makespan / critical, 4),
        "best_ratio": round(best / critical, 4),
        "ratio_to_cpu_bound": round(makespan / bound, 4),
        "overhead_us": round((makespan - critical) * per_step, 1),
        "zero_ms_us": round(zero_wall * per_step, 1),
        "zero_ms_cpu_us": round(zero_cpu * per_step, 1),
        "bare_cpu_us": round(bare_cpu * per_step, 1),
        "render_cpu_us": round(render * 1e6, 1),
        "executor_cpu_us": round(bare_cpu * per_step - render * 1e6, 1),
        "speedup": round(steps * sleep_ms / 1000 / makespan, 1),
    }
    log.info("%s", figures)
    return figures


async def sleep_overshoot_ms(sleep_ms: float, n: int = 20) -> float:
    """Median lateness of a bare `asyncio.sleep`: the machine's own timer noise per hop."""
    late = []
    for _ in range(n):
        start = time.perf_counter()
        await asyncio.sleep(sleep_ms / 1000)
        late.append(time.perf_counter() - start - sleep_ms / 1000)
    return statistics.median(late) * 1000


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Every shape at every size."""
    sizes = SIZES[:2] if args.quick else SIZES
    overshoot = await sleep_overshoot_ms(args.sleep_ms)
    runs = [
        await measure(shape, n, sleep_ms=args.sleep_ms, repeat=args.repeat)
        for n in sizes
        for shape in SHAPES
    ]
    at_100 = [r for r in runs if r["steps"] == 100]
    return {
        "bench": "executor",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "sleep_ms": args.sleep_ms,
        "repeat": args.repeat,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "sleep_overshoot_ms": round(overshoot, 3),
        "runs": runs,
        "summary": {
            "max_ratio_at_100": max(r["ratio"] for r in at_100),
            "max_overhead_us": max(r["overhead_us"] for r in runs),
            "ratio_at_100": {r["shape"]: r["ratio"] for r in at_100},
            "max_zero_ms_cpu_us": max(r["zero_ms_cpu_us"] for r in runs),
            "max_executor_cpu_us": max(r["executor_cpu_us"] for r in runs),
            "targets": {"ratio_at_100": 1.05, "overhead_us": 200},
        },
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 and 100 steps only")
    parser.add_argument("--repeat", type=int, default=5, help="runs per DAG (median)")
    parser.add_argument("--sleep-ms", type=float, default=20.0, help="tool latency")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print its JSON report."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    args = parse_args(argv)
    print(json.dumps(asyncio.run(run_all(args)), indent=2))


if __name__ == "__main__":
    main()
