"""Weight-only quantized GEMMs for decode shapes: y = x @ W^T with W stored as int8 (W8A16) or as
grouped 4-bit values (W4A16), dequantized tile by tile in registers (GemLite / gpt-fast style).

Layouts are the canonical ones of engine/quantize.py: int8 `qweight` [N, K] with float `scales`
[N]; int4 `qweight` uint8 [N, K/2] (even k in the low nibble) with `scales` and `zeros` [N, K/g]
and w = (q - 8) * scale + zero. x is [M, K] with M small (decode); y is [M, N] in x's dtype.

Decode GEMMs read the weights once and are bound by memory bandwidth, and their N/BLOCK_N
programs often leave SMs idle: the reduction over K is split over programs (split-K, the count
from engine/kernels/splits.py) into fp32 partials [S, M, N] that one sum reduces.

`w8a16_gemm` / `w4a16_gemm` are the Triton kernels; `*_ref` are the PyTorch references.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.splits import choose_num_splits

_BLOCK_M = 16  # the smallest row count of a tensor-core dot; decode batches are padded to it
_BLOCK_N = 64
_BLOCK_K = 64
_MIN_SPLIT_K = 512  # a split shorter than this does too little to pay for its partial row


# -- references ----------------------------------------------------------------------------------


def w8a16_gemm_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (qweight [N, K] * scales [N, 1])^T in fp32, returned in x's dtype."""
    w = qweight.float() * scales.float()[:, None]
    return (x.float() @ w.t()).to(x.dtype)


def w4a16_gemm_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> torch.Tensor:
    """x [M, K] @ dequantized int4 W^T in fp32, returned in x's dtype."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    q = torch.stack((qweight & 0x0F, qweight >> 4), dim=-1).reshape(n, k).float()
    groups = scales.shape[1]
    q = q.view(n, groups, k // groups)
    w = ((q - 8) * scales.float()[..., None] + zeros.float()[..., None]).reshape(n, k)
    return (x.float() @ w.t()).to(x.dtype)


# -- kernels -------------------------------------------------------------------------------------


@triton.jit
def _w8a16_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    part_ptr,
    *,
    m,
    n,
    k,
    k_per_split,
    stride_xm,
    stride_wn,
    stride_ps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per (block of N, split of K): partial[split] = x[:, ks] @ (q * s)[:, ks]^T."""
    pid_n, split = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, k)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < k_end
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=(offs_m[:, None] < m) & in_k[None, :],
            other=0.0,
        )
        q = tl.load(
            w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None],
            mask=in_k[:, None] & (offs_n[None, :] < n),
            other=0,
        )  # q: [BLOCK_K, BLOCK_N]
        acc += tl.dot(x, q.to(x.dtype), input_precision=DOT_PRECISION)
    scale = tl.load(s_ptr + offs_n, mask=offs_n < n, other=0.0).to(tl.float32)
    acc = acc * scale[None, :]
    out = part_ptr + split * stride_ps + offs_m[:, None] * n + offs_n[None, :]
    tl.store(out, acc, mask=(offs_m[:, None] < m) & (offs_n[None, :] < n))


@triton.jit
def _w4a16_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    part_ptr,
    *,
    m,
    n,
    k,
    k_per_split,
    group_size,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_ps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Like `_w8a16_kernel`, dequantizing 4-bit tiles: w = (q - 8) * scale[g] + zero[g]."""
    pid_n, split = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, k)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < k_end
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=(offs_m[:, None] < m) & in_k[None, :],
            other=0.0,
        )
        tile_mask = in_k[:, None] & in_n[None, :]
        packed = tl.load(
            w_ptr + offs_n[None, :] * stride_wn + (offs_k // 2)[:, None], mask=tile_mask, other=0
        ).to(tl.int32)  # [BLOCK_K, BLOCK_N], each byte read for its two k
        q = (packed >> ((offs_k % 2) * 4)[:, None]) & 0x0F
        g = (offs_k // group_size)[:, None]
        scale = tl.load(s_ptr + offs_n[None, :] * stride_sn + g, mask=tile_mask, other=0.0)
        zero = tl.load(z_ptr + offs_n[None, :] * stride_sn + g, mask=tile_mask, other=0.0)
        w = (q.to(tl.float32) - 8.0) * scale.to(tl.float32) + zero.to(tl.float32)
        acc += tl.dot(x, w.to(x.dtype), input_precision=DOT_PRECISION)
    out = part_ptr + split * stride_ps + offs_m[:, None] * n + offs_n[None, :]
    tl.store(out, acc, mask=(offs_m[:, None] < m) & in_n[None, :])


# -- launchers -----------------------------------------------------------------------------------


def _plan(x: torch.Tensor, n: int, k: int, num_splits: int | None) -> tuple[int, int, int]:
    """(programs over N, splits, K per split): split K only when N alone leaves SMs idle;
    a split's K is a multiple of BLOCK_K so the 4-bit groups and tiles stay aligned."""
    programs = triton.cdiv(n, _BLOCK_N)
    splits = num_splits or choose_num_splits(x.device, programs, k, _MIN_SPLIT_K)
    k_per_split = triton.cdiv(triton.cdiv(k, splits), _BLOCK_K) * _BLOCK_K
    return programs, triton.cdiv(k, k_per_split), k_per_split


def _check(x: torch.Tensor, k: int) -> None:
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {tuple(x.shape)}")
    if x.shape[0] > _BLOCK_M:
        raise ValueError(f"decode GEMMs take at most {_BLOCK_M} rows, got {x.shape[0]}")


def _precision(x: torch.Tensor) -> str:
    # fp32 activations must not be rounded to tf32: the tests compare with fp32 references.
    return "ieee" if x.dtype == torch.float32 else "tf32"


def w8a16_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """x [M <= 16, K] @ (int8 qweight [N, K] * scales [N])^T -> [M, N] in x's dtype."""
    n, k = qweight.shape
    _check(x, k)
    x = x.contiguous()
    programs, splits, k_per_split = _plan(x, n, k, num_splits)
    partial = torch.empty(splits, x.shape[0], n, dtype=torch.float32, device=x.device)
    _w8a16_kernel[(programs, splits)](
        x,
        qweight,
        scales,
        partial,
        m=x.shape[0],
        n=n,
        k=k,
        k_per_split=k_per_split,
        stride_xm=x.stride(0),
        stride_wn=qweight.stride(0),
        stride_ps=partial.stride(0),
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        BLOCK_K=_BLOCK_K,
        DOT_PRECISION=_precision(x),
    )
    return partial.sum(0).to(x.dtype) if splits > 1 else partial[0].to(x.dtype)


def w4a16_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """x [M <= 16, K] @ dequantized 4-bit W^T (groups along K) -> [M, N] in x's dtype."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    _check(x, k)
    group_size = k // scales.shape[1]
    x, scales, zeros = x.contiguous(), scales.contiguous(), zeros.contiguous()
    programs, splits, k_per_split = _plan(x, n, k, num_splits)
    partial = torch.empty(splits, x.shape[0], n, dtype=torch.float32, device=x.device)
    _w4a16_kernel[(programs, splits)](
        x,
        qweight,
        scales,
        zeros,
        partial,
        m=x.shape[0],
        n=n,
        k=k,
        k_per_split=k_per_split,
        group_size=group_size,
        stride_xm=x.stride(0),
        stride_wn=qweight.stride(0),
        stride_sn=scales.stride(0),
        stride_ps=partial.stride(0),
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        BLOCK_K=_BLOCK_K,
        DOT_PRECISION=_precision(x),
    )
    return partial.sum(0).to(x.dtype) if splits > 1 else partial[0].to(x.dtype)
