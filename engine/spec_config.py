"""Speculative decoding settings: a model's configuration and a request's override. Free of
torch, so that the server's configuration and request types load without it."""

from __future__ import annotations

from typing import Literal

import msgspec

from engine.errors import InvalidRequestError

MAX_SPECULATIVE_TOKENS = 16


class SpeculativeConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """How a model speculates: `method` "draft" (with `draft_model`, a loaded model sharing the
    target's tokenizer) or "ngram" (prompt lookup); at most `num_tokens` guesses per step."""

    method: Literal["draft", "ngram"] = "ngram"
    draft_model: str | None = None
    num_tokens: int = 4
    adaptive: bool = True  # choose the length per step from acceptance and measured step times
    ngram_min: int = 1
    ngram_max: int = 4
    # Prompt lookup also searches the model's recent outputs (per adapter) when the request's
    # own tokens hold no match: structured outputs repeat their scaffolding across requests.
    ngram_history: bool = True

    def validate(self) -> None:
        """Raise `InvalidRequestError` naming the first bad field."""
        if (self.method == "draft") != (self.draft_model is not None):
            raise InvalidRequestError(
                'method "draft" needs draft_model, and only it does', param="draft_model"
            )
        if not 1 <= self.num_tokens <= MAX_SPECULATIVE_TOKENS:
            raise InvalidRequestError(
                f"num_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], got {self.num_tokens}",
                param="num_tokens",
            )
        if not 1 <= self.ngram_min <= self.ngram_max <= 16:
            raise InvalidRequestError(
                "ngram_min and ngram_max must satisfy 1 <= ngram_min <= ngram_max <= 16",
                param="ngram_max",
            )


class SpeculativeOverride(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A request's own choice: "off", or a method instead of the model's default. With
    `num_tokens` the request speculates exactly that many tokens per step (no adaptation)."""

    method: Literal["draft", "ngram", "off"]
    num_tokens: int | None = None

    def validate(self) -> None:
        """Raise `InvalidRequestError` when num_tokens is out of range."""
        if self.num_tokens is not None and not 1 <= self.num_tokens <= MAX_SPECULATIVE_TOKENS:
            raise InvalidRequestError(
                f"speculative.num_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], "
                f"got {self.num_tokens}",
                param="speculative.num_tokens",
            )
