"""Per-request sampling for the continuous-batching engine.

Each step the engine hands the `Sampler` one logits row per running request. Row by row
(but as batched tensor ops), the logits go through:

    penalties (repetition / presence / frequency; only rows that set them)
    ─► logprobs are read here: log_softmax after penalties, before everything below
    ─► min_tokens mask (eos and stop_token_ids at -inf until enough tokens exist)
    ─► grammar mask (constrained rows only: tokens the request's grammar forbids at -inf)
    ─► greedy rows: argmax
    ─► sampling rows: temperature ─► top-k ─► top-p ─► min-p ─► exponential race

The exponential race picks argmax(probs / E) with E ~ Exponential(1) per token, which is an
exact draw from `probs`. A request with a seed draws E from its own generator, exactly one
vocabulary-sized draw per sampled step, so its tokens do not depend on the rest of the batch.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import torch

from engine.errors import InvalidRequestError
from engine.spec_config import SpeculativeOverride

if TYPE_CHECKING:
    from engine.constraints import TokenConstraint

MAX_LOGPROBS = 20
# Size limits of the constraint parameters (the server's request types use the same numbers).
MAX_CONSTRAINT_CHARS = 64 * 1024
MAX_CHOICES = 1024
MAX_CHOICE_CHARS = 1024
# Below this temperature logits / T overflows float32; such requests are decoded greedily.
GREEDY_TEMPERATURE = 1e-5
# The range torch.Generator.manual_seed accepts.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


class SamplingParams(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """How one request picks its tokens; `validate` states the accepted ranges."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    # Speculative decoding for this request instead of the model's configuration.
    speculative: SpeculativeOverride | None = None
    # Constrained decoding (engine/constraints.py); at most one of these is set.
    grammar: str | None = None  # Lark grammar, llguidance dialect
    json_schema: str | None = None  # JSON text of the schema
    regex: str | None = None
    choice: tuple[str, ...] = ()

    def validate(self, max_model_len: int | None = None) -> None:
        """Raise `InvalidRequestError` naming the first parameter that is out of range."""
        for param, is_valid, rule in _CHECKS:
            if not is_valid(self):
                value = getattr(self, param)
                raise InvalidRequestError(f"{param} {rule}, got {value!r}", param=param)
        _validate_constraint(self)
        if max_model_len is not None and self.max_tokens > max_model_len:
            raise InvalidRequestError(
                f"max_tokens must be at most the model's context length {max_model_len}, "
                f"got {self.max_tokens}",
                param="max_tokens",
            )

    @property
    def greedy(self) -> bool:
        """True when the choice is the argmax: temperature ~0 or top_k 1."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """True when any repetition, presence or frequency penalty is active."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


# (param, check, rule); checks are chained comparisons so that NaN fails them.
_CHECKS: tuple[tuple[str, Callable[[SamplingParams], bool], str], ...] = (
    ("max_tokens", lambda p: p.max_tokens >= 1, "must be at least 1"),
    ("min_tokens", lambda p: 0 <= p.min_tokens <= p.max_tokens, "must be in [0, max_tokens]"),
    ("temperature", lambda p: 0.0 <= p.temperature < math.inf, "must be a finite number >= 0"),
    ("top_p", lambda p: 0.0 < p.top_p <= 1.0, "must be in (0, 1]"),
    ("top_k", lambda p: p.top_k >= -1, "must be -1, 0 (off) or a positive count"),
    ("min_p", lambda p: 0.0 <= p.min_p <= 1.0, "must be in [0, 1]"),
    ("repetition_penalty", lambda p: 0.0 < p.repetition_penalty < math.inf, "must be > 0"),
    ("presence_penalty", lambda p: -2.0 <= p.presence_penalty <= 2.0, "must be in [-2, 2]"),
    ("frequency_penalty", lambda p: -2.0 <= p.frequency_penalty <= 2.0, "must be in [-2, 2]"),
    (
        "logprobs",
        lambda p: p.logprobs is None or 0 <= p.logprobs <= MAX_LOGPROBS,
        f"must be in [0, {MAX_LOGPROBS}]",
    ),
    (
        "seed",
        lambda p: p.seed is None or _SEED_MIN <= p.seed <= _SEED_MAX,
        f"must be in [{_SEED_MIN}, {_SEED_MAX}]",
    ),
    ("stop", lambda p: all(p.stop), "must not contain an empty string"),
    ("stop_token_ids", lambda p: all(t >= 0 for t in p.stop_token_ids), "must be >= 0"),
)


def _validate_constraint(params: SamplingParams) -> None:
    """At most one constraint, within the size limits; a JSON schema is a JSON object; choices
    are non-empty strings; no min_tokens (a grammar may end the output before it)."""
    given = [
        name
        for name in ("grammar", "json_schema", "regex", "choice")
        if getattr(params, name) not in (None, ())
    ]
    if len(given) > 1:
        raise InvalidRequestError(
            f"give at most one of grammar, json_schema, regex and choice, got {', '.join(given)}",
            param=given[1],
        )
    if given and params.min_tokens:
        # The worker ends a constrained request once the grammar is complete, and masking EOS
        # while min_tokens pends can leave a row with no allowed token: refuse the mix.
        raise InvalidRequestError(
            f"min_tokens cannot be combined with {given[0]}", param="min_tokens"
        )
    _validate_constraint_sizes(params)
    for name in ("grammar", "regex"):
        if getattr(params, name) == "":
            raise InvalidRequestError(f"{name} must not be empty", param=name)
    if params.choice and not all(params.choice):
        raise InvalidRequestError("choice must not contain an empty string", param="choice")
    _validate_json_schema(params)


def _validate_constraint_sizes(params: SamplingParams) -> None:
    """Grammars are compiled per request from network input: bound their size."""
    for name in ("grammar", "json_schema", "regex"):
        text = getattr(params, name)
        if text is not None and len(text) > MAX_CONSTRAINT_CHARS:
            raise InvalidRequestError(
                f"{name} must be at most {MAX_CONSTRAINT_CHARS} characters, got {len(text)}",
                param=name,
            )
    if len(params.choice) > MAX_CHOICES:
        raise InvalidRequestError(
            f"choice must have at most {MAX_CHOICES} entries, got {len(params.choice)}",
            param="choice",
        )
    if any(len(c) > MAX_CHOICE_CHARS for c in params.choice):
        raise InvalidRequestError(
            f"each choice must be at most {MAX_CHOICE_CHARS} characters", param="choice"
        )


def _validate_json_schema(params: SamplingParams) -> None:
    """The schema text parses (without blowing the stack) to a JSON object or boolean."""
    if params.json_schema is None:
        return
    try:
        schema = json.loads(params.json_schema)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise InvalidRequestError(
            f"json_schema is not valid JSON: {why}", param="json_schema"
        ) from None
    if not isinstance(schema, dict | bool):
        raise InvalidRequestError(
            "json_schema must be a JSON object (a JSON schema)", param="json_schema"
        )


class SamplingState:
    """Sampling state of one request: its tokens so far and its own random generator."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_token_ids: list[int],
        eos_token_ids: tuple[int, ...] = (),
        device: str | torch.device = "cpu",
        constraint: TokenConstraint | None = None,
    ) -> None:
        self.params = params
        # The grammar state (engine/constraints.py) shared with Sequence.constraint, or None.
        self.constraint = constraint
        self.prompt_token_ids = list(prompt_token_ids)
        self.eos_token_ids = tuple(eos_token_ids)
        self.device = torch.device(device)
        self.output_token_ids: list[int] = []
        eos = () if params.ignore_eos else self.eos_token_ids
        # Ids that end the request; min_tokens masks exactly these.
        self.stop_ids: tuple[int, ...] = tuple(sorted({*params.stop_token_ids, *eos}))
        self.generator = _seeded_generator(params.seed, self.device)
        self._prompt_ids: dict[torch.device, torch.Tensor] = {}

    def append(self, token_id: int) -> None:
        """Record a generated token."""
        self.output_token_ids.append(token_id)

    def stop_token_hit(self, token_id: int) -> bool:
        """True when `token_id` is an eos id (unless ignore_eos) or one of stop_token_ids."""
        return token_id in self.stop_ids

    @property
    def min_tokens_pending(self) -> bool:
        """True while fewer than `min_tokens` tokens were generated."""
        return len(self.output_token_ids) < self.params.min_tokens

    def prompt_ids_on(self, device: torch.device) -> torch.Tensor:
        """The prompt ids as a tensor on `device`, copied there once per request."""
        ids = self._prompt_ids.get(device)
        if ids is None:
            ids = torch.tensor(self.prompt_token_ids, dtype=torch.long, device=device)
            self._prompt_ids[device] = ids
        return ids


def _seeded_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """Logprob of the chosen token and the request's top-N alternatives, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


# ---------------------------------------------------------------------------------------
# Logits processing. Each function takes logits [R, V] float32 (row i is params/states[i]),
# may modify them in place, and returns the result.


def apply_penalties(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """Apply repetition, presence and frequency penalties to the rows whose request sets them.

    Repetition (HF): over prompt + output tokens, a positive logit is divided by the penalty and
    a negative one multiplied. Presence / frequency (OpenAI): over output tokens,
    logit -= presence * [count > 0] + frequency * count.
    """
    rows = [i for i, s in enumerate(states) if s.params.has_penalties]
    return _on_rows(logits, rows, lambda sub: _penalize(sub, [states[i] for i in rows]))


def _penalize(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    # logits: [R, V]; table columns: repetition, presence, frequency.
    table = _param_table(
        logits,
        [
            (s.params.repetition_penalty, s.params.presence_penalty, s.params.frequency_penalty)
            for s in states
        ],
    )
    vocab = logits.shape[1]
    out_lists = [s.output_token_ids for s in states]
    out_ids = torch.tensor(
        list(itertools.chain.from_iterable(out_lists)), dtype=torch.long, device=logits.device
    )
    out_counts = _token_counts(out_ids, [len(x) for x in out_lists], vocab)
    if any(s.params.repetition_penalty != 1.0 for s in states):
        prompt_ids = torch.cat([s.prompt_ids_on(logits.device) for s in states])
        prompt_counts = _token_counts(prompt_ids, [len(s.prompt_token_ids) for s in states], vocab)
        seen = (out_counts > 0) | (prompt_counts > 0)
        repetition = table[:, 0:1]
        penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, penalized, logits)
    if any(s.params.presence_penalty or s.params.frequency_penalty for s in states):
        logits -= table[:, 1:2] * (out_counts > 0) + table[:, 2:3] * out_counts
    return logits


def _token_counts(flat_ids: torch.Tensor, lengths: list[int], vocab: int) -> torch.Tensor:
    """Counts [R, V] of the ids in `flat_ids`, split into rows by `lengths`."""
    device = flat_ids.device
    row_lengths = torch.tensor(lengths, dtype=torch.long, device=device)
    rows = torch.repeat_interleave(
        torch.arange(len(lengths), device=device), row_lengths, output_size=flat_ids.numel()
    )
    # Ids past the logits' vocabulary (added tokens the head lacks) land in a spare column.
    counts = torch.zeros(len(lengths), vocab + 1, device=device)
    counts.index_put_(
        (rows, flat_ids.clamp(max=vocab)),
        torch.ones_like(rows, dtype=counts.dtype),
        accumulate=True,
    )
    return counts[:, :vocab]


def mask_stop_tokens(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """Set eos / stop_token_ids to -inf in the rows still short of their `min_tokens`."""
    vocab = logits.shape[1]
    pairs = [
        (row, token)
        for row, s in enumerate(states)
        if s.min_tokens_pending
        for token in s.stop_ids
        if token < vocab
    ]
    if pairs:
        index = torch.tensor(pairs, dtype=torch.long, device=logits.device)
        logits[index[:, 0], index[:, 1]] = -math.inf
    return logits


def mask_constrained(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """Set the tokens a row's grammar forbids to -inf; only constrained rows pay for a mask."""
    # getattr: state views without a grammar (speculative verification's) may come here too.
    rows = [i for i, s in enumerate(states) if getattr(s, "constraint", None) is not None]
    if not rows:
        return logits
    width = logits.shape[1]
    allowed = torch.stack([fit_mask(states[i].constraint.allowed(), width) for i in rows])
    allowed = allowed.to(logits.device, non_blocking=True)
    return _on_rows(logits, rows, lambda sub: sub.masked_fill_(~allowed, -math.inf))


def unsatisfiable_rows(states: Sequence[SamplingState], width: int) -> list[int]:
    """Constrained rows that no token of the `width` logits satisfies: the grammar's mask,
    less the stop ids while min_tokens pends, is empty, or the parser is in an error state
    (where llguidance's mask offers EOS alone, which would end the request as a success).
    Sampling such a row would pick token 0 from an all -inf row; the caller ends it instead."""
    rows = []
    for i, s in enumerate(states):
        constraint = getattr(s, "constraint", None)
        if constraint is None:
            continue
        if constraint.failed:
            rows.append(i)
            continue
        allowed = fit_mask(constraint.allowed(), width)
        if s.min_tokens_pending:
            stops = [t for t in s.stop_ids if t < width]
            allowed = allowed.clone()
            allowed[stops] = False
        if not bool(allowed.any()):
            rows.append(i)
    return rows


def fit_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    """A grammar mask cut or padded (with False) to the logits' width."""
    if mask.shape[0] >= width:
        return mask[:width]
    return torch.cat([mask, mask.new_zeros(width - mask.shape[0])])


def warp_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Apply temperature, top-k, top-p and min-p (in this order, as HF does) to sampling rows.

    Removed tokens get -inf. Greedy rows keep their logits (their temperature counts as 1).
    Each step runs only when some row needs it; top-k / top-p sort only the rows that use them.
    """
    vocab = logits.shape[1]
    temperatures = [1.0 if p.greedy else p.temperature for p in params]
    truncate_rows = [i for i, p in enumerate(params) if _top_k_on(p, vocab) or p.top_p < 1.0]
    use_min_p = any(p.min_p > 0.0 for p in params)
    if all(t == 1.0 for t in temperatures) and not truncate_rows and not use_min_p:
        return logits
    # One host-to-device copy for all per-row parameters; columns: temperature, k, p, min_p.
    table = _param_table(
        logits,
        [
            (t, p.top_k if _top_k_on(p, vocab) else vocab, p.top_p, p.min_p)
            for t, p in zip(temperatures, params, strict=True)
        ],
    )
    if any(t != 1.0 for t in temperatures):
        logits.div_(table[:, 0:1])
    if truncate_rows:
        logits = _truncate(logits, table, truncate_rows, [params[i] for i in truncate_rows])
    if use_min_p:
        logits = _apply_min_p(logits, table[:, 3:4])
    return logits


def _top_k_on(params: SamplingParams, vocab: int) -> bool:
    return 0 < params.top_k < vocab


def _truncate(
    logits: torch.Tensor, table: torch.Tensor, rows: list[int], params: list[SamplingParams]
) -> torch.Tensor:
    """Top-k and top-p on `rows`; a full sort only when some row uses top-p."""
    index = torch.tensor(rows, device=logits.device)
    sub_table = table if len(rows) == logits.shape[0] else table[index]
    top_k, top_p = sub_table[:, 1], sub_table[:, 2]
    if any(p.top_p < 1.0 for p in params):
        return _on_rows(logits, rows, lambda sub: _top_k_top_p(sub, top_k, top_p))
    k_max = max(p.top_k for p in params)
    return _on_rows(logits, rows, lambda sub: _top_k_only(sub, top_k, k_max))


def _top_k_only(logits: torch.Tensor, top_k: torch.Tensor, k_max: int) -> torch.Tensor:
    # topk(k_max) is cheaper than a full sort when k is small; ties with the k-th value stay.
    top_values = logits.topk(k_max, dim=-1).values  # [R, k_max]
    kth = top_values.gather(1, top_k.long().unsqueeze(1) - 1)  # [R, 1]
    return logits.masked_fill_(logits < kth, -math.inf)


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the k largest logits, then the smallest top set whose probability reaches p."""
    vocab = logits.shape[1]
    ascending, order = logits.sort(dim=-1)  # [R, V]
    kth = ascending.gather(1, vocab - top_k.long().unsqueeze(1))
    ascending.masked_fill_(ascending < kth, -math.inf)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    # A token goes when the tokens above it already carry at least p of the mass.
    drop = cumulative <= (1.0 - top_p).unsqueeze(1)
    drop[:, -1] = False  # the best token always stays
    ascending.masked_fill_(drop, -math.inf)
    return logits.scatter_(1, order, ascending)


def _apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    # min_p: [R, 1]; rows with min_p 0 keep every token since no probability is below 0.
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p
    return logits.masked_fill_(probs < threshold, -math.inf)


def process_logits(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """The logits a `Sampler` draws from, as a new float32 tensor [N, V].

    Penalties, the min_tokens mask and grammar masks apply to every row; temperature / top-k / top-p / min-p
    only to sampling rows. softmax of a sampling row is its exact sampling distribution.
    """
    logits = mask_stop_tokens(apply_penalties(_float_copy(logits), states), states)
    logits = mask_constrained(logits, states)
    rows = [i for i, s in enumerate(states) if not s.params.greedy]
    return _on_rows(logits, rows, lambda sub: warp_logits(sub, [states[i].params for i in rows]))


def _float_copy(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(torch.float32, copy=True)


def _param_table(logits: torch.Tensor, rows: list[tuple[float, ...]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32, device=logits.device)


def _on_rows(
    logits: torch.Tensor, rows: list[int], fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Apply `fn` to the listed rows only, writing them back; all rows go without a copy."""
    if not rows:
        return logits
    if len(rows) == logits.shape[0]:
        return fn(logits)
    index = torch.tensor(rows, device=logits.device)
    logits[index] = fn(logits[index])
    return logits


# ---------------------------------------------------------------------------------------
# The sampler.


class Sampler:
    """Chooses one token per logits row, each row under its own request's parameters.

    Rows without a seed share one sampler-wide generator per device (seeded from `seed` when
    given); rows with a seed use their `SamplingState.generator`.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(
        self, logits: torch.Tensor, states: Sequence[SamplingState]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """Return the chosen token per row and, for rows that asked, its logprobs.

        logits: [N, V], any float dtype; row i belongs to states[i]. The input is not modified.
        """
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} do not match {len(states)} states"
            )
        logits = apply_penalties(_float_copy(logits), states)
        logprob_rows, logprobs = _raw_logprobs(logits, states)
        logits = mask_constrained(mask_stop_tokens(logits, states), states)
        tokens = self._choose(logits, states)
        token_ids = tokens.tolist()
        return token_ids, _gather_logprobs(tokens, token_ids, logprob_rows, logprobs, states)

    def _choose(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        rows = [i for i, s in enumerate(states) if not s.params.greedy]
        if len(rows) == len(states):
            return self._sample(logits, states)
        tokens = logits.argmax(dim=-1)  # greedy rows; ties go to the lowest id
        if rows:
            index = torch.tensor(rows, device=logits.device)
            tokens[index] = self._sample(logits[index], [states[i] for i in rows])
        return tokens

    def _sample(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        probs = warp_logits(logits, [s.params for s in states]).softmax(dim=-1)
        return probs.div_(self._exponential_noise(probs, states)).argmax(dim=-1)

    def _exponential_noise(
        self, probs: torch.Tensor, states: Sequence[SamplingState]
    ) -> torch.Tensor:
        noise = torch.empty_like(probs)
        seeded = [(row, s.generator) for row, s in enumerate(states) if s.generator is not None]
        if len(seeded) < len(states):
            noise.exponential_(generator=self._generator(probs.device))
        for row, generator in seeded:
            # Exactly one [V] draw per step from the request's generator, whatever the batch.
            own = torch.empty(probs.shape[1], device=generator.device)
            noise[row] = own.exponential_(generator=generator)
        # exponential_ may return 0 on some backends; 0 would turn p / 0 into inf or nan.
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            if self._seed is None:
                generator.seed()
            else:
                generator.manual_seed(self._seed)
            self._generators[device] = generator
        return generator


def _raw_logprobs(
    logits: torch.Tensor, states: Sequence[SamplingState]
) -> tuple[list[int], torch.Tensor | None]:
    """log_softmax of the penalized logits for the rows that asked for logprobs."""
    rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    if not rows:
        return rows, None
    if len(rows) == len(states):
        return rows, logits.log_softmax(dim=-1)
    return rows, logits[torch.tensor(rows, device=logits.device)].log_softmax(dim=-1)


def _gather_logprobs(
    tokens: torch.Tensor,
    token_ids: list[int],
    rows: list[int],
    logprobs: torch.Tensor | None,
    states: Sequence[SamplingState],
) -> list[TokenLogprob | None]:
    result: list[TokenLogprob | None] = [None] * len(states)
    if logprobs is None:
        return result
    chosen = tokens[torch.tensor(rows, device=tokens.device)]
    chosen_logprobs = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
    top_n = min(max(states[i].params.logprobs or 0 for i in rows), logprobs.shape[1])
    top = logprobs.topk(top_n, dim=-1)  # sorted, best first
    top_ids, top_values = top.indices.tolist(), top.values.tolist()
    for j, row in enumerate(rows):
        n = states[row].params.logprobs or 0
        result[row] = TokenLogprob(
            token_id=token_ids[row],
            logprob=chosen_logprobs[j],
            top=tuple(zip(top_ids[j][:n], top_values[j][:n], strict=True)),
        )
    return result
