"""The training forward pass equals the engine's, and growing a model preserves its function."""

from __future__ import annotations

import torch

from models.grow import grow
from models.train import Arch, Doc, collate, forward_train, model_args, new_model


def _tiny():
    model = new_model(model_args(Arch(32, 2, 4, 2, 64), 300), seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def test_packed_rows_equal_separate_rows() -> None:
    model = _tiny()
    a, b = Doc(list(range(5, 25)), [1.0] * 20), Doc(list(range(40, 52)), [1.0] * 12)
    packed = collate([[a, b]], 40)
    alone = collate([[b]], 40)
    with torch.no_grad():
        h_packed = forward_train(model, packed.ids, packed.positions, packed.mask)[0, 20:32]
        h_alone = forward_train(model, alone.ids, alone.positions, alone.mask)[0, :12]
    torch.testing.assert_close(h_packed, h_alone, atol=1e-5, rtol=1e-5)


def test_grown_model_computes_the_same_logits() -> None:
    small = _tiny()
    big = grow(small, 4, 2, noise=0.0, seed=1)
    batch = collate([[Doc(list(range(5, 40)), [1.0] * 35)]], 40)
    with torch.no_grad():
        want = small.lm_head(forward_train(small, batch.ids, batch.positions, batch.mask))
        got = big.lm_head(forward_train(big, batch.ids, batch.positions, batch.mask))
    assert big.args.dim == 4 * small.args.dim
    assert big.args.n_layers == small.args.n_layers + 2
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
