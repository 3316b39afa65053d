"""Small plans from YAML snippets: the before/after examples in the rules' docstrings.

The catalog is whatever the snippet declares (its model targets and tools are taken as served,
every pipeline as resolvable), so an example needs only the lines that show the rewrite.
"""

from __future__ import annotations

from planner.bind import Catalog, bind
from planner.load import load_spec
from planner.logical import LogicalPlan, build_logical


def plan_from_yaml(text: str) -> LogicalPlan:
    """The unoptimized logical plan of a spec snippet (`name` defaults to `example`)."""
    if "name:" not in text.split("steps:", 1)[0]:
        text = "name: example\n" + text
    spec = load_spec(text, fmt="yaml")
    catalog = Catalog(
        models=set(spec.models.values()),
        tools={name: {"type": "object"} for name in spec.tools},
        pipelines=lambda ref: True,
    )
    return build_logical(bind(spec, catalog=catalog))
