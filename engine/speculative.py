"""Speculative decoding: configuration, proposers, lossless acceptance and the cost model.

A proposer guesses the next k tokens of a sequence cheaply: a small **draft model** with the
target's tokenizer, or **prompt lookup** (the longest recent n-gram of the sequence that also
occurs earlier in it, followed by what came after it there). The target then scores the last
token and all k guesses in one forward pass, and `accept_greedy` / `accept_sampled` keep the
longest prefix the target agrees with plus one token of its own, so the output is distributed
exactly as the target's (Leviathan et al. 2023, Chen et al. 2023).

How many tokens to propose is a per-step choice (`SpeedModel`): from each request's running
acceptance rate and the measured time of target steps of different sizes, it picks the draft
length with the best predicted tokens per second, zero (plain decoding) included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from engine.spec_config import MAX_SPECULATIVE_TOKENS, SpeculativeConfig, SpeculativeOverride

__all__ = ["MAX_SPECULATIVE_TOKENS", "SpeculativeConfig", "SpeculativeOverride"]

# ---------------------------------------------------------------------------------------
# Prompt lookup.


def ngram_propose(
    token_ids: Sequence[int], k: int, ngram_min: int = 1, ngram_max: int = 4
) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the sequence's longest
    matching suffix n-gram (longest n first, ngram_max down to ngram_min); [] when none.

    >>> ngram_propose([5, 6, 7, 8, 5, 6], 2)
    [7, 8]
    """
    return ngram_match(token_ids, k, ngram_min, ngram_max)[0]


def ngram_match(
    token_ids: Sequence[int], k: int, ngram_min: int = 1, ngram_max: int = 4
) -> tuple[list[int], int]:
    """`ngram_propose`'s tokens and the length n of the matched n-gram (0 when none)."""
    n_tokens = len(token_ids)
    for n in range(min(ngram_max, n_tokens - 1), ngram_min - 1, -1):
        suffix = list(token_ids[n_tokens - n :])
        first = suffix[0]
        # Scan backwards: the most recent match best predicts what comes next.
        for start in range(n_tokens - n - 1, -1, -1):
            if token_ids[start] == first and list(token_ids[start : start + n]) == suffix:
                follow = token_ids[start + n : start + n + k]
                if follow:
                    return list(follow), n
    return [], 0


class OutputHistory:
    """N-grams of a model's recent outputs and counts of the token that followed each
    (SuffixDecoding, Oliaro et al. 2024, as a hash table): structured outputs repeat their own
    scaffolding (`{"name": "`, `", "`, closing braces) from request to request, which a
    request's prompt does not hold, while the values between differ each time.

    A proposal follows the most frequent next token while past outputs agree on it (its share
    of the counts and the running product of shares stay above the thresholds), so it stops
    where outputs diverged (before a name or a number) instead of guessing the last request's
    value. One history per model and adapter: proposals are verified like any other, so they
    only change speed. Bounded: the n-grams not seen for longest go first.

    >>> h = OutputHistory(ngram_max=2)
    >>> h.add([9, 1, 2, 3, 4])
    >>> h.match([7, 1, 2], k=2, ngram_min=1, ngram_max=2)
    ([3, 4], 2)
    >>> h.add([8, 1, 2, 5, 4])
    >>> h.add([6, 1, 2, 7, 4])  # after "1 2" outputs disagree: nothing worth proposing
    >>> h.match([7, 1, 2], k=2, ngram_min=1, ngram_max=2)
    ([], 0)
    """

    def __init__(
        self,
        ngram_max: int = 4,
        max_entries: int = 100_000,
        min_share: float = 0.5,
        min_confidence: float = 0.3,
    ) -> None:
        self.ngram_max, self.max_entries = ngram_max, max_entries
        self.min_share, self.min_confidence = min_share, min_confidence
        self.table: dict[tuple[int, ...], dict[int, int]] = {}

    def add(self, tokens: Sequence[int]) -> None:
        """Count, for every n-gram of a finished output (preceded by the prompt's last tokens,
        which predict its start), the token that followed it."""
        tokens = tuple(tokens)
        table = self.table
        for end in range(1, len(tokens)):
            follow = tokens[end]
            for n in range(1, min(self.ngram_max, end) + 1):
                key = tokens[end - n : end]
                counts = table.pop(key, None) or {}  # re-inserted last: evicted last
                counts[follow] = counts.get(follow, 0) + 1
                table[key] = counts
        while len(table) > self.max_entries:
            del table[next(iter(table))]

    def match(
        self, token_ids: Sequence[int], k: int, ngram_min: int, ngram_max: int
    ) -> tuple[list[int], int]:
        """Up to k tokens past outputs agree would follow the sequence, each predicted from
        its longest known suffix n-gram, and the n of the first (0 when none)."""
        hi = min(ngram_max, self.ngram_max)
        context = list(token_ids[len(token_ids) - hi :])
        out: list[int] = []
        first_n, confidence = 0, 1.0
        while len(out) < k:
            step = self._next(context, ngram_min, hi)
            if step is None:
                break
            token, share, n = step
            confidence *= share
            if share < self.min_share or confidence < self.min_confidence:
                break
            out.append(token)
            context.append(token)
            first_n = first_n or n
        return out, first_n

    def _next(self, context: list[int], lo: int, hi: int) -> tuple[int, float, int] | None:
        """(most frequent next token, its share, n) for the longest suffix n-gram known."""
        for n in range(min(hi, len(context)), lo - 1, -1):
            counts = self.table.get(tuple(context[len(context) - n :]))
            if counts:
                token = max(counts, key=counts.__getitem__)
                return token, counts[token] / sum(counts.values()), n
        return None


def lookup(
    token_ids: Sequence[int],
    k: int,
    bounds: tuple[int, int],
    history: OutputHistory | None,
) -> tuple[list[int], int, str]:
    """Prompt lookup over the sequence, then over past outputs, longest n-gram first (the
    sequence wins a tie): (proposal, n, "prompt" | "history"); ([], 0, "prompt") when none."""
    lo, hi = bounds
    for n in range(hi, lo - 1, -1):
        proposal, m = ngram_match(token_ids, k, n, n)
        if proposal:
            return proposal, m, "prompt"
        if history is not None:
            proposal, m = history.match(token_ids, k, n, n)
            if proposal:
                return proposal, m, "history"
    return [], 0, "prompt"


# ---------------------------------------------------------------------------------------
# Lossless acceptance.


def accept_greedy(target_tokens: Sequence[int], draft: Sequence[int]) -> list[int]:
    """Tokens to emit: the drafts while they equal the target's argmax, then the target's own.

    target_tokens: the target's choice at each of the len(draft) + 1 positions.

    >>> accept_greedy([3, 4, 9], [3, 5])
    [3, 4]
    """
    out = []
    for want, guess in zip(target_tokens, draft, strict=False):
        out.append(want)
        if want != guess:
            return out
    out.append(target_tokens[len(draft)])
    return out


def accept_sampled(
    p: torch.Tensor,
    q: torch.Tensor | None,
    draft: Sequence[int],
    generator: torch.Generator | None,
) -> list[int]:
    """Rejection sampling (lossless): keep draft j with probability min(1, p_j/q_j); on the first
    rejection emit a draw from norm(max(0, p_j - q_j)); if all pass, a draw from p_k.

    p: [k+1, V] target probabilities; q: [k, V] draft probabilities, or None for a
    deterministic proposer (q one-hot at the draft token, prompt lookup).
    """
    k = len(draft)
    index = torch.tensor(list(draft), dtype=torch.long, device=p.device)
    p_draft = p[:k].gather(1, index[:, None]).squeeze(1)
    q_draft = torch.ones_like(p_draft) if q is None else q.gather(1, index[:, None]).squeeze(1)
    u = torch.rand(k, generator=generator, device=p.device)
    accepted = (u * q_draft < p_draft).tolist()  # u < p/q without dividing by a zero q
    out = []
    for j, ok in enumerate(accepted):
        if not ok:
            residual = _residual(p[j], None if q is None else q[j], draft[j])
            return [*out, _draw(residual, generator)]
        out.append(draft[j])
    return [*out, _draw(p[k], generator)]


def _residual(p: torch.Tensor, q: torch.Tensor | None, token: int) -> torch.Tensor:
    """norm(max(0, p - q)); for a one-hot q that is p without the rejected token."""
    if q is None:
        residual = p.clone()
        residual[token] = 0.0
    else:
        residual = (p - q).clamp_min_(0.0)
    if float(residual.sum()) <= 0.0:  # p == q up to rounding: rejection had probability ~0
        return p
    return residual


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from unnormalised probabilities [V]."""
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_draft(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """A draft token from the draft's probabilities [V] (the q of `accept_sampled`)."""
    return _draw(probs, generator)


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one verification emits on average with k drafts, each accepted with prob alpha."""
    if k <= 0:
        return 1.0
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


# ---------------------------------------------------------------------------------------
# Adaptation.


class Acceptance:
    """A request's running per-token acceptance rate (exponentially weighted)."""

    def __init__(self, prior: float, weight: float = 0.3, pseudo: float = 2.0) -> None:
        # The prior counts as `pseudo` tokens (0: none, the evidence alone).
        self.accepted, self.trials = prior * pseudo, pseudo
        self.weight = weight
        self.total_proposed = self.total_accepted = self.rounds = 0

    @property
    def rate(self) -> float:
        """The current estimate of P(a draft token is accepted)."""
        return self.accepted / self.trials if self.trials else 0.0

    def blend(self, prior: float, pseudo: float) -> float:
        """The rate with `prior` added as `pseudo` tokens of evidence."""
        return (self.accepted + prior * pseudo) / (self.trials + pseudo)

    def update(self, proposed: int, accepted: int) -> None:
        """Record one verification: `accepted` of `proposed` drafts kept."""
        # A round tests drafts until the first rejection: accepted + (1 if one was rejected).
        trials = accepted + (1 if accepted < proposed else 0)
        decay = (1.0 - self.weight) ** max(trials, 1)
        self.accepted = self.accepted * decay + accepted
        self.trials = self.trials * decay + trials
        self.total_proposed += proposed
        self.total_accepted += accepted
        self.rounds += 1


class StepTimer:
    """Measured seconds of steps by size: an EMA per bucket of tokens, linear between buckets."""

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.table: dict[int, float] = {}

    @staticmethod
    def bucket(tokens: int) -> int:
        """Exact up to 16 tokens, then 8-wide up to 128, then powers of two."""
        if tokens <= 16:
            return tokens
        if tokens <= 128:
            return -(-tokens // 8) * 8
        return 1 << (tokens - 1).bit_length()

    def observe(self, tokens: int, seconds: float) -> None:
        """Fold one measured step into its bucket."""
        b = self.bucket(tokens)
        old = self.table.get(b)
        self.table[b] = seconds if old is None else old + self.weight * (seconds - old)

    def known(self, tokens: int) -> bool:
        """Was a step of this size measured?"""
        return self.bucket(tokens) in self.table

    def predict(self, tokens: int) -> float | None:
        """Predicted seconds; None before any measurement."""
        if not self.table:
            return None
        b = self.bucket(tokens)
        if b in self.table:
            return self.table[b]
        keys = sorted(self.table)
        lower = [x for x in keys if x < b]
        upper = [x for x in keys if x > b]
        if lower and upper:
            lo, hi = lower[-1], upper[0]
            w = (b - lo) / (hi - lo)
            return self.table[lo] * (1 - w) + self.table[hi] * w
        near = lower[-1] if lower else upper[0]
        # Outside the measured range: scale with size, a pessimistic guess for GEMM-bound steps.
        return self.table[near] * max(b, 1) / max(near, 1)


class SpeedModel:
    """Chooses the draft length of a step from acceptance rates and measured step times.

    Target steps are timed separately for pure decode (one token per sequence) and for steps
    that verify drafts or prefill (several tokens per sequence): on CPU these take different
    attention paths. Draft-model time is measured per draft forward by batch size.
    """

    EXPLORE_EVERY = 32  # steps between re-measurements of a length not chosen

    def __init__(self) -> None:
        self.decode = StepTimer()
        self.multi = StepTimer()
        self.draft = StepTimer()
        self._since_explore = 0

    def observe_target(self, tokens: int, multi: bool, seconds: float) -> None:
        """Record a target forward of `tokens` new tokens (multi: some sequence had several)."""
        (self.multi if multi else self.decode).observe(tokens, seconds)

    def observe_draft(self, seqs: int, seconds: float) -> None:
        """Record one draft-model forward over `seqs` sequences."""
        self.draft.observe(seqs, seconds)

    def choose(
        self, plain: tuple[int, int, bool], candidates: list[tuple[float, int]], drafted: int
    ) -> int:
        """The draft length (0 = no speculation) with the best predicted tokens per second.

        plain: (new tokens of the step without speculation, tokens it emits, whether some
        sequence computes several tokens); candidates: (acceptance rate, most drafts available)
        per speculating sequence; drafted: how many of them use the draft model (k draft
        forwards per step). Sizes never measured are predicted optimistically (interpolated,
        a draft forward free), so that they get tried and measured once.
        """
        tokens, emits, multi = plain
        k_max = max((k for _, k in candidates), default=0)
        base = (self.multi if multi else self.decode).predict(tokens)
        if k_max == 0 or base is None:
            return 0  # measure plain decoding first
        best_k, best_rate, runner_up = 0, emits / base, (0.0, 0)
        for k in range(1, k_max + 1):
            rate = self._rate(plain, candidates, k, drafted)
            if rate is None:
                return k  # nothing with several tokens measured yet
            if rate > best_rate:
                best_k, best_rate = k, rate
            runner_up = max(runner_up, (rate, k))
        # Loads change and single measurements are noisy: now and then re-measure the most
        # promising other length (one step up when speculating already).
        self._since_explore += 1
        if self._since_explore >= self.EXPLORE_EVERY:
            self._since_explore = 0
            return runner_up[1] if best_k == 0 else min(best_k + 1, k_max)
        return best_k

    def _rate(self, plain, candidates, k: int, drafted: int) -> float | None:
        """Predicted emitted tokens per second at draft length k; None if not measurable."""
        tokens, emits, _ = plain
        ks = [min(k, cap) for _, cap in candidates]
        seconds = self.multi.predict(tokens + sum(ks))
        if seconds is None:
            return None
        if drafted:
            seconds += (self.draft.predict(drafted) or 0.0) * k
        gained = sum(
            expected_tokens(a, kk) - 1.0 for (a, _), kk in zip(candidates, ks, strict=True)
        )
        return (emits + gained) / seconds

    def __repr__(self) -> str:
        def fmt(timer: StepTimer) -> str:
            return ", ".join(f"{b}: {t * 1e3:.2f}ms" for b, t in sorted(timer.table.items()))

        return f"SpeedModel(decode={{{fmt(self.decode)}}}, multi={{{fmt(self.multi)}}}, draft={{{fmt(self.draft)}}})"


def acceptance_prior(method: str) -> float:
    """The acceptance rate assumed before a request has verified anything."""
    return 0.7 if method == "draft" else 0.5


def clamp_length(alpha: float, k: int, floor: float = 0.1) -> int:
    """Drop draft positions the request is unlikely to reach (P(reach) = alpha^j < floor)."""
    if alpha <= 0.0:
        return min(k, 1)
    if alpha >= 1.0:
        return k
    reach = int(math.log(floor) / math.log(alpha))
    return max(1, min(k, reach))
