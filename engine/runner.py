"""Turns a scheduled batch into tensors, runs the model over the paged cache, returns logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from engine.kv_cache import KVCache
from engine.lora import LoRAState
from engine.model import AttentionMetadata, AttnMode, Transformer
from engine.scheduler import ScheduledBatch


@dataclass
class StepInput:
    """Flattened tokens of one step and where their results go."""

    input_ids: Tensor  # [T]
    positions: Tensor  # [T]
    meta: AttentionMetadata
    # [N] rows of T whose logits are sampled: the last new token of a sequence, and before it
    # one row per speculative token it verifies
    sample_rows: Tensor
    sample_mask: list[bool]  # per batch item: does it sample a token this step


class ModelRunner:
    """Owns a model and its KV cache; executes one step at a time."""

    def __init__(
        self, model: Transformer, cache: KVCache, device: torch.device, lora: LoRAState
    ) -> None:
        self.model, self.cache, self.device, self.lora = model, cache, device, lora
        self.block_size = cache.block_size
        self.sliding_window = model.args.sliding_window
        # The Triton kernel serves decode on GPU; on CPU one padded SDPA handles every batch.
        # A quantized cache (engine/kv_cache.py QuantizedKV) is read dequantized by SDPA.
        self.use_decode_kernel = device.type == "cuda" and isinstance(cache.layers[0][0], Tensor)
        self.dtype = cache.layers[0][0].dtype

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[Tensor, list[bool]]:
        """Run the model on the batch: logits [N, vocab] for the sequences that sample."""
        step = self.prepare(batch)
        hidden = self.model(step.input_ids, step.positions, step.meta, self.cache.layers)
        return self.model.compute_logits(hidden[step.sample_rows]), step.sample_mask

    def prepare(self, batch: ScheduledBatch) -> StepInput:
        """Build the step's token, position, slot and block-table tensors."""
        ids, positions, slots, qlens, starts, tables, sample_mask = [], [], [], [], [], [], []
        lora_slots, sample_counts = [], []
        bs = self.block_size
        for seq, n in batch.items:
            lora_slots.extend([seq.lora_slot] * n)
            start = seq.num_computed
            ids.extend(seq.token_ids[start : start + n])
            if seq.draft_ids:  # speculative tokens to verify follow the last real token
                ids.extend(seq.draft_ids)
            pos = range(start, start + n)
            positions.extend(pos)
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in pos)
            qlens.append(n)
            starts.append(start)
            tables.append(seq.block_table)
            sample_mask.append(start + n == seq.num_tokens + len(seq.draft_ids))
            sample_counts.append(1 + len(seq.draft_ids))
        self.lora.set(lora_slots, self.device)
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        query_lens = torch.tensor(qlens)
        ends = torch.cumsum(query_lens, 0)
        meta = self._step_metadata(
            query_lens, torch.tensor(starts) + query_lens, table, torch.tensor(slots)
        )
        rows = _sample_rows(ends, sample_mask, sample_counts)
        return StepInput(
            input_ids=torch.tensor(ids, device=self.device),
            positions=torch.tensor(positions, device=self.device),
            meta=meta,
            sample_rows=rows.to(self.device),
            sample_mask=sample_mask,
        )

    def _step_metadata(self, qlens: Tensor, ctx: Tensor, table: Tensor, slots: Tensor):
        """One metadata for the step, split into decode and prefill groups when they mix."""
        ends = torch.cumsum(qlens, 0)
        decode = qlens == 1
        if bool(decode.all()) or not bool(decode.any()):
            return self._metadata(qlens, ctx, ends, table, slots)
        meta = self._metadata(qlens[:1], ctx[:1], qlens[:1], table[:1], slots)
        meta.parts = [self._part(g, qlens, ctx, (ends, table, slots)) for g in (decode, ~decode)]
        return meta

    def _part(self, group: Tensor, qlens: Tensor, ctx: Tensor, step: tuple[Tensor, ...]):
        """(token rows, metadata) of the sequences selected by `group`."""
        ends, table, slots = step
        g_qlens, g_ctx = qlens[group], ctx[group]
        rows = torch.cat(
            [torch.arange(e - n, e) for e, n in zip(ends[group], g_qlens, strict=True)]
        )
        width = -(-int(g_ctx.max()) // self.block_size)
        g_table = table[group][:, :width]
        meta = self._metadata(g_qlens, g_ctx, torch.cumsum(g_qlens, 0), g_table, slots[rows])
        return rows.to(self.device), meta

    def _metadata(self, qlens: Tensor, ctx: Tensor, ends: Tensor, table: Tensor, slots: Tensor):
        b, q, k = len(qlens), int(qlens.max()), int(ctx.max())
        col = torch.arange(q)
        valid = col[None, :] < qlens[:, None]  # [B, Q]
        query_index = torch.where(valid, (ends - qlens)[:, None] + col[None, :], 0)
        flat_index = (torch.arange(b)[:, None] * q + col[None, :])[valid]
        mode, mask = self._mode(b, q, k), None
        if mode is AttnMode.GATHER and self._needs_mask(b, q, k):
            mask = self._mask(qlens, ctx, valid, k)
        dev = self.device
        return AttentionMetadata(
            mode=mode,
            slot_mapping=slots.to(dev),
            block_tables=table.to(dev),
            flat_blocks=table.flatten().long().to(dev),
            context_lens=ctx.int().to(dev),
            query_index=query_index.to(dev),
            flat_index=flat_index.to(dev),
            attn_mask=None if mask is None else mask.to(dev),
            max_context=k,
        )

    def _mode(self, b: int, q: int, k: int) -> AttnMode:
        if b == 1 and q == k and self._window_covers(k):
            return AttnMode.FRESH
        if q == 1 and self.use_decode_kernel:
            return AttnMode.KERNEL
        return AttnMode.GATHER

    def _needs_mask(self, b: int, q: int, k: int) -> bool:
        # One sequence decoding one token sees its whole context: nothing to mask.
        return not (b == 1 and q == 1 and self._window_covers(k))

    def _window_covers(self, k: int) -> bool:
        return self.sliding_window is None or k <= self.sliding_window

    def _mask(self, qlens: Tensor, ctx: Tensor, valid: Tensor, k: int) -> Tensor:
        """Additive [B, 1, Q, K]: causal over each sequence's context (and window); pads see key 0."""
        qpos = (ctx - qlens)[:, None] + torch.arange(valid.shape[1])[None, :]  # [B, Q]
        kpos = torch.arange(k)
        allowed = kpos[None, None, :] <= qpos[:, :, None]
        if self.sliding_window is not None:
            allowed &= kpos[None, None, :] > qpos[:, :, None] - self.sliding_window
        allowed &= valid[:, :, None]
        allowed[:, :, 0] |= ~valid  # an all-masked row would make softmax NaN
        mask = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill_(~allowed, float("-inf"))
        return mask[:, None]

    @torch.inference_mode()
    def logits_standalone(self, token_ids: list[int], lora_slot: int = -1) -> Tensor:
        """Logits for every position of one sequence, in a private cache (pool untouched)."""
        from engine.scheduler import Sequence

        n = len(token_ids)
        nblocks = -(-n // self.block_size)
        args = self.model.args
        private = KVCache(args, nblocks, self.block_size, self.dtype, self.device)
        seq = Sequence("logits", list(token_ids), n, n, block_table=list(range(nblocks)))
        seq.lora_slot = lora_slot
        step = self.prepare(ScheduledBatch([(seq, n)], []))
        hidden = self.model(step.input_ids, step.positions, step.meta, private.layers)
        return self.model.compute_logits(hidden)


def _sample_rows(ends: Tensor, sample_mask: list[bool], counts: list[int]) -> Tensor:
    """Rows of T to compute logits for, in batch order."""
    if all(c == 1 for c in counts):
        return (ends - 1)[torch.tensor(sample_mask, dtype=torch.bool)]
    rows = []
    for end, sampled, count in zip(ends.tolist(), sample_mask, counts, strict=True):
        if sampled:
            rows.extend(range(end - count, end))
    return torch.tensor(rows, dtype=torch.long)
