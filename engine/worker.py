"""One loaded model: weights, tokenizer, KV pool, scheduler, runner and its live requests."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.adapters import AdapterManager
from engine.config import ModelArgs
from engine.constraints import ConstraintCompiler
from engine.kv_cache import BlockManager, KVCache
from engine.model import Transformer
from engine.outputs import StreamDelta
from engine.runner import ModelRunner
from engine.sampling import (
    Sampler,
    SamplingParams,
    SamplingState,
    TokenLogprob,
    unsatisfiable_rows,
)
from engine.scheduler import Scheduler, Sequence
from engine.spec_decode import Speculator
from engine.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)

Sink = Callable[[StreamDelta], None]


@dataclass
class ModelInfo:
    """What the engine reports about a loaded model."""

    name: str
    path: str
    architecture: str
    dtype: str
    max_model_len: int
    num_blocks: int
    block_size: int
    weight_bytes: int
    kv_cache_bytes: int
    vocab_size: int
    num_parameters: int
    quantization: str | None = None  # weight scheme (engine/quantize.py), None for float
    kv_cache_dtype: str = ""  # dtype the KV cache stores


@dataclass(eq=False)
class RequestState:
    """Per-request state beside the scheduler's: sampling, detokenizer, stop strings, sink."""

    params: SamplingParams
    sampling: SamplingState
    detok: IncrementalDetokenizer
    sink: Sink
    text: str = ""
    emitted: int = 0  # characters of `text` already sent
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)


class ModelWorker:
    """Runs the engine steps of one model."""

    def __init__(
        self,
        *,
        info: ModelInfo,
        args: ModelArgs,
        model: Transformer,
        tokenizer: Tokenizer,
        cache: KVCache,
        scheduler: Scheduler,
        adapters: AdapterManager,
        device: torch.device,
    ) -> None:
        self.info, self.args, self.model, self.tokenizer = info, args, model, tokenizer
        self.cache, self.scheduler, self.device = cache, scheduler, device
        self.adapters = adapters
        scheduler.pin, scheduler.unpin = self._pin, self._unpin
        self.runner = ModelRunner(model, cache, device, adapters.state)
        self.sampler = Sampler()
        self.eos_token_ids = tuple(sorted({*args.eos_token_ids, *tokenizer.eos_token_ids}))
        self.requests: dict[str, Sequence] = {}
        # Configured by `Engine.load_model(speculative=...)`; without a configuration it serves
        # requests that ask for prompt lookup themselves.
        self.speculator = Speculator(self, None)
        self.constraints = ConstraintCompiler(tokenizer, args.vocab_size, self.eos_token_ids)

    def _pin(self, seq: Sequence) -> bool:
        if seq.adapter is None:
            return True
        slot = self.adapters.pin(seq.adapter)
        if slot is None:
            return False
        seq.lora_slot = slot
        return True

    def _unpin(self, seq: Sequence) -> None:
        if seq.adapter is not None and seq.lora_slot >= 0:
            self.adapters.unpin(seq.adapter)
            seq.lora_slot = -1

    @property
    def blocks(self) -> BlockManager:
        """The model's KV block manager."""
        return self.scheduler.blocks

    @property
    def path(self) -> Path:
        """The checkpoint directory."""
        return Path(self.info.path)

    def add(self, seq: Sequence, params: SamplingParams, sink: Sink) -> None:
        """Start a request whose prompt was validated by the engine."""
        prompt = seq.token_ids[: seq.num_prompt_tokens]
        seq.payload = RequestState(
            params=params,
            sampling=SamplingState(
                params, prompt, self.eos_token_ids, device=self.device, constraint=seq.constraint
            ),
            detok=self.tokenizer.detokenizer(prompt, params.skip_special_tokens),
            sink=sink,
        )
        seq.spec = self.speculator.start(params, seq.adapter)
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str, reason: str = "abort", error: str | None = None) -> None:
        """Stop a request now and tell its sink."""
        if request_id in self.requests:
            self._finish(self.requests[request_id], reason, error)

    def abort_all(self, reason: str = "abort", error: str | None = None) -> None:
        """Stop every request of this model."""
        for request_id in list(self.requests):
            self.abort(request_id, reason, error)

    def step(self) -> int:
        """Schedule, run the model, sample and deliver tokens. Returns tokens computed."""
        batch = self.scheduler.schedule()
        if not batch.items:
            return 0
        for seq in batch.preempted:
            self.speculator.release(seq)
        self.speculator.propose(batch, self.scheduler)
        start = time.perf_counter()
        if any(seq.lora_slot >= 0 for seq, _ in batch.items):
            batch.items.sort(key=lambda item: item[0].lora_slot)  # contiguous tokens per adapter
        logits, sample_mask = self.runner.execute(batch)
        for seq, n in batch.items:
            if not seq.draft_ids:  # speculating sequences advance by what they accept
                self.scheduler.advance(seq, n)
        sampled = [seq for (seq, _), s in zip(batch.items, sample_mask, strict=True) if s]
        if any(seq.draft_ids for seq in sampled):
            self._sample_speculative(sampled, logits)
        elif sampled:
            self._sample(sampled, logits)
        self.speculator.observe(batch, time.perf_counter() - start)
        return batch.num_tokens

    def _sample(self, sampled: list[Sequence], logits: torch.Tensor) -> None:
        stuck = unsatisfiable_rows([seq.payload.sampling for seq in sampled], logits.shape[-1])
        if stuck:
            sampled, logits = self._end_stuck(sampled, logits, stuck)
            if not sampled:
                return
        tokens, logprobs = self.sampler(logits, [seq.payload.sampling for seq in sampled])
        for seq, token, lp in zip(sampled, tokens, logprobs, strict=True):
            self._append(seq, [token], [lp])

    def _end_stuck(
        self, sampled: list[Sequence], logits: torch.Tensor, stuck: list[int]
    ) -> tuple[list[Sequence], torch.Tensor]:
        """Finish the rows whose grammar allows no token with finish_reason "error" (no token
        appended); the other rows and their logits go on to the sampler."""
        for i in stuck:
            seq = sampled[i]
            # The first line: llguidance appends a dump of the parser state.
            why = (seq.constraint.error.strip() or "the grammar allows no token here").splitlines()[
                0
            ]
            log.warning("request %s: constrained decoding is stuck: %s", seq.request_id, why)
            self._finish(seq, "error", f"no token satisfies the request's constraint: {why}")
        dead = set(stuck)
        keep = [i for i in range(len(sampled)) if i not in dead]
        rows = torch.tensor(keep, dtype=torch.long, device=logits.device)
        return [sampled[i] for i in keep], logits.index_select(0, rows)

    def _sample_speculative(self, sampled: list[Sequence], logits: torch.Tensor) -> None:
        """Plain rows go to the sampler together; each speculating sequence verifies its rows."""
        counts = [1 + len(seq.draft_ids) for seq in sampled]
        offsets = [0, *itertools.accumulate(counts)]
        plain = [i for i, seq in enumerate(sampled) if not seq.draft_ids]
        if plain:
            rows = torch.tensor([offsets[i] for i in plain], device=logits.device)
            self._sample([sampled[i] for i in plain], logits.index_select(0, rows))
        for i, seq in enumerate(sampled):
            if seq.draft_ids:
                tokens, logprobs = self.speculator.verify(seq, logits[offsets[i] : offsets[i + 1]])
                emitted = self._append(seq, tokens, logprobs)
                self.speculator.settle(seq, self.scheduler, emitted)

    def _append(self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprob | None]) -> int:
        """Append tokens up to the first that ends the request; emit once. Returns how many."""
        state: RequestState = seq.payload
        for i, (token, logprob) in enumerate(zip(tokens, logprobs, strict=True)):
            seq.token_ids.append(token)
            state.sampling.append(token)
            state.pending_ids.append(token)
            if logprob is not None:
                state.pending_logprobs.append(logprob)
            reason = self._stop_reason(seq, state, token)
            if reason is not None:
                self._finish(seq, reason)
                return i + 1
        self._emit(seq, finished=False)
        return len(tokens)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        del self.requests[seq.request_id]
        self.scheduler.finish(seq)
        self.speculator.release(seq)
        if error is None and reason != "abort":
            self.speculator.record(seq)
        self._emit(seq, finished=True, reason=reason, error=error)

    def _stop_reason(self, seq: Sequence, state: RequestState, token: int) -> str | None:
        if state.sampling.stop_token_hit(token):
            self._flush(state)
            return "stop"
        start = len(state.text)
        state.text += state.detok.add(token)
        if self._match_stop_string(state, start):
            return "stop"
        if seq.constraint is not None and self._grammar_complete(seq, token):
            self._flush(state)
            return "stop"
        if (
            seq.num_output_tokens >= state.params.max_tokens
            or seq.num_tokens >= seq.max_total_tokens
        ):
            return "stop" if self._flush(state) else "length"
        return None

    @staticmethod
    def _grammar_complete(seq: Sequence, token: int) -> bool:
        """Advance the request's grammar; True once nothing more may follow.

        The sampler only lets allowed tokens through, so a refusal means the grammar's state
        and the tokens diverged (it cannot happen through `step`); the request ends there.
        """
        if not seq.constraint.advance(token):
            log.warning("request %s: token %d outside its grammar", seq.request_id, token)
            return True
        return seq.constraint.done()

    def _flush(self, state: RequestState) -> bool:
        """Emit text the detokenizer held back; True if it completes a stop string."""
        start = len(state.text)
        state.text += state.detok.flush()
        return self._match_stop_string(state, start)

    @staticmethod
    def _match_stop_string(state: RequestState, start: int) -> bool:
        """Truncate the text before the first stop string that the new text completes."""
        best = -1
        for stop in state.params.stop:
            i = state.text.find(stop, max(0, start - len(stop) + 1))
            if i >= 0 and (best < 0 or i < best):
                best = i
        if best < 0:
            return False
        state.text = state.text[:best]
        return True

    def _emit(
        self, seq: Sequence, *, finished: bool, reason: str | None = None, error: str | None = None
    ) -> None:
        state: RequestState = seq.payload
        end = len(state.text)
        if not finished and state.params.stop:
            # Hold back a tail that could be the start of a stop string.
            end = max(state.emitted, end - max(len(s) for s in state.params.stop) + 1)
        text = state.text[state.emitted : end]
        state.emitted = max(state.emitted, end)
        wants_logprobs = state.params.logprobs is not None
        delta = StreamDelta(
            request_id=seq.request_id,
            text=text,
            token_ids=state.pending_ids,
            logprobs=state.pending_logprobs if wants_logprobs else None,
            finished=finished,
            finish_reason=reason,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            error=error,
        )
        if seq.spec is not None:
            delta.num_draft_tokens = seq.spec.acceptance.total_proposed
            delta.num_accepted_tokens = seq.spec.acceptance.total_accepted
        state.pending_ids, state.pending_logprobs = [], []
        try:
            state.sink(delta)
        except Exception:  # a broken consumer must not stop the engine loop
            log.exception("delivering output of request %s failed", seq.request_id)
