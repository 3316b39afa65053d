"""W8A16 / W4A16 split-K decode GEMMs: the PyTorch references against dequantize-then-matmul, and
the Triton kernels against the references (through Triton's interpreter on CPU, natively on a GPU).

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

from engine.kernels import quant_gemm as qg
from engine.quantize import LINEAR_CLASSES, dequantize_weight, parse_scheme, quantize_weight

ROOT = Path(__file__).resolve().parents[2]

# Small shapes for the interpreter; K not a multiple of the tile, N not of BLOCK_N, and forced
# splits exercise the masks and the partial sums.
CASES: dict[str, dict] = {
    "decode_one_row": dict(m=1, k=128, n=96),
    "rows_3_split_2": dict(m=3, k=256, n=64, splits=2),
    "rows_5_split_3_ragged": dict(m=5, k=192, n=80, splits=3),
    "rows_16": dict(m=16, k=64, n=48),
}
GPU_CASES: dict[str, dict] = {
    "decode_qkv": dict(m=1, k=4096, n=4096),
    "decode_down": dict(m=4, k=14336, n=4096),
    "decode_small_n": dict(m=8, k=4096, n=512),
    "forced_split": dict(m=2, k=4096, n=1024, splits=5),
}


def make_case(spec: dict, scheme: str, device: str = "cpu", dtype=torch.float32):
    """x and the quantized tensors of a random weight, seeded by the case."""
    gen = torch.Generator().manual_seed(spec["m"] * 1000 + spec["k"])
    x = torch.randn(spec["m"], spec["k"], generator=gen)
    w = torch.randn(spec["n"], spec["k"], generator=gen) * spec["k"] ** -0.5
    tensors = quantize_weight(w, parse_scheme(scheme))
    return x.to(device, dtype), {k: t.to(device) for k, t in tensors.items()}


def kernel_diffs(spec: dict) -> dict:
    """Max abs difference of each kernel from its reference on fp32 inputs."""
    out = {}
    x, t = make_case(spec, "int8")
    y = qg.w8a16_gemm(x, t["qweight"], t["scales"], num_splits=spec.get("splits"))
    out["w8a16"] = (y - qg.w8a16_gemm_ref(x, t["qweight"], t["scales"])).abs().max().item()
    x, t = make_case(spec, "int4-g32")
    y = qg.w4a16_gemm(x, t["qweight"], t["scales"], t["zeros"], num_splits=spec.get("splits"))
    ref = qg.w4a16_gemm_ref(x, t["qweight"], t["scales"], t["zeros"])
    out["w4a16"] = (y - ref).abs().max().item()
    return out


def interpreter_report() -> dict:
    """Every case under the interpreter (run in the child process)."""
    return {case: kernel_diffs(spec) for case, spec in CASES.items()}


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """The child process's report: the kernels run by Triton's interpreter on CPU."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, __file__],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("scheme", ["int8", "int4-g32", "int4-g128"])
def test_references_match_dequantize_then_matmul(case: str, scheme: str) -> None:
    spec = CASES[case] if scheme != "int4-g128" else {**CASES[case], "k": 256}
    x, t = make_case(spec, scheme)
    want = x @ dequantize_weight(t, parse_scheme(scheme)).t()
    if scheme == "int8":
        got = qg.w8a16_gemm_ref(x, t["qweight"], t["scales"])
    else:
        got = qg.w4a16_gemm_ref(x, t["qweight"], t["scales"], t["zeros"])
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_kernels_match_reference_in_interpreter(interpreted: dict, case: str) -> None:
    for kernel, diff in interpreted[case].items():
        assert diff <= 1e-4, (kernel, diff)


def test_kernels_reject_prefill_sized_batches() -> None:
    x, t = make_case(dict(m=17, k=64, n=16), "int8")
    with pytest.raises(ValueError, match="at most 16 rows"):
        qg.w8a16_gemm(x, t["qweight"], t["scales"])
    with pytest.raises(ValueError, match=r"\[M, 64\]"):
        qg.w8a16_gemm(x[:, :32], t["qweight"], t["scales"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_kernels_match_reference_on_gpu(case: str, dtype: torch.dtype) -> None:
    spec = GPU_CASES[case]
    x, t = make_case(spec, "int8", "cuda", dtype)
    y = qg.w8a16_gemm(x, t["qweight"], t["scales"], num_splits=spec.get("splits"))
    ref = qg.w8a16_gemm_ref(x, t["qweight"], t["scales"]).float()
    tol = 2e-2 * ref.abs().max().item() if dtype != torch.float32 else 1e-3
    assert (y.float() - ref).abs().max().item() <= tol
    x, t = make_case(spec, "int4-g64", "cuda", dtype)
    y = qg.w4a16_gemm(x, t["qweight"], t["scales"], t["zeros"], num_splits=spec.get("splits"))
    ref = qg.w4a16_gemm_ref(x, t["qweight"], t["scales"], t["zeros"]).float()
    assert (y.float() - ref).abs().max().item() <= tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scheme", ["int8", "int4-g64", "fp8"])
def test_quantized_linears_on_gpu_match_their_reference(scheme: str) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(1024, 512, bias=True).cuda().bfloat16()
    module = LINEAR_CLASSES[scheme].from_linear(linear, parse_scheme(scheme)).prepare()
    for rows in (1, 5, 64):  # kernel rows, then the dequantize path
        x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
        ref = module.reference_matmul(x).float() + linear.bias.float()
        tol = 0.06 if scheme == "fp8" else 0.02  # fp8 also quantizes the activations
        assert (module(x).float() - ref).abs().max().item() <= tol * ref.abs().max().item()


if __name__ == "__main__":
    print(json.dumps(interpreter_report()))
