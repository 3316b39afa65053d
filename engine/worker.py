"""One loaded model: weights, tokenizer, KV pool, scheduler, runner and its live requests."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.adapters import AdapterManager
from engine.config import ModelArgs
from engine.kv_cache import BlockManager, KVCache
from engine.model import Transformer
from engine.outputs import StreamDelta
from engine.runner import ModelRunner
from engine.sampling import Sampler, SamplingParams, SamplingState, TokenLogprob
from engine.scheduler import Scheduler, Sequence
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
            sampling=SamplingState(params, prompt, self.eos_token_ids, device=self.device),
            detok=self.tokenizer.detokenizer(prompt, params.skip_special_tokens),
            sink=sink,
        )
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str, reason: str = "abort", error: str | None = None) -> None:
        """Stop a request now and tell its sink."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return
        self.scheduler.finish(seq)
        self._emit(seq, finished=True, reason=reason, error=error)

    def abort_all(self, reason: str = "abort", error: str | None = None) -> None:
        """Stop every request of this model."""
        for request_id in list(self.requests):
            self.abort(request_id, reason, error)

    def step(self) -> int:
        """Schedule, run the model, sample and deliver tokens. Returns tokens computed."""
        batch = self.scheduler.schedule()
        if not batch.items:
            return 0
        if any(seq.lora_slot >= 0 for seq, _ in batch.items):
            batch.items.sort(key=lambda item: item[0].lora_slot)  # contiguous tokens per adapter
        logits, sample_mask = self.runner.execute(batch)
        for seq, n in batch.items:
            self.scheduler.advance(seq, n)
        sampled = [seq for (seq, _), s in zip(batch.items, sample_mask, strict=True) if s]
        if sampled:
            tokens, logprobs = self.sampler(logits, [seq.payload.sampling for seq in sampled])
            for seq, token, lp in zip(sampled, tokens, logprobs, strict=True):
                self._append(seq, token, lp)
        return batch.num_tokens

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        state: RequestState = seq.payload
        seq.token_ids.append(token)
        state.sampling.append(token)
        state.pending_ids.append(token)
        if logprob is not None:
            state.pending_logprobs.append(logprob)
        reason = self._stop_reason(seq, state, token)
        if reason is None:
            self._emit(seq, finished=False)
            return
        del self.requests[seq.request_id]
        self.scheduler.finish(seq)
        self._emit(seq, finished=True, reason=reason)

    def _stop_reason(self, seq: Sequence, state: RequestState, token: int) -> str | None:
        if state.sampling.stop_token_hit(token):
            self._flush(state)
            return "stop"
        start = len(state.text)
        state.text += state.detok.add(token)
        if self._match_stop_string(state, start):
            return "stop"
        if (
            seq.num_output_tokens >= state.params.max_tokens
            or seq.num_tokens >= seq.max_total_tokens
        ):
            return "stop" if self._flush(state) else "length"
        return None

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
        state.pending_ids, state.pending_logprobs = [], []
        try:
            state.sink(delta)
        except Exception:  # a broken consumer must not stop the engine loop
            log.exception("delivering output of request %s failed", seq.request_id)
