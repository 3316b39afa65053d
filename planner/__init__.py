"""The SQL-style planner: spec text -> typed spec -> bound spec -> logical plan -> rewrite rules
-> cost-based physical plan, and EXPLAIN.

```python
spec = load_spec(text)                                   # SpecErrors: every problem, with line/col
plan = compile_spec(spec, catalog=Catalog(models={"demo-base"}, tools=registry.schemas()))
text = explain(plan)                                     # estimates and the critical path
```
"""

from __future__ import annotations

from collections.abc import Sequence

from planner.bind import BoundSpec, Catalog, bind
from planner.cost import Aggregate, Estimate, Statistics
from planner.errors import (
    ExpressionError,
    InvariantError,
    PlanError,
    PlannerError,
    SpecError,
    SpecErrors,
)
from planner.explain import explain
from planner.load import check_spec, load_spec, locate, parse_duration
from planner.logical import LogicalPlan, build_logical
from planner.optimizer import Rule, optimize
from planner.physical import PhysicalPlan, Task, build_physical
from planner.rules import RULES
from planner.spec import PipelineSpec

__all__ = [
    "RULES",
    "Aggregate",
    "BoundSpec",
    "Catalog",
    "Estimate",
    "ExpressionError",
    "InvariantError",
    "LogicalPlan",
    "PhysicalPlan",
    "PipelineSpec",
    "PlanError",
    "PlannerError",
    "SpecError",
    "SpecErrors",
    "Statistics",
    "Task",
    "bind",
    "check_spec",
    "compile_spec",
    "compile_text",
    "explain",
    "load_spec",
    "locate",
    "parse_duration",
    "plan_logical",
]


def plan_logical(
    spec: PipelineSpec,
    *,
    catalog: Catalog,
    stats: Statistics | None = None,
    rules: Sequence[Rule] = RULES,
) -> LogicalPlan:
    """Bind `spec` and optimize its logical plan (raises `PlanError`/`SpecErrors`)."""
    stats = stats or Statistics.empty()
    return optimize(build_logical(bind(spec, catalog=catalog)), rules=rules, stats=stats)


def compile_spec(
    spec: PipelineSpec,
    *,
    catalog: Catalog,
    stats: Statistics | None = None,
    rules: Sequence[Rule] = RULES,
) -> PhysicalPlan:
    """bind -> logical plan -> rewrite rules -> physical plan with estimates."""
    logical = plan_logical(spec, catalog=catalog, stats=stats, rules=rules)
    return build_physical(logical, stats=stats)


def compile_text(
    text: str | bytes,
    *,
    catalog: Catalog,
    stats: Statistics | None = None,
    fmt: str | None = None,
    source: str = "<spec>",
) -> PhysicalPlan:
    """`load_spec` then `compile_spec`; bind-time errors also carry line and column."""
    spec = load_spec(text, fmt=fmt, source=source)
    try:
        return compile_spec(spec, catalog=catalog, stats=stats)
    except SpecErrors as e:
        raise SpecErrors(locate(e.errors, text, fmt=fmt, source=source), source=source) from None
    except SpecError as e:
        raise locate([e], text, fmt=fmt, source=source)[0] from None
