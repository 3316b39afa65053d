"""Multi-LoRA shrink and expand over a batch whose tokens use different adapters (Punica-style).

Adapters sit in stacked slots (see engine/lora.py): `lora_a` [S, r, in] and `lora_b` [S, out, r],
ranks zero-padded to the slot rank r. `indices` [T] holds each token's slot, -1 for none. The
shrink gives h[t] = scale * A[slot_t] @ x[t] ([T, r], fp32), the expand adds B[slot_t] @ h[t] to
y[t] in place; tokens with -1 get h = 0 and leave y untouched. Slots must be below S (the
kernels do not check: that would cost a host sync).

`lora_shrink`, `lora_expand` and the fused `lora_apply` are the Triton kernels; `*_ref` are the
PyTorch references with the same signatures (less the kernels' `num_splits`), gathering each
token's adapter; `add_lora` picks one of the two.

Each program takes a block of consecutive tokens (one sequence's prefill tokens usually share a
slot) and serves its distinct slots one after another with tensor-core dots over the rows of that
slot, so a uniform block costs one pass and a decode block of mixed adapters degrades to one
gathered matrix-vector product per token (BGMV). The shrink may split `in` over programs when the
token blocks alone would leave SMs idle; the expand sums the split partials as it loads h, so
`lora_apply` is two launches and no host sync.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from engine.kernels.splits import choose_num_splits

# Tokens per program: the smallest row count of a tensor-core dot.
_BLOCK_T = 16
# Bytes of one weight tile ([BLOCK_K, BLOCK_R] of A or [BLOCK_R, BLOCK_N] of B). With it, every
# dtype and rank up to 128 compiles for sm_90 without spills (checked with cuobjdump) at 4 warps,
# or 8 for shrinks of rank 32+: at 4 those need 230-255 registers a thread, and spill in fp32.
_TILE_BYTES = 8192
# A split of `in` shorter than this does too little work to pay for its partial row in the expand.
_MIN_SPLIT_K = 256
_TRUTHY = frozenset({"1", "true", "yes", "on"})


@triton.jit
def _next_slot(idx, remaining):
    """The smallest slot among the rows still to serve, and the mask of its rows."""
    slot = tl.min(tl.where(remaining, idx, 2147483647), axis=0)
    return slot, remaining & (idx == slot)


@triton.jit
def _shrink_kernel(
    x_ptr,
    a_ptr,
    h_ptr,
    idx_ptr,
    *,
    num_tokens,
    in_features,
    rank,
    split_k,
    scale,
    stride_xt,
    stride_xk,
    stride_as,
    stride_ar,
    stride_ak,
    stride_hs,
    stride_ht,
    stride_hr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per (token block, split of `in`): h[split, t] = scale * A[slot_t] @ x[t]."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_rows = rows < num_tokens
    idx = tl.load(idx_ptr + rows, mask=in_rows, other=-1).to(tl.int32)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_r = offs_r < rank
    k_lo = split * split_k
    k_hi = tl.minimum(in_features, k_lo + split_k)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xt

    acc = tl.zeros([BLOCK_T, BLOCK_R], tl.float32)  # [BLOCK_T, BLOCK_R]
    remaining = idx >= 0
    while tl.max(remaining.to(tl.int32), axis=0) > 0:
        slot, sel = _next_slot(idx, remaining)
        a_slot = a_ptr + slot.to(tl.int64) * stride_as + offs_r[None, :] * stride_ar
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + offs_k
            mask_k = k < k_hi
            # x: [BLOCK_T, BLOCK_K], only this slot's rows; a: [BLOCK_K, BLOCK_R] = A[slot].T tile
            x_mask = sel[:, None] & mask_k[None, :]
            x = tl.load(x_rows + k[None, :] * stride_xk, mask=x_mask, other=0.0)
            a_mask = mask_k[:, None] & mask_r[None, :]
            a = tl.load(a_slot + k[:, None] * stride_ak, mask=a_mask, other=0.0)
            acc = tl.dot(x, a, acc, input_precision=DOT_PRECISION)
        remaining = remaining & ~sel

    h_ptrs = h_ptr + split * stride_hs + rows[:, None] * stride_ht + offs_r[None, :] * stride_hr
    tl.store(h_ptrs, acc * scale, mask=in_rows[:, None] & mask_r[None, :])


@triton.jit
def _expand_kernel(
    y_ptr,
    h_ptr,
    b_ptr,
    idx_ptr,
    *,
    num_tokens,
    out_features,
    rank,
    num_splits,
    stride_yt,
    stride_yn,
    stride_hs,
    stride_ht,
    stride_hr,
    stride_bs,
    stride_bn,
    stride_br,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per (token block, tile of `out`): y[t] += B[slot_t] @ sum over splits of h."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_rows = rows < num_tokens
    idx = tl.load(idx_ptr + rows, mask=in_rows, other=-1).to(tl.int32)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = offs_r < rank
    mask_n = offs_n < out_features

    # h: [BLOCK_T, BLOCK_R], the shrink's partials summed, then in B's dtype for the dot
    h = tl.zeros([BLOCK_T, BLOCK_R], tl.float32)
    h_ptrs = h_ptr + rows[:, None] * stride_ht + offs_r[None, :] * stride_hr
    for split in range(num_splits):
        h += tl.load(h_ptrs + split * stride_hs, mask=in_rows[:, None] & mask_r[None, :], other=0.0)
    h = h.to(b_ptr.dtype.element_ty)

    acc = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)  # [BLOCK_T, BLOCK_N]
    remaining = idx >= 0
    while tl.max(remaining.to(tl.int32), axis=0) > 0:
        slot, sel = _next_slot(idx, remaining)
        # b: [BLOCK_R, BLOCK_N] = B[slot].T tile
        b_ptrs = b_ptr + slot.to(tl.int64) * stride_bs + offs_r[:, None] * stride_br
        b_mask = mask_r[:, None] & mask_n[None, :]
        b = tl.load(b_ptrs + offs_n[None, :] * stride_bn, mask=b_mask, other=0.0)
        acc = tl.dot(tl.where(sel[:, None], h, 0.0), b, acc, input_precision=DOT_PRECISION)
        remaining = remaining & ~sel

    # Rows without an adapter are neither read nor written.
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_yt + offs_n[None, :] * stride_yn
    mask_y = (idx >= 0)[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=mask_y, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask_y)


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    indices: torch.Tensor,
    *,
    scale: float = 1.0,
    num_splits: int | None = None,
) -> torch.Tensor:
    """h[t] = scale * lora_a[indices[t]] @ x[t] with the Triton kernel; [T, r] fp32, 0 where -1.

    `num_splits` partitions `in` over that many programs per token block (summed afterwards);
    left as None it is chosen from the GPU size and the shapes, never from the values.
    """
    _check_shrink(x, lora_a, indices)
    parts = _shrink_parts(x, lora_a, indices, scale=scale, num_splits=num_splits)
    return parts[0] if parts.shape[0] == 1 else parts.sum(0)


def lora_expand(
    y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """y[t] += lora_b[indices[t]] @ h[t] in place with the Triton kernel (rows with -1 untouched).

    h (any float dtype) is rounded to lora_b's dtype for the product; sums are fp32. Returns y.
    """
    _check_expand(y, lora_b, indices)
    _check_h(h, y, lora_b)
    _launch_expand(y, h.unsqueeze(0), lora_b, indices)
    return y


def lora_apply(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    indices: torch.Tensor,
    *,
    scale: float = 1.0,
    num_splits: int | None = None,
) -> torch.Tensor:
    """y += expand(shrink(x)) in place: two launches, the split partials summed by the expand."""
    _check_apply(y, x, lora_a, lora_b, indices)
    parts = _shrink_parts(x, lora_a, indices, scale=scale, num_splits=num_splits)
    _launch_expand(y, parts, lora_b, indices)
    return y


def _shrink_parts(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    indices: torch.Tensor,
    *,
    scale: float,
    num_splits: int | None,
) -> torch.Tensor:
    """Run the shrink kernel; returns the fp32 partial sums [splits, T, r]."""
    tokens, in_features = x.shape
    rank = lora_a.shape[1]
    block_r = _block_r(rank)
    blocks = triton.cdiv(tokens, _BLOCK_T)
    splits = num_splits or choose_num_splits(x.device, blocks, in_features, _MIN_SPLIT_K)
    block_k = _block(triton.cdiv(in_features, splits), block_r, x.element_size(), high=256)
    split_k = triton.cdiv(triton.cdiv(in_features, splits), block_k) * block_k
    splits = triton.cdiv(in_features, split_k)  # rounding split_k up may leave fewer splits
    parts = torch.empty((splits, tokens, rank), dtype=torch.float32, device=x.device)
    if tokens == 0:
        return parts
    _shrink_kernel[(blocks, splits)](
        x,
        lora_a,
        parts,
        indices,
        num_tokens=tokens,
        in_features=in_features,
        rank=rank,
        split_k=split_k,
        scale=scale,
        stride_xt=x.stride(0),
        stride_xk=x.stride(1),
        stride_as=lora_a.stride(0),
        stride_ar=lora_a.stride(1),
        stride_ak=lora_a.stride(2),
        stride_hs=parts.stride(0),
        stride_ht=parts.stride(1),
        stride_hr=parts.stride(2),
        BLOCK_T=_BLOCK_T,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        DOT_PRECISION=_dot_precision(x.dtype),
        num_warps=8 if block_r >= 32 else 4,
    )
    return parts


def _launch_expand(
    y: torch.Tensor, parts: torch.Tensor, lora_b: torch.Tensor, indices: torch.Tensor
) -> None:
    """Run the expand kernel over h given as [splits, T, r] partials."""
    tokens, out_features = y.shape
    rank = lora_b.shape[2]
    if tokens == 0:
        return
    block_r = _block_r(rank)
    block_n = _block(out_features, block_r, y.element_size(), high=128)
    grid = (triton.cdiv(tokens, _BLOCK_T), triton.cdiv(out_features, block_n))
    _expand_kernel[grid](
        y,
        parts,
        lora_b,
        indices,
        num_tokens=tokens,
        out_features=out_features,
        rank=rank,
        num_splits=parts.shape[0],
        stride_yt=y.stride(0),
        stride_yn=y.stride(1),
        stride_hs=parts.stride(0),
        stride_ht=parts.stride(1),
        stride_hr=parts.stride(2),
        stride_bs=lora_b.stride(0),
        stride_bn=lora_b.stride(1),
        stride_br=lora_b.stride(2),
        BLOCK_T=_BLOCK_T,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(lora_b.dtype),
        num_warps=4,
    )


def _block_r(rank: int) -> int:
    """The rank padded to a power of two, at least 16 (the smallest tensor-core dot side)."""
    return max(16, triton.next_power_of_2(rank))


def _block(size: int, block_r: int, itemsize: int, *, high: int) -> int:
    """A tile side along `in` or `out`: a fixed weight-tile budget, not past the padded size."""
    budget = max(16, min(high, _TILE_BYTES // (itemsize * block_r)))
    return max(16, min(budget, triton.next_power_of_2(size)))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 must not round to tf32; 16-bit inputs ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def lora_shrink_ref(
    x: torch.Tensor, lora_a: torch.Tensor, indices: torch.Tensor, *, scale: float = 1.0
) -> torch.Tensor:
    """h[t] = scale * lora_a[indices[t]] @ x[t] in PyTorch; [T, r] fp32, 0 where -1."""
    _check_shrink(x, lora_a, indices)
    idx = indices.to(device=x.device, dtype=torch.long)
    a = lora_a[idx.clamp(min=0)].float()  # [T, r, in]
    h = torch.bmm(a, x.float().unsqueeze(2)).squeeze(2) * scale  # [T, r]
    return torch.where((idx >= 0)[:, None], h, 0.0)


def lora_expand_ref(
    y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """y[t] += lora_b[indices[t]] @ h[t] in place in PyTorch (rows with -1 untouched); returns y."""
    _check_expand(y, lora_b, indices)
    _check_h(h, y, lora_b)
    idx = indices.to(device=y.device, dtype=torch.long)
    b = lora_b[idx.clamp(min=0)].float()  # [T, out, r]
    # h rounded to B's dtype, as the kernel's tensor-core dot sees it
    delta = torch.bmm(b, h.to(lora_b.dtype).float().unsqueeze(2)).squeeze(2)  # [T, out]
    y.copy_(torch.where((idx >= 0)[:, None], (y.float() + delta).to(y.dtype), y))
    return y


def lora_apply_ref(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    indices: torch.Tensor,
    *,
    scale: float = 1.0,
) -> torch.Tensor:
    """y += expand(shrink(x)) in place in PyTorch; returns y."""
    _check_apply(y, x, lora_a, lora_b, indices)
    return lora_expand_ref(y, lora_shrink_ref(x, lora_a, indices, scale=scale), lora_b, indices)


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    indices: torch.Tensor,
    *,
    scale: float = 1.0,
) -> torch.Tensor:
    """y += B[slot] @ A[slot] @ x per token: the kernels on CUDA or under TRITON_INTERPRET."""
    fn = lora_apply if _use_triton(x) else lora_apply_ref
    return fn(y, x, lora_a, lora_b, indices, scale=scale)


def _use_triton(x: torch.Tensor) -> bool:
    """Whether the kernels can run: on a GPU, or on CPU through Triton's interpreter."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET", "0").lower() in _TRUTHY


def _check_shrink(x: torch.Tensor, lora_a: torch.Tensor, indices: torch.Tensor) -> None:
    """Reject shapes the shrink would silently misread (caller bugs, not user input)."""
    if x.dim() != 2 or lora_a.dim() != 3 or lora_a.shape[2] != x.shape[1]:
        raise ValueError(
            f"expected x [T, in] and lora_a [S, r, in], got {tuple(x.shape)} and "
            f"{tuple(lora_a.shape)}"
        )
    if x.dtype != lora_a.dtype:
        raise ValueError(f"x and lora_a must share a dtype, got {x.dtype} and {lora_a.dtype}")
    _check_indices(indices, x)


def _check_expand(y: torch.Tensor, lora_b: torch.Tensor, indices: torch.Tensor) -> None:
    """Reject shapes the expand would silently misread (caller bugs, not user input)."""
    if y.dim() != 2 or lora_b.dim() != 3 or lora_b.shape[1] != y.shape[1]:
        raise ValueError(
            f"expected y [T, out] and lora_b [S, out, r], got {tuple(y.shape)} and "
            f"{tuple(lora_b.shape)}"
        )
    if y.dtype != lora_b.dtype:
        raise ValueError(f"y and lora_b must share a dtype, got {y.dtype} and {lora_b.dtype}")
    _check_indices(indices, y)


def _check_h(h: torch.Tensor, y: torch.Tensor, lora_b: torch.Tensor) -> None:
    if h.shape != (y.shape[0], lora_b.shape[2]) or h.device != y.device:
        raise ValueError(
            f"expected h [{y.shape[0]}, {lora_b.shape[2]}] on {y.device}, got "
            f"{tuple(h.shape)} on {h.device}"
        )


def _check_apply(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    indices: torch.Tensor,
) -> None:
    _check_shrink(x, lora_a, indices)
    _check_expand(y, lora_b, indices)
    if lora_a.shape[:2] != lora_b.shape[::2]:
        raise ValueError(
            f"lora_a [S, r, in] {tuple(lora_a.shape)} and lora_b [S, out, r] "
            f"{tuple(lora_b.shape)} disagree on S or r"
        )


def _check_indices(indices: torch.Tensor, rows: torch.Tensor) -> None:
    if indices.shape != (rows.shape[0],) or indices.dtype.is_floating_point:
        raise ValueError(
            f"expected integer indices [{rows.shape[0]}], got {indices.dtype} "
            f"{tuple(indices.shape)}"
        )
    if indices.device != rows.device:
        raise ValueError(f"indices are on {indices.device}, the tensors on {rows.device}")
