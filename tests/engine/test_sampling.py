"""Sampling: parameters, logits processing, the batched sampler. CPU only, no model."""

from __future__ import annotations

import math

import msgspec
import pytest
import torch

from engine.errors import InvalidRequestError
from engine.sampling import (
    Sampler,
    SamplingParams,
    SamplingState,
    TokenLogprob,
    apply_penalties,
    mask_stop_tokens,
    process_logits,
    warp_logits,
)

EOS = 3


def states_for(params: SamplingParams, rows: int, prompt: list[int] | None = None):
    """`rows` independent states sharing `params`."""
    return [SamplingState(params, prompt or [0], eos_token_ids=(EOS,)) for _ in range(rows)]


def logits_from_probs(probs: list[float], rows: int = 1) -> torch.Tensor:
    """Logits [rows, V] whose softmax is `probs`."""
    return torch.tensor(probs).log().expand(rows, -1).contiguous()


# --- SamplingParams ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.1}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"min_tokens": 17, "max_tokens": 16}, "min_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"seed": 2**64}, "seed"),
        ({"stop": ("",)}, "stop"),
        ({"stop_token_ids": (-1,)}, "stop_token_ids"),
    ],
)
def test_validate_names_the_param(fields, param):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**fields).validate()
    assert info.value.param == param
    assert param in str(info.value)


def test_validate_accepts_edges_and_checks_context_length():
    SamplingParams(
        temperature=0.0,
        top_p=1.0,
        top_k=-1,
        min_p=1.0,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        logprobs=20,
        min_tokens=16,
        seed=-1,
    ).validate(max_model_len=16)
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(max_tokens=17).validate(max_model_len=16)
    assert info.value.param == "max_tokens"


def test_params_are_frozen_and_reject_unknown_fields():
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"temperature": 1.0, "bogus": 1}, SamplingParams)
    with pytest.raises(AttributeError):
        SamplingParams().temperature = 0.5


def test_greedy_property():
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(top_k=1).greedy
    assert not SamplingParams(temperature=0.5).greedy


# --- SamplingState -------------------------------------------------------------------------


def test_stop_token_hit_covers_eos_and_stop_ids_unless_ignore_eos():
    state = SamplingState(SamplingParams(stop_token_ids=(7,)), [1], eos_token_ids=(EOS,))
    assert state.stop_token_hit(EOS) and state.stop_token_hit(7)
    assert not state.stop_token_hit(5)
    ignoring = SamplingState(
        SamplingParams(stop_token_ids=(7,), ignore_eos=True), [1], eos_token_ids=(EOS,)
    )
    assert not ignoring.stop_token_hit(EOS) and ignoring.stop_token_hit(7)


def test_generator_only_for_seeded_requests():
    assert SamplingState(SamplingParams(), [1]).generator is None
    assert isinstance(SamplingState(SamplingParams(seed=1), [1]).generator, torch.Generator)


# --- greedy, top-k, top-p, min-p -----------------------------------------------------------


def test_greedy_is_argmax():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    tokens, logprobs = Sampler(seed=0)(logits, states_for(SamplingParams(temperature=0.0), 8))
    assert tokens == logits.argmax(dim=-1).tolist()
    assert logprobs == [None] * 8


def test_greedy_ties_go_to_lowest_id():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0]])
    assert Sampler()(logits, states_for(SamplingParams(temperature=0.0), 1))[0] == [1]


def test_top_k_1_is_greedy():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.5, top_k=1)
    tokens, _ = Sampler(seed=0)(logits, states_for(params, 16))
    assert tokens == logits.argmax(dim=-1).tolist()
    warped = warp_logits(logits.clone(), [SamplingParams(temperature=1.5, top_k=2)] * 16)
    assert (warped.isfinite().sum(dim=-1) == 2).all()


def test_top_k_keeps_k_best_per_row():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0, 0.0]])
    params = [SamplingParams(top_k=2), SamplingParams(top_k=3)]
    warped = warp_logits(logits.clone(), params)
    assert warped.isfinite().tolist() == [
        [False, False, False, True, True],
        [True, True, True, False, False],
    ]
    assert torch.equal(warped[0, 3:], logits[0, 3:])


PROBS = [0.02, 0.5, 0.05, 0.3, 0.1, 0.03]


@pytest.mark.parametrize(("top_p", "allowed"), [(0.75, {1, 3}), (0.85, {1, 3, 4}), (0.4, {1})])
def test_top_p_restricts_support(top_p, allowed):
    params = SamplingParams(top_p=top_p)
    tokens, _ = Sampler(seed=0)(logits_from_probs(PROBS, 2000), states_for(params, 2000))
    assert set(tokens) == allowed
    seeded = SamplingParams(top_p=top_p, seed=5)
    tokens, _ = Sampler()(logits_from_probs(PROBS, 300), states_for(seeded, 300))
    assert set(tokens) <= allowed


def test_top_k_and_top_p_combine():
    # top-k 2 leaves {1: 0.625, 3: 0.375} after renormalising; top-p 0.6 then keeps only 1.
    warped = warp_logits(logits_from_probs(PROBS), [SamplingParams(top_k=2, top_p=0.6)])
    assert warped[0].isfinite().nonzero().flatten().tolist() == [1]


def test_min_p_restricts_support():
    # max prob 0.5, min_p 0.25 -> threshold 0.125: tokens 1 (0.5) and 3 (0.3) stay.
    params = SamplingParams(min_p=0.25)
    tokens, _ = Sampler(seed=0)(logits_from_probs(PROBS, 2000), states_for(params, 2000))
    assert set(tokens) == {1, 3}


def test_rows_without_truncation_are_untouched_in_mixed_batch():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(top_p=0.5), SamplingParams(), SamplingParams(min_p=0.0, top_k=0)]
    warped = warp_logits(logits.clone(), params)
    assert torch.equal(warped[1:], logits[1:])
    assert not warped[0].isfinite().all()


# --- temperature and the distribution ------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sampled_frequencies_match_tempered_softmax(temperature):
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 20000
    params = SamplingParams(temperature=temperature)
    tokens, _ = Sampler(seed=0)(logits_from_probs(probs.tolist(), n), states_for(params, n))
    observed = torch.bincount(torch.tensor(tokens), minlength=4).float() / n
    expected = (probs.log() / temperature).softmax(dim=0)
    # Standard error of a frequency is at most 0.0036 here; 0.015 is > 4 sigma.
    assert torch.allclose(observed, expected, atol=0.015), (observed, expected)


def test_process_logits_reflects_temperature_only_for_sampling_rows():
    logits = torch.tensor([[1.0, 2.0, 4.0], [1.0, 2.0, 4.0]])
    states = [
        SamplingState(SamplingParams(temperature=2.0), [0]),
        SamplingState(SamplingParams(temperature=0.0), [0]),
    ]
    processed = process_logits(logits, states)
    assert torch.allclose(processed[0], logits[0] / 2)
    assert torch.equal(processed[1], logits[1])
    assert torch.equal(logits, torch.tensor([[1.0, 2.0, 4.0], [1.0, 2.0, 4.0]]))


# --- penalties -----------------------------------------------------------------------------


def test_repetition_penalty_hf_semantics_over_prompt_and_output():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0]])
    state = SamplingState(SamplingParams(repetition_penalty=2.0), prompt_token_ids=[0, 1])
    state.append(2)
    state.append(2)
    out = apply_penalties(logits.clone(), [state])
    assert out.tolist() == [[1.0, -4.0, 1.0, -2.0, 1.0]]


def test_presence_and_frequency_penalties_openai_semantics_over_output_only():
    logits = torch.zeros(1, 5)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    state = SamplingState(params, prompt_token_ids=[4, 4, 4])
    for token in (1, 2, 2, 2):
        state.append(token)
    out = apply_penalties(logits.clone(), [state])
    # token 1: 0.5 + 0.25; token 2: 0.5 + 3 * 0.25; prompt token 4 untouched.
    assert out.tolist() == [[0.0, -0.75, -1.25, 0.0, 0.0]]


def test_penalties_only_touch_rows_that_set_them():
    logits = torch.ones(3, 6)
    plain = SamplingState(SamplingParams(), [1, 2])
    plain.append(3)
    rep = SamplingState(SamplingParams(repetition_penalty=4.0), [1])
    freq = SamplingState(SamplingParams(frequency_penalty=1.0), [5])
    freq.append(5)
    out = apply_penalties(logits.clone(), [plain, rep, freq])
    assert out[0].tolist() == [1.0] * 6
    assert out[1].tolist() == [1.0, 0.25, 1.0, 1.0, 1.0, 1.0]
    assert out[2].tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_penalties_ignore_ids_past_the_vocabulary():
    state = SamplingState(SamplingParams(repetition_penalty=2.0), [1, 99])
    out = apply_penalties(torch.ones(1, 4), [state])
    assert out.tolist() == [[1.0, 0.5, 1.0, 1.0]]


def test_penalties_steer_sampling():
    # Strong frequency penalty against a repeated favourite makes greedy pick the runner-up.
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    state = SamplingState(SamplingParams(temperature=0.0, frequency_penalty=2.0), [0])
    state.append(0)
    assert Sampler()(logits, [state])[0] == [1]


# --- min_tokens ----------------------------------------------------------------------------


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(4,))
    state = SamplingState(params, [0], eos_token_ids=(EOS,))
    logits = torch.tensor([[0.0, 1.0, 0.0, 9.0, 8.0]])  # eos, then stop id 4, are favourites
    sampler = Sampler()
    produced = []
    for _ in range(4):
        token = sampler(logits, [state])[0][0]
        state.append(token)
        produced.append(token)
    assert produced == [1, 1, 1, EOS]


def test_min_tokens_mask_only_pending_rows():
    pending = SamplingState(SamplingParams(min_tokens=1), [0], eos_token_ids=(EOS,))
    done = SamplingState(SamplingParams(min_tokens=1), [0], eos_token_ids=(EOS,))
    done.append(0)
    out = mask_stop_tokens(torch.zeros(2, 5), [pending, done])
    assert out[0, EOS] == -math.inf and out[1].isfinite().all()


# --- seeds ---------------------------------------------------------------------------------


def run_steps(sampler: Sampler, states, logits_per_step, row: int) -> list[int]:
    """Decode one step per logits tensor, appending every row's token; return row `row`'s."""
    produced = []
    for logits in logits_per_step:
        tokens, _ = sampler(logits, states)
        for state, token in zip(states, tokens, strict=True):
            state.append(token)
        produced.append(tokens[row])
    return produced


def test_seeded_row_is_reproducible_and_batch_invariant():
    gen = torch.Generator().manual_seed(3)
    steps = [torch.randn(4, 64, generator=gen) for _ in range(20)]
    params = SamplingParams(temperature=0.8, top_p=0.95, top_k=40, seed=1234)

    alone = run_steps(Sampler(seed=0), [SamplingState(params, [1])], [s[2:3] for s in steps], 0)
    again = run_steps(Sampler(seed=99), [SamplingState(params, [1])], [s[2:3] for s in steps], 0)
    neighbours = [
        SamplingState(SamplingParams(temperature=1.3), [2]),
        SamplingState(SamplingParams(temperature=0.0), [3]),
        SamplingState(params, [1]),
        SamplingState(SamplingParams(seed=7, min_p=0.1, logprobs=3), [4]),
    ]
    batched = run_steps(Sampler(seed=5), neighbours, steps, 2)
    assert alone == again == batched
    assert len(set(alone)) > 1  # it really sampled


def test_different_seeds_differ_and_unseeded_sampler_is_seedable():
    logits = torch.zeros(1, 1000)
    first = Sampler()(logits, [SamplingState(SamplingParams(seed=1), [0])])[0]
    second = Sampler()(logits, [SamplingState(SamplingParams(seed=2), [0])])[0]
    assert first != second
    unseeded = states_for(SamplingParams(), 8)
    assert (
        Sampler(seed=3)(logits.expand(8, -1), unseeded)[0]
        == Sampler(seed=3)(logits.expand(8, -1), unseeded)[0]
    )


# --- logprobs ------------------------------------------------------------------------------


def test_logprobs_are_log_softmax_with_top_n_best_first():
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(4))
    states = [
        SamplingState(SamplingParams(logprobs=5, temperature=0.7), [0]),
        SamplingState(SamplingParams(), [0]),
        SamplingState(SamplingParams(logprobs=0, temperature=0.0), [0]),
    ]
    tokens, logprobs = Sampler(seed=0)(logits, states)
    reference = logits.log_softmax(dim=-1)
    first = logprobs[0]
    assert isinstance(first, TokenLogprob) and first.token_id == tokens[0]
    assert first.logprob == pytest.approx(reference[0, tokens[0]].item(), abs=1e-6)
    values, ids = reference[0].topk(5)
    assert [t for t, _ in first.top] == ids.tolist()
    assert [v for _, v in first.top] == pytest.approx(values.tolist(), abs=1e-6)
    assert [v for _, v in first.top] == sorted((v for _, v in first.top), reverse=True)
    assert logprobs[1] is None
    assert logprobs[2] == TokenLogprob(
        token_id=tokens[2], logprob=pytest.approx(reference[2].max().item(), abs=1e-6), top=()
    )


def test_logprobs_are_taken_after_penalties():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    state = SamplingState(SamplingParams(logprobs=1, repetition_penalty=2.0, temperature=0), [0])
    logprob = Sampler()(logits, [state])[1][0]
    expected = torch.tensor([1.0, 1.0, 0.0]).log_softmax(dim=0)
    assert logprob is not None and logprob.logprob == pytest.approx(expected[0].item())


# --- dtypes and inputs ---------------------------------------------------------------------


def test_half_precision_input_is_not_modified():
    logits = torch.randn(2, 16, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    before = logits.clone()
    state = SamplingState(SamplingParams(repetition_penalty=1.5, top_p=0.9), [1, 2])
    Sampler(seed=0)(logits, [state, SamplingState(SamplingParams(temperature=0), [0])])
    assert torch.equal(logits, before)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="do not match"):
        Sampler()(torch.zeros(2, 4), states_for(SamplingParams(), 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_cuda_matches_cpu_for_greedy_and_is_batch_invariant_when_seeded():
    logits = torch.randn(4, 128, generator=torch.Generator().manual_seed(7))
    greedy = states_for(SamplingParams(temperature=0.0, repetition_penalty=1.3), 4)
    cpu_tokens = Sampler()(logits, greedy)[0]
    assert Sampler()(logits.cuda(), greedy)[0] == cpu_tokens
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, min_p=0.01, seed=11)
    alone = Sampler()(logits[1:2].cuda(), [SamplingState(params, [1], device="cuda")])[0]
    batch = [SamplingState(SamplingParams(), [0]), SamplingState(params, [1], device="cuda")]
    assert Sampler()(logits[:2].cuda(), batch)[0][1] == alone[0]
