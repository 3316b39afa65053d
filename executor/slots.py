"""Per-resource concurrency slots handed out by priority.

Every model or tool call holds a slot of its resource (`model:<target>`, `tool:<name>`) while
it runs. When calls wait, a freed slot goes to the waiter with the highest priority (the
planner's estimated longest path to the end), ties in arrival order: critical-path-first among
the calls queued for a busy model or tool. (The run-wide limit on running tasks is the
scheduler's ready-queue in `executor.run`.)
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Mapping


class PrioritySlots:
    """A counting semaphore whose waiters are served highest priority first."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a slot pool needs at least one slot, got {size}")
        self.size = size
        self._free = size
        self._waiters: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self.in_use = 0
        self.peak = 0

    async def acquire(self, priority: float = 0.0) -> None:
        """Take a slot, waiting behind callers of higher priority."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            self._taken()
            return
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (-priority, next(self._order), future))
        try:
            await future
        except asyncio.CancelledError:
            # Handed the slot just as we were cancelled: pass it on rather than leak it.
            if future.done() and not future.cancelled():
                self.in_use += 1
                self.release()
            raise
        self._taken()

    def release(self) -> None:
        """Give a slot back: to the best waiter still waiting, else to the pool."""
        self.in_use -= 1
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)
                return
        self._free += 1

    def _taken(self) -> None:
        self.in_use += 1
        self.peak = max(self.peak, self.in_use)


class Slots:
    """One pool per limited resource, made on first use.

    `per_resource` maps a resource (`model:demo-base`) or a class default (`model:*`) to how
    many calls may be in flight at once; a resource with neither is not limited.
    """

    def __init__(self, per_resource: Mapping[str, int]) -> None:
        self.per_resource = dict(per_resource)
        self._pools: dict[str, PrioritySlots | None] = {}

    def pool(self, resource: str) -> PrioritySlots | None:
        """The pool limiting `resource`; None when it has no limit."""
        if resource not in self._pools:
            kind = resource.split(":", 1)[0]
            size = self.per_resource.get(resource, self.per_resource.get(f"{kind}:*"))
            self._pools[resource] = PrioritySlots(size) if size is not None else None
        return self._pools[resource]

    def hold(self, resource: str, priority: float) -> Held:
        """`async with slots.hold(resource, priority):` holds a slot of `resource` for a call."""
        return Held(self.pool(resource), priority)


class Held:
    """An async context holding one slot of a pool (or nothing, for an unlimited resource)."""

    __slots__ = ("pool", "priority")

    def __init__(self, pool: PrioritySlots | None, priority: float) -> None:
        self.pool = pool
        self.priority = priority

    async def __aenter__(self) -> None:
        if self.pool is not None:
            await self.pool.acquire(self.priority)

    async def __aexit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.release()
