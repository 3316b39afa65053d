"""Distil a draft model from a target: match the target's next-token distribution (KL).

The draft learns where the target puts probability on the answer tokens of the pretraining
mixture, which is what speculative decoding rewards: a draft token is accepted when the target
would have produced it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.checkpoint import load_model
from engine.model import Transformer
from models.train import Batch, TrainConfig, batches, forward_train, save_checkpoint, train


def kd_loss(teacher: Transformer, temperature: float = 1.0):
    """Loss function: KL(teacher || student) on weighted positions, plus the usual cross-entropy."""

    def loss_fn(student: Transformer, batch: Batch) -> Tensor:
        keep = batch.weights > 0
        with torch.no_grad():
            t_hidden = forward_train(teacher, batch.ids, batch.positions, batch.mask)
            t_logp = F.log_softmax(teacher.lm_head(t_hidden[keep]).float() / temperature, -1)
        hidden = forward_train(student, batch.ids, batch.positions, batch.mask)
        logits = student.lm_head(hidden[keep]).float()
        s_logp = F.log_softmax(logits / temperature, -1)
        kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean")
        return kl + 0.1 * F.cross_entropy(logits, batch.targets[keep])

    return loss_fn


def distill(target: Path, init: Path, out: Path, budget, build: Path) -> dict:
    """Train a copy of `init` towards `target`'s outputs; save it to `out`."""
    from models import zoo

    _, teacher = load_model(target, "float32", torch.device("cpu"))
    args, student = load_model(init, "float32", torch.device("cpu"))
    student.requires_grad_(True)
    tok = zoo.load_tokenizer()
    docs = zoo.training_docs(tok)
    cfg = TrainConfig(steps=budget.draft_steps, lr=1e-3, seq_len=256, rows=8, warmup=5, seed=2)
    figures = train(
        student,
        list(student.parameters()),
        lambda start: batches(docs, seq_len=cfg.seq_len, rows=cfg.rows, seed=cfg.seed, start=start),
        cfg,
        build / "demo-draft",
        loss_fn=kd_loss(teacher),
        label="demo-draft",
    )
    save_checkpoint(student, args, zoo.TOKENIZER, out, special=zoo.special_ids(tok))
    return {
        "train": figures,
        "teacher": target.name,
        "initialised_from": init.name,
        "parameters": sum(p.numel() for p in student.parameters()),
        "lr": cfg.lr,
    }
