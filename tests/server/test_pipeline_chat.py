"""Pipelines as chat models: one `/v1/chat/completions` call runs a chat-endpoint pipeline."""

from __future__ import annotations

import json
import uuid
from functools import partial

import httpx
import openai
import pytest
from litestar.testing import TestClient

from executor import events
from server.errors import RunFailedError
from server.pipeline_chat import AnswerStream
from tests.server.conftest import MODEL

YAML = {"Content-Type": "application/yaml"}
CHAT_SPEC = """
name: {name}
chat: {{input: messages, output: answer}}
inputs:
  messages: {{type: array, items: {{type: object}}}}
models: {{writer: {model}}}
tools: [calc]
steps:
  size:
    tool: calc
    args: {{expression: "{{{{ inputs.messages | length }}}} * 10"}}
  reply:
    generate: {{model: writer, prompt: "{{{{ inputs.messages[-1].content }}}}", max_tokens: 4}}
outputs:
  answer: "{{{{ steps.size.output }}}} {{{{ steps.reply.output | length > -1 }}}}"
"""
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def register(client: TestClient, *, chat: bool = True) -> str:
    name = f"chat-{uuid.uuid4().hex[:8]}"
    text = CHAT_SPEC.format(name=name, model=MODEL)
    if not chat:
        text = text.replace("chat: {input: messages, output: answer}\n", "")
    response = client.post("/v1/pipelines", content=text, headers=YAML)
    assert response.status_code == 201, response.text
    return name


def test_a_chat_pipeline_answers_a_chat_completion(client: TestClient) -> None:
    name = register(client)
    response = client.post("/v1/chat/completions", json={"model": name, "messages": MESSAGES})
    assert response.status_code == 200, response.text
    body = response.json()
    run_id = response.headers["x-compound-run-id"]
    assert body["compound"]["run_id"] == run_id and body["id"] == f"chatcmpl-{run_id}"
    assert body["object"] == "chat.completion" and body["model"] == name
    message = body["choices"][0]["message"]
    assert (message["role"], message["content"]) == ("assistant", "20 True")
    assert body["usage"]["total_tokens"] > 0
    run = client.get(f"/v1/runs/{run_id}").json()
    assert run["status"] == "succeeded" and run["inputs"]["messages"] == MESSAGES
    assert {s["step"] for s in run["steps"]} == {"size", "reply"}
    # the version suffix resolves through the same lookup as `pipeline` steps
    again = client.post("/v1/chat/completions", json={"model": f"{name}@1", "messages": MESSAGES})
    assert again.json()["choices"][0]["message"]["content"] == "20 True"


def test_chat_pipelines_are_listed_as_models(client: TestClient) -> None:
    chat, plain = register(client), register(client, chat=False)
    cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert cards[chat]["owned_by"] == "compound-pipeline" and plain not in cards


def test_streamed_answer_and_step_events(client: TestClient) -> None:
    name = register(client)
    body = {"model": name, "messages": MESSAGES, "stream": True, "compound": {"events": True}}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    run_id = response.headers["x-compound-run-id"]
    blocks = [b for b in response.text.split("\n\n") if b]
    assert blocks[-1] == "data: [DONE]"
    events = [b.split("\n")[0].removeprefix("event: ") for b in blocks if b.startswith("event:")]
    assert events[0] == "compound.run_started" and events[-1] == "compound.run_finished"
    assert "compound.step_finished" in events
    chunks = [json.loads(b[6:]) for b in blocks[:-1] if b.startswith("data: ")]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[0]["compound"]["run_id"] == run_id
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "20 True"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_bad_requests_to_pipelines(client: TestClient) -> None:
    plain = register(client, chat=False)
    refused = client.post("/v1/chat/completions", json={"model": plain, "messages": MESSAGES})
    assert (
        refused.status_code == 400 and "not a chat endpoint" in refused.json()["error"]["message"]
    )
    name = register(client)
    two = client.post("/v1/chat/completions", json={"model": name, "messages": MESSAGES, "n": 2})
    assert two.status_code == 400 and two.json()["error"]["param"] == "n"
    for field, value in [("guided_regex", "a+"), ("guided_choice", ["a", "b"])]:
        guided = client.post(
            "/v1/chat/completions", json={"model": name, "messages": MESSAGES, field: value}
        )
        assert guided.status_code == 400 and guided.json()["error"]["param"] == field
    unknown = client.post("/v1/chat/completions", json={"model": "no-such", "messages": MESSAGES})
    assert unknown.status_code == 404


def test_the_stock_openai_client_talks_to_a_pipeline(server_url: str) -> None:
    name = f"chat-{uuid.uuid4().hex[:8]}"
    spec = CHAT_SPEC.format(name=name, model=MODEL)
    created = httpx.post(f"{server_url}/v1/pipelines", content=spec, headers=YAML, timeout=30)
    assert created.status_code == 201, created.text
    client = openai.OpenAI(base_url=f"{server_url}/v1", api_key="x", max_retries=0, timeout=30)
    whole = client.chat.completions.with_raw_response.create(model=name, messages=MESSAGES)
    assert whole.headers["x-compound-run-id"]
    assert whole.parse().choices[0].message.content == "20 True"
    stream = client.chat.completions.create(
        model=name, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "20 True"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


STREAM_SPEC = """
name: {name}
chat: {{input: messages, output: answer}}
inputs:
  messages: {{type: array, items: {{type: object}}}}
models: {{writer: {model}}}
steps:
  reply:
    generate: {{model: writer, prompt: "{{{{ inputs.messages[-1].content }}}}", max_tokens: 12}}
outputs:
  answer: "{{{{ steps.reply.output }}}}"
"""


def test_the_answer_streams_token_by_token_with_the_stock_client(server_url: str) -> None:
    name = f"chat-{uuid.uuid4().hex[:8]}"
    spec = STREAM_SPEC.format(name=name, model=MODEL)
    created = httpx.post(f"{server_url}/v1/pipelines", content=spec, headers=YAML, timeout=30)
    assert created.status_code == 201, created.text
    client = openai.OpenAI(base_url=f"{server_url}/v1", api_key="x", max_retries=0, timeout=30)
    whole = client.chat.completions.create(model=name, messages=MESSAGES)
    stream = client.chat.completions.create(
        model=name, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    # greedy: the same text, but as it was generated, not in one piece at the end
    assert len(pieces) > 1 and "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage == whole.usage


def test_usage_splits_prompt_and_completion_tokens_over_the_runs_calls(client: TestClient) -> None:
    name = f"chat-{uuid.uuid4().hex[:8]}"
    # two model calls: the answer step and a second one the answer does not show
    spec = STREAM_SPEC.format(name=name, model=MODEL).replace(
        "outputs:",
        '  aside:\n    generate: {model: writer, prompt: "a longer prompt, of several tokens",'
        ' max_tokens: 5}\noutputs:\n  aside: "{{ steps.aside.output }}"',
    )
    assert client.post("/v1/pipelines", content=spec, headers=YAML).status_code == 201
    response = client.post("/v1/chat/completions", json={"model": name, "messages": MESSAGES})
    usage = response.json()["usage"]
    run = client.get(f"/v1/runs/{response.headers['x-compound-run-id']}").json()
    steps = {s["step"]: s["tokens"] for s in run["steps"]}
    assert set(steps) == {"reply", "aside"}
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["total_tokens"] == run["total_tokens"] == sum(steps.values())
    assert (run["prompt_tokens"], run["completion_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    # at most 12 + 5 generated; both prompts (the longer one alone has several) counted apart
    assert 2 <= usage["completion_tokens"] <= 17 and usage["prompt_tokens"] >= 6


def test_a_stream_that_went_wrong_ends_in_an_error_not_a_wrong_answer() -> None:
    stream = AnswerStream(frozenset({"reply", "other"}))
    delta = partial(events.TokenDelta, run_id="r")
    assert stream.take(delta(step="reply", text="Hel")) == "Hel"
    assert stream.take(delta(step="other", text="xyz")) == ""  # one answer step streams
    assert stream.take(delta(step="reply.1.joiner", text="?")) == ""
    assert stream.rest("Hello", "r") == "lo"
    # a retry after text went out: the answer no longer starts with it
    with pytest.raises(RunFailedError, match="'reply' streamed text that is not the answer"):
        stream.rest("Goodbye", "r")
