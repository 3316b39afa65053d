"""End to end: uvicorn on a loopback port, driven by the stock `openai` client and raw httpx."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import MODEL, RecordingEngine

MESSAGES = [{"role": "user", "content": "the model"}]


@pytest.fixture
def client(server_url: str) -> openai.OpenAI:
    """The stock OpenAI client pointed at the test server."""
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="x", max_retries=0, timeout=30)


def test_models_list(client: openai.OpenAI) -> None:
    # chat pipelines registered by other tests of the session are listed too, as pipelines
    assert [m.id for m in client.models.list() if m.owned_by == "compound"] == [MODEL]


def test_completions_create(client: openai.OpenAI) -> None:
    result = client.completions.create(
        model=MODEL,
        prompt="the model",
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert result.object == "text_completion"
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == 5


def test_chat_stream_equals_non_streaming(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_errors_raise_the_matching_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt="x", max_tokens=100_000)
    assert bad.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user"}], stream=True)


def test_stream_disconnect_aborts_the_request(server_url: str, engine: RecordingEngine) -> None:
    # 4000 tokens take the tiny model seconds; an abort frees the engine at once.
    body = {"model": MODEL, "prompt": "the", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", f"{server_url}/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        first = next(response.iter_lines())
    request_id = first.removeprefix("data: ").split('"id":"', 1)[1].split('"', 1)[0] + "-0"
    assert engine.wait_idle(timeout_s=10.0)
    assert request_id in engine.aborted
    assert request_id not in engine.finished


def test_non_streaming_disconnect_aborts_the_request(
    server_url: str, engine: RecordingEngine
) -> None:
    before = len(engine.aborted)
    body = {"model": MODEL, "prompt": "the", "max_tokens": 4000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout), httpx.Client(timeout=0.5) as http:
        http.post(f"{server_url}/v1/completions", json=body)
    assert engine.wait_idle(timeout_s=10.0)
    assert len(engine.aborted) > before
