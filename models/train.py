"""Pretraining for the demo zoo: our engine's model code, a batched causal forward, packed data.

The engine's `Transformer.forward` runs over a paged KV cache; training needs a plain batched
causal pass instead. `forward_train` runs the same modules (so the trained state dict is the
Hugging Face-named checkpoint the engine loads) over packed rows: several examples per row, each
attending only to itself (block-diagonal causal mask) with positions restarting at 0.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from engine.config import ModelArgs
from engine.model import Transformer, apply_rope, rope_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arch:
    """Model size: what config.json needs beyond the tokenizer."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    max_position: int = 1024
    tie_word_embeddings: bool = True


def model_args(arch: Arch, vocab_size: int) -> ModelArgs:
    """The engine's ModelArgs for an architecture."""
    return ModelArgs(
        architecture="LlamaForCausalLM",
        vocab_size=vocab_size,
        dim=arch.dim,
        n_layers=arch.n_layers,
        n_heads=arch.n_heads,
        n_kv_heads=arch.n_kv_heads,
        head_dim=arch.dim // arch.n_heads,
        intermediate_size=arch.intermediate_size,
        norm_eps=1e-5,
        max_position_embeddings=arch.max_position,
        tie_word_embeddings=arch.tie_word_embeddings,
    )


def new_model(args: ModelArgs, seed: int) -> Transformer:
    """A freshly initialised model (GPT-2 style: N(0, 0.02), residual outputs scaled down)."""
    torch.manual_seed(seed)
    model = Transformer(args)
    out_std = 0.02 / math.sqrt(2 * args.n_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, out_std)
            else:
                p.normal_(0.0, 0.02)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def forward_train(model: Transformer, ids: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
    """Hidden states [B, S, dim] of a batched causal pass; mask: [B, 1, S, S] bool (True: attend)."""
    b, s = ids.shape
    args = model.args
    table = rope_table(args, int(positions.max()) + 1, ids.device)[positions]  # [B, S, 2, D]
    x = model.model.embed_tokens(ids)
    for layer in model.model.layers:
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(b, s, attn.n_heads, attn.head_dim)  # q: [B, S, H, D]
        k = attn.k_proj(h).view(b, s, attn.n_kv_heads, attn.head_dim)
        v = attn.v_proj(h).view(b, s, attn.n_kv_heads, attn.head_dim)
        cos, sin = table[:, :, 0:1].to(q.dtype), table[:, :, 1:2].to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            scale=attn.scale,
            enable_gqa=attn.n_heads != attn.n_kv_heads,
        )  # out: [B, H, S, D]
        x = x + attn.o_proj(out.transpose(1, 2).reshape(b, s, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.model.norm(x)


# -- data -----------------------------------------------------------------------------------


@dataclass
class Doc:
    """One tokenised example: ids and a per-token loss weight for predicting the NEXT token."""

    ids: list[int]
    weights: list[float]


@dataclass
class Batch:
    """Packed rows: ids/positions [B, S], mask [B, 1, S, S], targets and weights [B, S]."""

    ids: Tensor
    positions: Tensor
    mask: Tensor
    targets: Tensor
    weights: Tensor

    @property
    def tokens(self) -> int:
        """Tokens in the batch (padding excluded)."""
        return int((self.positions >= 0).sum())


def pack(docs: Sequence[Doc], seq_len: int) -> list[list[Doc]]:
    """First-fit packing of docs (in the given order) into rows of at most seq_len tokens."""
    rows: list[list[Doc]] = []
    free: list[int] = []
    for doc in docs:
        n = min(len(doc.ids), seq_len)
        # Only the last few rows are open: packing stays linear in the number of docs.
        for i in range(max(0, len(rows) - 8), len(rows)):
            if free[i] >= n:
                rows[i].append(doc)
                free[i] -= n
                break
        else:
            rows.append([doc])
            free.append(seq_len - n)
    return rows


def collate(rows: Sequence[Sequence[Doc]], seq_len: int) -> Batch:
    """Tensors for packed rows; padding has position -1 and weight 0."""
    b = len(rows)
    ids = torch.zeros(b, seq_len, dtype=torch.long)
    targets = torch.zeros(b, seq_len, dtype=torch.long)
    weights = torch.zeros(b, seq_len)
    positions = torch.full((b, seq_len), -1, dtype=torch.long)
    doc_id = torch.full((b, seq_len), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for d, doc in enumerate(row):
            n = min(len(doc.ids), seq_len - at)
            ids[r, at : at + n] = torch.tensor(doc.ids[:n])
            targets[r, at : at + n - 1] = torch.tensor(doc.ids[1:n])
            weights[r, at : at + n - 1] = torch.tensor(doc.weights[: n - 1])
            positions[r, at : at + n] = torch.arange(n)
            doc_id[r, at : at + n] = d
            at += n
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    same = (doc_id[:, :, None] == doc_id[:, None, :]) & (doc_id[:, :, None] >= 0)
    mask = (same & causal) | torch.eye(seq_len, dtype=torch.bool)  # padding attends to itself
    return Batch(ids, positions.clamp(min=0), mask[:, None], targets, weights)


def batches(
    docs: Sequence[Doc], *, seq_len: int, rows: int, seed: int, start: int = 0
) -> Iterator[Batch]:
    """Endless packed batches: each epoch shuffles the docs with (seed, epoch); skips `start`."""
    epoch, served = 0, 0
    while True:
        order = list(docs)
        random.Random(f"{seed}:{epoch}").shuffle(order)
        packed = pack(order, seq_len)
        for i in range(0, len(packed), rows):  # the last batch of an epoch may be smaller
            if served >= start:
                yield collate(packed[i : i + rows], seq_len)
            served += 1
        epoch += 1


# -- the loop -------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Optimisation settings of one training run."""

    steps: int
    lr: float
    seq_len: int = 512
    rows: int = 16
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    seed: int = 0
    checkpoint_every: int = 50
    # "auto" (measure, see bf16_is_faster), "float32" or "bf16"; the default comes from
    # COMPOUND_TRAIN_PRECISION (set by `python -m models.build --precision`, inherited by workers)
    precision: str = field(default_factory=lambda: os.environ.get(PRECISION_ENV, "auto"))
    extra: dict = field(default_factory=dict)


PRECISION_ENV = "COMPOUND_TRAIN_PRECISION"
PRECISIONS = ("auto", "float32", "bf16")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


LossFn = Callable[[Transformer, Batch], Tensor]


def lm_loss(model: Transformer, batch: Batch) -> Tensor:
    """Weighted next-token cross-entropy; lm_head only runs on rows that carry weight."""
    hidden = forward_train(model, batch.ids, batch.positions, batch.mask)
    keep = batch.weights > 0
    logits = model.lm_head(hidden[keep]).float()
    w = batch.weights[keep]
    return (F.cross_entropy(logits, batch.targets[keep], reduction="none") * w).sum() / w.sum()


def train(
    model: Transformer,
    params: list[torch.nn.Parameter],
    data: Iterator[Batch] | Callable[[int], Iterator[Batch]],
    cfg: TrainConfig,
    work_dir: Path,
    *,
    loss_fn: LossFn = lm_loss,
    label: str = "train",
) -> dict:
    """Train with AdamW (float32, or bf16 autocast where `cfg.precision` asks for it or
    measures it faster); resumes from work_dir/state.pt; returns run figures."""
    work_dir.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    state_file = work_dir / "state.pt"
    step, seen, elapsed, bf16, loss_avg = 0, 0, 0.0, None, None
    if state_file.is_file():
        state = torch.load(state_file, weights_only=False)
        model.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["opt"])
        step, seen, elapsed = state["step"], state["tokens"], state["elapsed"]
        loss_avg = state.get("loss")
        # a resumed run keeps the precision it started with (states before the probe: bf16
        # wherever the CPU had it)
        bf16 = state.get("bf16", cpu_has_bf16())
        log.info("%s: resuming at step %d", label, step)
        scheduled = state.get("schedule_steps", cfg.steps)
        if scheduled != cfg.steps:
            log.warning(
                "%s: the state was trained on a %d-step schedule, now %d: the learning rate "
                "continues from step %d of the new one",
                label, scheduled, cfg.steps, step,
            )  # fmt: skip
    stream = data(step) if callable(data) else data
    model.train()
    pending = [next(stream)] if step < cfg.steps else []
    if bf16 is None:
        bf16 = _use_bf16(cfg.precision, model, params, pending, loss_fn)
    log.info("%s: %s", label, "bf16 autocast" if bf16 else "float32")
    bar = Progress(label, cfg.steps, step)
    t0 = time.perf_counter() - elapsed
    while step < cfg.steps:
        batch = pending.pop() if pending else next(stream)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step, seen = step + 1, seen + batch.tokens
        value = loss.item()
        loss_avg = value if loss_avg is None else 0.95 * loss_avg + 0.05 * value
        bar.update(step, f"loss {loss_avg:.3f} {seen / (time.perf_counter() - t0):,.0f} tok/s")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save_state(
                state_file,
                model,
                opt,
                params,
                step=step,
                seen=seen,
                elapsed=time.perf_counter() - t0,
                bf16=bf16,
                schedule_steps=cfg.steps,
                loss=loss_avg,
            )
    bar.close()
    model.eval()
    return {
        "steps": step,
        "tokens": seen,
        "seconds": round(time.perf_counter() - t0, 1),
        "loss": loss_avg,
        "precision": "bf16 autocast" if bf16 else "float32",
        "threads": torch.get_num_threads(),
    }


def _use_bf16(precision: str, model, params, pending: list[Batch], loss_fn: LossFn) -> bool:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision == "bf16"
    return bool(pending) and cpu_has_bf16() and bf16_is_faster(model, params, pending[0], loss_fn)


def bf16_is_faster(model, params: list[torch.nn.Parameter], batch: Batch, loss_fn: LossFn) -> bool:
    """Time forward+backward on one batch with and without bf16 autocast; True if bf16 wins.

    Native bf16 pays off on wide layers, but at the zoo's small widths the casts cost more than
    the matmuls save (demo-base on an AVX512-BF16 CPU: 0.41 s/step bf16 vs 0.24 fp32). Gradients
    are cleared afterwards; the weights are not touched.
    """
    timings: dict[bool, list[float]] = {True: [], False: []}
    for enabled in (True, False) * 4:  # interleaved; the first of each warms up
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            loss = loss_fn(model, batch)
        loss.backward()
        timings[enabled].append(time.perf_counter() - t)
    for p in params:
        p.grad = None
    # best of the timed runs; bf16 only when clearly faster (a busy machine makes single runs noisy)
    return min(timings[True][1:]) < 0.8 * min(timings[False][1:])


def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere autocast is slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _save_state(
    file: Path,
    model,
    opt,
    params,
    *,
    step: int,
    seen: int,
    elapsed: float,
    bf16: bool,
    schedule_steps: int,
    loss: float | None,
) -> None:
    trainable = {id(p) for p in params}
    names = [n for n, p in model.named_parameters() if id(p) in trainable]
    state = {n: t for n, t in model.state_dict().items() if n in names}
    tmp = file.with_suffix(".tmp")
    torch.save(
        {
            "model": state,
            "opt": opt.state_dict(),
            "step": step,
            "tokens": seen,
            "elapsed": elapsed,
            "bf16": bf16,
            "schedule_steps": schedule_steps,
            "loss": loss,
        },
        tmp,
    )
    tmp.replace(file)


class Progress:
    """A one-line progress bar on stderr (a log line every 5% when stderr is not a terminal)."""

    def __init__(self, label: str, total: int, start: int = 0) -> None:
        self.label, self.total, self.start = label, max(1, total), start
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self._last_pct = -1

    def update(self, done: int, extra: str = "") -> None:
        """Show `done` of total with an ETA."""
        frac = done / self.total
        rate = (done - self.start) / max(1e-9, time.perf_counter() - self.t0)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        bar = "#" * int(30 * frac)
        line = f"{self.label} [{bar:<30}] {done}/{self.total} eta {eta / 60:.1f}m {extra}"
        if self.tty:
            sys.stderr.write("\r" + line)
            sys.stderr.flush()
        elif int(100 * frac) // 2 != self._last_pct or done == self.total:
            self._last_pct = int(100 * frac) // 2
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self.tty:
            sys.stderr.write("\n")


# -- saving ---------------------------------------------------------------------------------


def save_checkpoint(
    model: Transformer, args: ModelArgs, tokenizer_dir: Path, out: Path, *, special: dict
) -> None:
    """Write config.json, generation_config.json, bf16 model.safetensors and the tokenizer."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    state = {
        n: t.detach().to(torch.bfloat16).contiguous()
        for n, t in model.state_dict().items()
        if not (args.tie_word_embeddings and n == "lm_head.weight")
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(args, special), indent=2) + "\n")
    generation = {
        "bos_token_id": special["<s>"],
        "eos_token_id": [special["<|im_end|>"], special["</s>"]],
        "pad_token_id": special["<pad>"],
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, out / name)


def hf_config(args: ModelArgs, special: dict) -> dict:
    """A transformers LlamaConfig dict for these arguments."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "intermediate_size": args.intermediate_size,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_position_embeddings,
        "tie_word_embeddings": args.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": special["<s>"],
        "eos_token_id": [special["<|im_end|>"], special["</s>"]],
        "pad_token_id": special["<pad>"],
    }


def arch_dict(arch: Arch) -> dict:
    """The architecture as a plain dict (for model cards)."""
    return asdict(arch)
