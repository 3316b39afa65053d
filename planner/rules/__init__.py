"""Logical rewrite rules: pure functions `rule(plan, **ctx) -> plan`, one per module.

`RULES` is the order the optimizer applies them in: drop what no output needs before merging,
narrow maps and reorder filters before batching (a batch fixes its members).
"""

from __future__ import annotations

from planner.rules.batch_same_model_calls import batch_same_model_calls
from planner.rules.merge_identical_calls import merge_identical_calls
from planner.rules.order_filters import order_filters
from planner.rules.prune_dead_steps import prune_dead_steps
from planner.rules.push_limit_into_map import push_limit_into_map

RULES = (
    prune_dead_steps,
    merge_identical_calls,
    push_limit_into_map,
    order_filters,
    batch_same_model_calls,
)

__all__ = [
    "RULES",
    "batch_same_model_calls",
    "merge_identical_calls",
    "order_filters",
    "prune_dead_steps",
    "push_limit_into_map",
]
