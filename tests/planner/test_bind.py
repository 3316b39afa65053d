"""Binding: names resolve against the catalog, dependencies are inferred, mistakes are located."""

from __future__ import annotations

import pytest

from planner import Catalog, PlanError, SpecError, SpecErrors, bind, compile_text, load_spec
from tests.planner.support import CATALOG, TRIAGE


def spec_of(steps: str, *, head: str = "", outputs: str = "{o: '{{ steps.a.output }}'}") -> str:
    return (
        "name: demo\nmodels: {w: demo-base, r: demo-base:router}\ntools: [kb.search, calc]\n"
        f"{head}steps:\n{steps}outputs: {outputs}\n"
    )


def bind_text(text: str, catalog: Catalog = CATALOG):
    return bind(load_spec(text), catalog=catalog)


def plan_error(text: str, catalog: Catalog = CATALOG) -> PlanError:
    with pytest.raises(PlanError) as info:
        bind_text(text, catalog)
    return info.value


def test_dependencies_are_inferred_from_references() -> None:
    bound = bind_text(TRIAGE)
    assert bound.deps == {
        "intent": frozenset(),
        "facts": frozenset(),
        "answer": frozenset({"intent", "facts"}),
        "fields": frozenset({"facts"}),
    }
    assert bound.models == {"small": "demo-base:router", "writer": "demo-base"}
    assert bound.output_refs == {"intent": frozenset({"intent"}), "reply": frozenset({"answer"})}
    assert bound.types["intent"] == "string"
    assert bound.types["fields"] == "array"


def test_route_membership_adds_dependencies() -> None:
    text = spec_of(
        '  r: {route: {branches: [{when: "inputs.x == 1", steps: [a]}], default: [b]}}\n'
        "  a: {generate: {model: w, prompt: hi}}\n"
        "  b: {tool: calc, args: {expression: '1+1'}}\n"
    )
    bound = bind_text(text)
    assert bound.deps["a"] == {"r"}
    assert bound.deps["b"] == {"r"}
    assert bound.enabled_by == {"a": ("r", "0"), "b": ("r", "default")}


# ---------------------------------------------------------------------------- unknown names


def test_unknown_step_names_the_exact_field() -> None:
    error = plan_error(
        spec_of(
            "  a: {generate: {model: w, prompt: 'x {{ steps.fact.output }}'}}\n  facts: {tool: calc, args: {expression: '1'}}\n"
        )
    )
    assert error.path == "/steps/a/generate/prompt"
    assert error.step == "a"
    assert error.message == "unknown step `fact` (did you mean `facts`?)"


def test_unknown_step_in_outputs() -> None:
    error = plan_error(
        spec_of(
            "  a: {tool: calc, args: {expression: '1'}}\n", outputs="{o: '{{ steps.b.output }}'}"
        )
    )
    assert (error.path, error.step) == ("/outputs/o", None)


def test_unknown_step_field() -> None:
    error = plan_error(
        spec_of(
            "  a: {tool: calc, args: {expression: '1'}}\n  b: {tool: calc, when: steps.a.outptu, args: {expression: '1'}}\n"
        )
    )
    assert error.path == "/steps/b/when"
    assert "has `output` and `status`, not `outptu`" in error.message


def test_unknown_model_alias() -> None:
    error = plan_error(spec_of("  a: {generate: {model: writer, prompt: hi}}\n"))
    assert (error.path, error.step) == ("/steps/a/generate/model", "a")
    assert "unknown model alias `writer`" in error.message


def test_unknown_fallback_alias() -> None:
    error = plan_error(
        spec_of("  a: {generate: {model: w, prompt: hi}, fallback: [{model: big}]}\n")
    )
    assert error.path == "/steps/a/fallback/0/model"


def test_model_target_not_served() -> None:
    error = plan_error(
        spec_of("  a: {tool: calc, args: {expression: '1'}}\n").replace(
            "r: demo-base:router", "r: demo-huge"
        )
    )
    assert error.path == "/models/r"
    assert error.message == "model `demo-huge` is not served here"


def test_tool_not_declared() -> None:
    error = plan_error(spec_of("  a: {tool: kb.lookup, args: {}}\n"))
    assert error.path == "/steps/a/tool"
    assert "not declared in `tools`" in error.message


def test_tool_not_registered() -> None:
    text = spec_of("  a: {tool: calc, args: {expression: '1'}}\n").replace(
        "tools: [kb.search, calc]", "tools: [calc, kb.serch]"
    )
    error = plan_error(text)
    assert error.path == "/tools/1"
    assert "(did you mean `kb.search`?)" in error.message


def test_literal_tool_args_are_checked_templated_ones_are_not() -> None:
    error = plan_error(spec_of("  a: {tool: kb.search, args: {query: 'x', k: 0}}\n"))
    assert error.path == "/steps/a/args/k"
    assert "invalid argument" in error.message
    bind_text(
        spec_of("  a: {tool: kb.search, args: {query: '{{ inputs.q }}', k: '{{ inputs.k }}'}}\n")
    )
    missing = plan_error(spec_of("  a: {tool: kb.search, args: {k: 2}}\n"))
    assert (missing.path, missing.message) == (
        "/steps/a/args",
        "invalid argument: 'query' is a required property",
    )


def test_pipelines_resolve_by_name_or_version() -> None:
    ok = "  a: {pipeline: {name: summarize@v2, inputs: {text: '{{ inputs.t }}'}}}\n  b: {pipeline: {name: extract@v1}}\n"
    bind_text(spec_of(ok))
    error = plan_error(spec_of("  a: {pipeline: {name: extract@v2}}\n"))
    assert (error.path, error.message) == (
        "/steps/a/pipeline/name",
        "unknown pipeline `extract@v2`",
    )
    recursive = plan_error(spec_of("  a: {pipeline: {name: demo}}\n"))
    assert recursive.message == "a pipeline cannot call itself"


def test_catalog_accepts_predicates() -> None:
    catalog = Catalog(
        models=lambda t: t.startswith("demo-"), tools=CATALOG.tools, pipelines=lambda r: True
    )
    bind_text(spec_of("  a: {pipeline: {name: anything@v9}}\n"), catalog)


# ---------------------------------------------------------------------------- cycles and routes


def test_cycle_names_its_steps() -> None:
    error = plan_error(
        spec_of(
            "  a: {generate: {model: w, prompt: '{{ steps.c.output }}'}}\n"
            "  b: {generate: {model: w, prompt: '{{ steps.a.output }}'}}\n"
            "  c: {generate: {model: w, prompt: '{{ steps.b.output }}'}}\n"
        )
    )
    assert error.message == "dependency cycle: a -> b -> c -> a"
    assert (error.path, error.step) == ("/steps/a", "a")


def test_self_reference() -> None:
    error = plan_error(spec_of("  a: {generate: {model: w, prompt: '{{ steps.a.output }}'}}\n"))
    assert error.message == "a step cannot read its own output"


def test_cycle_through_a_route() -> None:
    error = plan_error(
        spec_of(
            "  r: {route: {branches: [{when: \"steps.a.output == 'x'\", steps: [a]}]}}\n"
            "  a: {generate: {model: w, prompt: hi}}\n"
        )
    )
    assert "dependency cycle" in error.message


def test_route_branch_lists_unknown_step() -> None:
    error = plan_error(
        spec_of(
            "  r: {route: {branches: [{when: 'true', steps: [a, zz]}]}}\n  a: {tool: calc, args: {expression: '1'}}\n"
        )
    )
    assert error.path == "/steps/r/route/branches/0/steps/1"


def test_step_in_two_routes() -> None:
    error = plan_error(
        spec_of(
            "  r: {route: {branches: [{when: 'true', steps: [a]}]}}\n"
            "  s: {route: {branches: [{when: 'true', steps: [b]}], default: [a]}}\n"
            "  a: {tool: calc, args: {expression: '1'}}\n"
            "  b: {tool: calc, args: {expression: '1'}}\n"
        )
    )
    assert error.path == "/steps/s/route/default/0"
    assert error.message == "step `a` is already in route `r` (branch 0)"


def test_route_cannot_enable_itself() -> None:
    error = plan_error(
        spec_of(
            "  r: {route: {branches: [{when: 'true', steps: [r]}]}}\n  a: {tool: calc, args: {expression: '1'}}\n"
        )
    )
    assert error.message == "a route cannot enable itself"


# ---------------------------------------------------------------------------- types


def test_map_over_a_plain_string_output() -> None:
    error = plan_error(
        spec_of(
            "  a: {generate: {model: w, prompt: hi}}\n"
            "  b: {map: steps.a.output, generate: {model: w, prompt: '{{ item }}'}}\n",
            outputs="{o: '{{ steps.b.output }}'}",
        )
    )
    assert error.path == "/steps/b/map"
    assert "`steps.a.output` is a string, but map needs a list" in error.message


def test_filter_over_a_route_label() -> None:
    error = plan_error(
        spec_of(
            "  r: {route: {branches: [{when: 'true', steps: [a]}]}}\n"
            "  a: {tool: calc, args: {expression: '1'}}\n"
            "  f: {filter: {items: steps.r.output, where: 'item'}}\n",
            outputs="{o: '{{ steps.f.output }}'}",
        )
    )
    assert error.path == "/steps/f/filter/items"


def test_field_of_a_plain_string_output() -> None:
    error = plan_error(
        spec_of(
            "  a: {generate: {model: w, prompt: hi}}\n", outputs="{o: '{{ steps.a.output.hits }}'}"
        )
    )
    assert (error.path, error.message) == (
        "/outputs/o",
        "`steps.a.output` is a string; it has no field `hits`",
    )
    bind_text(
        spec_of(
            "  a: {generate: {model: w, prompt: hi}}\n",
            outputs="{o: '{{ steps.a.output.upper() }}'}",
        )
    )


def test_map_over_structured_outputs_is_fine() -> None:
    bind_text(
        spec_of(
            "  a: {generate: {model: w, prompt: hi}, output_schema: {type: array, items: {type: string}}}\n"
            "  j: {generate: {model: w, prompt: hi}, output: {type: json}}\n"
            "  b: {map: steps.a.output, generate: {model: w, prompt: '{{ item }}'}}\n"
            "  c: {map: steps.j.output, tool: calc, args: {expression: '{{ item }}'}}\n"
            "  d: {map: steps.c.output, tool: calc, args: {expression: '{{ item }}'}}\n",
            outputs="{o: '{{ steps.b.output }}{{ steps.d.output }}'}",
        )
    )


# ---------------------------------------------------------------------------- reporting


def test_several_problems_are_reported_together() -> None:
    text = spec_of(
        "  a: {generate: {model: nope, prompt: '{{ steps.zz.output }}'}}\n  b: {tool: kb.lookup}\n"
    )
    with pytest.raises(SpecErrors) as info:
        bind_text(text)
    errors = info.value.errors
    assert [e.path for e in errors] == [
        "/steps/a/generate/model",
        "/steps/a/generate/prompt",
        "/steps/b/tool",
    ]
    assert all(isinstance(e, PlanError) for e in errors)


def test_compile_text_locates_bind_errors() -> None:
    with pytest.raises(PlanError) as info:
        compile_text(
            TRIAGE.replace("model: writer", "model: writr"), catalog=CATALOG, source="t.yaml"
        )
    assert (info.value.path, info.value.line, info.value.column) == (
        "/steps/answer/generate/model",
        19,
        14,
    )
    assert isinstance(info.value, SpecError)


def test_unvalidated_spec_objects_are_checked_too() -> None:
    from planner.spec import PipelineSpec, Step

    spec = PipelineSpec(name="x", steps={"a": Step()}, outputs={"o": "x"})
    with pytest.raises(SpecErrors, match="exactly one of"):
        bind(spec, catalog=CATALOG)
