"""Model backends against a real engine: in process, and through our own OpenAI-compatible
server on a loopback port (uvicorn in a thread, from the server tests' fixtures)."""

from __future__ import annotations

import re

import msgspec
import pytest

from executor import events
from executor.backends import (
    Backends,
    EngineBackend,
    ModelBackend,
    ModelCall,
    ModelResult,
    OpenAIBackend,
)
from executor.errors import BackendError
from executor.run import execute
from planner import Catalog, compile_spec
from planner.spec import PipelineSpec
from tests.server.conftest import (  # the server tests' session fixtures, reused as they are
    MODEL,
    RecordingEngine,
    config,
    engine,
    server_url,
    tiny_model_dir,
)
from tools.registry import ToolRegistry

__all__ = ["config", "engine", "server_url", "tiny_model_dir"]

MESSAGES = [{"role": "user", "content": "the model"}]


@pytest.fixture
def provider(server_url: str) -> OpenAIBackend:
    """Our server as a remote provider that calls the tiny model "remote-tiny"."""
    return OpenAIBackend(
        "loopback",
        f"{server_url}/v1",
        api_key="x",
        model_map={"remote-tiny": MODEL, "gone": "no-such-model"},
        timeout_s=30,
    )


async def collect(backend: ModelBackend, call: ModelCall) -> tuple[ModelResult, list[str]]:
    pieces: list[str] = []
    result = await backend.generate(call, pieces.append)
    return result, pieces


async def test_engine_backend_streams_a_prompt(engine: RecordingEngine) -> None:
    backend = EngineBackend(engine)
    assert backend.serves(MODEL) and not backend.serves("other")
    result, pieces = await collect(
        backend, ModelCall(target=MODEL, prompt="the model", max_tokens=6, temperature=0.0)
    )
    assert "".join(pieces) == result.text
    assert 0 < result.completion_tokens <= 6
    assert result.prompt_tokens > 0
    assert result.finish_reason in ("stop", "length")


async def test_engine_backend_renders_chat_messages(engine: RecordingEngine) -> None:
    tokenizer = engine.tokenizer(MODEL)
    expected = tokenizer.encode(tokenizer.apply_chat_template(MESSAGES), add_special_tokens=False)
    result, _ = await collect(
        EngineBackend(engine),
        ModelCall(target=MODEL, messages=MESSAGES, max_tokens=4, temperature=0.0),
    )
    assert result.prompt_tokens == len(expected)


async def test_engine_backend_errors_are_backend_errors(engine: RecordingEngine) -> None:
    backend = EngineBackend(engine)
    with pytest.raises(BackendError, match="max_tokens"):
        await backend.generate(ModelCall(target=MODEL, prompt="x", max_tokens=100_000))
    assert backend.serves(MODEL)
    assert not backend.serves(f"{MODEL}:router")  # no such adapter loaded or on disk
    with pytest.raises(BackendError, match="not loaded"):
        await backend.generate(ModelCall(target=f"{MODEL}:router", prompt="x"))


async def test_backends_route_by_target(engine: RecordingEngine, provider: OpenAIBackend) -> None:
    backends = Backends([EngineBackend(engine), provider])
    assert backends.backend_for(MODEL).__class__ is EngineBackend
    assert backends.backend_for("remote-tiny") is provider
    with pytest.raises(BackendError, match="no model backend serves 'nowhere'"):
        await backends.generate(ModelCall(target="nowhere", prompt="x"))


async def test_openai_backend_matches_the_engine(
    engine: RecordingEngine, provider: OpenAIBackend
) -> None:
    call = ModelCall(target="remote-tiny", messages=MESSAGES, max_tokens=8, temperature=0.0)
    remote, pieces = await collect(provider, call)
    local, _ = await collect(
        EngineBackend(engine),
        ModelCall(target=MODEL, messages=MESSAGES, max_tokens=8, temperature=0.0),
    )
    await provider.aclose()
    assert "".join(pieces) == remote.text == local.text
    assert (remote.prompt_tokens, remote.completion_tokens) == (
        local.prompt_tokens,
        local.completion_tokens,
    )
    assert remote.finish_reason == local.finish_reason


async def test_openai_backend_sends_a_prompt_as_a_user_message(provider: OpenAIBackend) -> None:
    result = await provider.generate(
        ModelCall(target="remote-tiny", prompt="the model", max_tokens=3, stop=["zzz"], seed=1)
    )
    await provider.aclose()
    assert result.completion_tokens <= 3 and result.prompt_tokens > 0


async def test_openai_backend_errors_name_the_provider(provider: OpenAIBackend) -> None:
    with pytest.raises(BackendError, match=r"provider 'loopback': HTTP 404: .*no-such-model"):
        await provider.generate(ModelCall(target="gone", prompt="x"))
    with pytest.raises(BackendError, match=r"HTTP 400: .*max_tokens"):
        await provider.generate(ModelCall(target="remote-tiny", prompt="x", max_tokens=100_000))
    with pytest.raises(BackendError, match="does not serve 'tiny'"):
        await provider.generate(ModelCall(target=MODEL, prompt="x"))
    await provider.aclose()
    unreachable = OpenAIBackend("down", "http://127.0.0.1:9/v1", None, {"m": "m"}, timeout_s=2)
    with pytest.raises(BackendError, match="provider 'down': ConnectError"):
        await unreachable.generate(ModelCall(target="m", prompt="x"))


async def test_execute_a_pipeline_on_the_engine(engine: RecordingEngine) -> None:
    spec = {
        "name": "on-engine",
        "models": {"m": MODEL},
        "steps": {
            "a": {"generate": {"model": "m", "prompt": "the model", "max_tokens": 4}},
            "b": {
                "generate": {
                    "model": "m",
                    "messages": [{"role": "user", "content": "{{ steps.a.output }}"}],
                    "max_tokens": 4,
                }
            },
        },
        "outputs": {"a": "{{ steps.a.output }}", "b": "{{ steps.b.output }}"},
    }
    plan = compile_spec(msgspec.convert(spec, PipelineSpec), catalog=Catalog(models={MODEL}))
    sink: list[events.Event] = []
    result = await execute(
        plan, {}, backends=Backends([EngineBackend(engine)]), tools=ToolRegistry(), emit=sink.append
    )
    assert result.status == "succeeded", result.error
    finished = {e.step: e for e in sink if isinstance(e, events.StepFinished)}
    deltas = "".join(e.text for e in sink if isinstance(e, events.TokenDelta) and e.step == "a")
    assert deltas == finished["a"].output == result.outputs["a"]
    assert finished["b"].model == MODEL and finished["b"].tokens > 0
    assert result.tokens == finished["a"].tokens + finished["b"].tokens


async def test_engine_enforces_a_steps_enum_and_output_schema(engine: RecordingEngine) -> None:
    # The tiny random model never writes these on its own: only decoding under the step's
    # constraint lets the executor's output check pass.
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    spec = {
        "name": "constrained",
        "models": {"m": MODEL},
        "steps": {
            "intent": {
                "generate": {"model": "m", "prompt": "the model", "max_tokens": 8},
                "output": {"enum": ["billing", "outage", "other thing"]},
            },
            "fields": {
                "generate": {"model": "m", "prompt": "the model", "max_tokens": 30},
                "output_schema": schema,
            },
        },
        "outputs": {"intent": "{{ steps.intent.output }}", "n": "{{ steps.fields.output.n }}"},
    }
    plan = compile_spec(msgspec.convert(spec, PipelineSpec), catalog=Catalog(models={MODEL}))
    result = await execute(
        plan,
        {},
        backends=Backends([EngineBackend(engine)]),
        tools=ToolRegistry(),
        emit=lambda e: None,
    )
    assert result.status == "succeeded", result.error
    assert result.outputs["intent"] in ("billing", "outage", "other thing")
    assert re.fullmatch(r"-?[0-9]+", str(result.outputs["n"]))  # an integer came back
