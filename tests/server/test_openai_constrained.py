"""Constrained decoding through the OpenAI endpoints: response_format json_schema / json_object
and the guided_* extensions shape the reply; bad constraints are 400s naming the field."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from tests.server.conftest import MODEL
from tests.server.test_openai_api import assert_error, chat, completion

Client = TestClient[Litestar]
SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
    "required": ["n", "ok"],
    "additionalProperties": False,
}


def _content(response: Any) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_response_format_json_schema_is_enforced(client: Client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}
    text = _content(chat(client, max_tokens=40, response_format=fmt))
    jsonschema.validate(json.loads(text), SCHEMA)


def test_response_format_json_object_gives_an_object(client: Client) -> None:
    response = chat(client, max_tokens=60, response_format={"type": "json_object"})
    text = _content(response)
    # The tiny random model may run out of tokens inside a string; a finished reply parses.
    assert text.startswith('{"')
    if response.json()["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)


def test_guided_choice_and_regex_on_completions(client: Client) -> None:
    choices = ["alpha", "beta gamma"]
    body = completion(client, prompt="pick", max_tokens=8, guided_choice=choices).json()
    assert body["choices"][0]["text"] in choices
    body = completion(client, prompt="num", max_tokens=8, guided_regex="[0-9]{4}").json()
    assert re.fullmatch("[0-9]{4}", body["choices"][0]["text"])


def test_guided_grammar_streams_a_sentence(client: Client) -> None:
    grammar = 'start: "x=" NUM\nNUM: /[1-9][0-9]?/'
    response = completion(client, prompt="go", max_tokens=8, guided_grammar=grammar, stream=True)
    assert response.status_code == 200
    chunks = [
        json.loads(line.removeprefix("data: "))
        for line in response.text.split("\n\n")
        if line.startswith("data: {")
    ]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert re.fullmatch(r"x=[1-9][0-9]?", text)


BAD_SCHEMA = {"type": "object", "properties": {"n": {"type": "no-such-type"}}}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"guided_regex": "[a-"}, "guided_regex"),
        ({"guided_regex": ""}, "guided_regex"),
        ({"guided_grammar": "start: ("}, "guided_grammar"),
        ({"guided_choice": ["a", ""]}, "guided_choice"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        ({"guided_json": "{nope"}, "guided_json"),
        ({"guided_json": BAD_SCHEMA}, "guided_json"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": BAD_SCHEMA}}},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        (
            {"response_format": {"type": "json_object"}, "guided_json": {"type": "object"}},
            "response_format",
        ),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_constraints_are_400_naming_the_field_sent(
    client: Client, body: dict[str, Any], param: str, stream: bool
) -> None:
    response = chat(client, max_tokens=4, model=MODEL, stream=stream, **body)
    assert_error(response, 400, param)
    message = response.json()["error"]["message"]
    # The message speaks of the client's field, not the engine's SamplingParams name.
    assert param.split(".", maxsplit=1)[0] in message
    for engine_name in ("regex", "grammar", "choice", "json_schema"):
        assert not re.match(rf"{engine_name}\b", message), message


def test_bad_guided_regex_on_completions_names_guided_regex(client: Client) -> None:
    response = completion(client, prompt="x", max_tokens=4, guided_regex="(")
    assert_error(response, 400, "guided_regex")
    assert response.json()["error"]["message"].startswith("guided_regex ")


def _deep(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"guided_regex": "a" * (64 * 1024 + 1)}, "guided_regex"),
        ({"guided_grammar": "x" * (64 * 1024 + 1)}, "guided_grammar"),
        ({"guided_json": "{" + " " * (64 * 1024) + "}"}, "guided_json"),
        ({"guided_choice": [str(i) for i in range(1025)]}, "guided_choice"),
        ({"guided_choice": ["a", "b" * 1025]}, "guided_choice[1]"),
        ({"guided_json": {"enum": ["x" * 1000] * 70}}, "guided_json"),
        ({"guided_json": _deep(150)}, "guided_json"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": _deep(150)}}},
            "response_format.json_schema.schema",
        ),
    ],
)
def test_oversized_and_deep_constraints_are_400(
    client: Client, body: dict[str, Any], param: str
) -> None:
    assert_error(chat(client, max_tokens=4, model=MODEL, **body), 400, param)


def test_deeper_than_the_decoder_allows_is_400_not_500(client: Client) -> None:
    text = '{"a": ' * 3000 + "1" + "}" * 3000
    body = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "guided_json": %s}'
    response = client.post(
        "/v1/chat/completions",
        content=body % (MODEL, text),
        headers={"content-type": "application/json"},
    )
    error = assert_error(response, 400)
    assert "nested too deeply" in error["message"]
