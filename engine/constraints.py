"""Grammar-constrained decoding: the token masks of the engine's admissibility gate.

A request may restrict its output to a Lark grammar, a JSON schema, a regular expression or a
fixed list of choices (`SamplingParams.grammar / json_schema / regex / choice`). The engine
compiles that into a `TokenConstraint` per sequence, backed by llguidance (a Rust parser that
computes, from the tokenizer's byte strings, which next tokens keep the output inside the
grammar):

    params ─► ConstraintCompiler.compile (once per request; bad grammar -> InvalidRequestError)
           ─► TokenConstraint on Sequence.constraint
    each step: Sampler masks the row with allowed() ─► choose ─► worker calls advance(token)

EOS is in the mask only where the grammar accepts, and the worker ends the request as soon as
`done()` says nothing more may follow, so a constrained output always parses. A row whose mask
allows no token, or whose parser is in an error state, finishes with finish_reason "error" and
the parser's message (`sampling.unsatisfiable_rows`) instead of sampling an arbitrary token.

Under speculative decoding (engine/spec_decode.py) a constrained request's proposal starts with
the tokens the grammar forces (`forced_tokens`), drafts are cut where the grammar refuses them
(`valid_prefix`), and each verified row is masked with the state after the drafts before it
(`advance` through the drafts, then `rollback`); a state that allows no token decodes plainly,
so it ends with the same error.

    >>> from engine.sampling import SamplingParams
    >>> grammar_source(SamplingParams(choice=("yes", "no")))
    ('lark', 'start: "yes" | "no"')
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import llguidance
import numpy as np
import torch

from engine.errors import InvalidRequestError
from engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from engine.sampling import SamplingParams

# The parameters that constrain the output, in the order the error message names them.
CONSTRAINT_PARAMS = ("grammar", "json_schema", "regex", "choice")
# JSON in the layout of Python's json.dumps, which models mostly saw in training; free
# whitespace lets a weak model emit blanks until max_tokens. A schema's "x-guidance" overrides.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Grammars come from the network: bound the work one request may ask of the parser. llguidance's
# defaults (step_lexer_fuel 200k, max_grammar_size 500k) keep one token's mask to about a
# millisecond; masks are computed inside the engine step, so more fuel per request would stall
# every request of the batch, and a grammar that needs more is refused with a parser error.
_LIMITS = llguidance.LLParserLimits()
# Compiled grammars kept per model (each holds its lexer tables: up to a few MB for big ones).
GRAMMAR_CACHE_SIZE = 32


def grammar_source(params: SamplingParams) -> tuple[str, str] | None:
    """The (format, text) of the request's constraint, or None when the output is free."""
    if params.grammar is not None:
        return "lark", params.grammar
    if params.json_schema is not None:
        return "json_schema", params.json_schema
    if params.regex is not None:
        return "regex", params.regex
    if params.choice:
        return "lark", "start: " + " | ".join(json.dumps(c) for c in params.choice)
    return None


def _llguidance_grammar(kind: str, text: str) -> str:
    if kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(text)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(text)
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(text, defaults=_JSON_LAYOUT)
    except (ValueError, RecursionError) as e:
        raise InvalidRequestError(
            f"json_schema is not a usable JSON schema: {e}", param="json_schema"
        ) from None


class TokenConstraint:
    """The grammar state of one sequence: which next tokens are allowed, and the tokens so far."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._mask: torch.Tensor | None = None  # cached until the state changes

    def allowed(self) -> torch.Tensor:
        """Bool [vocab_size] mask of the tokens that may come next (EOS only where accepting)."""
        if self._mask is None:
            bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
            unpacked = np.unpackbits(bits, bitorder="little")[: self.vocab_size]
            self._mask = torch.from_numpy(unpacked.astype(np.bool_))
        return self._mask

    def advance(self, token_id: int) -> bool:
        """Consume a token; False (and the state unchanged) when the grammar does not allow it."""
        if self._matcher.validate_tokens([token_id]) != 1:
            return False
        self._mask = None
        return self._matcher.consume_token(token_id)

    def valid_prefix(self, token_ids: Sequence[int]) -> int:
        """How many leading tokens of a draft the grammar allows, without consuming them."""
        return self._matcher.validate_tokens(list(token_ids)) if token_ids else 0

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces next (in its own tokenization), without consuming them."""
        return list(self._matcher.compute_ff_tokens())

    def rollback(self, n: int) -> None:
        """Undo the last `n` advanced tokens."""
        if n > 0:
            self._mask = None
            self._matcher.rollback(n)

    def accepting(self) -> bool:
        """True when the output so far is a complete sentence of the grammar."""
        return self._matcher.is_accepting()

    def done(self) -> bool:
        """True when the grammar accepts and no further token may follow."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    @property
    def failed(self) -> bool:
        """True when the parser is in an error state (its mask then offers only EOS)."""
        return self._matcher.is_error()

    @property
    def error(self) -> str:
        """The parser's error message, empty while the state is valid."""
        return self._matcher.get_error()


class ConstraintCompiler:
    """Builds `TokenConstraint`s for one model; the tokenizer bridge is built once, lazily.

    Compiled grammars are kept in a small LRU keyed by (kind, text) (the compiler belongs to one
    model, so the model is part of the key): pipelines send the same schema request after
    request, and a copy of a compiled matcher costs far less than compiling it again. Requests
    compile from several threads (the server's worker threads, `Engine.generate` callers), so
    the cache and the bridge are guarded by a lock."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        cache_size: int = GRAMMAR_CACHE_SIZE,
    ) -> None:
        self._tokenizer = tokenizer
        # The logits may be wider than the tokenizer (padded heads): masks cover the logits.
        self.vocab_size = max(vocab_size, tokenizer.vocab_size)
        self._eos = list(eos_token_ids)
        self._bridge: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @property
    def bridge(self) -> llguidance.LLTokenizer:
        """llguidance's view of the tokenizer (byte string per token id), cached."""
        with self._lock:
            if self._bridge is None:
                self._bridge = llguidance.LLTokenizer(
                    self._tokenizer.backend_json(),
                    n_vocab=self.vocab_size,
                    eos_token=self._eos or None,
                )
            return self._bridge

    def compile(self, params: SamplingParams) -> TokenConstraint | None:
        """The request's constraint, or None; raises `InvalidRequestError` for a bad grammar."""
        source = grammar_source(params)
        if source is None:
            return None
        template = self._cached(source)
        if template is None:
            template = self._compile(source, _param_of(params))
            self._store(source, template)
        with self._lock:
            matcher = template.deep_copy()  # the template never advances: a fresh state
        return TokenConstraint(matcher, self.vocab_size)

    def _compile(self, source: tuple[str, str], param: str) -> llguidance.LLMatcher:
        grammar = _llguidance_grammar(*source)
        matcher = llguidance.LLMatcher(self.bridge, grammar, log_level=0, limits=_LIMITS)
        if matcher.is_error():
            raise InvalidRequestError(
                f"{param} is not a valid {_DESCRIPTION[param]}: {matcher.get_error().strip()}",
                param=param,
            )
        return matcher

    def _cached(self, source: tuple[str, str]) -> llguidance.LLMatcher | None:
        with self._lock:
            matcher = self._cache.get(source)
            if matcher is not None:
                self._cache.move_to_end(source)
            return matcher

    def _store(self, source: tuple[str, str], matcher: llguidance.LLMatcher) -> None:
        with self._lock:
            self._cache[source] = matcher
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    @property
    def cached_grammars(self) -> int:
        """How many compiled grammars the LRU holds."""
        return len(self._cache)


_DESCRIPTION = {
    "grammar": "Lark grammar",
    "json_schema": "JSON schema",
    "regex": "regular expression",
    "choice": "list of choices",
}


def _param_of(params: SamplingParams) -> str:
    return next(p for p in CONSTRAINT_PARAMS if getattr(params, p) not in (None, ()))
