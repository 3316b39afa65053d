"""Paged KV cache: fixed-size blocks, a block manager with reference counts, prefix caching.

A full block is keyed by a hash chain over its tokens (the parent block's hash and its own
token ids), so two requests that share a prefix share its blocks. Blocks nobody references
keep their contents and hash until they are needed again, then are evicted LRU.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence

import torch

from engine.config import ModelArgs

ROOT_HASH = b"compound-kv-root"


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Hash of a full block given its parent's hash: collisions would silently corrupt output,
    so a 128-bit cryptographic digest rather than Python's `hash`."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


def block_bytes(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, K and V."""
    return 2 * args.n_layers * block_size * args.n_kv_heads * args.head_dim * dtype.itemsize


class KVCache:
    """The cache tensors of one model: per layer K and V of [num_blocks, block_size, H_kv, D]."""

    def __init__(
        self,
        args: ModelArgs,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_blocks, block_size, args.n_kv_heads, args.head_dim)
        self.layers = [
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(args.n_layers)
        ]
        self.num_blocks, self.block_size = num_blocks, block_size

    @property
    def nbytes(self) -> int:
        """Memory held by the cache tensors."""
        return sum(k.nbytes + v.nbytes for k, v in self.layers)


class BlockManager:
    """Allocates cache blocks, counts references and keeps the prefix-cache index.

    Free blocks live in two places: `_free` (no useful contents) and `_evictable` (contents
    still indexed by hash, least recently released first). Allocation prefers `_free`.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = prefix_caching
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._by_hash: dict[bytes, int] = {}
        self.hits = 0  # blocks served from the prefix cache, for metrics and tests

    @property
    def num_free(self) -> int:
        """Blocks that an allocation could take now."""
        return len(self._free) + len(self._evictable)

    def ref_count(self, block: int) -> int:
        """References held on a block."""
        return self._ref[block]

    def match_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """Cached blocks for the longest run of leading full-block hashes (no refs taken)."""
        blocks = []
        if not self.prefix_caching:
            return blocks
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def acquire(self, blocks: Sequence[int]) -> None:
        """Take a reference on cached blocks found by `match_prefix`."""
        for b in blocks:
            if self._ref[b] == 0:
                del self._evictable[b]
            self._ref[b] += 1
        self.hits += len(blocks)

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks with one reference each, or None (nothing taken) if there are too few."""
        if n > self.num_free:
            return None
        return [self._take() for _ in range(n)]

    def _take(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            self._forget(block)
        self._ref[block] = 1
        return block

    def _forget(self, block: int) -> None:
        h = self._hash[block]
        if h is not None and self._by_hash.get(h) == block:
            del self._by_hash[h]
        self._hash[block] = None

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block; the tail goes first so it is evicted first."""
        for b in reversed(blocks):
            self._ref[b] -= 1
            if self._ref[b] > 0:
                continue
            if self._hash[b] is not None:
                self._evictable[b] = None
            else:
                self._free.append(b)

    def register(self, block: int, h: bytes) -> None:
        """Index a block that has just become full under its chain hash."""
        if not self.prefix_caching or self._hash[block] is not None:
            return
        if h in self._by_hash:  # another request computed the same block concurrently
            return
        self._hash[block] = h
        self._by_hash[h] = block

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no request references."""
        while self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._forget(block)
            self._free.append(block)
