"""Multi-LoRA shrink/expand: the PyTorch references against a naive per-token loop, and the Triton
kernels against the references (through Triton's interpreter on CPU, natively on a GPU).

TRITON_INTERPRET is read when `@triton.jit` runs, so the interpreter cases run in one child process
(this file as a script) that reports max abs differences per case; pytest only reads the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.kernels import lora as lk
from engine.lora import LoRALinear, LoRAState

ROOT = Path(__file__).resolve().parents[2]

# Shapes for the interpreter (slow, so small). `indices` are per-token slots (-1 = no adapter);
# runs of one slot are what prefill produces, alternating slots what a decode batch does.
# `num_splits` exercises the shrink's split over `in` and the expand's sum of the partials.
CASES: dict[str, dict] = {
    "one_token": dict(in_features=32, out_features=32, rank=4, slots=2, indices=[1]),
    "one_token_no_adapter": dict(in_features=32, out_features=48, rank=8, slots=2, indices=[-1]),
    "decode_mixed": dict(
        in_features=48, out_features=64, rank=8, slots=3, indices=[2, -1, 0, 2, 1]
    ),
    "decode_rank6": dict(
        in_features=64, out_features=32, rank=6, slots=3, indices=[0, 2, 2, -1, 1]
    ),
    "decode_rank16_int32": dict(
        in_features=32, out_features=48, rank=16, slots=4, indices=[3, 1, -1, 0, 3], int32=True
    ),
    "prefill_runs": dict(
        in_features=64, out_features=48, rank=16, slots=2, indices=[0] * 10 + [-1] * 7 + [1] * 16
    ),
    "prefill_one_slot": dict(in_features=48, out_features=32, rank=4, slots=3, indices=[2] * 33),
    "random_mix": dict(in_features=48, out_features=48, rank=6, slots=4, tokens=33, seed=1),
    "split_k": dict(
        in_features=64, out_features=32, rank=8, slots=3, indices=[1, -1, 0, 1, 2], num_splits=2
    ),
    "split_k_prefill": dict(
        in_features=48, out_features=64, rank=4, slots=2, tokens=33, seed=2, num_splits=3
    ),
}

# Realistic shapes for a GPU; "decode" sizes leave the split over `in` to the heuristic.
GPU_CASES: dict[str, dict] = {
    "decode_qkv": dict(in_features=4096, out_features=4096, rank=16, slots=8, tokens=7, seed=3),
    "decode_many": dict(in_features=4096, out_features=1024, rank=8, slots=16, tokens=200, seed=4),
    "decode_down_r64": dict(in_features=14336, out_features=4096, rank=64, slots=4, tokens=3),
    "prefill_r128": dict(in_features=2048, out_features=2048, rank=128, slots=3, tokens=1000),
    "prefill_runs_r12": dict(
        in_features=4096,
        out_features=4096,
        rank=12,
        slots=3,
        indices=[0] * 300 + [-1] * 211 + [2] * 513 + [1] * 5,
    ),
    "forced_split": dict(
        in_features=4096, out_features=512, rank=32, slots=4, tokens=40, seed=5, num_splits=5
    ),
}


def slot_indices(spec: dict) -> list[int]:
    """The case's slots: explicit, or `tokens` random slots (-1 included) from its seed."""
    if "indices" in spec:
        return spec["indices"]
    gen = torch.Generator().manual_seed(spec["seed"])
    return torch.randint(-1, spec["slots"], (spec["tokens"],), generator=gen).tolist()


def make_inputs(spec: dict, dtype: torch.dtype = torch.float32, device: str = "cpu") -> dict:
    """Random y, x and stacked adapters, scaled so h and the delta are O(1) at any size."""
    gen = torch.Generator().manual_seed(0)
    indices = slot_indices(spec)
    tokens, d_in, d_out = len(indices), spec["in_features"], spec["out_features"]
    slots, rank = spec["slots"], spec["rank"]
    tensors = {
        "y": torch.randn(tokens, d_out, generator=gen),
        "x": torch.randn(tokens, d_in, generator=gen),
        "lora_a": torch.randn(slots, rank, d_in, generator=gen) * d_in**-0.5,
        "lora_b": torch.randn(slots, d_out, rank, generator=gen) * rank**-0.5,
    }
    inputs = {name: t.to(device=device, dtype=dtype) for name, t in tensors.items()}
    index_dtype = torch.int32 if spec.get("int32") else torch.int64
    inputs["indices"] = torch.tensor(indices, dtype=index_dtype, device=device)
    inputs["scale"] = 0.5
    return inputs


def naive_shrink(inputs: dict) -> torch.Tensor:
    """scale * A[slot] @ x[t] token by token, in fp32."""
    x, a = inputs["x"].float(), inputs["lora_a"].float()
    h = torch.zeros(x.shape[0], a.shape[1])
    for t, slot in enumerate(inputs["indices"].tolist()):
        if slot >= 0:
            h[t] = inputs["scale"] * (a[slot] @ x[t])
    return h


def naive_apply(inputs: dict) -> torch.Tensor:
    """y + B[slot] @ h[t] token by token, h rounded to B's dtype, in fp32; returns a new y."""
    y, b = inputs["y"].float().clone(), inputs["lora_b"]
    h = naive_shrink(inputs).to(b.dtype).float()
    for t, slot in enumerate(inputs["indices"].tolist()):
        if slot >= 0:
            y[t] += b[slot].float() @ h[t]
    return y


def kernel_diffs(spec: dict) -> dict:
    """Max abs differences between each kernel and its reference on the case's fp32 inputs."""
    inputs = make_inputs(spec)
    y, x, a, b, idx = (inputs[k] for k in ("y", "x", "lora_a", "lora_b", "indices"))
    splits, scale = spec.get("num_splits"), inputs["scale"]
    h = lk.lora_shrink(x, a, idx, scale=scale, num_splits=splits)
    h_ref = lk.lora_shrink_ref(x, a, idx, scale=scale)
    expanded = lk.lora_expand(y.clone(), h_ref, b, idx)
    applied = lk.lora_apply(y.clone(), x, a, b, idx, scale=scale, num_splits=splits)
    want = lk.lora_apply_ref(y.clone(), x, a, b, idx, scale=scale)
    untouched = idx < 0
    return {
        "shrink": (h - h_ref).abs().max().item(),
        "expand": (expanded - lk.lora_expand_ref(y.clone(), h_ref, b, idx)).abs().max().item(),
        "apply": (applied - want).abs().max().item(),
        "untouched": torch.equal(applied[untouched], y[untouched])
        and torch.equal(h[untouched], torch.zeros_like(h[untouched])),
    }


def make_lora_linear(spec: dict) -> tuple[LoRALinear, torch.Tensor]:
    """A LoRALinear with random adapters in its slots and the case's step installed, and x."""
    gen = torch.Generator().manual_seed(0)
    inputs = make_inputs(spec)
    state = LoRAState()
    state.set(inputs["indices"].tolist(), torch.device("cpu"))
    base = nn.Linear(spec["in_features"], spec["out_features"])
    lin = LoRALinear(base, spec["slots"], spec["rank"], state)
    d_in, d_out = spec["in_features"], spec["out_features"]
    for slot in range(spec["slots"]):
        r = spec["rank"] - slot % 2  # an adapter below the slot rank is zero-padded
        a = torch.randn(r, d_in, generator=gen) * d_in**-0.5
        lin.install(slot, a, torch.randn(d_out, r, generator=gen) * r**-0.5)
    return lin, inputs["x"]


def lora_linear_diff(spec: dict) -> float:
    """LoRALinear's per-slot loop (its CPU path) against lora_apply, as the CUDA path calls it."""
    lin, x = make_lora_linear(spec)
    with torch.inference_mode():
        looped = lin(x)
        fused = lk.lora_apply(lin.base(x), x, lin.lora_a, lin.lora_b, lin.state.indices)
    return (looped - fused).abs().max().item()


def interpreter_report() -> dict:
    """Run in the child process: every case through the kernels, the dispatcher, LoRALinear."""
    report: dict = {name: kernel_diffs(spec) for name, spec in CASES.items()}
    inputs = make_inputs(CASES["decode_mixed"])
    got = lk.add_lora(inputs["y"].clone(), **{k: v for k, v in inputs.items() if k != "y"})
    want = lk.lora_apply_ref(inputs["y"].clone(), **{k: v for k, v in inputs.items() if k != "y"})
    report["dispatcher"] = (got - want).abs().max().item()
    report["dispatcher_uses_triton"] = lk._use_triton(torch.zeros(1))
    report["lora_linear"] = max(lora_linear_diff(CASES[c]) for c in ("decode_rank6", "split_k"))
    return report


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """The child's report; runs the interpreter cases once for the module."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.engine.test_lora_kernels"],
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
def test_shrink_reference_matches_naive_loop(case: str) -> None:
    inputs = make_inputs(CASES[case])
    got = lk.lora_shrink_ref(inputs["x"], inputs["lora_a"], inputs["indices"], scale=0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, naive_shrink(inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_apply_reference_matches_naive_loop(case: str) -> None:
    inputs = make_inputs(CASES[case])
    want = naive_apply(inputs)
    y = inputs.pop("y")
    out = lk.lora_apply_ref(y, **inputs)
    assert out is y  # in place
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


def test_reference_keeps_bfloat16_and_leaves_base_rows_alone() -> None:
    inputs = make_inputs(CASES["prefill_runs"], dtype=torch.bfloat16)
    before = inputs["y"].clone()
    want = naive_apply(inputs)
    y = inputs.pop("y")
    lk.lora_apply_ref(y, **inputs)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want, atol=2e-2, rtol=2e-2)
    base_rows = inputs["indices"] < 0
    assert torch.equal(y[base_rows], before[base_rows])


@pytest.mark.parametrize("fn", [lk.lora_shrink, lk.lora_shrink_ref])
def test_empty_step_shrinks_to_empty(fn) -> None:
    inputs = make_inputs(CASES["decode_mixed"])
    h = fn(inputs["x"][:0], inputs["lora_a"], inputs["indices"][:0])
    assert h.shape == (0, 8)


@pytest.mark.parametrize("case", list(CASES))
def test_kernels_match_reference_in_interpreter(interpreted: dict, case: str) -> None:
    diffs = interpreted[case]
    assert diffs["untouched"] is True
    assert max(diffs["shrink"], diffs["expand"], diffs["apply"]) < 1e-5


def test_dispatcher_runs_kernels_under_interpreter(interpreted: dict) -> None:
    assert interpreted["dispatcher_uses_triton"] is True
    assert interpreted["dispatcher"] < 1e-5


def test_kernels_give_lora_linear_results(interpreted: dict) -> None:
    assert interpreted["lora_linear"] < 1e-5


def test_dispatcher_uses_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = make_inputs(CASES["random_mix"])
    y = inputs.pop("y")
    assert torch.equal(lk.add_lora(y.clone(), **inputs), lk.lora_apply_ref(y.clone(), **inputs))


def test_lora_linear_cpu_path_matches_reference() -> None:
    lin, x = make_lora_linear(CASES["random_mix"])
    with torch.inference_mode():
        got = lin(x)
        want = lk.lora_apply_ref(lin.base(x), x, lin.lora_a, lin.lora_b, lin.state.indices)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rejects_mismatched_shapes_and_dtypes() -> None:
    inputs = make_inputs(CASES["decode_mixed"])
    x, a, b, idx = inputs["x"], inputs["lora_a"], inputs["lora_b"], inputs["indices"]
    with pytest.raises(ValueError, match="lora_a"):
        lk.lora_shrink_ref(x[:, :7], a, idx)
    with pytest.raises(ValueError, match="share a dtype"):
        lk.lora_shrink(x.double(), a, idx)
    with pytest.raises(ValueError, match="indices"):
        lk.lora_apply_ref(inputs["y"], x, a, b, idx[:2])
    with pytest.raises(ValueError, match="disagree"):
        lk.lora_apply(inputs["y"], x, a, b[:, :, :4], idx)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_kernels_match_reference_on_gpu(case: str, dtype: torch.dtype) -> None:
    spec = GPU_CASES[case]
    inputs = make_inputs(spec, dtype=dtype, device="cuda")
    y, x, a, b, idx = (inputs[k] for k in ("y", "x", "lora_a", "lora_b", "indices"))
    h = lk.lora_shrink(x, a, idx, scale=0.5, num_splits=spec.get("num_splits"))
    torch.testing.assert_close(h, lk.lora_shrink_ref(x, a, idx, scale=0.5), atol=1e-3, rtol=1e-3)
    got = lk.lora_apply(y.clone(), x, a, b, idx, scale=0.5, num_splits=spec.get("num_splits"))
    want = lk.lora_apply_ref(y.clone(), x, a, b, idx, scale=0.5)
    assert got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert torch.equal(got[idx < 0], y[idx < 0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lora_linear_on_gpu_matches_cpu_loop() -> None:
    lin, x = make_lora_linear(GPU_CASES["decode_many"])
    with torch.inference_mode():
        want = lin(x)
        lin.base.cuda()
        lin.lora_a, lin.lora_b = lin.lora_a.cuda(), lin.lora_b.cuda()
        lin.state.set(lin.state.indices.tolist(), torch.device("cuda"))
        got = lin(x.cuda())
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


if __name__ == "__main__":
    sys.stdout.write(json.dumps(interpreter_report()) + "\n")
