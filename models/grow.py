"""Grow a trained checkpoint into a wider, deeper one that computes the same function (Net2Net).

Widening by a factor w repeats every residual coordinate w times ([x, x, ..., x]): RMSNorm of the
repeated vector is the repeated norm, so each linear layer reading the residual takes w copies of
its weight divided by w, each head and MLP neuron appears w times, and each layer writing to the
residual repeats its rows. Added layers start with zero output projections, so they pass the
residual through unchanged. A little noise then breaks the symmetry between the copies, and
further training on the same data lets the larger model use its extra capacity.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor

from engine.checkpoint import load_model
from engine.config import ModelArgs
from engine.model import Transformer
from models.train import TrainConfig, batches, new_model, save_checkpoint, train

_READS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # read the residual stream
_WRITES = ("o_proj", "down_proj")  # write to the residual stream


def grown_args(args: ModelArgs, width: int, extra_layers: int) -> ModelArgs:
    """The larger architecture: w times the width, heads and MLP, plus extra layers, untied."""
    return dataclasses.replace(
        args,
        dim=args.dim * width,
        n_heads=args.n_heads * width,
        n_kv_heads=args.n_kv_heads * width,
        intermediate_size=args.intermediate_size * width,
        n_layers=args.n_layers + extra_layers,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )


def _tile(w: Tensor, rows: int, cols: int) -> Tensor:
    """w repeated as a rows x cols grid of blocks, divided by cols (inputs are repeated cols times)."""
    return w.repeat(rows, cols) / cols


def grow(
    small: Transformer, width: int, extra_layers: int, *, noise: float, seed: int
) -> Transformer:
    """A model computing small's function with w times the width and extra identity layers."""
    args = grown_args(small.args, width, extra_layers)
    big = new_model(args, seed=seed)
    src, dst = small.state_dict(), {}
    for name, t in src.items():
        leaf = name.split(".")[-2] if name.endswith(".weight") else ""
        if "norm" in name:
            dst[name] = t.repeat(width)
        elif name == "model.embed_tokens.weight":
            dst[name] = t.repeat(1, width)
        elif name == "lm_head.weight":
            dst[name] = _tile(t, 1, width)
        elif leaf in _READS or leaf in _WRITES:
            dst[name] = _tile(t, width, width)
    with torch.no_grad():
        state = big.state_dict()
        for name, t in dst.items():
            state[name].copy_(t)
        for layer in big.model.layers[small.args.n_layers :]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        generator = torch.Generator().manual_seed(seed)
        for name, p in big.named_parameters():
            if name in dst and "norm" not in name:
                p.add_(torch.randn(p.shape, generator=generator) * noise * float(p.std()))
    return big


def grow_checkpoint(base: Path, out: Path, growth: dict, budget, build: Path) -> dict:
    """Grow `base` into `out` and train it further on the pretraining mixture."""
    from models import zoo

    _, small = load_model(base, "float32", torch.device("cpu"))
    big = grow(small, growth["width"], growth["extra_layers"], noise=0.01, seed=1)
    tok = zoo.load_tokenizer()
    docs = zoo.training_docs(tok)
    cfg = TrainConfig(steps=budget.large_steps, lr=3e-4, seq_len=256, rows=4, warmup=5, seed=1)
    figures = train(
        big,
        list(big.parameters()),
        lambda start: batches(docs, seq_len=cfg.seq_len, rows=cfg.rows, seed=cfg.seed, start=start),
        cfg,
        build / "demo-large",
        label="demo-large",
    )
    save_checkpoint(big, big.args, zoo.TOKENIZER, out, special=zoo.special_ids(tok))
    return {
        "train": figures,
        "grown_from": base.name,
        "growth": growth,
        "parameters": sum(p.numel() for p in big.parameters()),
        "lr": cfg.lr,
    }
