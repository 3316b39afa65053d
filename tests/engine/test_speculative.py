"""Speculative decoding building blocks: prompt lookup, lossless acceptance (chi-square against
the target distribution, with a check that the test detects a 2% bias), the adaptive speed
model and configuration errors."""

import math

import pytest
import torch

from engine import InvalidRequestError, SpeculativeConfig, SpeculativeOverride
from engine.speculative import (
    Acceptance,
    OutputHistory,
    SpeedModel,
    accept_greedy,
    accept_sampled,
    clamp_length,
    expected_tokens,
    lookup,
    ngram_propose,
)

# -- prompt lookup ---------------------------------------------------------------------------


def test_ngram_prefers_the_longest_and_latest_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    # "2 3" occurs twice before the end; the latest (followed by 7 8) wins.
    assert ngram_propose(tokens, 2) == [7, 8]
    # A longer n-gram beats a more recent shorter one.
    assert ngram_propose([4, 5, 6, 1, 6, 9, 4, 5, 6], 3, 1, 3) == [1, 6, 9]


def test_ngram_without_match_proposes_nothing_and_respects_bounds():
    assert ngram_propose([1, 2, 3, 4], 3) == []
    assert ngram_propose([1, 2, 1, 2], 5) == [1, 2]  # only what exists after the match
    assert ngram_propose([7, 7], 3, ngram_min=2) == []


def test_output_history_follows_the_continuation_past_outputs_agree_on():
    history = OutputHistory(ngram_max=3)
    history.add([1, 2, 3, 4, 5])
    assert history.match([9, 2, 3], k=4, ngram_min=1, ngram_max=3) == ([4, 5], 2)
    assert history.match([1, 2, 3], k=1, ngram_min=1, ngram_max=3) == ([4], 3)  # longest n
    assert history.match([7, 7], k=2, ngram_min=1, ngram_max=3) == ([], 0)
    assert history.match([9, 3], k=2, ngram_min=2, ngram_max=3) == ([], 0)  # too short a match
    # Two more outputs share the scaffolding "2 3 ... 5" but differ in the value after "2 3":
    # the proposal stops before the value instead of guessing one.
    history.add([8, 2, 3, 6, 5])
    history.add([8, 2, 3, 7, 5])
    assert history.match([9, 2, 3], k=4, ngram_min=1, ngram_max=3) == ([], 0)
    # After the value, all three agree again on 5.
    assert history.match([9, 2, 3, 6], k=1, ngram_min=1, ngram_max=3) == ([5], 3)


def test_output_history_is_bounded_and_evicts_the_oldest():
    history = OutputHistory(ngram_max=1, max_entries=3)
    history.add([1, 2, 3, 4, 5])  # 1-grams 1..4
    assert len(history.table) == 3 and (1,) not in history.table
    history.add([2, 9])  # refreshes 2, which then outlives 3
    history.add([6, 7])
    assert (2,) in history.table and (3,) not in history.table


def test_lookup_prefers_longer_matches_then_the_request_over_history():
    history = OutputHistory(ngram_max=4)
    history.add([5, 6, 7, 40, 41])
    # The request holds "6 7" (n=2) but the history holds "5 6 7" (n=3): the longer one wins.
    assert lookup([6, 7, 30, 5, 6, 7], 2, (1, 4), history) == ([40, 41], 3, "history")
    # A tie at the same n goes to the request's own tokens.
    assert lookup([6, 7, 30, 9, 6, 7], 1, (1, 4), history) == ([30], 2, "prompt")
    assert lookup([1, 2, 3], 2, (1, 4), None) == ([], 0, "prompt")


# -- acceptance ------------------------------------------------------------------------------


def test_accept_greedy_keeps_the_agreeing_prefix_then_the_target_token():
    assert accept_greedy([5, 6, 7], [5, 6]) == [5, 6, 7]
    assert accept_greedy([5, 1, 7], [5, 6]) == [5, 1]
    assert accept_greedy([2, 6, 7], [5, 6]) == [2]


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty upper quantile of chi-square (z = 3.09: p = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


P = torch.tensor(
    [
        [0.40, 0.25, 0.15, 0.10, 0.06, 0.04],
        [0.05, 0.10, 0.30, 0.30, 0.15, 0.10],
        [0.20, 0.20, 0.20, 0.20, 0.10, 0.10],
    ]
)
Q = torch.tensor([[0.10, 0.10, 0.40, 0.20, 0.10, 0.10], [0.30, 0.30, 0.10, 0.10, 0.10, 0.10]])


def first_two_tokens(n: int, q: torch.Tensor | None, seed: int = 0):
    """Counts of the first emitted token, and of the second one when the first was accepted."""
    g = torch.Generator().manual_seed(seed)
    first, second = torch.zeros(6), torch.zeros(6)
    for _ in range(n):
        if q is None:  # a deterministic proposer always guesses the same tokens
            draft = [0, 2]
        else:
            draft = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(2)]
        out = accept_sampled(P, q, draft, g)
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
    return first, second


@pytest.mark.parametrize("proposer", ["draft", "ngram"])
def test_sampled_acceptance_reproduces_the_target_distribution(proposer):
    q = Q if proposer == "draft" else None
    first, second = first_two_tokens(15000, q)
    critical = chi_square_critical(df=5)
    assert chi_square(first, P[0]) < critical
    assert chi_square(second, P[1]) < critical
    # The same sample size detects a distribution 2% away from the target's.
    biased = 0.98 * P[0] + 0.02 * torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    assert chi_square(first, biased) > critical


def test_acceptance_rate_follows_min_p_over_q():
    # With q == p every draft is accepted.
    g = torch.Generator().manual_seed(1)
    out = accept_sampled(P, P[:2].clone(), [0, 3], g)
    assert out[:2] == [0, 3] and len(out) == 3
    # A draft the target gives probability 0 is always rejected.
    p = P.clone()
    p[0] = torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0, 0.0])
    assert all(accept_sampled(p, None, [0, 1], g)[0] in (1, 2) for _ in range(50))


def test_expected_tokens_formula():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


# -- adaptation ------------------------------------------------------------------------------


def test_acceptance_tracks_recent_rounds():
    a = Acceptance(prior=0.5)
    for _ in range(20):
        a.update(proposed=4, accepted=4)
    assert a.rate > 0.95
    for _ in range(20):
        a.update(proposed=4, accepted=0)
    assert a.rate < 0.1
    assert (a.total_proposed, a.total_accepted, a.rounds) == (160, 80, 40)


def test_clamp_length_drops_unreachable_positions():
    assert clamp_length(0.99, 8) == 8
    assert clamp_length(0.3, 8) == 1
    assert 1 < clamp_length(0.7, 8) < 8


def speed_model(decode_ms: dict[int, float], multi_ms: dict[int, float]) -> SpeedModel:
    m = SpeedModel()
    for tokens, ms in decode_ms.items():
        m.observe_target(tokens, False, ms / 1e3)
    for tokens, ms in multi_ms.items():
        m.observe_target(tokens, True, ms / 1e3)
    return m


def test_speed_model_speculates_when_verification_is_cheap():
    m = speed_model({1: 10.0}, {2: 12.0, 3: 13.0, 5: 15.0})
    assert m.choose((1, 1, False), [(0.9, 4)], drafted=0) == 4


def test_speed_model_falls_back_to_plain_decoding_when_tokens_cost_linearly():
    # A saturated batch: time grows with every token, and acceptance is mediocre.
    m = speed_model({16: 20.0}, {32: 40.0, 48: 60.0, 64: 80.0, 80: 100.0})
    assert m.choose((16, 16, False), [(0.6, 4)] * 16, drafted=0) == 0


def test_speed_model_counts_draft_forwards():
    m = speed_model({1: 10.0}, {2: 11.0, 3: 12.0, 4: 13.0, 5: 14.0})
    m.observe_draft(1, 0.001)
    assert m.choose((1, 1, False), [(0.9, 4)], drafted=1) == 4
    m.observe_draft(1, 0.030)  # a draft as slow as the target: never worth it
    for _ in range(20):
        m.observe_draft(1, 0.030)
    assert m.choose((1, 1, False), [(0.9, 4)], drafted=1) == 0


def test_speed_model_measures_before_it_judges():
    m = SpeedModel()
    assert m.choose((1, 1, False), [(0.9, 4)], drafted=0) == 0  # plain first
    m.observe_target(1, False, 0.01)
    assert m.choose((1, 1, False), [(0.9, 4)], drafted=0) == 1  # then some speculation


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "param"),
    [
        (SpeculativeConfig(method="draft"), "draft_model"),
        (SpeculativeConfig(method="ngram", draft_model="x"), "draft_model"),
        (SpeculativeConfig(num_tokens=0), "num_tokens"),
        (SpeculativeConfig(num_tokens=99), "num_tokens"),
        (SpeculativeConfig(ngram_min=3, ngram_max=2), "ngram_max"),
    ],
)
def test_bad_config_names_the_field(config, param):
    with pytest.raises(InvalidRequestError) as e:
        config.validate()
    assert e.value.param == param


def test_override_validation():
    SpeculativeOverride(method="ngram", num_tokens=3).validate()
    with pytest.raises(InvalidRequestError) as e:
        SpeculativeOverride(method="ngram", num_tokens=0).validate()
    assert e.value.param == "speculative.num_tokens"


def test_docstring_examples():
    import doctest

    import engine.speculative

    result = doctest.testmod(engine.speculative)
    assert result.attempted > 0 and result.failed == 0
