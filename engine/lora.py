"""Multi-LoRA: PEFT adapters served side by side in one batch.

Every targeted `nn.Linear` is swapped for a `LoRALinear` that keeps the base layer and stacked
adapter weights, one slot per resident adapter: A [S, r, in] and B [S, out, r] (scaling folded
into B, ranks zero-padded to the slot rank). A step sets one slot index per token (-1 = base
only); each linear adds B[slot] @ A[slot] @ x for its tokens (shrink, then expand), so requests
for different adapters and for the bare base share one forward.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from engine.errors import AdapterError
from engine.model import TransposedLinear
from engine.quantize import QuantizedLinear

LINEAR_TYPES = (nn.Linear, TransposedLinear, QuantizedLinear)
# The linears an adapter may target: PEFT names them by their last module name.
TARGETABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of a PEFT `adapter_config.json` the engine honours."""

    r: int
    alpha: float
    target_modules: tuple[str, ...] | str  # names, or a regex over full module names
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def targets(self, module_name: str) -> bool:
        """Does the adapter apply to the module with this full name?"""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module_name) is not None
        return module_name.rsplit(".", 1)[-1] in self.target_modules


def read_adapter_config(path: Path) -> AdapterConfig:
    """Parse and check `adapter_config.json`; errors name the file and field."""
    file = path / "adapter_config.json"
    if not file.is_file():
        raise AdapterError("file not found", file=str(file))
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"invalid JSON ({e})", file=str(file)) from e
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{cfg['peft_type']!r} is not LORA", file=str(file), field="peft_type")
    for field in ("bias", "modules_to_save"):
        if cfg.get(field) not in (None, "none", []):
            raise AdapterError("only LoRA weights are supported", file=str(file), field=field)
    r = cfg.get("r")
    if not isinstance(r, int) or r < 1:
        raise AdapterError(f"expected a positive int, got {r!r}", file=str(file), field="r")
    targets = cfg.get("target_modules")
    if not targets:
        raise AdapterError("missing", file=str(file), field="target_modules")
    return AdapterConfig(
        r=r,
        alpha=float(cfg.get("lora_alpha", r)),
        target_modules=targets if isinstance(targets, str) else tuple(targets),
        use_rslora=bool(cfg.get("use_rslora", False)),
    )


@dataclass
class AdapterWeights:
    """One adapter's tensors on CPU, by full module name: A [r, in], B [out, r] * scaling."""

    name: str
    path: str
    config: AdapterConfig
    weights: dict[str, tuple[Tensor, Tensor]]

    @property
    def nbytes(self) -> int:
        """Bytes the tensors take."""
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def load_adapter_weights(
    name: str, path: str | Path, linears: dict[str, nn.Linear], max_rank: int
) -> AdapterWeights:
    """Read a PEFT adapter and check it against the base model's linears (by full name)."""
    path = Path(path)
    config = read_adapter_config(path)
    if config.r > max_rank:
        raise AdapterError(
            f"rank {config.r} exceeds the engine's max_lora_rank {max_rank}",
            file=str(path / "adapter_config.json"),
            field="r",
        )
    tensors = _read_tensors(path)
    weights = {}
    for module, (a, b) in tensors.items():
        _check_shapes(module, (a, b), linears, config, path)
        weights[module] = (a.float(), b.float() * config.scaling)
    if not weights:
        raise AdapterError("no LoRA tensors found", file=str(path / "adapter_model.safetensors"))
    return AdapterWeights(name=name, path=str(path), config=config, weights=weights)


def _read_tensors(path: Path) -> dict[str, tuple[Tensor, Tensor]]:
    file = path / "adapter_model.safetensors"
    if not file.is_file():
        raise AdapterError("file not found", file=str(file))
    pairs: dict[str, dict[str, Tensor]] = {}
    with safe_open(file, framework="pt", device="cpu") as st:
        keys = st.keys()
        for key in keys:
            m = _KEY.match(key)
            if m is None:
                raise AdapterError("not a LoRA A/B weight", file=str(file), field=key)
            pairs.setdefault(m["module"], {})[m["ab"]] = st.get_tensor(key)
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError("needs both lora_A and lora_B", file=str(file), field=module)
    return {module: (ab["A"], ab["B"]) for module, ab in pairs.items()}


def _check_shapes(
    module: str, pair: tuple[Tensor, Tensor], linears: dict, config: AdapterConfig, path: Path
) -> None:
    a, b = pair
    file = str(path / "adapter_model.safetensors")
    base = linears.get(module)
    if base is None:
        raise AdapterError("the base model has no such linear layer", file=file, field=module)
    want_a, want_b = (config.r, base.in_features), (base.out_features, config.r)
    if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
        raise AdapterError(
            f"shapes {tuple(a.shape)}/{tuple(b.shape)} do not match the base ({want_a}/{want_b})",
            file=file,
            field=module,
        )


class LoRAState:
    """Per-step adapter mapping shared by every LoRALinear of a model."""

    def __init__(self) -> None:
        self.indices: Tensor | None = None  # [T] slot per token, -1 = base only
        self.groups: list[tuple[int, Tensor]] = []  # (slot, token rows) for each active slot
        # When each slot's tokens are contiguous (the worker sorts the batch by slot), slices
        # replace the gathers: 2 ops per slot and linear instead of ~5 (CPU is op-bound here).
        self.ranges: list[tuple[int, int, int]] = []  # (slot, start, end)
        self.rank = 0  # largest rank of a resident adapter: slots are padded beyond it

    def set(self, slots: list[int], device: torch.device) -> None:
        """Install the slot of each token of the step (computes the per-slot row groups once)."""
        active = sorted({s for s in slots if s >= 0})
        if not active:
            self.indices, self.groups, self.ranges = None, [], []
            return
        idx = torch.tensor(slots, device=device)
        self.indices = idx
        self.ranges = _contiguous_runs(slots)
        self.groups = [] if self.ranges else [(s, (idx == s).nonzero().squeeze(1)) for s in active]


def _contiguous_runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """(slot, start, end) per adapter slot if every slot's tokens form one run, else []."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[start]:
            if slots[start] >= 0:
                runs.append((slots[start], start, i))
            start = i
    return runs if len({s for s, _, _ in runs}) == len(runs) else []


class LoRALinear(nn.Module):
    """`nn.Linear` plus stacked adapter slots; a module swap that leaves the base untouched."""

    def __init__(self, base: nn.Module, num_slots: int, rank: int, state: LoRAState) -> None:
        super().__init__()
        self.base = base
        self.state = state
        w = base.weight
        self.lora_a = torch.zeros(num_slots, rank, base.in_features, dtype=w.dtype, device=w.device)
        self.lora_b = torch.zeros(
            num_slots, base.out_features, rank, dtype=w.dtype, device=w.device
        )

    @property
    def weight(self) -> Tensor:
        """The base weight (so code that reads `.weight` keeps working)."""
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)  # x: [T, in] -> y: [T, out]
        if x.is_cuda and self.state.indices is not None and not y.requires_grad:
            from engine.kernels.lora import lora_apply

            # One shrink and one expand launch for the whole step, whatever the slot mix (the
            # kernels write y in place, invisible to autograd: the loop serves training).
            return lora_apply(y, x, self.lora_a, self.lora_b, self.state.indices)
        # On CPU a matmul per active slot is the fast path.
        r = self.state.rank or self.lora_a.shape[1]
        for slot, start, end in self.state.ranges:
            a, b = self.lora_a[slot, :r], self.lora_b[slot, :, :r]
            y[start:end].addmm_(x[start:end] @ a.T, b.T)
        for slot, rows in self.state.groups:
            # shrink [n, in] -> [n, r], expand [n, r] -> [n, out]
            delta = (x[rows] @ self.lora_a[slot].T) @ self.lora_b[slot].T
            y.index_add_(0, rows, delta)
        return y

    def install(self, slot: int, a: Tensor | None, b: Tensor | None) -> None:
        """Copy one adapter's A/B into a slot (zeros where it does not target this module)."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if a is not None and b is not None:
            r = a.shape[0]
            self.lora_a[slot, :r].copy_(a)
            self.lora_b[slot, :, :r].copy_(b)


def wrap_linears(
    model: nn.Module, num_slots: int, rank: int, state: LoRAState
) -> dict[str, LoRALinear]:
    """Swap every targetable linear of the model for a LoRALinear; returns them by full name."""
    wrapped = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETABLE and isinstance(child, LINEAR_TYPES):
                lora = LoRALinear(child, num_slots, rank, state)
                setattr(module, child_name, lora)
                wrapped[f"{name}.{child_name}" if name else child_name] = lora
    return wrapped
