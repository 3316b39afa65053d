"""Shared test data: a small catalog and the design sketch's ticket-triage spec."""

from __future__ import annotations

from planner import Catalog, PhysicalPlan, Statistics, compile_spec, load_spec

KB_SEARCH = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "maxLength": 200},
        "k": {"type": "integer", "minimum": 1},
    },
    "required": ["query"],
    "additionalProperties": False,
}
CALC = {
    "type": "object",
    "properties": {"expression": {"type": "string"}},
    "required": ["expression"],
}

CATALOG = Catalog(
    models={"demo-base", "demo-base:router", "demo-large"},
    tools={"kb.search": KB_SEARCH, "kb.lookup": {"type": "object"}, "calc": CALC},
    pipelines={"summarize", "extract@v1"},
)

TRIAGE = """\
name: ticket-triage
description: Route a support ticket, answer it, extract fields.
inputs:
  ticket: {type: string, maxLength: 8000}
models:
  small: demo-base:router
  writer: demo-base
tools: [kb.search, calc]
steps:
  intent:
    generate: {model: small, prompt: "Ticket: {{ inputs.ticket }}\\nIntent:", max_tokens: 4}
    output: {enum: [billing, outage, other]}
  facts:
    tool: kb.search
    args: {query: "{{ inputs.ticket }}"}
  answer:
    when: "steps.intent.output != 'other'"
    generate:
      model: writer
      prompt: "Facts: {{ steps.facts.output }}\\nTicket: {{ inputs.ticket }}\\nReply:"
    fallback: [{model: small}]
    retries: 2
    timeout: 10s
  fields:
    map: "steps.facts.output.hits"
    generate: {model: small, prompt: "Extract from {{ item }}"}
    output_schema: {type: object, properties: {id: {type: string}}, required: [id]}
outputs:
  intent: "{{ steps.intent.output }}"
  reply: "{{ steps.answer.output }}"
"""


def compile_yaml(text: str, *, stats: Statistics | None = None, **kwargs: object) -> PhysicalPlan:
    """Load and compile a YAML spec against the test catalog."""
    return compile_spec(load_spec(text, fmt="yaml"), catalog=CATALOG, stats=stats, **kwargs)
