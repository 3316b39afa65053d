"""Speculative decoding inside the engine: lossless greedy outputs with both proposers at batch
sizes 1 and 8, rollback of KV blocks, stops inside a draft run, preemption, per-request overrides
and acceptance figures."""

import json
import random
import re
import threading

import pytest

from engine import (
    Engine,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
    SpeculativeConfig,
    SpeculativeOverride,
)
from engine.sampling import Sampler
from tests.engine.tiny_models import make_checkpoint

OFF = SpeculativeOverride(method="off")
NGRAM = SpeculativeOverride(method="ngram")
DRAFT = SpeculativeOverride(method="draft")


@pytest.fixture(scope="module")
def tiny_draft(tmp_path_factory):
    """A different random Llama with the same tokenizer: it guesses badly, so verification
    rejects often and rollback paths run."""
    return make_checkpoint(tmp_path_factory.mktemp("draft"), "llama", seed=7, hidden=32, layers=1)


@pytest.fixture(scope="module")
def eng(tiny_llama, tiny_draft):
    with Engine() as e:
        e.load_model("draft", tiny_draft, dtype="float32")
        e.load_model("self-draft", tiny_llama, dtype="float32")
        config = SpeculativeConfig(
            method="draft", draft_model="draft", num_tokens=4, adaptive=False
        )
        e.load_model("tiny", tiny_llama, dtype="float32", speculative=config, num_blocks=96)
        same = SpeculativeConfig(
            method="draft", draft_model="self-draft", num_tokens=3, adaptive=False
        )
        e.load_model("tiny-self", tiny_llama, dtype="float32", speculative=same)
        adaptive = SpeculativeConfig(method="draft", draft_model="draft", num_tokens=6)
        e.load_model("tiny-adaptive", tiny_llama, dtype="float32", speculative=adaptive)
        yield e


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Random prompts, some repetitive so that prompt lookup finds matches."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        base = [rng.randrange(5, 400) for _ in range(rng.randrange(3, 30))]
        out.append(base * (1 + i % 3))
    return out


def greedy(spec: SpeculativeOverride, **kw) -> SamplingParams:
    fields = {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True, **kw}
    return SamplingParams(speculative=spec, **fields)


@pytest.mark.parametrize("model", ["tiny", "tiny-self", "tiny-adaptive"])
@pytest.mark.parametrize("spec", [DRAFT, NGRAM], ids=["draft", "ngram"])
@pytest.mark.parametrize("batch", [1, 8])
def test_greedy_output_is_identical_with_and_without_speculation(eng, model, spec, batch):
    ps = prompts(8, seed=batch)
    ref = [o.token_ids for o in eng.generate(ps, greedy(OFF), model=model)]
    got = []
    for i in range(0, len(ps), batch):
        got += [o.token_ids for o in eng.generate(ps[i : i + batch], greedy(spec), model=model)]
    assert got == ref


def test_draft_tokens_are_verified_and_reported(eng):
    outs = eng.generate(prompts(4), greedy(DRAFT), model="tiny-self")
    # The draft is the target itself: every greedy guess is right.
    assert all(o.num_draft_tokens > 0 for o in outs)
    assert all(o.num_accepted_tokens == o.num_draft_tokens for o in outs)
    bad = eng.generate(prompts(4), greedy(DRAFT), model="tiny")
    assert sum(o.num_draft_tokens for o in bad) > sum(o.num_accepted_tokens for o in bad)
    stats = eng.speculative_stats("tiny")
    assert stats["draft_tokens"] >= stats["accepted_tokens"] > 0


def test_rolled_back_blocks_return_to_the_pool(eng):
    blocks = eng.block_manager("tiny")
    draft_blocks = eng.block_manager("draft")
    free, draft_free = blocks.num_free, draft_blocks.num_free
    eng.generate(prompts(8, seed=3), greedy(DRAFT), model="tiny")
    assert blocks.num_free == free
    assert draft_blocks.num_free == draft_free


def test_prefix_cache_holds_only_accepted_tokens(eng):
    """A follow-up prompt made of a speculated output must reuse cached blocks and still decode
    exactly as without cache: rejected tokens never entered a hashed block."""
    first = prompts(1, seed=11)[0]
    out = eng.generate([first], greedy(DRAFT), model="tiny")[0]
    follow = first + out.token_ids
    hits = eng.block_manager("tiny").hits
    cached = eng.generate([follow], greedy(OFF), model="tiny")[0]
    assert eng.block_manager("tiny").hits > hits
    eng.block_manager("tiny").reset_prefix_cache()
    fresh = eng.generate([follow], greedy(OFF), model="tiny")[0]
    assert cached.token_ids == fresh.token_ids


def test_draft_model_reuses_its_prefix_cache(eng):
    """The draft's KV of a prompt seen before comes from the draft pool's prefix cache, and
    outputs stay those of plain decoding (blocks holding guesses are never indexed)."""
    rng = random.Random(31)
    shared = [rng.randrange(5, 400) for _ in range(40)]
    ps = [shared + [rng.randrange(5, 400) for _ in range(5)] for _ in range(3)]
    ref = [o.token_ids for o in eng.generate(ps, greedy(OFF), model="tiny")]
    draft_blocks = eng.block_manager("draft")
    eng.generate(ps[:1], greedy(DRAFT), model="tiny")
    hits = draft_blocks.hits
    got = [eng.generate([p], greedy(DRAFT), model="tiny")[0].token_ids for p in ps]
    assert got == ref
    # Each of the three requests found at least the 2 full blocks of the shared 40 tokens.
    assert draft_blocks.hits - hits >= 3 * (40 // draft_blocks.block_size)


def test_stop_token_inside_a_draft_run_ends_the_request_there(eng):
    p = prompts(1, seed=5)[0]
    ref = eng.generate([p], greedy(OFF), model="tiny-self")[0].token_ids
    stop_at = ref[5]
    params = SamplingParams(
        max_tokens=24, temperature=0.0, stop_token_ids=(stop_at,), speculative=DRAFT
    )
    out = eng.generate([p], params, model="tiny-self")[0]
    assert out.token_ids == ref[: ref.index(stop_at) + 1]
    assert out.finish_reason == "stop"


def test_stop_string_and_max_tokens_inside_a_draft_run(eng):
    p = prompts(1, seed=6)[0]
    ref = eng.generate([p], greedy(OFF, max_tokens=7), model="tiny-self")[0]
    spec = eng.generate([p], greedy(DRAFT, max_tokens=7), model="tiny-self")[0]
    assert spec.token_ids == ref.token_ids and len(spec.token_ids) == 7
    full = eng.generate([p], greedy(OFF), model="tiny-self")[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    if not stop.strip():
        pytest.skip("the random model produced whitespace")
    ref_stop = eng.generate([p], greedy(OFF, stop=(stop,)), model="tiny-self")[0]
    spec_stop = eng.generate([p], greedy(DRAFT, stop=(stop,)), model="tiny-self")[0]
    assert spec_stop.text == ref_stop.text and stop not in spec_stop.text


def test_preemption_during_speculation_keeps_outputs_exact(tiny_llama, tiny_draft):
    config = SpeculativeConfig(method="draft", draft_model="draft", num_tokens=4, adaptive=False)
    with Engine() as e:
        e.load_model("draft", tiny_draft, dtype="float32")
        # 12 blocks of 4 tokens cannot hold 8 sequences of ~40 tokens: preemption must happen.
        e.load_model("t", tiny_llama, dtype="float32", num_blocks=24, block_size=4,
                     speculative=config)  # fmt: skip
        ps = [p[:12] for p in prompts(8, seed=9)]
        scheduler = e._workers["t"].scheduler
        preempt, preempted = scheduler._preempt, []
        scheduler._preempt = lambda seq: (preempted.append(seq.draft_ids), preempt(seq))
        ref = e.generate(ps, greedy(OFF, max_tokens=30), model="t")
        preempted.clear()
        got = e.generate(ps, greedy(DRAFT, max_tokens=30), model="t")
        assert preempted, "the pool was large enough: no preemption happened"
        assert [o.token_ids for o in got] == [o.token_ids for o in ref]
        assert e.block_manager("t").num_free == 24
        assert e.block_manager("draft").num_free == e.model_info("draft").num_blocks


def test_logprobs_match_plain_decoding(eng):
    p = prompts(2, seed=4)
    ref = eng.generate(p, greedy(OFF, logprobs=2), model="tiny-self")
    got = eng.generate(p, greedy(DRAFT, logprobs=2), model="tiny-self")
    for r, g in zip(ref, got, strict=True):
        assert [x.token_id for x in g.logprobs] == [x.token_id for x in r.logprobs]
        for a, b in zip(g.logprobs, r.logprobs, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_penalties_and_min_tokens_stay_exact_under_speculation(eng):
    p = prompts(3, seed=8)
    kw = {"repetition_penalty": 1.3, "frequency_penalty": 0.5, "min_tokens": 10}
    ref = eng.generate(p, greedy(OFF, **kw), model="tiny")
    got = eng.generate(p, greedy(DRAFT, **kw), model="tiny")
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]


@pytest.mark.parametrize("model", ["tiny", "tiny-self", "tiny-adaptive"])
@pytest.mark.parametrize("spec", [DRAFT, NGRAM], ids=["draft", "ngram"])
def test_seeded_sampling_gives_the_same_tokens_with_and_without_speculation(eng, model, spec):
    """A seed fixes the noise of every position, so the tokens do not depend on how many were
    speculated in which step (nor on the batch)."""
    ps = prompts(4, seed=2)

    def params(s):
        return [
            SamplingParams(max_tokens=20, temperature=0.9, seed=100 + i, speculative=s)
            for i in range(len(ps))
        ]

    ref = eng.generate(ps, params(OFF), model=model)
    got = eng.generate(ps, params(spec), model=model)
    alone = [eng.generate([p], [q], model=model)[0] for p, q in zip(ps, params(spec), strict=True)]
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert [o.token_ids for o in alone] == [o.token_ids for o in ref]


def test_requests_with_and_without_speculation_share_a_batch(eng):
    ps = prompts(6, seed=12)
    specs = [DRAFT, NGRAM, OFF, DRAFT, NGRAM, OFF]
    ref = [o.token_ids for o in eng.generate(ps, greedy(OFF), model="tiny")]
    got = eng.generate(ps, [greedy(s) for s in specs], model="tiny")
    assert [o.token_ids for o in got] == ref
    assert got[2].num_draft_tokens == 0 and got[0].num_draft_tokens > 0


def test_draft_override_needs_a_draft_model(eng):
    with pytest.raises(InvalidRequestError) as e:
        eng.submit(
            GenerationRequest(model="draft", prompt="hi", params=greedy(DRAFT)), lambda d: None
        )
    assert e.value.param == "speculative.method"


def test_bad_configurations_are_refused(eng, tiny_llama):
    with pytest.raises(InvalidRequestError):
        eng.load_model("x", tiny_llama, speculative=SpeculativeConfig(method="draft"))
    with pytest.raises(InvalidRequestError):
        eng.load_model(
            "x", tiny_llama, speculative=SpeculativeConfig(method="draft", draft_model="nope")
        )
    with pytest.raises(InvalidRequestError):
        eng.load_model("x", tiny_llama, speculative=SpeculativeConfig(num_tokens=0))
    with pytest.raises(InvalidRequestError) as e:
        eng.unload_model("draft")
    assert "draft model" in str(e.value)


@pytest.mark.parametrize("seeded", [False, True], ids=["rejection-sampling", "seeded-noise"])
def test_sampled_tokens_follow_the_target_distribution_end_to_end(eng, seeded):
    """Joint frequencies of three sampled tokens (top_k 3: 27 outcomes) under speculation with a
    poor draft match the target's exact probabilities (chi-square, p = 0.001). Unseeded
    requests go through rejection sampling, seeded ones through their own noise."""
    prompt = prompts(1, seed=21)[0]
    n = 1500
    worker = eng._workers["tiny"]
    worker.speculator.generator.manual_seed(0)  # a fixed draw keeps the test deterministic
    worker.sampler = Sampler(seed=0)
    params = [
        SamplingParams(
            max_tokens=3, temperature=1.5, top_k=3, seed=i if seeded else None, ignore_eos=True
        )
        for i in range(n)
    ]
    outs = eng.generate([prompt] * n, params, model="tiny")
    assert sum(o.num_draft_tokens for o in outs) > n // 2  # speculation did happen
    counts = {}
    for o in outs:
        counts[tuple(o.token_ids)] = counts.get(tuple(o.token_ids), 0) + 1
    probs = exact_joint(eng, prompt, temperature=1.5, top_k=3, depth=3)
    assert set(counts) <= set(probs)
    stat = sum((counts.get(t, 0) - n * p) ** 2 / (n * p) for t, p in probs.items())
    df = len(probs) - 1
    assert stat < df * (1 - 2 / (9 * df) + 3.09 * (2 / (9 * df)) ** 0.5) ** 3


def exact_joint(eng, prompt, *, temperature, top_k, depth, prefix=()):
    """P(token sequence) of the target under temperature and top-k, by enumeration."""
    logits = eng.logits("tiny", prompt + list(prefix))[-1] / temperature
    top = logits.topk(top_k)
    probs = top.values.softmax(-1).tolist()
    out = {}
    for token, p in zip(top.indices.tolist(), probs, strict=True):
        if depth == 1:
            out[(*prefix, token)] = p
            continue
        rest = exact_joint(
            eng, prompt, temperature=temperature, top_k=top_k, depth=depth - 1,
            prefix=(*prefix, token),
        )  # fmt: skip
        out.update({seq: p * q for seq, q in rest.items()})
    return out


def test_abort_and_unload_during_speculation_free_both_pools(tiny_llama, tiny_draft):
    config = SpeculativeConfig(method="draft", draft_model="draft", num_tokens=4, adaptive=False)
    with Engine() as e:
        e.load_model("draft", tiny_draft, dtype="float32")
        e.load_model("t", tiny_llama, dtype="float32", speculative=config)
        started = threading.Event()

        def sink(delta):
            if delta.token_ids:
                started.set()

        params = greedy(DRAFT, max_tokens=400)
        request_id = e.submit(GenerationRequest(model="t", prompt="a b c", params=params), sink)
        assert started.wait(10)
        e.abort(request_id)
        e.generate(prompts(1), greedy(OFF), model="t")  # the abort has been processed
        assert e.block_manager("t").num_free == e.model_info("t").num_blocks
        assert e.block_manager("draft").num_free == e.model_info("draft").num_blocks
        e.submit(GenerationRequest(model="t", prompt="a b c", params=params), lambda d: None)
        e.unload_model("t")
        assert e.block_manager("draft").num_free == e.model_info("draft").num_blocks
        e.unload_model("draft")  # no longer anyone's draft


@pytest.fixture(scope="module")
def lora_eng(tiny_llama, tiny_draft, tmp_path_factory):
    """A target speculating with a draft model by default, plus a LoRA adapter on it."""
    pytest.importorskip("peft")
    from tests.engine.test_lora import make_adapter

    root = tmp_path_factory.mktemp("spec-adapters")
    make_adapter(tiny_llama, root / "a1", seed=1)
    with Engine() as e:
        e.load_model("draft", tiny_draft, dtype="float32")
        config = SpeculativeConfig(
            method="draft", draft_model="draft", num_tokens=4, adaptive=False
        )
        e.load_model("tiny", tiny_llama, dtype="float32", speculative=config, adapter_dir=root)
        yield e


def run_mixed(eng, requests: list[tuple[str, list[int], SamplingParams]]) -> list[dict]:
    """Submit every request before waiting, so that base and adapter requests share steps."""
    outs = [{"ids": [], "drafts": 0} for _ in requests]
    done = [threading.Event() for _ in requests]

    def sink(i):
        def collect(delta):
            outs[i]["ids"] += delta.token_ids
            outs[i]["drafts"] = delta.num_draft_tokens or 0
            if delta.finished:
                done[i].set()

        return collect

    for i, (model, ids, params) in enumerate(requests):
        eng.submit(GenerationRequest(model=model, prompt_token_ids=ids, params=params), sink(i))
    for event in done:
        assert event.wait(60)
    return outs


def test_adapter_requests_speculate_exactly_beside_base_requests(lora_eng):
    """The verify forward runs each request's rows under its own LoRA slot: greedy outputs of
    adapter and base requests mixed in one batch equal plain decoding, and adapter requests
    use prompt lookup (the draft model has no adapter)."""
    ps = prompts(8, seed=21)
    models = ["tiny:a1" if i % 2 else "tiny" for i in range(len(ps))]
    default = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    ref = run_mixed(lora_eng, [(m, p, greedy(OFF)) for m, p in zip(models, ps, strict=True)])
    got = run_mixed(lora_eng, [(m, p, default) for m, p in zip(models, ps, strict=True)])
    assert [o["ids"] for o in got] == [o["ids"] for o in ref]
    # The adapter changes outputs, so a verify under the base weights could not pass the above.
    base = lora_eng.generate(ps[1::2], greedy(OFF), model="tiny")
    assert [o.token_ids for o in base] != [o["ids"] for o in ref[1::2]]
    assert sum(o["drafts"] for o in got[1::2]) > 0  # prompt lookup proposed for them
    stats = lora_eng.speculative_stats("tiny")
    assert stats["draft_tokens"] > 0


def test_adapter_requests_cannot_ask_for_the_draft_model(lora_eng):
    with pytest.raises(InvalidRequestError) as e:
        lora_eng.submit(
            GenerationRequest(model="tiny:a1", prompt="hi", params=greedy(DRAFT)), lambda d: None
        )
    assert e.value.param == "speculative.method"


def test_prompt_lookup_learns_from_earlier_outputs_and_stays_exact(tiny_llama):
    """A second request whose prompt holds no repeat gets proposals from the first request's
    output (the history), verified as usual; with the history off it gets none."""
    rng = random.Random(5)
    first, second = ([rng.randrange(5, 400) for _ in range(12)] for _ in range(2))
    spec = SpeculativeOverride(method="ngram", num_tokens=4)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, speculative=spec)
    runs = {}
    for history in (True, False):
        with Engine() as e:
            config = SpeculativeConfig(method="ngram", ngram_min=2, ngram_history=history)
            e.load_model("tiny", tiny_llama, dtype="float32", speculative=config)
            ref = e.generate([first], greedy(OFF), model="tiny")[0].token_ids
            e.generate([first], params, model="tiny")  # indexed in the history when on
            # The same continuation now starts from a different prompt: [noise..., ref[:8]]
            prompt = second + ref[:8]
            runs[history] = e.generate([prompt], params, model="tiny")[0]
            plain = e.generate([prompt], greedy(OFF), model="tiny")[0]
            assert runs[history].token_ids == plain.token_ids
    assert runs[True].num_accepted_tokens > runs[False].num_accepted_tokens


CONSTRAINED = {
    "json": {
        "json_schema": json.dumps(
            SCHEMA_JSON := {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 8},
                    "year": {"type": "integer"},
                },
                "required": ["city", "year"],
                "additionalProperties": False,
            }
        )
    },
    "regex": {"regex": r"(ab|cd)[0-9]{2,6}(ab|cd)[0-9]{2,6}"},
}


@pytest.mark.parametrize("model", ["tiny", "tiny-self"])
@pytest.mark.parametrize("spec", [DRAFT, NGRAM], ids=["draft", "ngram"])
@pytest.mark.parametrize("kind", sorted(CONSTRAINED))
def test_constrained_requests_speculate_exactly(eng, model, spec, kind):
    """Drafts are cut where the grammar refuses them and every verified row is masked by the
    grammar state after the drafts before it: greedy and seeded outputs equal plain decoding."""
    texts = ["The answer is", "Record: Oslo 1048", "ab12 ab12 ab12 cd", "city year city"]
    fields = {"max_tokens": 40, "temperature": 0.0, **CONSTRAINED[kind]}
    seeded = {**fields, "temperature": 0.9, "seed": 3}
    for kw in (fields, seeded):
        ref = eng.generate(texts, SamplingParams(**kw, speculative=OFF), model=model)
        got = eng.generate(texts, SamplingParams(**kw, speculative=spec), model=model)
        assert [o.token_ids for o in got] == [o.token_ids for o in ref]
        if kind == "json":  # complete outputs parse (a random model may run to max_tokens)
            done = [o for o in got if o.finish_reason == "stop"]
            assert all(json.loads(o.text).keys() == {"city", "year"} for o in done)
    if model == "tiny-self" and spec is DRAFT:  # the target drafting for itself
        assert sum(o.num_accepted_tokens for o in got) > 0


def test_unseeded_sampled_constrained_requests_do_not_use_the_draft_model(eng):
    params = SamplingParams(max_tokens=12, temperature=0.9, speculative=DRAFT, regex=r"[a-z]{4,12}")
    outs = eng.generate(["The answer is"] * 2, params, model="tiny-self")
    assert all(o.num_draft_tokens == 0 and re.fullmatch(r"[a-z]{4,12}", o.text) for o in outs)


def test_grammar_forced_tokens_are_proposed_when_lookup_finds_nothing(tiny_llama):
    """A regex that forces a long literal: prompt lookup has no match in a fresh model without
    history, so the forced tokens are the proposal, and all of them are accepted."""
    config = SpeculativeConfig(method="ngram", num_tokens=6, adaptive=False, ngram_history=False)
    params = {"max_tokens": 30, "temperature": 0.0, "regex": r"release notes: [0-9]{3}"}
    with Engine() as e:
        e.load_model("tiny", tiny_llama, dtype="float32", speculative=config)
        ref = e.generate(["Hi"], SamplingParams(**params, speculative=OFF), model="tiny")[0]
        got = e.generate(["Hi"], SamplingParams(**params), model="tiny")[0]
    assert got.token_ids == ref.token_ids and got.text.startswith("release notes: ")
    assert got.num_accepted_tokens >= 3
