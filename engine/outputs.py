"""Request and output types of the engine's public API."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sampling import SamplingParams, TokenLogprob


@dataclass
class GenerationRequest:
    """One generation: a prompt as text or token ids, for a loaded model."""

    model: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None


@dataclass
class StreamDelta:
    """What a request produced in one engine step (text held back while it may start a stop string)."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int
    completion_tokens: int
    num_cached_tokens: int = 0
    error: str | None = None
    # Speculative decoding so far: draft tokens verified, and how many the target accepted.
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


@dataclass
class RequestOutput:
    """The whole result of a finished request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finished_time: float | None = None
    error: str | None = None  # why, when finish_reason is "error"

    def add(self, delta: StreamDelta, now: float) -> None:
        """Fold one delta into the output."""
        if delta.token_ids and self.first_token_time is None:
            self.first_token_time = now
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs = [*(self.logprobs or []), *delta.logprobs]
        self.num_cached_tokens = delta.num_cached_tokens
        self.num_draft_tokens = delta.num_draft_tokens
        self.num_accepted_tokens = delta.num_accepted_tokens
        if delta.finished:
            self.finish_reason = delta.finish_reason
            self.finished_time = now
            self.error = delta.error

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def acceptance_rate(self) -> float | None:
        """Share of draft tokens the target accepted (None without speculation)."""
        if not self.num_draft_tokens:
            return None
        return self.num_accepted_tokens / self.num_draft_tokens
