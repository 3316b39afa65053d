"""Weight-only quantization: the quantize/dequantize references, the module swaps and their CPU
kernels, checkpoints written by `compound quantize`, the engine paths (load-time and ahead-of-time
quantization, LoRA, batching, prefix caching) and the quantized KV cache."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from engine import Engine, SamplingParams
from engine.checkpoint import quantize_checkpoint
from engine.errors import CheckpointError, InvalidRequestError, QuantizationError
from engine.kv_cache import KVCache, QuantizedKV, block_bytes
from engine.lora import LoRALinear
from engine.quantize import (
    LINEAR_CLASSES,
    SCHEMES,
    Int4GroupedLinear,
    QuantConfig,
    QuantizedEmbedding,
    dequantize_weight,
    pack_int4,
    parse_scheme,
    quantize_int4,
    quantize_int8,
    quantize_weight,
    scaled_matmul,
    unpack_int4,
)

ROOT = Path(__file__).resolve().parents[2]
DEMO_BASE = ROOT / "models" / "demo-base"
BF16_EPS = torch.finfo(torch.bfloat16).eps
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
IDS = [1, 17, 33, 250, 9, 41, 77, 120, 5, 300, 211, 64, 8]


# -- references ----------------------------------------------------------------------------------


def test_int8_error_is_at_most_half_a_step_per_channel() -> None:
    w = torch.randn(48, 96) * torch.linspace(0.01, 3, 48)[:, None]  # very different row ranges
    t = quantize_int8(w)
    assert t["qweight"].dtype == torch.int8 and t["scales"].shape == (48,)
    err = (dequantize_weight(t, parse_scheme("int8")) - w).abs()
    assert (err <= t["scales"][:, None] / 2 + 1e-6).all()
    assert t["qweight"].abs().max().item() == 127  # the largest weight of a row uses the range


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_error_is_at_most_half_a_step_per_group(group: int) -> None:
    w = torch.randn(24, 256) + 0.5  # asymmetric ranges: the zero point matters
    t = quantize_int4(w, group)
    assert t["qweight"].shape == (24, 128) and t["scales"].shape == (24, 256 // group)
    assert t["scales"].dtype == torch.bfloat16
    deq = dequantize_weight(t, parse_scheme(f"int4-g{group}")).view(24, -1, group)
    err = (deq - w.view(24, -1, group)).abs()
    assert (err <= t["scales"].float()[..., None] * 0.51 + 1e-3).all()


def test_int4_pack_round_trips_and_puts_even_k_low() -> None:
    q = torch.randint(0, 16, (5, 32), dtype=torch.uint8)
    packed = pack_int4(q)
    assert torch.equal(unpack_int4(packed), q)
    assert packed[0, 0].item() == q[0, 0].item() | (q[0, 1].item() << 4)


def test_fp8_reference_keeps_relative_error_small() -> None:
    w = torch.randn(16, 64)
    t = quantize_weight(w, parse_scheme("fp8"))
    assert t["qweight"].dtype == torch.float8_e4m3fn
    deq = dequantize_weight(t, parse_scheme("fp8"))
    assert ((deq - w).abs() <= w.abs() * 2**-3 + t["scales"][:, None] * 2**-6).all()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_zero_rows_quantize_without_nan(scheme: str) -> None:
    w = torch.zeros(8, 128)
    deq = dequantize_weight(quantize_weight(w, parse_scheme(scheme)), parse_scheme(scheme))
    assert torch.isfinite(deq).all() and deq.abs().max().item() < 1e-5


def test_unknown_scheme_and_bad_metadata_are_typed_errors() -> None:
    with pytest.raises(QuantizationError, match="int3"):
        parse_scheme("int3")
    with pytest.raises(QuantizationError) as e:
        QuantConfig.from_json({"quant_method": "gptq", "bits": 4})
    assert e.value.field == "quantization_config.quant_method"
    cfg = QuantConfig("int4-g64").to_json()
    assert QuantConfig.from_json(cfg) == QuantConfig("int4-g64") and cfg["group_size"] == 64
    with pytest.raises(QuantizationError) as e:
        QuantConfig.from_json({**cfg, "scheme": "int4-g48"})
    assert e.value.field == "quantization_config.scheme"


# -- modules -------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("out_features", [72, 96])  # 72: not packable for the int4 CPU kernel
def test_quantized_linear_matches_dequantized_reference(
    scheme: str, rows: int, out_features: int
) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(128, out_features, bias=True)
    config = parse_scheme(scheme)
    module = LINEAR_CLASSES[scheme].from_linear(linear, config).prepare()
    x = torch.randn(rows, 128)
    ref = F.linear(
        x, dequantize_weight(quantize_weight(linear.weight, config), config), linear.bias
    )
    # The CPU kernels take bf16 activations: allow bf16 rounding of x, not more.
    tol = 0.02 * ref.abs().max().item()
    assert (module(x) - ref).abs().max().item() <= tol
    assert (module(x) - linear(x)).abs().max().item() > 1e-4  # really quantized
    assert module(x.view(1, rows, 128)).shape == (1, rows, out_features)


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_fallback_matmul_does_not_overflow_fp16(scheme: str) -> None:
    # Raw int8 (127) / fp8 (448) values times activations of 8 over 256 inputs sum past fp16's
    # 65504 unless the weight is scaled first; the scaled product is ~200.
    config = parse_scheme(scheme)
    weight = torch.full((16, 256), 0.1)
    tensors = quantize_weight(weight, config)
    x = torch.full((3, 256), 8.0, dtype=torch.float16)
    want = x.float() @ dequantize_weight(tensors, config, torch.float32).t()
    y = scaled_matmul(x, tensors["qweight"], tensors["scales"])
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert torch.allclose(y.float(), want, rtol=1e-2)
    if scheme == "fp8":  # the CPU path of the module is that fallback
        module = LINEAR_CLASSES[scheme].from_linear(nn.Linear(256, 16, bias=False), config)
        module.load_tensors(tensors)
        assert torch.allclose(module.prepare()(x).float(), want, rtol=1e-2)


def test_int4_cpu_packing_drops_the_canonical_copy_and_still_dequantizes() -> None:
    linear = nn.Linear(256, 64, bias=False)
    config = parse_scheme("int4-g64")
    module = Int4GroupedLinear.from_linear(linear, config)
    want = module.weight
    module.prepare()
    assert module.packed_for_cpu and module.qweight.numel() == 0
    assert (module.weight - want).abs().max().item() <= 1e-2 * want.abs().max().item()


def test_quantized_embedding_dequantizes_only_gathered_rows() -> None:
    emb = nn.Embedding(100, 64)
    for scheme in ("int8", "int4-g32"):
        q = QuantizedEmbedding.from_embedding(emb, parse_scheme(scheme))
        ids = torch.tensor([[3, 99], [0, 3]])
        assert torch.equal(q(ids), q.weight[ids])
        assert (q(ids) - emb(ids)).abs().max().item() < 0.2


# -- checkpoints and the engine ------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["int8", "int4-g64", "fp8"])
def test_greedy_output_equals_reference_implementation(scheme: str, monkeypatch) -> None:
    """The kernels accumulate in another order than the fp32 reference, then round to bf16 (as
    W8A16 / W4A16 do): greedy outputs are equal, or part only where the reference's own top two
    logits are within that rounding (a tie either way may break). The thread count changes the
    accumulation order, so CI's default threads and a 1-thread run may break different ties."""
    prompts = [[1, *range(200, 200 + n)] for n in (3, 9, 17)]
    with Engine(device="cpu") as eng:
        eng.load_model("q", DEMO_BASE, dtype="float32", quantization=scheme)
        assert eng.model_info("q").quantization == scheme
        ours = [o.token_ids for o in eng.generate(prompts, GREEDY, model="q")]
        cls = LINEAR_CLASSES[scheme]
        monkeypatch.setattr(cls, "_matmul", cls.reference_matmul)
        theirs = [o.token_ids for o in eng.generate(prompts, GREEDY, model="q")]
        equal = 0
        for prompt, a, b in zip(prompts, ours, theirs, strict=True):
            i = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
            if i is None:
                equal += 1
                continue
            logits = eng.logits("q", prompt + a[:i])[-1]
            # the logits themselves are bf16 (the quantized lm_head rounds its output): a tie
            # is a gap within one bf16 step at that magnitude (0.031 at 6.0, say)
            tie = max(4e-3, BF16_EPS * logits[a[i]].abs().item())
            assert logits[b[i]] - logits[a[i]] <= tie, (prompt, i)
    assert equal >= 2


@pytest.mark.parametrize("scheme", ["int8", "int4-g32", "fp8"])
def test_ahead_of_time_checkpoint_loads_like_load_time_quantization(
    scheme: str, build_variant, tmp_path: Path
) -> None:
    base = build_variant("llama")
    figures = quantize_checkpoint(base, scheme, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["scheme"] == scheme
    assert figures["bytes_out"] < 0.6 * figures["bytes_in"]
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    with Engine(device="cpu") as eng:
        aot = eng.load_model("aot", tmp_path / "q", dtype="float32")
        eng.load_model("jit", base, dtype="float32", quantization=scheme)
        assert (
            aot.quantization == scheme
            and aot.num_parameters == eng.model_info("jit").num_parameters
        )
        assert torch.equal(eng.logits("aot", IDS), eng.logits("jit", IDS))
        with pytest.raises(QuantizationError, match="cannot run it as"):
            eng.load_model(
                "other", tmp_path / "q", quantization="int4-g64" if scheme != "int4-g64" else "int8"
            )


def test_tied_model_shares_one_quantized_table(build_variant, tmp_path: Path) -> None:
    base = build_variant("llama-tied")
    quantize_checkpoint(base, "int8", tmp_path / "q")
    with safe_open(tmp_path / "q" / "model.safetensors", framework="pt") as st:
        names = set(st.keys())
    assert "model.embed_tokens.qweight" in names and not any(n.startswith("lm_head") for n in names)
    with Engine(device="cpu") as eng:
        aot = eng.load_model("aot", tmp_path / "q", dtype="float32")
        eng.load_model("jit", base, dtype="float32", quantization="int8")
        eng.load_model("float", base, dtype="float32")
        assert torch.equal(eng.logits("aot", IDS), eng.logits("jit", IDS))
        assert aot.weight_bytes < 0.3 * eng.model_info("float").weight_bytes


def test_bad_quantized_checkpoints_name_the_field(build_variant, tmp_path: Path) -> None:
    quantize_checkpoint(build_variant("llama"), "int8", tmp_path / "q")
    with pytest.raises(QuantizationError, match="quantized already"):
        quantize_checkpoint(tmp_path / "q", "int8", tmp_path / "again")
    cfg_file = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"]["scheme"] = "fp8"  # metadata disagrees with the tensors
    cfg_file.write_text(json.dumps(cfg))
    with Engine(device="cpu") as eng, pytest.raises(QuantizationError) as e:
        eng.load_model("q", tmp_path / "q")
    assert e.value.field is not None and e.value.field.endswith(".qweight")
    cfg["quantization_config"]["scheme"] = "int4-g64"
    cfg_file.write_text(json.dumps(cfg))
    with Engine(device="cpu") as eng, pytest.raises(CheckpointError) as e:
        eng.load_model("q", tmp_path / "q")
    assert e.value.field is not None and e.value.field.endswith(".zeros")
    with Engine(device="cpu") as eng, pytest.raises(QuantizationError):
        eng.load_model("x", build_variant("llama"), quantization="int5")


@pytest.mark.parametrize("leaf", ["scales", "qweight"])
def test_quantized_leaf_of_wrong_dtype_names_its_shard(
    build_variant, tmp_path: Path, leaf: str
) -> None:
    quantize_checkpoint(build_variant("llama"), "int8", tmp_path / "q")
    shard = next((tmp_path / "q").glob("*.safetensors"))
    tensors = load_file(shard)
    name = next(n for n in sorted(tensors) if n.endswith("." + leaf))
    tensors[name] = tensors[name].to(torch.float16)
    save_file(tensors, shard)
    with Engine(device="cpu") as eng, pytest.raises(QuantizationError) as e:
        eng.load_model("q", tmp_path / "q")
    assert e.value.field == name and e.value.file == str(shard)
    assert "float16" in str(e.value)


def test_batching_and_prefix_cache_match_each_request_alone(build_variant) -> None:
    rng = random.Random(0)
    shared = [rng.randrange(5, 400) for _ in range(40)]
    prompts = [
        shared + [rng.randrange(5, 400) for _ in range(rng.randrange(1, 9))] for _ in range(6)
    ]
    with Engine(device="cpu") as eng:
        eng.load_model("q", build_variant("llama"), dtype="float32", quantization="int4-g32")
        alone = [eng.generate([p], GREEDY, model="q")[0].token_ids for p in prompts]
        together = [o.token_ids for o in eng.generate(prompts, GREEDY, model="q")]
        assert eng.block_manager("q").hits > 0
    assert together == alone


def test_lora_wraps_a_quantized_base(tmp_path: Path, build_variant) -> None:
    peft = pytest.importorskip("peft")
    from tests.engine.test_lora import make_adapter

    base = build_variant("llama")
    make_adapter(base, tmp_path / "a", seed=1, targets=("q_proj", "down_proj"))
    assert peft is not None
    with Engine(device="cpu") as eng:
        eng.load_model("q", base, dtype="float32", quantization="int8")
        eng.load_adapter("q:a", tmp_path / "a")
        with_adapter, bare = eng.logits("q:a", IDS), eng.logits("q", IDS)
        model = eng._workers["q"].model
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, LoRALinear)
    assert isinstance(layer.self_attn.q_proj.base, LINEAR_CLASSES["int8"])
    assert (with_adapter - bare).abs().max().item() > 1e-2


# -- quantized KV cache --------------------------------------------------------------------------


@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn])
def test_quantized_kv_round_trip(qdtype: torch.dtype) -> None:
    kv = QuantizedKV((4, 8, 2, 16), qdtype, torch.float32, "cpu")
    x = torch.randn(5, 2, 16) * torch.tensor([0.01, 10.0])[None, :, None]  # per-head scales
    slots = torch.tensor([0, 9, 10, 17, 31])
    kv.write(slots, x)
    back = kv.index_select(0, torch.arange(4)).view(-1, 2, 16)[slots]
    rel = 2**-7 if qdtype == torch.int8 else 2**-3
    assert ((back - x).abs() <= x.abs().amax(-1, keepdim=True) * rel).all()


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_quantized_kv_cache_is_smaller_and_keeps_greedy_output(build_variant, kv_dtype) -> None:
    base = build_variant("llama")
    with Engine(device="cpu") as eng:
        f = eng.load_model("f", base, dtype="float32", num_blocks=32)
        q = eng.load_model("q", base, dtype="float32", num_blocks=32, kv_cache_dtype=kv_dtype)
        prompts = [IDS, IDS[:5], [1, 2, 3]]
        assert [o.token_ids for o in eng.generate(prompts, GREEDY, model="q")] == [
            o.token_ids for o in eng.generate(prompts, GREEDY, model="f")
        ]
        with pytest.raises(InvalidRequestError):
            eng.load_model("bad", base, kv_cache_dtype="int4")
    assert q.kv_cache_bytes < 0.3 * f.kv_cache_bytes
    assert q.kv_cache_dtype == {"int8": "int8", "fp8": "float8_e4m3fn"}[kv_dtype]


def test_kv_block_bytes_count_the_scales(build_variant) -> None:
    from engine.config import ModelArgs

    args = ModelArgs.from_dir(build_variant("llama"))
    cache = KVCache(args, 3, 16, torch.float32, torch.device("cpu"), kv_dtype=torch.int8)
    assert cache.nbytes == 3 * block_bytes(args, 16, torch.int8)
