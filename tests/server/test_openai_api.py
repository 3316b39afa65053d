"""The OpenAI-compatible endpoints through litestar's test client: shapes, streaming, errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient, TestClient

from tests.server.conftest import MODEL, RecordingEngine

Client = TestClient[Litestar]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the model"}]


def completion(client: Client, **body: Any) -> Any:
    return client.post("/v1/completions", json={"model": MODEL, "temperature": 0, **body})


def chat(client: Client, **body: Any) -> Any:
    return client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "temperature": 0, **body}
    )


def events(text: str) -> list[Any]:
    """Parse an SSE body: every event is `data: ...` and a blank line; `[DONE]` last."""
    assert text.endswith("data: [DONE]\n\n")
    blocks = text.split("\n\n")[:-1]
    assert all(b.startswith("data: ") for b in blocks), blocks
    payloads = [b.removeprefix("data: ") for b in blocks]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def assert_error(response: Any, status: int, param: str | None = None, code: str | None = None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    assert error["param"] == param
    assert error["code"] == code
    return error


# -- success shapes ------------------------------------------------------------------------------


def test_models_lists_the_loaded_model(client: Client) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    engine_models = [m for m in body["data"] if m["owned_by"] != "compound-pipeline"]
    assert [m["id"] for m in engine_models] == [MODEL]  # other tests' chat pipelines aside
    card = engine_models[0]
    assert card["object"] == "model" and card["owned_by"] == "compound"
    assert isinstance(card["created"], int)


def test_completion_shape_and_usage(client: Client, engine: RecordingEngine) -> None:
    response = completion(client, prompt="the model is", max_tokens=6, ignore_eos=True)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["id"].startswith("cmpl-") and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert choice["logprobs"] is None
    prompt_ids = engine.tokenizer(MODEL).encode("the model is")
    expected = engine.generate([prompt_ids], _greedy(6), model=MODEL)[0]
    assert choice["text"] == expected.text
    assert body["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": 6,
        "total_tokens": len(prompt_ids) + 6,
    }


def test_chat_uses_the_chat_template(client: Client, engine: RecordingEngine) -> None:
    response = chat(client, max_completion_tokens=5, ignore_eos=True)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant"
    tokenizer = engine.tokenizer(MODEL)
    # The template starts with BOS itself: encoding must not add a second one.
    prompt = tokenizer.encode(tokenizer.apply_chat_template(CHAT), add_special_tokens=False)
    assert prompt.count(tokenizer.bos_token_id) == 1
    expected = engine.generate([prompt], _greedy(5), model=MODEL)[0]
    assert choice["message"]["content"] == expected.text
    assert body["usage"]["prompt_tokens"] == len(prompt)
    assert body["usage"]["completion_tokens"] == 5


def test_chat_content_parts_equal_plain_text(client: Client) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "the model"}]}]
    plain = [{"role": "user", "content": "the model"}]
    a = chat(client, messages=parts, max_tokens=4).json()
    b = chat(client, messages=plain, max_tokens=4).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"]


def test_default_max_tokens_fills_the_context(client: Client, engine: RecordingEngine) -> None:
    # Without max_tokens a request may run to the end of the context (or the server's limit).
    tokens = [5] * (engine.model_info(MODEL).max_model_len - 3)
    body = completion(client, prompt=tokens, ignore_eos=True).json()
    assert body["usage"]["completion_tokens"] == 3
    assert body["choices"][0]["finish_reason"] == "length"


def test_n_choices_and_batched_prompts(client: Client, engine: RecordingEngine) -> None:
    prompts = ["the model", "a river"]
    body = completion(
        client, prompt=prompts, n=2, max_tokens=3, temperature=1.0, seed=7, ignore_eos=True
    ).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    # OpenAI counts each prompt once, however many choices it has.
    prompt_tokens = sum(len(engine.tokenizer(MODEL).encode(p)) for p in prompts)
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 12,
        "total_tokens": prompt_tokens + 12,
    }


def test_token_prompts(client: Client, engine: RecordingEngine) -> None:
    ids = engine.tokenizer(MODEL).encode("the model")
    by_ids = completion(client, prompt=ids, max_tokens=4).json()
    by_text = completion(client, prompt="the model", max_tokens=4).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    batched = completion(client, prompt=[ids, ids], max_tokens=4).json()
    assert [c["text"] for c in batched["choices"]] == [by_text["choices"][0]["text"]] * 2


def test_seed_makes_sampling_repeatable(client: Client) -> None:
    a = completion(client, prompt="the", max_tokens=8, temperature=1.0, seed=3).json()
    b = completion(client, prompt="the", max_tokens=8, temperature=1.0, seed=3).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_chat_logprobs(client: Client) -> None:
    body = chat(client, max_tokens=3, logprobs=True, top_logprobs=2, ignore_eos=True).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert len(entry["top_logprobs"]) == 2
        # Greedy: the chosen token is the most likely one.
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])
    text = "".join(e["token"] for e in content)
    assert text == body["choices"][0]["message"]["content"]


def test_completion_logprobs(client: Client) -> None:
    body = completion(client, prompt="the model", max_tokens=3, logprobs=1, ignore_eos=True).json()
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == 3
    assert logprobs["text_offset"][0] == 0
    assert all(len(top) <= 1 for top in logprobs["top_logprobs"])


def test_stop_string_is_cut(client: Client) -> None:
    full = completion(client, prompt="the model", max_tokens=12, ignore_eos=True).json()
    text = full["choices"][0]["text"]
    stop = text[3:5]
    assert stop.strip(), "the tiny model produced blank text; pick another prompt"
    cut = completion(client, prompt="the model", max_tokens=12, ignore_eos=True, stop=[stop]).json()
    assert cut["choices"][0]["text"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


# -- streaming -----------------------------------------------------------------------------------


def test_chat_stream_matches_non_streaming(client: Client) -> None:
    whole = chat(client, max_tokens=8, ignore_eos=True).json()
    response = chat(
        client, max_tokens=8, ignore_eos=True, stream=True, stream_options={"include_usage": True}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = events(response.text)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    first, last_choice, usage = chunks[0], chunks[-2], chunks[-1]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert last_choice["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == whole["choices"][0]["message"]["content"]


def test_completion_stream_without_usage(client: Client) -> None:
    whole = completion(client, prompt="a river", max_tokens=6).json()
    chunks = events(completion(client, prompt="a river", max_tokens=6, stream=True).text)
    assert all(c["usage"] is None for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_stream_with_several_choices(client: Client) -> None:
    chunks = events(chat(client, n=3, max_tokens=3, temperature=1.0, seed=1, stream=True).text)
    finished = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1, 2]


async def test_async_client_streams(app: Litestar) -> None:
    async with AsyncTestClient(app) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": CHAT, "max_tokens": 3, "stream": True},
        )
        assert response.status_code == 200
        assert events(response.text)[-1]["choices"][0]["finish_reason"] in ("stop", "length")


# -- errors --------------------------------------------------------------------------------------


def test_unknown_model_is_404(client: Client) -> None:
    error = assert_error(
        completion(client, model="nope", prompt="x"), 404, "model", "model_not_found"
    )
    assert "nope" in error["message"]
    assert_error(chat(client, model="nope"), 404, "model", "model_not_found")
    assert_error(chat(client, model="nope", stream=True), 404, "model", "model_not_found")


def test_max_tokens_over_context_is_400(client: Client, engine: RecordingEngine) -> None:
    context = engine.model_info(MODEL).max_model_len
    error = assert_error(completion(client, prompt="x", max_tokens=context), 400, "max_tokens")
    assert str(context) in error["message"]
    assert_error(
        chat(client, max_completion_tokens=context, stream=True), 400, "max_completion_tokens"
    )
    assert_error(completion(client, prompt="x", max_tokens=5000), 400, "max_tokens")


def test_prompt_over_context_is_400(client: Client, engine: RecordingEngine) -> None:
    context = engine.model_info(MODEL).max_model_len
    assert_error(completion(client, prompt=[5] * context), 400, "prompt")
    long_message = [{"role": "user", "content": "the model " * context}]
    assert_error(chat(client, messages=long_message), 400, "messages")


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ("hello", "messages"),
        ([], "messages"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            "messages[0].content[0].type",
        ),
        ([{"role": "user", "content": 3}], "messages[0].content"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"content": "x"}], "messages[0]"),
    ],
)
def test_malformed_messages_are_400(client: Client, messages: Any, param: str) -> None:
    assert_error(chat(client, messages=messages), 400, param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "temperature": 3}, "temperature"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [10**6]}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({}, "prompt"),
    ],
)
def test_invalid_fields_are_400(client: Client, body: dict[str, Any], param: str) -> None:
    assert_error(completion(client, **body), 400, param)


def test_unknown_fields_are_ignored(client: Client) -> None:
    response = completion(client, prompt="x", max_tokens=2, some_future_field={"a": 1})
    assert response.status_code == 200


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", b"null"])
def test_malformed_json_is_400(client: Client, body: bytes) -> None:
    response = client.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert_error(response, 400)


def test_oversized_body_is_413(client: Client) -> None:
    big = {"model": MODEL, "prompt": "x" * (1 << 20)}
    assert_error(client.post("/v1/completions", json=big), 413)


def test_routing_errors_have_the_openai_shape(client: Client) -> None:
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/completions"), 405)


def test_unexpected_errors_are_generic_500(
    client: Client, engine: RecordingEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(name: str) -> Any:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(engine, "model_names", broken)
    error = assert_error(client.get("/v1/models"), 500)
    assert "secret" not in error["message"]


# -- probes and schema ---------------------------------------------------------------------------


def test_health_and_readiness(client: Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == [MODEL]


def test_openapi_documents_the_endpoints(client: Client) -> None:
    schema = client.get("/schema/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(schema["paths"])


def _greedy(max_tokens: int) -> Any:
    from engine import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
