"""EXPLAIN: a physical plan as text (indented tree), JSON, or a Mermaid flowchart.

Every task shows its estimate; the critical path is marked (`*` in text). With `analyze`
(actual figures per task or step id from a run: latency_s, tokens, attempts, status) each task
shows estimate and actual side by side: EXPLAIN ANALYZE.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from planner.physical import PhysicalPlan, Task

OP_NAMES = {
    "generate": "Generate",
    "tool": "CallTool",
    "filter": "Filter",
    "route": "Route",
    "pipeline": "Subpipeline",
    "plan": "Plan",
    "batch": "Batch",
}
ACTUAL_FIELDS = ("latency_s", "tokens", "attempts", "status")


def explain(
    plan: PhysicalPlan,
    fmt: Literal["text", "json", "mermaid"] = "text",
    analyze: Mapping[str, Any] | None = None,
) -> str:
    """Render `plan`; `analyze` maps task or step ids to actual figures (mappings or objects)."""
    renderers = {"text": _text, "json": _json, "mermaid": _mermaid}
    if fmt not in renderers:
        raise ValueError(f"unknown EXPLAIN format {fmt!r}; use one of {', '.join(renderers)}")
    return renderers[fmt](plan, analyze)


# ---------------------------------------------------------------------------- figures


def actual(task: Task, analyze: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Actual figures of a task from a run (looked up by task id, then by its first step)."""
    if not analyze:
        return None
    found = analyze.get(task.id, analyze.get(task.step_ids[0]))
    if found is None:
        return None
    figures = {name: _read(found, name) for name in ACTUAL_FIELDS}
    started, finished = _read(found, "started_at"), _read(found, "finished_at")
    if figures["latency_s"] is None and started is not None and finished is not None:
        figures["latency_s"] = finished - started
    return {k: v for k, v in figures.items() if v is not None}


def _read(figures: Any, name: str) -> Any:
    return figures.get(name) if isinstance(figures, Mapping) else getattr(figures, name, None)


def totals(plan: PhysicalPlan) -> dict[str, Any]:
    """Plan-wide figures: critical-path latency, tokens, task count, the critical path."""
    path, latency = plan.critical_path()
    tokens = sum(t.estimate.tokens for t in plan.topological())
    return {
        "latency_s": latency,
        "tokens": tokens,
        "tasks": plan.graph.number_of_nodes(),
        "critical_path": path,
    }


# ---------------------------------------------------------------------------- text


def _text(plan: PhysicalPlan, analyze: Mapping[str, Any] | None) -> str:
    summary = totals(plan)
    path = " -> ".join(summary["critical_path"]) or "-"
    lines = [
        f"Plan {plan.spec.name}: {summary['tasks']} tasks, estimated {summary['latency_s']:.2f} s,"
        f" {summary['tokens']} tokens; critical path: {path}",
    ]
    _TextTree(plan, analyze, set(summary["critical_path"]), lines).render()
    return "\n".join(lines)


class _TextTree:
    def __init__(
        self,
        plan: PhysicalPlan,
        analyze: Mapping[str, Any] | None,
        critical: set[str],
        lines: list[str],
    ) -> None:
        self.plan, self.analyze, self.critical, self.lines = plan, analyze, critical, lines
        self.order = {t.id: i for i, t in enumerate(plan.topological())}
        self.printed: set[str] = set()

    def render(self) -> None:
        """Append the tree: the outputs' producers first, then any other sinks."""
        plan = self.plan
        self.lines.append(f"Output {', '.join(plan.outputs)}")
        producers = [plan.step_task[s] for steps in plan.outputs.values() for s in steps]
        for tid in sorted(dict.fromkeys(producers), key=self.order.__getitem__):
            self._task(tid, 1)
        for tid in self.order:
            if tid not in self.printed and not any(True for _ in plan.graph.successors(tid)):
                self._task(tid, 0)

    def _task(self, tid: str, depth: int) -> None:
        task = self.plan.task(tid)
        if tid in self.printed:
            self.lines.append("  " * depth + f"Ref {','.join(task.step_ids)}")
            return
        mark = "* " if tid in self.critical else ""
        self.printed.add(tid)
        self.lines.append("  " * depth + mark + self._label(task))
        for member in task.members:
            self.lines.append("  " * (depth + 1) + self._label(member))
        for dep in sorted(task.deps, key=self.order.__getitem__):
            self._task(dep, depth + 1)

    def _label(self, task: Task) -> str:
        label = f"{OP_NAMES[task.op]} {task.id if task.op == 'batch' else ','.join(task.step_ids)}"
        if task.step is not None and task.step.map is not None:
            label += " (map)"
        if task.step is not None and task.step.fallback:
            label += " (fallback)"
        label += f" [{task.resource}] est {_figures(task.estimate.latency_s, task.estimate.tokens)}"
        if task.estimate.failure_rate:
            label += f", p(fail) {task.estimate.failure_rate:.2f}"
        if task.id in self.plan.graph and self.plan.step_task.get(task.step_ids[0]) == task.id:
            label += f", prio {self.plan.priority(task.id):.2f} s"
        if (act := actual(task, self.analyze)) is not None:
            label += " | actual " + _actual_text(act)
        return label


def _figures(latency_s: float, tokens: int | None) -> str:
    return f"{latency_s:.2f} s, {tokens or 0} tok"


def _actual_text(act: dict[str, Any]) -> str:
    text = _figures(act.get("latency_s", 0.0), act.get("tokens"))
    if "attempts" in act:
        text += f", {act['attempts']} attempt{'s' if act['attempts'] != 1 else ''}"
    if "status" in act:
        text += f", {act['status']}"
    return text


# ---------------------------------------------------------------------------- json


def _json(plan: PhysicalPlan, analyze: Mapping[str, Any] | None) -> str:
    summary = totals(plan)
    critical = set(summary["critical_path"])
    body = {
        "pipeline": plan.spec.name,
        "estimate": {"latency_s": summary["latency_s"], "tokens": summary["tokens"]},
        "critical_path": summary["critical_path"],
        "outputs": {name: sorted(steps) for name, steps in plan.outputs.items()},
        "tasks": [_task_json(plan, t, critical, analyze) for t in plan.topological()],
    }
    return json.dumps(body, indent=2)


def _task_json(
    plan: PhysicalPlan, task: Task, critical: set[str], analyze: Mapping[str, Any] | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": task.id,
        "op": task.op,
        "step_ids": list(task.step_ids),
        "deps": sorted(task.deps),
        "resource": task.resource,
        "estimate": {
            "latency_s": task.estimate.latency_s,
            "tokens": task.estimate.tokens,
            "failure_rate": task.estimate.failure_rate,
        },
        "critical": task.id in critical,
    }
    if task.id in plan.graph:
        body["priority_s"] = plan.priority(task.id)
    if task.enabled_by is not None:
        body["enabled_by"] = {"route": task.enabled_by[0], "branch": task.enabled_by[1]}
    if task.members:
        body["members"] = [_task_json(plan, m, set(), analyze) for m in task.members]
    if (act := actual(task, analyze)) is not None:
        body["actual"] = act
    return body


# ---------------------------------------------------------------------------- mermaid


def _mermaid(plan: PhysicalPlan, analyze: Mapping[str, Any] | None) -> str:
    tasks = plan.topological()
    names = {t.id: f"t{i}" for i, t in enumerate(tasks)}
    critical, _ = plan.critical_path()
    lines = ["flowchart TD"]
    for task in tasks:
        lines.append(f'  {names[task.id]}["{_escape(_mermaid_label(task, analyze))}"]')
    lines.append(f'  out(["{_escape("Output: " + ", ".join(plan.outputs))}"])')
    for task in tasks:
        for dep in sorted(task.deps, key=lambda d: names[d]):
            lines.append(f"  {names[dep]} --> {names[task.id]}")
    producers = dict.fromkeys(plan.step_task[s] for steps in plan.outputs.values() for s in steps)
    lines.extend(f"  {names[tid]} --> out" for tid in producers)
    if critical:
        lines.append("  classDef critical stroke:#d62728,stroke-width:3px")
        lines.append(f"  class {','.join(names[t] for t in critical)} critical")
    return "\n".join(lines)


def _mermaid_label(task: Task, analyze: Mapping[str, Any] | None) -> str:
    head = f"{OP_NAMES[task.op]} {','.join(task.step_ids)}"
    label = f"{head}<br/>{task.resource}<br/>est {_figures(task.estimate.latency_s, task.estimate.tokens)}"
    if (act := actual(task, analyze)) is not None:
        label += "<br/>actual " + _actual_text(act)
    return label


def _escape(text: str) -> str:
    return text.replace("&", "#amp;").replace('"', "#quot;")
