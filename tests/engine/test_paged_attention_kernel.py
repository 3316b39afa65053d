"""Paged-attention decode: the PyTorch reference against a naive loop, and the Triton kernel against
the reference (through Triton's interpreter on CPU, natively on a GPU).

TRITON_INTERPRET is read when `@triton.jit` runs, so the interpreter cases run in one child process
(this file as a script) that reports a max abs difference per case; pytest only reads the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.kernels import paged_attention as pa

ROOT = Path(__file__).resolve().parents[2]

# Shapes for the interpreter (slow, so small). G = n_heads // n_kv; G >= 4 takes the tensor-core
# path, smaller groups the broadcast path. `num_splits` exercises the split-and-merge path.
CASES: dict[str, dict] = {
    "mha_single": dict(n_heads=2, n_kv=2, head_dim=16, block_size=4, context_lens=[7]),
    "mha_ragged_batch": dict(
        n_heads=2, n_kv=2, head_dim=16, block_size=4, context_lens=[1, 9, 16, 5]
    ),
    "gqa_group2": dict(n_heads=4, n_kv=2, head_dim=16, block_size=8, context_lens=[5, 19]),
    "gqa_group4_dot": dict(n_heads=8, n_kv=2, head_dim=16, block_size=4, context_lens=[3, 14, 30]),
    "mqa_group6_dim24": dict(n_heads=6, n_kv=1, head_dim=24, block_size=4, context_lens=[2, 23]),
    "mha_dim24": dict(n_heads=3, n_kv=3, head_dim=24, block_size=8, context_lens=[13, 4]),
    "gqa_dim80": dict(n_heads=4, n_kv=2, head_dim=80, block_size=16, context_lens=[20, 33]),
    "block_size_6": dict(n_heads=4, n_kv=2, head_dim=16, block_size=6, context_lens=[11, 25]),
    "window": dict(
        n_heads=4, n_kv=2, head_dim=16, block_size=4, context_lens=[3, 12, 21], sliding_window=5
    ),
    "window_dot": dict(
        n_heads=8, n_kv=2, head_dim=16, block_size=4, context_lens=[6, 29], sliding_window=7
    ),
    "split": dict(
        n_heads=4, n_kv=2, head_dim=16, block_size=4, context_lens=[2, 25, 40], num_splits=3
    ),
    "split_window_dot": dict(
        n_heads=8,
        n_kv=2,
        head_dim=16,
        block_size=4,
        context_lens=[9, 37],
        sliding_window=20,
        num_splits=2,
    ),
    "empty_context": dict(
        n_heads=4, n_kv=2, head_dim=16, block_size=4, context_lens=[0, 6], num_splits=2
    ),
}

# Realistic shapes for a GPU in 16-bit; "long_context" leaves the split count to the heuristic.
GPU_CASES: dict[str, dict] = {
    "llama_gqa": dict(
        n_heads=32, n_kv=8, head_dim=128, block_size=16, context_lens=[1, 17, 300, 1000]
    ),
    "mha_dim80": dict(n_heads=8, n_kv=8, head_dim=80, block_size=16, context_lens=[5, 129, 700]),
    "group8_window": dict(
        n_heads=16,
        n_kv=2,
        head_dim=64,
        block_size=16,
        context_lens=[40, 900, 2000],
        sliding_window=256,
    ),
    "long_context": dict(n_heads=8, n_kv=2, head_dim=128, block_size=16, context_lens=[4000]),
    "forced_split": dict(
        n_heads=32, n_kv=8, head_dim=128, block_size=16, context_lens=[3, 250, 1500], num_splits=4
    ),
}


def make_inputs(spec: dict, dtype: torch.dtype = torch.float32, device: str = "cpu") -> dict:
    """Random q and caches, and block tables over shuffled block ids with spare garbage blocks."""
    gen = torch.Generator().manual_seed(0)
    bs, lens = spec["block_size"], spec["context_lens"]
    batch, n_heads, n_kv, head_dim = len(lens), spec["n_heads"], spec["n_kv"], spec["head_dim"]
    counts = [-(-n // bs) for n in lens]
    num_blocks = sum(counts) + 3  # blocks no sequence owns: reading one would change the result
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    # One spare column: entries past a sequence's blocks are arbitrary (0 here).
    table = torch.zeros(batch, max(counts) + 1, dtype=torch.int32)
    for b, n in enumerate(counts):
        table[b, :n] = torch.tensor(ids[:n], dtype=torch.int32)
        ids = ids[n:]
    shape = (num_blocks, bs, n_kv, head_dim)
    tensors = {
        "q": torch.randn(batch, n_heads, head_dim, generator=gen),
        "k_cache": torch.randn(shape, generator=gen),
        "v_cache": torch.randn(shape, generator=gen),
    }
    inputs = {name: t.to(device=device, dtype=dtype) for name, t in tensors.items()}
    inputs["block_tables"] = table.to(device)
    inputs["context_lens"] = torch.tensor(lens, dtype=torch.int32, device=device)
    inputs["scale"] = head_dim**-0.5
    inputs["sliding_window"] = spec.get("sliding_window")
    return inputs


def naive_attention(inputs: dict) -> torch.Tensor:
    """softmax(q k^T * scale) v per sequence and head, reading the cache token by token."""
    q, k_cache, v_cache = inputs["q"].float(), inputs["k_cache"].float(), inputs["v_cache"].float()
    bs, n_kv = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // n_kv
    window = inputs["sliding_window"]
    out = torch.zeros_like(q)
    for b, n in enumerate(inputs["context_lens"].tolist()):
        first = 0 if window is None else max(0, n - window)
        table = inputs["block_tables"][b].tolist()
        slots = [(table[p // bs], p % bs) for p in range(first, n)]
        for h in range(q.shape[1]):
            if not slots:
                continue
            k = torch.stack([k_cache[blk, off, h // group] for blk, off in slots])  # [S, D]
            v = torch.stack([v_cache[blk, off, h // group] for blk, off in slots])
            probs = torch.softmax(k @ q[b, h] * inputs["scale"], dim=0)
            out[b, h] = probs @ v
    return out


def max_diff(spec: dict, fn=pa.paged_attention_decode) -> float:
    """Max abs difference between `fn` and the reference on the case's fp32 inputs."""
    inputs = make_inputs(spec)
    extra = {"num_splits": spec["num_splits"]} if "num_splits" in spec else {}
    got = fn(**inputs, **extra)
    want = pa.paged_attention_decode_ref(**inputs)
    return (got - want).abs().max().item()


def interpreter_report() -> dict:
    """Run in the child process: every case through the kernel, and the dispatcher once."""
    report: dict = {name: max_diff(spec) for name, spec in CASES.items()}
    report["dispatcher"] = max_diff(CASES["gqa_group2"], pa.paged_attention)
    report["dispatcher_uses_triton"] = pa._use_triton(torch.zeros(1))
    return report


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """The child's report; runs the interpreter cases once for the module."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.engine.test_paged_attention_kernel"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_naive_loop(case: str) -> None:
    inputs = make_inputs(CASES[case])
    got = pa.paged_attention_decode_ref(**inputs)
    torch.testing.assert_close(got, naive_attention(inputs), atol=1e-5, rtol=1e-5)


def test_reference_keeps_bfloat16_and_computes_in_float32() -> None:
    inputs = make_inputs(CASES["window_dot"], dtype=torch.bfloat16)
    got = pa.paged_attention_decode_ref(**inputs)
    assert got.dtype == torch.bfloat16
    want = naive_attention(inputs).to(torch.bfloat16)
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


def test_empty_context_attends_to_nothing() -> None:
    inputs = make_inputs(CASES["empty_context"])
    out = pa.paged_attention_decode_ref(**inputs)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert out[1].abs().sum() > 0


@pytest.mark.parametrize("fn", [pa.paged_attention_decode, pa.paged_attention_decode_ref])
def test_empty_batch_returns_empty(fn) -> None:
    inputs = make_inputs(CASES["gqa_group2"])
    for name in ("q", "block_tables", "context_lens"):
        inputs[name] = inputs[name][:0]
    assert fn(**inputs).shape == (0, 4, 16)


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference_in_interpreter(interpreted: dict, case: str) -> None:
    assert interpreted[case] < 1e-4


def test_dispatcher_runs_kernel_under_interpreter(interpreted: dict) -> None:
    assert interpreted["dispatcher_uses_triton"] is True
    assert interpreted["dispatcher"] < 1e-4


def test_dispatcher_uses_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = make_inputs(CASES["window"])
    assert torch.equal(pa.paged_attention(**inputs), pa.paged_attention_decode_ref(**inputs))


def test_rejects_heads_that_do_not_divide() -> None:
    inputs = make_inputs(CASES["gqa_group2"])
    inputs["q"] = inputs["q"][:, :3]
    with pytest.raises(ValueError, match="kv heads"):
        pa.paged_attention(**inputs)


def test_rejects_mixed_dtypes() -> None:
    inputs = make_inputs(CASES["gqa_group2"])
    inputs["q"] = inputs["q"].to(torch.bfloat16)
    with pytest.raises(ValueError, match="share a dtype"):
        pa.paged_attention_decode(**inputs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_kernel_matches_reference_on_gpu(case: str, dtype: torch.dtype) -> None:
    spec = GPU_CASES[case]
    inputs = make_inputs(spec, dtype=dtype, device="cuda")
    extra = {"num_splits": spec["num_splits"]} if "num_splits" in spec else {}
    got = pa.paged_attention_decode(**inputs, **extra)
    want = pa.paged_attention_decode_ref(**inputs)
    assert got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


if __name__ == "__main__":
    sys.stdout.write(json.dumps(interpreter_report()) + "\n")
