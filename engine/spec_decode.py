"""Speculative decoding inside a model's continuous batch.

Each step, after the scheduler has chosen the batch, `Speculator.propose` gives some decoding
sequences k guessed tokens (`Sequence.draft_ids`, KV blocks reserved for them) and the batch
item grows from 1 to 1 + k tokens: the target scores the last token and every guess in the
same forward as everyone else. `Speculator.verify` then turns those k + 1 logits rows into the
tokens to emit; the worker appends them and calls `Speculator.settle`, which rolls the target's
and the draft's KV back to the accepted length. Rejected tokens never reach `token_ids`, so the
prefix cache never hashes them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from engine.errors import InvalidRequestError
from engine.sampling import (
    SamplingParams,
    SamplingState,
    TokenLogprob,
    apply_penalties,
    fit_mask,
    mask_stop_tokens,
    unsatisfiable_rows,
    warp_logits,
)
from engine.scheduler import ScheduledBatch, Scheduler, Sequence, Status
from engine.speculative import (
    Acceptance,
    OutputHistory,
    SpeculativeConfig,
    SpeedModel,
    accept_greedy,
    accept_sampled,
    acceptance_prior,
    clamp_length,
    lookup,
    sample_draft,
)

if TYPE_CHECKING:
    from engine.worker import ModelWorker

log = logging.getLogger(__name__)


@dataclass(eq=False)
class SpecState:
    """A request's speculation: method, length limit, acceptance and its draft-model KV."""

    method: str  # "draft" | "ngram"
    num_tokens: int
    adaptive: bool
    acceptance: Acceptance
    draft_seq: Sequence | None = None  # the request's tokens in the draft model's KV pool
    draft_probs: list[Tensor] = field(default_factory=list)  # q per draft (sampling + draft)
    # Prompt lookup: n of the n-gram behind the current proposal, and where it was found: the
    # request ("prompt"), past outputs ("history") or forced by its grammar ("grammar").
    match_len: int = 0
    match_from: str = "prompt"
    # Seeded sampling: the generator's state before this round's noise, and that noise.
    generator_state: Tensor | None = None
    noise: list[Tensor] = field(default_factory=list)


class _AtPosition:
    """A request's sampling state as it will be after the first j drafts are accepted, so that
    penalties and min_tokens apply at every verified position exactly as plain decoding would."""

    __slots__ = ("base", "output_token_ids", "params")

    def __init__(self, base: SamplingState, drafts: list[int]) -> None:
        self.base, self.params = base, base.params
        self.output_token_ids = base.output_token_ids + drafts if drafts else base.output_token_ids

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.base.prompt_token_ids

    def prompt_ids_on(self, device: torch.device) -> Tensor:
        return self.base.prompt_ids_on(device)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return self.base.stop_ids

    @property
    def min_tokens_pending(self) -> bool:
        return len(self.output_token_ids) < self.params.min_tokens


def _positions(state: SamplingState, drafts: list[int], n: int) -> list[_AtPosition]:
    return [_AtPosition(state, drafts[:j]) for j in range(n)]


class Speculator:
    """Proposes, verifies and rolls back speculative tokens for one target model."""

    def __init__(
        self,
        target: ModelWorker,
        config: SpeculativeConfig | None,
        draft: ModelWorker | None = None,
    ) -> None:
        self.target, self.config, self.draft = target, config, draft
        self.speed = SpeedModel()
        self.generator = torch.Generator(device=target.device)
        self.generator.seed()
        # Totals for metrics.
        self.proposed = self.accepted = self.rounds = 0
        # Model-wide acceptance per proposer (prompt lookup: per match length and source),
        # blended into a request's own estimate: a one-token n-gram match is a much weaker
        # guess than a four-token one.
        self.priors: dict[tuple[str, int, str], Acceptance] = {}
        # Prompt lookup's second source: recent outputs, per adapter (keyed like the prefix
        # cache, by the adapter's hash salt: reloaded weights start a fresh history).
        self.histories: dict[bytes, OutputHistory] = {}

    # -- per request -------------------------------------------------------------------------

    def check(self, params: SamplingParams, adapter: str | None = None) -> None:
        """Refuse a request override this model cannot serve. The draft model knows nothing of
        a LoRA adapter: its guesses would be the bare base's, so an adapter request cannot ask
        for it (by default such requests use prompt lookup, see `start`)."""
        override = params.speculative
        if override is None:
            return
        override.validate()
        if override.method == "draft" and self.draft is None:
            raise InvalidRequestError(
                "speculative method 'draft' needs a draft model configured for this model",
                param="speculative.method",
            )
        if override.method == "draft" and adapter is not None:
            raise InvalidRequestError(
                f"speculative method 'draft' cannot serve adapter {adapter!r} (the draft model "
                "has no such adapter); use 'ngram'",
                param="speculative.method",
            )

    def start(self, params: SamplingParams, adapter: str | None = None) -> SpecState | None:
        """The request's speculation state, or None when it decodes plainly. A request for a
        LoRA adapter uses prompt lookup where the model's default is the draft model."""
        config, override = self.config, params.speculative
        method = override.method if override is not None else (config and config.method)
        if not method or method == "off":
            return None
        if method == "draft" and adapter is not None:
            method = "ngram"
        default_k = config.num_tokens if config is not None else 4
        k = override.num_tokens if override is not None and override.num_tokens else default_k
        state = SpecState(
            method=method,
            num_tokens=k,
            # A request that names its length gets that length; otherwise the model adapts.
            adaptive=(config is None or config.adaptive)
            and (override is None or override.num_tokens is None),
            acceptance=Acceptance(acceptance_prior(method)),
        )
        if method == "draft":  # start from how well the draft has been doing on this model
            state.acceptance = Acceptance(self._prior(state).rate)
            state.draft_seq = Sequence("draft", [], 0, 0)
        else:  # prompt lookup: judged per match length in `_cap`
            state.acceptance = Acceptance(0.0, pseudo=0.0)
        return state

    def release(self, seq: Sequence) -> None:
        """Free the request's draft-model KV (finished, aborted or preempted)."""
        state: SpecState | None = seq.spec
        if state is None or state.draft_seq is None or self.draft is None:
            return
        d = state.draft_seq
        self.draft.blocks.release(d.block_table)
        d.block_table, d.num_computed, d.num_registered = [], 0, 0

    def record(self, seq: Sequence) -> None:
        """Index a finished prompt-lookup request's output (with the prompt's last tokens, which
        predict how outputs start) in its adapter's history."""
        state: SpecState | None = seq.spec
        history = self._history(seq)
        if state is None or state.method != "ngram" or history is None:
            return
        start = max(seq.num_prompt_tokens - history.ngram_max, 0)
        history.add(seq.token_ids[start:])

    def _history(self, seq: Sequence) -> OutputHistory | None:
        """The output history prompt lookup searches for seq (None when configured off)."""
        cfg = self.config
        if cfg is not None and not cfg.ngram_history:
            return None
        history = self.histories.get(seq.hash_salt)
        if history is None:
            ngram_max = cfg.ngram_max if cfg is not None else 4
            history = self.histories[seq.hash_salt] = OutputHistory(ngram_max)
        return history

    # -- proposing ---------------------------------------------------------------------------

    def propose(self, batch: ScheduledBatch, scheduler: Scheduler) -> None:
        """Give decoding sequences of the batch draft tokens and grow their items to match."""
        cands = self._candidates(batch)
        if not cands:
            return
        budget = scheduler.max_num_batched_tokens - batch.num_tokens
        plans = self._lengths(batch, cands)
        index = {id(seq): i for i, (seq, _) in enumerate(batch.items)}
        drafted = []
        for seq, length, proposal in plans:
            k = min(length, budget)
            if k <= 0 or not scheduler.reserve(seq, 1 + k):
                continue
            budget -= k
            if seq.spec.method == "ngram":
                seq.draft_ids = proposal[:k]
            else:
                drafted.append((seq, k))
        if drafted:
            self._draft_propose(drafted)
        for seq, _, _ in plans:
            self._fit_grammar(seq)
            if seq.draft_ids:
                batch.items[index[id(seq)]] = (seq, 1 + len(seq.draft_ids))
            else:
                self._withdraw(seq, scheduler)

    def _withdraw(self, seq: Sequence, scheduler: Scheduler) -> None:
        """Undo a proposal that left no drafts (none found, or the grammar refused them all):
        free the reserved blocks, drop the draft model's guessed KV, restore a seeded
        generator, as `settle` does after a verification."""
        scheduler.rollback(seq)
        state: SpecState = seq.spec
        state.draft_probs = []
        self._rewind(seq, 0)
        if state.draft_seq is not None and state.draft_seq.num_computed > 0:
            self._draft_rollback(state.draft_seq, seq.num_tokens)

    def _candidates(self, batch: ScheduledBatch) -> list[Sequence]:
        out = []
        for seq, n in batch.items:
            if seq.spec is None or n != 1 or seq.num_computed + 1 != seq.num_tokens:
                continue  # prefilling, or speculation off
            if seq.constraint is not None and not self._grammar_ready(seq):
                continue
            out.append(seq)
        return out

    def _grammar_ready(self, seq: Sequence) -> bool:
        """May a constrained request speculate now? Not when its grammar allows no token (the
        worker's plain path ends it with the parser's error) nor where it would not be exact."""
        width = self.target.args.vocab_size
        return _grammar_exact(seq) and not unsatisfiable_rows([seq.payload.sampling], width)

    @staticmethod
    def _fit_grammar(seq: Sequence) -> None:
        """Cut a constrained request's drafts at the first token its grammar refuses (the
        target could never accept it); the draft model's extra KV goes at `settle`."""
        if seq.constraint is None or not seq.draft_ids:
            return
        n = seq.constraint.valid_prefix(seq.draft_ids)
        del seq.draft_ids[n:]
        del seq.spec.draft_probs[n:]

    def _lengths(
        self, batch: ScheduledBatch, cands: list[Sequence]
    ) -> list[tuple[Sequence, int, list[int]]]:
        """(sequence, draft length, prompt-lookup proposal) for the candidates."""
        caps = [self._cap(seq) for seq in cands]
        chosen = self._choose(batch, caps)
        return [
            (seq, cap if self._fixed(seq) else min(chosen, cap), proposal)
            for seq, cap, proposal, _ in caps
        ]

    def _cap(self, seq: Sequence) -> tuple[Sequence, int, list[int], float]:
        """Most drafts worth proposing for seq now, the proposal (prompt lookup) and the
        acceptance rate expected of it."""
        state: SpecState = seq.spec
        cap = min(state.num_tokens, seq.max_total_tokens - seq.num_tokens - 1)
        alpha, proposal = state.acceptance.rate, []
        if state.method == "ngram" and cap > 0:
            proposal = self._lookup(seq, cap)
            # How often a match of this length pays off on this model, overruled by the
            # request's own record as it builds up (its decayed count saturates near 3).
            alpha = state.acceptance.blend(self._prior(state).rate, pseudo=1.5)
        elif state.method == "draft" and not self._draft_fits(seq, cap):
            cap = 0
        if state.adaptive:
            cap = clamp_length(alpha, cap)
        return (
            seq,
            max(min(cap, len(proposal)) if state.method == "ngram" else cap, 0),
            proposal,
            alpha,
        )

    def _lookup(self, seq: Sequence, k: int) -> list[int]:
        """The tokens a request's grammar forces next (a JSON key after `{"`, say), then prompt
        lookup (the request, then past outputs) continuing after them."""
        state: SpecState = seq.spec
        forced = seq.constraint.forced_tokens()[:k] if seq.constraint is not None else []
        cfg = self.config
        lo, hi = (cfg.ngram_min, cfg.ngram_max) if cfg is not None else (1, 4)
        context = seq.token_ids + forced if forced else seq.token_ids
        proposal, state.match_len, state.match_from = (
            lookup(context, k - len(forced), (lo, hi), self._history(seq))
            if len(forced) < k
            else ([], 0, "prompt")
        )
        if forced:  # judged as its own proposer: grammar-forced tokens are nearly always right
            state.match_len, state.match_from = min(len(forced), 4), "grammar"
        return forced + proposal

    def _prior(self, state: SpecState) -> Acceptance:
        """The model-wide acceptance of the request's proposer (prompt lookup: per match length
        and source)."""
        ngram = state.method == "ngram"
        key = (state.method, state.match_len if ngram else 0, state.match_from if ngram else "")
        prior = self.priors.get(key)
        if prior is None:
            prior = self.priors[key] = Acceptance(acceptance_prior(state.method), weight=0.05)
        return prior

    @staticmethod
    def _fixed(seq: Sequence) -> bool:
        """Requests whose draft length ignores measured timings (configuration or request)."""
        return not seq.spec.adaptive

    def _choose(self, batch: ScheduledBatch, caps) -> int:
        """The batch's draft length from the speed model (adaptive requests only)."""
        adaptive = [(alpha, cap) for seq, cap, _, alpha in caps if not self._fixed(seq)]
        drafted = sum(1 for seq, cap, _, _ in caps if cap and seq.spec.method == "draft")
        emits = sum(1 for seq, n in batch.items if seq.num_computed + n == seq.num_tokens)
        multi = any(n > 1 for _, n in batch.items)
        k = self.speed.choose((batch.num_tokens, emits, multi), adaptive, drafted)
        log.debug("speculate %d tokens: %s %s", k, adaptive, self.speed)
        return k

    def _draft_fits(self, seq: Sequence, k: int) -> bool:
        return self.draft is not None and seq.num_tokens + k <= self.draft.info.max_model_len

    def _draft_propose(self, items: list[tuple[Sequence, int]]) -> None:
        """Run the draft model k times over the sequences (batched), one token per run."""
        for seq, _ in items:
            d = seq.spec.draft_seq
            d.token_ids = list(seq.token_ids)
            seq.spec.draft_probs = []
            if not d.block_table:
                self._draft_attach(d)
        active = items
        for j in range(max(k for _, k in items)):
            active = [(seq, k) for seq, k in active if k > j and self._draft_reserve(seq)]
            if not active:
                return
            self._draft_forward([seq for seq, _ in active], timed=j > 0)

    def _draft_attach(self, d: Sequence) -> None:
        """Start a request's draft KV from the draft pool's prefix cache (a shared system prompt,
        a resubmitted conversation), as the target's scheduler does for the target's KV."""
        blocks = self.draft.blocks
        full = (d.num_tokens - 1) // blocks.block_size  # leave a token: its logits are needed
        cached = blocks.match_prefix(d.block_hashes(full, blocks.block_size))
        blocks.acquire(cached)
        d.block_table = list(cached)
        d.num_computed, d.num_registered = len(cached) * blocks.block_size, len(cached)

    def _draft_reserve(self, seq: Sequence) -> bool:
        """Blocks in the draft pool for the draft sequence's uncomputed tokens."""
        d = seq.spec.draft_seq
        bs = self.draft.blocks.block_size
        need = -(-d.num_tokens // bs) - len(d.block_table)
        if need <= 0:
            return True
        blocks = self.draft.blocks.allocate(need)
        if blocks is None:
            return False
        d.block_table.extend(blocks)
        return True

    def _draft_forward(self, seqs: list[Sequence], *, timed: bool) -> None:
        """One draft-model forward, one new draft token per sequence; the first forward of a
        step also catches the draft's cache up with accepted tokens, so only later ones time
        the steady per-token cost."""
        start = time.perf_counter()
        drafts = [seq.spec.draft_seq for seq in seqs]
        batch = ScheduledBatch([(d, d.num_tokens - d.num_computed) for d in drafts], [])
        logits, _ = self.draft.runner.execute(batch)  # [len(seqs), V]: last row of each
        tokens = self._draft_tokens(seqs, logits)
        for seq, d, token in zip(seqs, drafts, tokens, strict=True):
            d.num_computed = d.num_tokens
            d.token_ids.append(token)
            seq.draft_ids.append(token)
        if timed:
            self.speed.observe_draft(len(seqs), time.perf_counter() - start)

    def _draft_tokens(self, seqs: list[Sequence], logits: Tensor) -> list[int]:
        """Greedy requests take the draft's argmax; sampling ones draw from its distribution
        under their own parameters (the q that verification divides by)."""
        tokens = logits.argmax(dim=-1).tolist()
        for i, seq in enumerate(seqs):
            state: SamplingState = seq.payload.sampling
            if state.params.greedy:
                continue
            view = [_AtPosition(state, seq.draft_ids)]
            row = mask_stop_tokens(apply_penalties(logits[i : i + 1].float().clone(), view), view)
            q = warp_logits(row, [state.params]).softmax(dim=-1)[0]
            if state.generator is not None:  # seeded: the noise the target will use here
                noise = self._noise(seq, len(seq.draft_ids), q.shape[0])
                tokens[i] = int((q / noise).argmax())
            else:
                seq.spec.draft_probs.append(q)
                tokens[i] = sample_draft(q, self.generator)
        return tokens

    def _noise(self, seq: Sequence, j: int, vocab: int) -> Tensor:
        """Exponential noise [V] of the j-th position this round of a seeded request: the draw
        plain decoding would take from the request's generator for that position."""
        state: SpecState = seq.spec
        generator = seq.payload.sampling.generator
        if state.generator_state is None:
            state.generator_state = generator.get_state()
        while len(state.noise) <= j:
            state.noise.append(_exponential(vocab, generator))
        return state.noise[j]

    def _rewind(self, seq: Sequence, emitted: int) -> None:
        """Leave a seeded request's generator as if plain decoding had produced `emitted`
        tokens: one noise draw per token, whatever was drawn for rejected positions."""
        state: SpecState = seq.spec
        if state.generator_state is None:
            return
        generator = seq.payload.sampling.generator
        generator.set_state(state.generator_state)
        vocab = state.noise[0].shape[0]
        for _ in range(emitted):
            _exponential(vocab, generator)
        state.generator_state, state.noise = None, []

    # -- verifying ---------------------------------------------------------------------------

    def verify(self, seq: Sequence, rows: Tensor) -> tuple[list[int], list[TokenLogprob | None]]:
        """Tokens to emit (accepted drafts + one of the target's) from the target's logits rows
        [1 + k, V] at the last token and each draft, with logprobs when the request wants them."""
        state: SamplingState = seq.payload.sampling
        drafts = seq.draft_ids
        views = _positions(state, drafts, len(drafts) + 1)
        penalized = apply_penalties(rows.float().clone(), views)
        logprobs = penalized.log_softmax(dim=-1) if state.params.logprobs is not None else None
        masked = mask_stop_tokens(penalized, views)
        if seq.constraint is not None:
            allowed, usable = _grammar_masks(seq, masked.shape[1])
            if 0 < usable <= len(drafts):
                # Accepting draft usable - 1 would leave the grammar no token: plain decoding
                # may emit it and fails the step after, so stop before it and let the target
                # choose at that position (`_candidates` keeps such a state from speculating).
                del drafts[usable - 1 :], seq.spec.draft_probs[usable - 1 :]
                views, masked, allowed = views[:usable], masked[:usable], allowed[:usable]
                logprobs = None if logprobs is None else logprobs[:usable]
            masked.masked_fill_(~allowed, float("-inf"))
        if state.params.greedy:
            tokens = accept_greedy(masked.argmax(dim=-1).tolist(), drafts)
        else:
            p = warp_logits(masked, [state.params] * len(views)).softmax(dim=-1)
            tokens = self._accept_sampled(seq, p, drafts)
        return tokens, _logprobs(logprobs, tokens, state.params.logprobs)

    def _accept_sampled(self, seq: Sequence, p: Tensor, drafts: list[int]) -> list[int]:
        """Unseeded: rejection sampling. Seeded: the token at each position is the one plain
        decoding draws there, argmax(p / E) with the request's own noise E for that position
        (an exact sample of p); drafts are kept while they equal it. The output then depends
        on the seed alone, not on how many tokens were speculated in which step."""
        if seq.payload.sampling.generator is None:
            q = torch.stack(seq.spec.draft_probs) if seq.spec.draft_probs else None
            return accept_sampled(p, q, drafts, self.generator)
        noise = torch.stack([self._noise(seq, j, p.shape[1]) for j in range(len(drafts) + 1)])
        return accept_greedy((p / noise).argmax(dim=-1).tolist(), drafts)

    def settle(self, seq: Sequence, scheduler: Scheduler, emitted: int) -> None:
        """After the worker appended `emitted` tokens: record acceptance, advance the target's
        computed length over the accepted drafts and free KV blocks of rejected ones."""
        state: SpecState = seq.spec
        proposed, accepted = len(seq.draft_ids), max(emitted - 1, 0)
        start = seq.num_tokens - emitted  # the verified token's index + 1
        seq.draft_ids = []
        state.draft_probs = []
        self._rewind(seq, emitted)
        state.acceptance.update(proposed, min(accepted, proposed))
        self._prior(state).update(proposed, min(accepted, proposed))
        self.proposed += proposed
        self.accepted += min(accepted, proposed)
        self.rounds += 1
        if seq.status is not Status.RUNNING:
            return  # finished inside the run: `release` freed its blocks already
        if state.draft_seq is not None:
            self._draft_rollback(state.draft_seq, start + accepted)
        scheduler.advance(seq, 1 + accepted)
        scheduler.rollback(seq)

    def _draft_rollback(self, d: Sequence, valid: int) -> None:
        """Keep draft KV only for tokens the target accepted (positions < valid); index the
        draft's newly full blocks in its prefix cache."""
        d.num_computed = min(d.num_computed, valid)
        d.token_ids = d.token_ids[: d.num_computed]
        blocks = self.draft.blocks
        keep = -(-d.num_computed // blocks.block_size)
        if len(d.block_table) > keep:
            blocks.release(d.block_table[keep:])
            del d.block_table[keep:]
        # Index full blocks of verified tokens only: a block holding a guess is rewritten later.
        full = d.num_computed // blocks.block_size
        if full > d.num_registered:
            hashes = d.block_hashes(full, blocks.block_size)
            for i in range(d.num_registered, full):
                blocks.register(d.block_table[i], hashes[i])
            d.num_registered = full

    def observe(self, batch: ScheduledBatch, seconds: float) -> None:
        """Feed a measured target step into the speed model."""
        multi = any(n > 1 for _, n in batch.items)
        self.speed.observe_target(batch.num_tokens, multi, seconds)


def _grammar_exact(seq: Sequence) -> bool:
    """Can a constrained request speculate losslessly? Grammar-cut drafts are fine wherever
    the proposal is not a random draw (greedy, seeded, prompt lookup): for an unseeded sampled
    draft-model proposal, cutting where the draw left the grammar would skew rejection
    sampling, so such requests decode plainly."""
    params = seq.payload.sampling.params
    return seq.spec.method == "ngram" or params.greedy or seq.payload.sampling.generator is not None


def _grammar_masks(seq: Sequence, width: int) -> tuple[Tensor, int]:
    """Bool [1 + k, width]: the tokens the grammar allows at the verified token and after each
    draft, the state stepped through the drafts and back (the worker advances it for real);
    and how many leading rows allow some token (a draft may lead to a dead end)."""
    constraint = seq.constraint
    masks, advanced = [], 0
    for j in range(len(seq.draft_ids) + 1):
        masks.append(fit_mask(constraint.allowed(), width))
        if j == len(seq.draft_ids) or not constraint.advance(seq.draft_ids[j]):
            break
        advanced += 1
    constraint.rollback(advanced)
    usable = next((j for j, m in enumerate(masks) if not bool(m.any())), len(masks))
    # Rows past a refused draft (none after `_fit_grammar`) are never reached.
    masks += [masks[-1]] * (len(seq.draft_ids) + 1 - len(masks))
    return torch.stack(masks).to(seq.payload.sampling.device), usable


def _logprobs(
    logprobs: Tensor | None, tokens: list[int], n: int | None
) -> list[TokenLogprob | None]:
    """TokenLogprob of each emitted token j from row j (None each when not asked for)."""
    if logprobs is None or n is None:
        return [None] * len(tokens)
    rows = logprobs[: len(tokens)]
    index = torch.tensor(tokens, device=rows.device)[:, None]
    chosen = rows.gather(1, index).squeeze(1).tolist()
    top = rows.topk(min(n, rows.shape[1]), dim=-1) if n else None
    out = []
    for j, token in enumerate(tokens):
        pairs = (
            ()
            if top is None
            else tuple(zip(top.indices[j].tolist(), top.values[j].tolist(), strict=True))
        )
        out.append(TokenLogprob(token_id=token, logprob=chosen[j], top=pairs))
    return out


def _exponential(vocab: int, generator: torch.Generator) -> Tensor:
    """One [V] draw of Exp(1) noise exactly as `Sampler` takes it for a seeded request."""
    noise = torch.empty(vocab, device=generator.device).exponential_(generator=generator)
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny)
