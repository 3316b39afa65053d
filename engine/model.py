"""Llama-family decoder (Llama, Qwen2, Mistral) over a paged KV cache, in gpt-fast's shape.

Parameter names mirror Hugging Face (`model.layers.N.self_attn.q_proj`, ...) so a checkpoint's
state dict loads as it is and PEFT adapters name the same modules.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.config import ModelArgs
from engine.kv_cache import write_kv


class AttnMode(enum.Enum):
    """Which attention path a step takes (chosen once per step by the runner)."""

    FRESH = "fresh"  # one sequence, empty cache: causal attention over the new tokens alone
    GATHER = "gather"  # read contexts through block tables; mask only when shapes need one
    KERNEL = "kernel"  # decode-only batch on GPU: the Triton paged-attention kernel


@dataclass
class AttentionMetadata:
    """How the flattened new tokens of one step map onto sequences and KV-cache slots.

    T new tokens in total, B sequences, Q = most new tokens of any sequence, K = longest context.
    """

    mode: AttnMode
    slot_mapping: Tensor  # [T] int64: cache slot (block * block_size + offset) of each new token
    block_tables: Tensor  # [B, max_blocks] int32
    flat_blocks: Tensor  # [B * max_blocks] int64: block_tables flattened, for index_select
    context_lens: Tensor  # [B] int32: tokens in the cache after this step
    query_index: Tensor  # [B, Q] int64: row of each sequence's i-th new token in T (0 if padded)
    flat_index: Tensor  # [T] int64: position of each new token in the padded [B * Q] layout
    attn_mask: Tensor | None  # [B, 1, Q, K] additive (0 / -inf) in the model dtype, or None
    max_context: int  # K
    # Mixed prefill/decode steps attend per group (rows of T, the group's own metadata), so
    # decode rows are not padded to the longest prefill chunk.
    parts: list[tuple[Tensor, AttentionMetadata]] = field(default_factory=list)


class TransposedLinear(nn.Module):
    """`nn.Linear` with its weight stored as [in, out]: `x @ W^T` becomes a plain GEMM, which
    CPU BLAS runs 1.3-2x faster than `F.linear` at decode shapes on our machines."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = linear.bias

    @property
    def weight(self) -> Tensor:
        """The weight in `nn.Linear`'s [out, in] layout (a view)."""
        return self.weight_t.t()

    def forward(self, x: Tensor) -> Tensor:
        if self.bias is None:
            return x @ self.weight_t
        return torch.addmm(self.bias, x.reshape(-1, self.in_features), self.weight_t).view(
            *x.shape[:-1], self.out_features
        )


def transpose_linears(model: nn.Module) -> None:
    """Swap every `nn.Linear` of a loaded model for a `TransposedLinear` (CPU inference)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, TransposedLinear(child))


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 as Hugging Face does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(args: ModelArgs) -> Tensor:
    """Inverse RoPE frequencies [head_dim / 2], with llama3 or linear scaling applied."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / float(scaling["factor"])
    return _llama3_inv_freq(inv_freq, scaling)


def _llama3_inv_freq(inv_freq: Tensor, scaling: dict) -> Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between smoothed.
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_table(args: ModelArgs, max_len: int, device: torch.device | str) -> Tensor:
    """cos/sin table [max_len, 2, head_dim] in float32, indexed by position."""
    inv_freq = rope_inv_freq(args).to(device)
    freqs = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return torch.stack((emb.cos(), emb.sin()), dim=1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE (the Hugging Face Llama convention). x: [T, H, D], cos/sin: [T, 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Grouped-query attention that writes new K/V into the paged cache and reads it back."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.scale = self.head_dim**-0.5
        self.sliding_window = args.sliding_window
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(args.dim, q_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, kv_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, kv_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(q_dim, args.dim, bias=False)

    def forward(
        self, x: Tensor, rope: Tensor, meta: AttentionMetadata, kv_cache: tuple[Tensor, Tensor]
    ) -> Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.n_heads, self.head_dim)  # q: [T, H, D]
        k = self.k_proj(x).view(t, self.n_kv_heads, self.head_dim)  # k: [T, H_kv, D]
        v = self.v_proj(x).view(t, self.n_kv_heads, self.head_dim)
        cos, sin = rope[:, 0:1].to(q.dtype), rope[:, 1:2].to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_cache, v_cache = kv_cache  # [num_blocks, block_size, H_kv, D]
        write_kv(k_cache, meta.slot_mapping, k)
        write_kv(v_cache, meta.slot_mapping, v)
        out = self._attend(q, (k, v), (k_cache, v_cache), meta)
        return self.o_proj(out.reshape(t, -1))

    def _attend(self, q: Tensor, kv: tuple[Tensor, Tensor], cache, meta) -> Tensor:
        """Attention of the new tokens q [T, H, D] -> [T, H, D]."""
        if meta.parts:
            out = torch.empty_like(q)
            for rows, part in meta.parts:
                sub_kv = (kv[0].index_select(0, rows), kv[1].index_select(0, rows))
                out.index_copy_(0, rows, self._attend(q.index_select(0, rows), sub_kv, cache, part))
            return out
        if meta.mode is AttnMode.FRESH:
            return self._attend_fresh(q, *kv)
        if meta.mode is AttnMode.KERNEL:
            return self._decode_kernel(q, *cache, meta)
        return self._attend_gathered(q, *cache, meta)

    def _attend_fresh(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),  # [H, T, D]
            k.transpose(0, 1),
            v.transpose(0, 1),
            is_causal=True,
            scale=self.scale,
            enable_gqa=self.n_heads != self.n_kv_heads,
        )
        return out.transpose(0, 1)  # [T, H, D]

    def _decode_kernel(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, meta) -> Tensor:
        from engine.kernels.paged_attention import paged_attention

        return paged_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.context_lens,
            scale=self.scale,
            sliding_window=self.sliding_window,
        )

    def _attend_gathered(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, meta) -> Tensor:
        b, qn = meta.query_index.shape
        if qn == 1:  # decode: token i is sequence i, no padding to add or remove
            q = q.unsqueeze(2)  # q: [B, H, 1, D]
        else:
            q = q.index_select(0, meta.query_index.flatten()).view(b, qn, self.n_heads, -1)
            q = q.transpose(1, 2)  # q: [B, H, Q, D]
        k = _gather_context(k_cache, meta)  # k: [B, H_kv, K, D]
        v = _gather_context(v_cache, meta)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=meta.attn_mask,
            scale=self.scale,
            enable_gqa=self.n_heads != self.n_kv_heads,
        )  # out: [B, H, Q, D]
        out = out.transpose(1, 2).reshape(b * qn, self.n_heads, self.head_dim)
        return out if qn == 1 else out.index_select(0, meta.flat_index)  # [T, H, D]


def _gather_context(cache: Tensor, meta: AttentionMetadata) -> Tensor:
    """Read each sequence's first K cached tokens through its block table: [B, H_kv, K, D]."""
    # index_select, not advanced indexing: the latter is 100x slower on CPU here.
    b, nb = meta.block_tables.shape
    _, bs, h, d = cache.shape
    blocks = cache.index_select(0, meta.flat_blocks)  # [B * max_blocks, block_size, H_kv, D]
    return blocks.view(b, nb * bs, h, d)[:, : meta.max_context].transpose(1, 2)


class FeedForward(nn.Module):
    """SwiGLU MLP."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    """Pre-norm decoder layer."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = FeedForward(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, rope: Tensor, meta: AttentionMetadata, kv_cache) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), rope, meta, kv_cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    """Embeddings, layers and final norm (Hugging Face's `model.` prefix)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)


class Transformer(nn.Module):
    """A causal LM: `forward` returns hidden states, `compute_logits` projects chosen rows."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = DecoderModel(args)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("rope", torch.empty(0), persistent=False)

    def setup_rope(self, max_len: int) -> None:
        """Precompute the cos/sin table for positions [0, max_len)."""
        self.rope = rope_table(self.args, max_len, self.lm_head.weight.device)

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        meta: AttentionMetadata,
        kv_caches: list[tuple[Tensor, Tensor]],
    ) -> Tensor:
        """input_ids, positions: [T] -> hidden states [T, dim]."""
        x = self.model.embed_tokens(input_ids)
        rope = self.rope.index_select(0, positions)  # [T, 2, D]
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x = layer(x, rope, meta, kv_cache)
        return self.model.norm(x)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden: [N, dim] -> logits [N, vocab] in float32."""
        return self.lm_head(hidden).float()
