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
from torch import Tensor

from engine.config import ModelArgs
from engine.errors import InvalidRequestError

ROOT_HASH = b"compound-kv-root"


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Hash of a full block given its parent's hash: collisions would silently corrupt output,
    so a 128-bit cryptographic digest rather than Python's `hash`."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


KV_CACHE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
QUANT_MAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
SCALE_DTYPE = torch.bfloat16  # one scale per cached token and KV head


def resolve_kv_dtype(name: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the KV cache stores: `auto` (the model's), `int8` or `fp8` (e4m3)."""
    if name == "auto":
        return model_dtype
    if name not in KV_CACHE_DTYPES:
        raise InvalidRequestError(
            f"kv_cache_dtype {name!r} is not one of auto, {', '.join(KV_CACHE_DTYPES)}",
            param="kv_cache_dtype",
        )
    return KV_CACHE_DTYPES[name]


def block_bytes(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, K and V (with their scales when quantized)."""
    per_head = args.head_dim * dtype.itemsize + (SCALE_DTYPE.itemsize if dtype in QUANT_MAX else 0)
    return 2 * args.n_layers * block_size * args.n_kv_heads * per_head


class QuantizedKV:
    """K or V of one layer stored in int8 or fp8 with one scale per (cached token, KV head):
    a token's scale is fixed when it is written, so writes never rescale other tokens and
    blocks shared through the prefix cache stay valid. Reads dequantize only the gathered
    blocks; the attention math runs in `dtype`."""

    def __init__(self, shape: tuple[int, ...], qdtype: torch.dtype, dtype: torch.dtype, device):
        self.data = torch.zeros(shape, dtype=qdtype, device=device)  # [NB, BS, H_kv, D]
        self.scales = torch.zeros(*shape[:-1], 1, dtype=SCALE_DTYPE, device=device)
        self.dtype, self.shape, self.qmax = dtype, self.data.shape, QUANT_MAX[qdtype]

    @property
    def nbytes(self) -> int:
        """Memory held by the values and their scales."""
        return self.data.nbytes + self.scales.nbytes

    def write(self, slots: Tensor, x: Tensor) -> None:
        """Quantize x [T, H_kv, D] into the cache slots [T]."""
        scale = (x.float().abs().amax(dim=-1, keepdim=True) / self.qmax).clamp(min=1e-8)
        scale = scale.to(SCALE_DTYPE)
        q = (x.float() / scale.float()).clamp(-self.qmax, self.qmax)
        q = (
            q.round().to(self.data.dtype)
            if self.data.dtype == torch.int8
            else q.to(self.data.dtype)
        )
        h, d = self.shape[2], self.shape[3]
        # Copies go through an int8 view: CPU index kernels do not take float8.
        self.data.view(torch.int8).view(-1, h, d).index_copy_(0, slots, q.view(torch.int8))
        self.scales.view(-1, h, 1).index_copy_(0, slots, scale)

    def index_select(self, dim: int, blocks: Tensor) -> Tensor:
        """Dequantized blocks [n, BS, H_kv, D] in `dtype` (what `_gather_context` reads)."""
        data = self.data.view(torch.int8).index_select(dim, blocks).view(self.data.dtype)
        data = data.to(self.dtype)
        return data * self.scales.index_select(dim, blocks).to(self.dtype)


def write_kv(cache: Tensor | QuantizedKV, slots: Tensor, x: Tensor) -> None:
    """Store new keys or values x [T, H_kv, D] at cache slots [T]."""
    if isinstance(cache, QuantizedKV):
        cache.write(slots, x)
    else:
        cache.view(-1, x.shape[1], x.shape[2]).index_copy_(0, slots, x)


class KVCache:
    """The cache tensors of one model: per layer K and V of [num_blocks, block_size, H_kv, D],
    plain tensors in the model's dtype or `QuantizedKV` when `kv_dtype` is int8 / fp8."""

    def __init__(
        self,
        args: ModelArgs,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        shape = (num_blocks, block_size, args.n_kv_heads, args.head_dim)
        kv_dtype = kv_dtype or dtype

        def make() -> Tensor | QuantizedKV:
            if kv_dtype in QUANT_MAX:
                return QuantizedKV(shape, kv_dtype, dtype, device)
            return torch.zeros(shape, dtype=kv_dtype, device=device)

        self.layers = [(make(), make()) for _ in range(args.n_layers)]
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
