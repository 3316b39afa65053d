"""Paged attention for decode: one query token per sequence over a block-paged KV cache.

Cache layout (see engine/kv_cache.py): `k_cache`, `v_cache` are [num_blocks, block_size, H_kv, D];
token position p of sequence b lives in block `block_tables[b, p // block_size]` at offset
`p % block_size`. The query of sequence b is the token at position `context_lens[b] - 1`, whose
key and value are already in the cache. Query head h reads kv head `h // (H // H_kv)` (GQA).

`paged_attention_decode` is the Triton kernel (flash-decoding: online softmax over tiles of the
context with fp32 accumulators, optionally split over the context and merged afterwards);
`paged_attention_decode_ref` is the PyTorch reference with the same signature (less the kernel's
`num_splits`), vectorised so the engine can use it for decode on CPU; `paged_attention` picks one of the two.

A sequence with `context_lens[b] == 0` attends over nothing and gets a zero output.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from engine.kernels.splits import choose_num_splits

_LOG2E = 1.4426950408889634
# Without dots the kernel holds a [G, TILE_N, D] fp32 product per tile; tiles of this many
# elements compile without register spills on sm_90 (checked with cuobjdump), at 8 warps.
_TILE_ELEMENTS = 4096
# A context split shorter than this many tokens costs more in the merge than it saves.
_MIN_SPLIT_TOKENS = 256
_TRUTHY = frozenset({"1", "true", "yes", "on"})


@triton.jit
def _attend_tile(
    q,
    m_i,
    l_i,
    acc,
    *,
    k_ptr,
    v_ptr,
    bt_row,
    k_off,
    v_off,
    pos,
    visible,
    offs_d,
    mask_d,
    qk_scale,
    stride_kn,
    stride_ks,
    stride_vn,
    stride_vs,
    BLOCK_SIZE: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fold one tile of context positions into the online-softmax state (log2 domain)."""
    block_id = tl.load(bt_row + pos // BLOCK_SIZE, mask=visible, other=0).to(tl.int64)
    slot = pos % BLOCK_SIZE
    kv_mask = visible[:, None] & mask_d[None, :]
    # k, v: [TILE_N, BLOCK_D] in the cache dtype
    k = tl.load(
        k_ptr + block_id[:, None] * stride_kn + slot[:, None] * stride_ks + k_off + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        v_ptr + block_id[:, None] * stride_vn + slot[:, None] * stride_vs + v_off + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    # s: [BLOCK_G, TILE_N], scaled by scale * log2(e) so exp2 gives the softmax.
    if USE_DOT:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    else:
        s = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
    s = tl.where(visible[None, :], s * qk_scale, float("-inf"))
    # Every tile holds at least one visible position, so m_new is finite and alpha is 0 on the
    # first tile (m_i = -inf) instead of NaN.
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if USE_DOT:
        pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    else:
        pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    *,
    bt_ptr,
    ctx_ptr,
    m_ptr,
    l_ptr,
    qk_scale,
    window,
    split_tokens,
    stride_qb,
    stride_qh,
    stride_kn,
    stride_ks,
    stride_kh,
    stride_vn,
    stride_vs,
    stride_vh,
    stride_btb,
    stride_ob,
    stride_os,
    stride_oh,
    stride_mb,
    stride_ms,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILE_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    SPLIT: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per (sequence, kv head, context split); it serves the kv head's query group."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    start = 0
    if USE_WINDOW:
        start = tl.maximum(ctx - window, 0)
    lo = start + split * split_tokens
    hi = tl.minimum(ctx, lo + split_tokens)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, TILE_N)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    # q: [BLOCK_G, BLOCK_D]; padded heads and dims load as zeros and never change a score.
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_g[:, None] & mask_d[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b * stride_btb
    for tile in range(lo, hi, TILE_N):
        pos = tile + offs_n
        m_i, l_i, acc = _attend_tile(
            q,
            m_i,
            l_i,
            acc,
            k_ptr=k_ptr,
            v_ptr=v_ptr,
            bt_row=bt_row,
            k_off=kvh * stride_kh,
            v_off=kvh * stride_vh,
            pos=pos,
            visible=pos < hi,
            offs_d=offs_d,
            mask_d=mask_d,
            qk_scale=qk_scale,
            stride_kn=stride_kn,
            stride_ks=stride_ks,
            stride_vn=stride_vn,
            stride_vs=stride_vs,
            BLOCK_SIZE=BLOCK_SIZE,
            USE_DOT=USE_DOT,
            DOT_PRECISION=DOT_PRECISION,
        )

    # An empty split (or an empty context) has l_i == 0 and stores zeros.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + b * stride_ob + split * stride_os + heads[:, None] * stride_oh
    tl.store(
        o_ptrs + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask_g[:, None] & mask_d[None, :],
    )
    if SPLIT:
        ml_off = b * stride_mb + split * stride_ms + heads
        tl.store(m_ptr + ml_off, m_i, mask=mask_g)
        tl.store(l_ptr + ml_off, l_i, mask=mask_g)


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Decode attention with the Triton kernel; returns [B, H, D] in q's dtype.

    `num_splits` partitions each context into that many parts run as separate programs and merged
    afterwards (flash-decoding); left as None it is chosen from the GPU size and the batch shape,
    never from `context_lens` values, so no host sync happens and CUDA graphs can capture it.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens, sliding_window=sliding_window)
    batch, n_heads, head_dim = q.shape
    out = torch.empty((batch, n_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    span = block_tables.shape[1] * block_size
    if sliding_window is not None:
        span = min(span, sliding_window)
    splits = num_splits or choose_num_splits(q.device, batch * n_kv, span, _MIN_SPLIT_TOKENS)
    meta = _launch_meta(n_heads // n_kv, head_dim, block_size, k_cache.dtype)
    split_tokens = triton.cdiv(triton.cdiv(span, splits), meta["TILE_N"]) * meta["TILE_N"]
    launch = functools.partial(
        _launch,
        q.contiguous(),
        k_cache,
        v_cache,
        block_tables=block_tables.contiguous(),
        context_lens=context_lens.contiguous(),
        scale=scale,
        window=sliding_window,
        split_tokens=split_tokens,
        meta=meta,
    )
    if splits == 1:
        launch((out, out, out))
        return out
    # Partial outputs, row maxima (log2 domain) and row sums of every split: [B, S, H(, D)].
    o_part = torch.empty((batch, splits, n_heads, head_dim), dtype=torch.float32, device=q.device)
    m_part = torch.empty((batch, splits, n_heads), dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    launch((o_part, m_part, l_part))
    return _merge_splits(o_part, m_part, l_part).to(q.dtype)


def _launch_meta(group: int, head_dim: int, block_size: int, dtype: torch.dtype) -> dict:
    """Compile-time sizes and launch options for one attention shape and cache dtype."""
    # A kv head serving 4+ query heads gets tensor-core dots (rows padded to 16, the mma
    # minimum); fewer heads would mostly multiply padding, so they use broadcast products.
    use_dot = group >= 4
    block_g = max(16 if use_dot else 1, triton.next_power_of_2(group))
    block_d = max(16, triton.next_power_of_2(head_dim))
    if use_dot:
        tile_n = 16
        num_warps = 8 if block_d >= 128 else 4
    else:
        tile_n = max(16, min(128, _TILE_ELEMENTS // (block_g * block_d)))
        num_warps = 8 if block_g * tile_n * block_d >= _TILE_ELEMENTS else 4
    return {
        "GROUP": group,
        "HEAD_DIM": head_dim,
        "BLOCK_SIZE": block_size,
        "BLOCK_G": block_g,
        "BLOCK_D": block_d,
        "TILE_N": tile_n,
        "USE_DOT": use_dot,
        # fp32 must not round to tf32; 16-bit inputs ignore the setting.
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "num_warps": num_warps,
    }


def _launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    outs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int | None,
    split_tokens: int,
    meta: dict,
) -> None:
    """Run the kernel over a (B, H_kv, splits) grid into `outs` = (out, m, l).

    Unsplit, `out` is the [B, H, D] result and m/l are unused; split, `out` is [B, S, H, D] fp32
    and m/l are [B, S, H].
    """
    out, m_part, l_part = outs
    splits = out.shape[1] if out.dim() == 4 else 1
    # Strides of out viewed as [B, S, H, D]; the unsplit output has no split axis.
    o_strides = (
        (out.stride(0), out.stride(1), out.stride(2))
        if splits > 1
        else (out.stride(0), 0, out.stride(1))
    )
    m_strides = (m_part.stride(0), m_part.stride(1)) if splits > 1 else (0, 0)
    grid = (q.shape[0], k_cache.shape[2], splits)
    _paged_decode_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        bt_ptr=block_tables,
        ctx_ptr=context_lens,
        m_ptr=m_part,
        l_ptr=l_part,
        qk_scale=scale * _LOG2E,
        window=window or 0,
        split_tokens=split_tokens,
        stride_qb=q.stride(0),
        stride_qh=q.stride(1),
        stride_kn=k_cache.stride(0),
        stride_ks=k_cache.stride(1),
        stride_kh=k_cache.stride(2),
        stride_vn=v_cache.stride(0),
        stride_vs=v_cache.stride(1),
        stride_vh=v_cache.stride(2),
        stride_btb=block_tables.stride(0),
        stride_ob=o_strides[0],
        stride_os=o_strides[1],
        stride_oh=o_strides[2],
        stride_mb=m_strides[0],
        stride_ms=m_strides[1],
        USE_WINDOW=window is not None,
        SPLIT=splits > 1,
        **meta,
    )


def _merge_splits(o_part: torch.Tensor, m_part: torch.Tensor, l_part: torch.Tensor) -> torch.Tensor:
    """Combine per-split softmax results: weight each split by its share of the total mass."""
    m_max = m_part.amax(dim=1, keepdim=True)
    # Empty splits have l == 0 and m == -inf (m - m_max may be NaN); their weight is 0.
    weight = torch.where(l_part > 0, l_part * torch.exp2(m_part - m_max), 0.0)
    # A non-empty context has total >= 1 (the split holding the maximum adds exp2(0) = 1), so the
    # clamp only turns an empty context's 0 / 0 into 0 / 1.
    total = weight.sum(dim=1).clamp_min(1.0)
    return (weight.unsqueeze(-1) * o_part).sum(dim=1) / total.unsqueeze(-1)


def paged_attention_decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Decode attention in PyTorch; returns [B, H, D] in q's dtype.

    SDPA does the math (its CPU and CUDA kernels keep the softmax in fp32 for 16-bit inputs), with
    each kv head's query group as the query rows, so GQA needs no repeated keys.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens, sliding_window=sliding_window)
    batch, n_heads, head_dim = q.shape
    block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    ctx = context_lens.to(device=q.device, dtype=torch.long)
    start = torch.zeros_like(ctx)
    if sliding_window is not None:
        start = (ctx - sliding_window).clamp_min(0)
    # Gather only the table columns some sequence can see (a host sync; free on CPU).
    lo = int(start.min()) // block_size if batch else 0
    hi = max(lo, triton.cdiv(int(ctx.max()), block_size)) if batch else 0
    if hi == lo:  # no sequence has a visible key
        return torch.zeros_like(q)
    table = block_tables[:, lo:hi].to(device=q.device, dtype=torch.long)
    # k, v: [B, H_kv, S, D] views with S = (hi - lo) * block_size
    k = k_cache[table].flatten(1, 2).transpose(1, 2)
    v = v_cache[table].flatten(1, 2).transpose(1, 2)
    pos = torch.arange(lo * block_size, hi * block_size, device=q.device)
    visible = (pos[None, :] >= start[:, None]) & (pos[None, :] < ctx[:, None])  # [B, S]
    qg = q.reshape(batch, n_kv, n_heads // n_kv, head_dim)  # [B, H_kv, G, D]
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=visible[:, None, None, :], scale=scale)
    # Rows with no visible key come out NaN or 0 depending on the SDPA backend; pin them to 0.
    out = torch.where((ctx > 0)[:, None, None, None], out, 0.0)
    return out.reshape(batch, n_heads, head_dim)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Decode attention: the Triton kernel on CUDA or under TRITON_INTERPRET, else the reference."""
    fn = paged_attention_decode if _use_triton(q) else paged_attention_decode_ref
    return fn(
        q, k_cache, v_cache, block_tables, context_lens, scale=scale, sliding_window=sliding_window
    )


def _use_triton(q: torch.Tensor) -> bool:
    """Whether the kernel can run: on a GPU, or on CPU through Triton's interpreter."""
    return q.is_cuda or os.environ.get("TRITON_INTERPRET", "0").lower() in _TRUTHY


def _check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    sliding_window: int | None,
) -> None:
    """Reject shapes the kernels would silently misread (caller bugs, not user input)."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"expected q [B, H, D] and caches [N, block_size, H_kv, D], got q {tuple(q.shape)}, "
            f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    batch, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[2]
    if k_cache.shape[3] != head_dim or n_heads % n_kv != 0:
        raise ValueError(
            f"q heads/dim {n_heads}/{head_dim} do not fit cache kv heads/dim "
            f"{n_kv}/{k_cache.shape[3]}"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or context_lens.shape != (batch,):
        raise ValueError(
            f"expected block_tables [{batch}, max_blocks] and context_lens [{batch}], "
            f"got {tuple(block_tables.shape)} and {tuple(context_lens.shape)}"
        )
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(
            f"q and caches must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous along head_dim")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
