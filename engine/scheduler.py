"""Continuous batching: waiting and running queues, a per-step token budget, chunked prefill,
preemption by recompute when the KV pool runs out, first-come first-served admission."""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.kv_cache import ROOT_HASH, BlockManager, block_hash

_arrivals = itertools.count()


class Status(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Scheduling state of one request: its tokens, KV blocks and progress through them.

    `token_ids` is the prompt followed by the tokens generated so far; the KV of the first
    `num_computed` of them is in the cache. The newest generated token is not computed yet.
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    max_total_tokens: int  # prompt + max_tokens, capped by the model's context
    hash_salt: bytes = ROOT_HASH  # keeps different adapters' caches apart
    adapter: str | None = None  # "base:adapter" or None for the bare base model
    lora_slot: int = -1  # adapter slot while running, -1 = base only
    status: Status = Status.WAITING
    num_computed: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    block_table: list[int] = field(default_factory=list)
    num_registered: int = 0  # leading full blocks indexed in the prefix cache
    arrival: int = field(default_factory=lambda: next(_arrivals))
    num_preemptions: int = 0
    payload: Any = None  # the engine's per-request state (sampling, detokenizer, sink)
    spec: Any = None  # speculative decoding state (engine.spec_decode.SpecState) or None
    # Guessed tokens verified in this step after the last token; never part of token_ids.
    draft_ids: list[int] = field(default_factory=list)
    constraint: Any = None  # engine.constraints.TokenConstraint of a constrained request
    _hashes: list[bytes] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far."""
        return len(self.token_ids) - self.num_prompt_tokens

    def block_hashes(self, n: int, block_size: int) -> list[bytes]:
        """Chain hashes of the first n full blocks (computed once, then reused)."""
        while len(self._hashes) < n:
            i = len(self._hashes)
            parent = self._hashes[-1] if self._hashes else self.hash_salt
            self._hashes.append(
                block_hash(parent, self.token_ids[i * block_size : (i + 1) * block_size])
            )
        return self._hashes[:n]


@dataclass
class ScheduledBatch:
    """What one engine step computes: (sequence, number of new tokens) in batch order."""

    items: list[tuple[Sequence, int]]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        """New tokens in the step."""
        return sum(n for _, n in self.items)


class Scheduler:
    """Chooses, every step, which sequences run and how many of their tokens are computed."""

    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        *,
        pin: Callable[[Sequence], bool] | None = None,
        unpin: Callable[[Sequence], None] | None = None,
    ) -> None:
        # pin/unpin: hold per-request resources (an adapter slot) while a sequence runs.
        self.pin = pin or (lambda seq: True)
        self.unpin = unpin or (lambda seq: None)
        self.blocks = blocks
        self.block_size = blocks.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def has_work(self) -> bool:
        """True while any sequence waits or runs."""
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence behind those already waiting."""
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        """Running sequences first (oldest first), then admit waiting ones while budget allows."""
        batch = ScheduledBatch([], [])
        budget = self._schedule_running(batch, self.max_num_batched_tokens)
        if not batch.preempted:
            self._admit_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._grow(seq, n, batch):
                break  # seq itself was preempted: everything after it already was
            batch.items.append((seq, n))
            budget -= n
            i += 1
        return budget

    def _grow(self, seq: Sequence, n: int, batch: ScheduledBatch) -> bool:
        """Give seq blocks for n more tokens, preempting the newest running sequences if needed."""
        need = self._blocks_needed(seq, n)
        while need > self.blocks.num_free:
            victim = self.running[-1]
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is seq:
                return False
        seq.block_table.extend(self.blocks.allocate(need) or [])
        return True

    def _blocks_needed(self, seq: Sequence, n: int) -> int:
        return -(-(seq.num_computed + n) // self.block_size) - len(seq.block_table)

    def _preempt(self, seq: Sequence) -> None:
        # Recompute rather than swap: the prefix cache usually still holds most of its blocks.
        self.running.remove(seq)
        self.unpin(seq)
        self.blocks.release(seq.block_table)
        seq.block_table, seq.num_computed, seq.num_registered = [], 0, 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.pin(seq):
                break  # its adapter has no free slot yet: first come, first served
            n = self._admit(seq, budget)
            if n == 0:
                self.unpin(seq)
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.items.append((seq, n))
            budget -= n

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Attach cached prefix blocks and allocate the rest for the first chunk; 0 if no room."""
        # Leave at least one token to compute: its logits produce the next token.
        full = (seq.num_tokens - 1) // self.block_size
        cached = self.blocks.match_prefix(seq.block_hashes(full, self.block_size))
        computed = len(cached) * self.block_size
        n = min(seq.num_tokens - computed, budget)
        fresh = -(-(computed + n) // self.block_size) - len(cached)
        evictable_hits = sum(1 for b in cached if self.blocks.ref_count(b) == 0)
        if fresh > self.blocks.num_free - evictable_hits:
            return 0
        self.blocks.acquire(cached)
        seq.block_table = [*cached, *(self.blocks.allocate(fresh) or [])]
        seq.num_computed, seq.num_registered = computed, len(cached)
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = computed
        return n

    def advance(self, seq: Sequence, n: int) -> None:
        """Record that n more tokens of seq are in the cache; index newly full blocks."""
        seq.num_computed += n
        full = seq.num_computed // self.block_size
        if full > seq.num_registered:
            hashes = seq.block_hashes(full, self.block_size)
            for i in range(seq.num_registered, full):
                self.blocks.register(seq.block_table[i], hashes[i])
            seq.num_registered = full

    def reserve(self, seq: Sequence, n: int) -> bool:
        """Blocks for n new tokens of a running sequence without preempting anyone: speculative
        tokens are optional, so they take only free blocks. False (nothing taken) if too few."""
        need = self._blocks_needed(seq, n)
        if need <= 0:
            return True
        blocks = self.blocks.allocate(need)
        if blocks is None:
            return False
        seq.block_table.extend(blocks)
        return True

    def rollback(self, seq: Sequence) -> None:
        """Free blocks past the sequence's tokens (they held rejected speculative tokens only,
        never hashed: `advance` registers blocks of accepted tokens alone)."""
        keep = -(-seq.num_tokens // self.block_size)
        if len(seq.block_table) > keep:
            self.blocks.release(seq.block_table[keep:])
            del seq.block_table[keep:]

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence for good and release its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.unpin(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.blocks.release(seq.block_table)
        seq.block_table = []
        seq.status = Status.FINISHED
