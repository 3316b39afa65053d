"""Weight-only quantization as module swaps of `nn.Linear` (and `nn.Embedding`), gpt-fast style.

Schemes (named in `compound.yaml`, `Engine.load_model(quantization=...)` and a checkpoint's
`config.json` `quantization_config`, never guessed from file names):

- `int8`: symmetric, one scale per output channel: w = q * s, q in [-127, 127].
- `int4-g32|g64|g128`: asymmetric per group of `g` input features: w = (q - 8) * s + z with
  q in [0, 15] (tinygemm's float zero point, so the CPU kernel reads our tensors as they are).
- `fp8`: e4m3 with one scale per output channel: w = q * s.

Canonical tensors per quantized layer (what a checkpoint stores): `qweight` (int8 [N, K];
uint8 [N, K/2] two 4-bit values a byte, even k in the low nibble; float8_e4m3fn [N, K]),
`scales` ([N] float32 for int8/fp8, [N, K/g] bfloat16 for int4) and `zeros` (int4 only, like
`scales`). Scales are rounded to their storage dtype before the weights are rounded, so a
reference dequantization and every kernel agree on the same numbers.

At run time each module `prepare`s itself for its device: on CPU int4 weights are repacked for
`aten._weight_int4pack_mm_for_cpu`, and both integer schemes run their GEMM in bfloat16
activations (those kernels vectorize bf16 only; fp32 activations take a scalar path 10x slower).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.errors import QuantizationError

log = logging.getLogger(__name__)

QUANT_METHOD = "compound"
FORMAT_VERSION = 1
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_INT4_SCHEME = re.compile(r"^int4-g(32|64|128)$")
SCHEMES = ("int8", "int4-g32", "int4-g64", "int4-g128", "fp8")
# Decode-sized batches on CUDA take the Triton split-K GEMMs; larger ones dequantize and matmul.
_MAX_KERNEL_ROWS = 16


@dataclass(frozen=True)
class QuantConfig:
    """A quantization scheme and what it covers."""

    scheme: str  # one of SCHEMES

    @property
    def bits(self) -> int:
        """Bits a weight."""
        return 4 if self.scheme.startswith("int4") else 8

    @property
    def group_size(self) -> int | None:
        """Input features sharing a scale (int4), None for per-channel schemes."""
        m = _INT4_SCHEME.match(self.scheme)
        return int(m.group(1)) if m else None

    def to_json(self) -> dict:
        """The `quantization_config` entry of a checkpoint's config.json."""
        return {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "scheme": self.scheme,
            "bits": self.bits,
            "group_size": self.group_size,
        }

    @classmethod
    def from_json(cls, cfg: object, file: str = "config.json") -> QuantConfig:
        """Parse a `quantization_config`; errors name the file and field."""
        if not isinstance(cfg, dict):
            raise QuantizationError("expected an object", file=file, field="quantization_config")
        if cfg.get("quant_method") != QUANT_METHOD:
            raise QuantizationError(
                f"quant_method {cfg.get('quant_method')!r} is not supported (expected "
                f"{QUANT_METHOD!r}, written by `compound quantize`)",
                file=file,
                field="quantization_config.quant_method",
            )
        if cfg.get("format_version") != FORMAT_VERSION:
            raise QuantizationError(
                f"format_version {cfg.get('format_version')!r} is not {FORMAT_VERSION}",
                file=file,
                field="quantization_config.format_version",
            )
        return parse_scheme(cfg.get("scheme"), field="quantization_config.scheme", file=file)


def parse_scheme(scheme: object, *, field: str = "quantization", file: str = "<load_model>"):
    """A `QuantConfig` for a scheme name, or a typed error listing the valid names."""
    if scheme not in SCHEMES:
        raise QuantizationError(
            f"unknown quantization scheme {scheme!r} (expected one of {', '.join(SCHEMES)})",
            file=file,
            field=field,
        )
    return QuantConfig(str(scheme))


# -- quantize / dequantize references ------------------------------------------------------------


def quantize_int8(w: Tensor) -> dict[str, Tensor]:
    """w [N, K] -> int8 qweight [N, K] and float32 per-row scales [N] (bf16-exact: the CPU
    kernel multiplies in bf16)."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-8).to(torch.bfloat16).float()
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return {"qweight": q, "scales": scales}


def dequantize_int8(t: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    """The [N, K] weight an int8 layer stands for."""
    return (t["qweight"].float() * t["scales"].float()[:, None]).to(dtype)


def quantize_int4(w: Tensor, group_size: int) -> dict[str, Tensor]:
    """w [N, K] -> packed uint8 qweight [N, K/2], bfloat16 scales and zeros [N, K/g]."""
    n, k = w.shape
    if k % group_size:
        raise QuantizationError(
            f"in_features {k} is not a multiple of the group size {group_size}",
            file="<quantize>",
            field="group_size",
        )
    groups = w.float().reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-6).to(torch.bfloat16)
    zeros = (lo + 8 * scales.float()).to(torch.bfloat16)
    q = torch.round((groups - zeros.float()[..., None]) / scales.float()[..., None] + 8)
    q = q.clamp(0, 15).to(torch.uint8).reshape(n, k)
    return {"qweight": pack_int4(q), "scales": scales, "zeros": zeros}


def pack_int4(q: Tensor) -> Tensor:
    """uint8 values in [0, 15] [N, K] -> [N, K/2], even k in the low nibble."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of `pack_int4`: [N, K/2] -> uint8 [N, K]."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(t: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    """The [N, K] weight an int4 layer stands for."""
    q = unpack_int4(t["qweight"]).float()
    n, k = q.shape
    groups = t["scales"].shape[1]
    q = q.view(n, groups, k // groups)
    w = (q - 8) * t["scales"].float()[..., None] + t["zeros"].float()[..., None]
    return w.reshape(n, k).to(dtype)


def quantize_fp8(w: Tensor) -> dict[str, Tensor]:
    """w [N, K] -> float8_e4m3fn qweight [N, K] and float32 per-row scales [N]."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    q = (w / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"qweight": q, "scales": scales}


def dequantize_fp8(t: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    """The [N, K] weight an fp8 layer stands for."""
    return (t["qweight"].float() * t["scales"].float()[:, None]).to(dtype)


def quantize_weight(w: Tensor, config: QuantConfig) -> dict[str, Tensor]:
    """Canonical quantized tensors of one [N, K] weight under a scheme."""
    if config.scheme == "int8":
        return quantize_int8(w)
    if config.scheme == "fp8":
        return quantize_fp8(w)
    return quantize_int4(w, config.group_size or 64)


def dequantize_weight(
    t: dict[str, Tensor], config: QuantConfig, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Reference dequantization of canonical tensors."""
    if config.scheme == "int8":
        return dequantize_int8(t, dtype)
    if config.scheme == "fp8":
        return dequantize_fp8(t, dtype)
    return dequantize_int4(t, dtype)


def quantized_shapes(out_features: int, in_features: int, config: QuantConfig) -> dict:
    """Shapes and dtypes of the canonical tensors of an [out, in] weight."""
    if config.group_size is not None:
        groups = (out_features, in_features // config.group_size)
        return {
            "qweight": ((out_features, in_features // 2), torch.uint8),
            "scales": (groups, torch.bfloat16),
            "zeros": (groups, torch.bfloat16),
        }
    qdtype = torch.int8 if config.scheme == "int8" else torch.float8_e4m3fn
    return {
        "qweight": ((out_features, in_features), qdtype),
        "scales": ((out_features,), torch.float32),
    }


# -- modules -------------------------------------------------------------------------------------


def scaled_matmul(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """x [M, K] @ (qweight [N, K] * scales [N])^T in x's dtype: the per-channel fallback.

    The weight is dequantized before the matmul: multiplying raw int8 / fp8 values (up to 127
    / 448) by fp16 activations and scaling afterwards overflows fp16's 65504 on long rows."""
    w = qweight.to(x.dtype).mul_(scales.to(x.dtype)[:, None])
    return F.linear(x, w)


class QuantizedLinear(nn.Module):
    """Base of the quantized linears: canonical buffers, a bias, the activations' dtype."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: QuantConfig,
        *,
        bias: Tensor | None,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.config, self.dtype = (
            in_features,
            out_features,
            config,
            dtype,
        )
        for name, (shape, qdtype) in quantized_shapes(out_features, in_features, config).items():
            self.register_buffer(name, torch.empty(shape, dtype=qdtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Module, config: QuantConfig) -> QuantizedLinear:
        """Quantize a float linear (nn.Linear or anything with `.weight` [out, in]); the
        result is not `prepare`d yet."""
        w = linear.weight.detach()
        module = cls(
            linear.in_features, linear.out_features, config, bias=linear.bias, dtype=w.dtype
        )
        module.load_tensors(quantize_weight(w, config))
        return module

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Install canonical tensors (shared, not copied: a tied embedding passes its own)."""
        for name, t in tensors.items():
            setattr(self, name, t)

    def tensors(self) -> dict[str, Tensor]:
        """The canonical tensors (before any device-specific repacking)."""
        return {
            name: self._buffers[name]
            for name in ("qweight", "scales", "zeros")
            if name in self._buffers
        }

    @property
    def weight(self) -> Tensor:
        """The dequantized weight [out, in] (a fresh tensor: for set-up code, not the hot path)."""
        return dequantize_weight(self.tensors(), self.config, self.dtype)

    def prepare(self) -> QuantizedLinear:
        """Convert buffers to the device's fast layout (once, after the weights are in place)."""
        return self

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = self._matmul(x.reshape(-1, self.in_features)).view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _matmul(self, x: Tensor) -> Tensor:
        """x [M, K] -> x @ W^T [M, N] in x's dtype; the dequantize-then-matmul fallback."""
        return F.linear(x, self.weight.to(x.dtype))

    def reference_matmul(self, x: Tensor) -> Tensor:
        """The reference implementation `_matmul` must agree with: the dequantized weight in
        fp32, with activations and outputs rounded where the kernels round them (to bf16 for
        the CPU integer kernels: W8A16 / W4A16 take 16-bit activations)."""
        w = self.weight.float()
        act = self.activation_dtype(x)
        y = x.to(act).float() @ w.t()
        return y.to(act).to(x.dtype)

    def activation_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype `_matmul` multiplies x in."""
        return x.dtype

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scheme={self.config.scheme}"


class Int8WeightOnlyLinear(QuantizedLinear):
    """W8A16: int8 weights, per-output-channel scales, activations in their own dtype."""

    def activation_dtype(self, x: Tensor) -> torch.dtype:
        return torch.bfloat16 if x.device.type == "cpu" else x.dtype

    def _matmul(self, x: Tensor) -> Tensor:
        if x.is_cuda and x.shape[0] <= _MAX_KERNEL_ROWS:
            from engine.kernels.quant_gemm import w8a16_gemm

            return w8a16_gemm(x, self.qweight, self.scales)
        if x.device.type == "cpu":
            # The kernel multiplies by the scales inside, in bf16 (exact: see quantize_int8).
            xb = x.to(torch.bfloat16)
            y = torch.ops.aten._weight_int8pack_mm(xb, self.qweight, self._scales_bf16)
            return y.to(x.dtype)
        return scaled_matmul(x, self.qweight, self.scales)

    def prepare(self) -> QuantizedLinear:
        self._scales_bf16 = self.scales.to(torch.bfloat16)
        return self


class Int4GroupedLinear(QuantizedLinear):
    """W4A16: 4-bit weights in groups along `in` with a scale and a zero point each.

    On CPU `prepare` repacks the weights for `aten._weight_int4pack_mm_for_cpu` and drops the
    canonical tensors, so the layer holds one copy."""

    def prepare(self) -> QuantizedLinear:
        if self.qweight.device.type != "cpu" or self.qweight.shape[0] != self.out_features:
            return self  # on a GPU, or packed already
        if self.out_features % 16:
            return self  # the CPU packing needs N % 16 == 0: dequantize-and-matmul instead
        q = unpack_int4(self.qweight).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        # tinygemm's layout: [K/g, N, 2] (scale, zero)
        scales_zeros = torch.stack((self.scales, self.zeros), dim=-1).transpose(0, 1)
        self.register_buffer("cpu_packed", packed, persistent=False)
        self.register_buffer("cpu_scales_zeros", scales_zeros.contiguous(), persistent=False)
        # The canonical tensors are now redundant: drop them so the layer holds one copy.
        self.qweight = torch.empty(0, 0, dtype=torch.uint8)
        self.scales = self.zeros = torch.empty(0, 0, dtype=torch.bfloat16)
        return self

    @property
    def packed_for_cpu(self) -> bool:
        """Whether `prepare` swapped the canonical weights for the CPU kernel's layout."""
        return "cpu_packed" in self._buffers

    @property
    def weight(self) -> Tensor:
        if not self.packed_for_cpu:
            return super().weight
        # The kernel unpacks for us: with x = I, scale 1 and zero 0 it returns (q - 8)^T exactly
        # (small integers), which the stored scales and zeros then dequantize in fp32.
        sz = self.cpu_scales_zeros  # [K/g, N, 2]
        unit = torch.stack((torch.ones_like(sz[..., 0]), torch.zeros_like(sz[..., 1])), dim=-1)
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        q = torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye, self.cpu_packed, self.config.group_size, unit
        )
        n, groups = self.out_features, sz.shape[0]
        q = q.float().t().reshape(n, groups, -1)
        w = q * sz[..., 0].t().float()[..., None] + sz[..., 1].t().float()[..., None]
        return w.reshape(n, -1).to(self.dtype)

    def activation_dtype(self, x: Tensor) -> torch.dtype:
        return torch.bfloat16 if self.packed_for_cpu and x.device.type == "cpu" else x.dtype

    def _cpu_mm(self, x: Tensor) -> Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), self.cpu_packed, self.config.group_size, self.cpu_scales_zeros
        )

    def _matmul(self, x: Tensor) -> Tensor:
        if self.packed_for_cpu and x.device.type == "cpu":
            return self._cpu_mm(x).to(x.dtype)
        if x.is_cuda and x.shape[0] <= _MAX_KERNEL_ROWS:
            from engine.kernels.quant_gemm import w4a16_gemm

            return w4a16_gemm(x, self.qweight, self.scales, self.zeros)
        return super()._matmul(x)


class Fp8Linear(QuantizedLinear):
    """FP8 (e4m3) weights with per-channel scales. On Hopper (sm_90+) activations are quantized
    per token and multiplied by `torch._scaled_mm`; elsewhere the weight is dequantized to the
    activations' dtype."""

    def _matmul(self, x: Tensor) -> Tensor:
        aligned = self.in_features % 16 == 0 and self.out_features % 16 == 0
        if x.is_cuda and aligned and _has_fp8_mm(x.device):
            return _fp8_scaled_mm(x, self.qweight, self.scales)
        return scaled_matmul(x, self.qweight, self.scales)


def _has_fp8_mm(device: torch.device) -> bool:
    """Row-wise scaled FP8 GEMMs (`torch._scaled_mm` with per-row scales) need Hopper."""
    return torch.cuda.get_device_capability(device) >= (9, 0)


def _fp8_scaled_mm(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """Row-wise scaled FP8 GEMM: x quantized per token, W per output channel."""
    x_scale = (x.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    xq = (x.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    out_dtype = x.dtype if x.dtype != torch.float32 else torch.bfloat16
    y = torch._scaled_mm(
        xq, qweight.t(), scale_a=x_scale, scale_b=scales.float()[None, :], out_dtype=out_dtype
    )
    return y.to(x.dtype)


LINEAR_CLASSES: dict[str, type[QuantizedLinear]] = {
    "int8": Int8WeightOnlyLinear,
    "fp8": Fp8Linear,
    **{s: Int4GroupedLinear for s in SCHEMES if s.startswith("int4")},
}


class QuantizedEmbedding(nn.Module):
    """Token embeddings stored like a quantized linear's weight ([vocab, dim], rows = out);
    a lookup dequantizes only the gathered rows."""

    def __init__(self, num: int, dim: int, config: QuantConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.config, self.dtype = num, dim, config, dtype
        for name, (shape, qdtype) in quantized_shapes(num, dim, config).items():
            self.register_buffer(name, torch.empty(shape, dtype=qdtype))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, config: QuantConfig) -> QuantizedEmbedding:
        """Quantize a float embedding table row by row."""
        w = emb.weight.detach()
        module = cls(w.shape[0], w.shape[1], config, w.dtype)
        for name, t in quantize_weight(w, config).items():
            setattr(module, name, t)
        return module

    def tensors(self) -> dict[str, Tensor]:
        """The canonical tensors of the table."""
        return dict(self.named_buffers())

    @property
    def weight(self) -> Tensor:
        """The dequantized table (set-up code only)."""
        return dequantize_weight(dict(self.named_buffers()), self.config, self.dtype)

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        rows = {name: buf.index_select(0, flat) for name, buf in self.named_buffers()}
        out = dequantize_weight(rows, self.config, self.dtype)
        return out.view(*ids.shape, self.embedding_dim)


# -- model-level swaps ---------------------------------------------------------------------------


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, child) of every float linear but a tied lm_head."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and child is not getattr(model, "lm_head", None):
                found.append((parent, name, child))
    return found


def quantize_model(model: nn.Module, config: QuantConfig, *, tied: bool) -> nn.Module:
    """Swap the float linears and the token embeddings of a loaded model (a Transformer) for
    quantized ones. A tied lm_head and the embeddings share one quantized table: per-row
    quantization of [vocab, dim] is the same for both."""
    cls = LINEAR_CLASSES[config.scheme]
    for parent, name, child in _linears(model):
        setattr(parent, name, cls.from_linear(child, config).prepare())
    emb = QuantizedEmbedding.from_embedding(model.model.embed_tokens, config)
    model.model.embed_tokens = emb
    if tied:
        head = cls(emb.embedding_dim, emb.num_embeddings, config, bias=None, dtype=emb.dtype)
        head.load_tensors(emb.tensors())
    else:
        head = cls.from_linear(model.lm_head, config)
    model.lm_head = head.prepare()
    log.info("quantized %s to %s", type(model).__name__, config.scheme)
    return model


def empty_quantized(model: nn.Module, config: QuantConfig, *, dtype: torch.dtype) -> nn.Module:
    """On a meta-device model, swap linears and embeddings for empty quantized modules that a
    checkpoint fills (then `tie_quantized` and `prepare_model`)."""
    cls = LINEAR_CLASSES[config.scheme]
    for parent, name, child in [*_linears(model), (model, "lm_head", model.lm_head)]:
        bias = None if child.bias is None else torch.empty_like(child.bias, dtype=dtype)
        setattr(
            parent,
            name,
            cls(child.in_features, child.out_features, config, bias=bias, dtype=dtype),
        )
    emb = model.model.embed_tokens
    model.model.embed_tokens = QuantizedEmbedding(
        emb.num_embeddings, emb.embedding_dim, config, dtype
    )
    return model


def tie_quantized(model: nn.Module) -> None:
    """Point a tied lm_head at the quantized embedding table (checkpoints store it once)."""
    model.lm_head.load_tensors(model.model.embed_tokens.tensors())


def prepare_model(model: nn.Module) -> None:
    """Let each quantized linear build its device layout (after its tensors are loaded)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.prepare()


def quantized_state_dict(
    state: dict[str, Tensor], config: QuantConfig, *, linear_names: set[str], embedding: str | None
) -> dict[str, Tensor]:
    """Quantize a float state dict: each `<linear>.weight` becomes `<linear>.qweight`,
    `.scales` (and `.zeros`); other tensors are kept as they are."""
    out: dict[str, Tensor] = {}
    for key, t in state.items():
        module, _, leaf = key.rpartition(".")
        if leaf == "weight" and (module in linear_names or module == embedding):
            for name, q in quantize_weight(t, config).items():
                out[f"{module}.{name}"] = q.contiguous()
        else:
            out[key] = t
    return out


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes the weights of a loaded model take (parameters and buffers, the RoPE table
    excepted; tensors shared by tied layers count once)."""
    seen: set[int] = set()
    total = 0
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, t in tensors:
        if name == "rope" or t.device.type == "meta" or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.nbytes
    return total


def num_parameters(model: nn.Module) -> int:
    """Weights the model stands for, counted before quantization."""
    total, seen = 0, set()
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total += module.in_features * module.out_features
        elif isinstance(module, QuantizedEmbedding):
            total += module.num_embeddings * module.embedding_dim
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def quant_scheme(model: nn.Module) -> str | None:
    """The weight quantization scheme of a model, None when it is float."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            return module.config.scheme
    return None
