"""Engine behaviour end to end on tiny random checkpoints: batching, prefix cache, preemption,
several models, stop conditions, seeds, streaming, errors."""

import asyncio
import random
import threading
import time

import pytest

from engine import (
    Engine,
    GenerationRequest,
    InvalidRequestError,
    MemoryBudgetError,
    ModelAlreadyLoadedError,
    ModelNotFoundError,
    SamplingParams,
)
from engine.kv_cache import block_bytes

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def eng(tiny_llama):
    with Engine() as e:
        e.load_model("tiny", tiny_llama, dtype="float32")
        yield e


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 400) for _ in range(rng.randrange(3, 60))] for _ in range(n)]


def test_generate_returns_one_output_per_prompt_in_order(eng):
    outs = eng.generate(["Hello there", "Hi"], GREEDY, model="tiny")
    assert [len(o.token_ids) for o in outs] == [12, 12]
    assert all(o.finish_reason == "length" for o in outs)
    assert outs[0].prompt_token_ids == eng.tokenizer("tiny").encode("Hello there")
    assert outs[0].text == eng.tokenizer("tiny").decode(outs[0].token_ids)


def test_chunked_prefill_and_batching_do_not_change_greedy_output(tiny_llama):
    ps = prompts(12, seed=1)
    with Engine() as small_steps:
        small_steps.load_model("m", tiny_llama, max_num_batched_tokens=16)
        chunked = small_steps.generate(ps, GREEDY, model="m")
        alone = [small_steps.generate([p], GREEDY, model="m")[0] for p in ps[:3]]
    assert [o.token_ids for o in chunked[:3]] == [o.token_ids for o in alone]


def test_prefix_cache_reuses_blocks_and_keeps_output(tiny_llama):
    with Engine() as e:
        e.load_model("m", tiny_llama, block_size=8)
        shared = prompts(1, seed=2)[0] * 3  # > 5 full blocks
        first = e.generate([[*shared, 11]], GREEDY, model="m")[0]
        hits_before = e.block_manager("m").hits
        second = e.generate([[*shared, 11]], GREEDY, model="m")[0]
        assert e.block_manager("m").hits - hits_before == len(shared) // 8
        assert second.num_cached_tokens == (len(shared) // 8) * 8
        assert second.token_ids == first.token_ids
        other = e.generate([[*shared, 12]], GREEDY, model="m")[0]
        assert other.num_cached_tokens == (len(shared) // 8) * 8


def test_preemption_under_a_tiny_pool_completes_every_request(tiny_llama):
    ps = prompts(8, seed=3)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    with Engine() as roomy:
        roomy.load_model("m", tiny_llama)
        expected = [o.token_ids for o in roomy.generate(ps, params, model="m")]
    need = max(len(p) for p in ps) + 24
    with Engine() as tight:
        tight.load_model("m", tiny_llama, block_size=4, num_blocks=-(-need // 4) + 2)
        got = tight.generate(ps, params, model="m")
        sched = tight._worker("m").scheduler
    assert [o.token_ids for o in got] == expected
    assert all(o.finish_reason == "length" for o in got)
    assert sched.blocks.num_free == sched.blocks.num_blocks


def test_several_models_in_one_engine_load_and_unload(tiny_llama, tiny_qwen2):
    with Engine() as e:
        e.load_model("a", tiny_llama)
        e.load_model("b", tiny_qwen2)
        assert set(e.model_names()) == {"a", "b"}
        with pytest.raises(ModelAlreadyLoadedError):
            e.load_model("a", tiny_llama)
        a = e.generate(["x y z"], GREEDY, model="a")[0]
        b = e.generate(["x y z"], GREEDY, model="b")[0]
        assert a.token_ids != b.token_ids
        used = e.memory_used_bytes
        e.unload_model("b")
        assert e.memory_used_bytes < used
        with pytest.raises(ModelNotFoundError):
            e.generate(["x"], GREEDY, model="b")
        assert e.generate(["x y z"], GREEDY, model="a")[0].token_ids == a.token_ids


def test_unload_waits_for_a_load_in_progress(tiny_llama):
    # The draft-model check and the unload run under the load lock: a load naming the model
    # as its draft cannot slip in between them.
    with Engine() as e:
        e.load_model("a", tiny_llama)
        done = threading.Event()
        with e._load_lock:  # a load_model in progress
            worker = threading.Thread(target=lambda: (e.unload_model("a"), done.set()))
            worker.start()
            assert not done.wait(0.3)
            assert "a" in e.model_names()
        worker.join(timeout=30)
        assert done.is_set() and "a" not in e.model_names()


def test_memory_budget_is_enforced(tiny_llama):
    with Engine(memory_budget_bytes=10_000) as e, pytest.raises(MemoryBudgetError):
        e.load_model("m", tiny_llama)


def test_kv_pool_defaults_fit_the_budget(tiny_llama):
    with Engine(memory_budget_bytes=64 << 20) as e:
        info = e.load_model("m", tiny_llama, max_model_len=256)
        assert info.weight_bytes + info.kv_cache_bytes <= 64 << 20
        assert info.num_blocks * info.block_size >= 256


def test_stop_strings_truncate_text(eng):
    base = eng.generate(["The"], GREEDY, model="tiny")[0]
    stop = base.text[4:7]
    assert stop and stop not in base.text[:4]
    out = eng.generate(
        ["The"], SamplingParams(max_tokens=12, temperature=0.0, stop=(stop,)), model="tiny"
    )[0]
    assert out.finish_reason == "stop"
    assert out.text == base.text[: base.text.index(stop)]


def test_stop_token_ids_end_the_request(eng):
    base = eng.generate(["abc"], GREEDY, model="tiny")[0]
    target = base.token_ids[5]
    first = base.token_ids.index(target)
    params = SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(target,))
    out = eng.generate(["abc"], params, model="tiny")[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == base.token_ids[: first + 1]


def test_same_seed_same_output_alone_or_batched(eng):
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    alone = eng.generate(["once upon"], params, model="tiny")[0]
    others = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    batch = eng.generate(["a", "once upon", "b c d"], [others, params, others], model="tiny")
    assert batch[1].token_ids == alone.token_ids
    other_seed = SamplingParams(max_tokens=16, temperature=1.0, seed=99, ignore_eos=True)
    assert eng.generate(["once upon"], other_seed, model="tiny")[0].token_ids != alone.token_ids


def test_logprobs_are_returned_per_token(eng):
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=3, ignore_eos=True)
    out = eng.generate(["hello"], params, model="tiny")[0]
    assert out.logprobs is not None and len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp.token_id == tok and len(lp.top) == 3 and lp.top[0][0] == tok


def test_stream_yields_deltas_that_add_up(eng):
    async def collect():
        req = GenerationRequest(model="tiny", prompt="stream me", params=GREEDY)
        return [d async for d in eng.stream(req)]

    deltas = asyncio.run(collect())
    full = eng.generate(["stream me"], GREEDY, model="tiny")[0]
    assert "".join(d.text for d in deltas) == full.text
    assert [t for d in deltas for t in d.token_ids] == full.token_ids
    assert deltas[-1].finished and deltas[-1].completion_tokens == 12


def test_abandoned_stream_aborts_the_request(eng):
    async def first_only():
        params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        async for _ in eng.stream(GenerationRequest(model="tiny", prompt="x", params=params)):
            break
        await asyncio.sleep(0.2)

    asyncio.run(first_only())
    assert eng._worker("tiny").requests == {}


@pytest.fixture
def slow_compile(eng, monkeypatch):
    """Grammar compilation that takes 0.4 s, like a big schema or choice list."""
    compiler = eng._worker("tiny").constraints
    compile_ = compiler.compile

    def slow(params):
        time.sleep(0.4)
        return compile_(params)

    monkeypatch.setattr(compiler, "compile", slow)


def test_stream_compiles_off_the_event_loop(eng, slow_compile):
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async def run() -> list:
        tick = asyncio.ensure_future(ticker())
        req = GenerationRequest(model="tiny", prompt="x", params=SamplingParams(regex="ab"))
        deltas = [d async for d in eng.stream(req)]
        tick.cancel()
        return deltas

    deltas = asyncio.run(run())
    assert "".join(d.text for d in deltas) == "ab"
    assert ticks >= 10  # the loop kept running while the grammar compiled


def test_stream_cancelled_while_submitting_aborts_the_request(eng, slow_compile, monkeypatch):
    finals = []
    submit = eng.submit

    def recording_submit(request, sink):
        return submit(request, lambda d: (sink(d), d.finished and finals.append(d)))

    monkeypatch.setattr(eng, "submit", recording_submit)

    async def run() -> None:
        params = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True, regex="a+")
        req = GenerationRequest(model="tiny", prompt="x", params=params)

        async def consume() -> None:
            async for _ in eng.stream(req):
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.1)  # inside the 0.4 s compile
        task.cancel()
        for _ in range(600):
            await asyncio.sleep(0.05)
            if finals:
                return

    asyncio.run(run())
    assert [d.finish_reason for d in finals] == ["abort"]
    assert eng._worker("tiny").requests == {}


def test_request_errors_name_the_parameter(eng):
    limit = eng.model_info("tiny").max_model_len
    with pytest.raises(InvalidRequestError) as e:
        eng.generate(["hi"], SamplingParams(max_tokens=limit), model="tiny")
    assert e.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError) as e:
        eng.generate([[]], GREEDY, model="tiny")
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as e:
        eng.generate(["hi"], SamplingParams(temperature=-1.0), model="tiny")
    assert e.value.param == "temperature"
    with pytest.raises(ModelNotFoundError):
        eng.generate(["hi"], GREEDY, model="nope")


def test_block_bytes_matches_the_cache(eng):
    info = eng.model_info("tiny")
    w = eng._worker("tiny")
    assert info.kv_cache_bytes == info.num_blocks * block_bytes(
        w.args, info.block_size, w.cache.layers[0][0].dtype
    )
