"""Adapter residency for one base model: slots in the model's stacked LoRA weights, a CPU tier,
and a directory on disk; pinned while requests use them, LRU otherwise (LoRAX-style tiers)."""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.errors import AdapterError, ModelNotFoundError
from engine.lora import (
    LINEAR_TYPES,
    AdapterWeights,
    LoRALinear,
    LoRAState,
    load_adapter_weights,
    wrap_linears,
)

log = logging.getLogger(__name__)
_generation = itertools.count(1)


@dataclass
class AdapterInfo:
    """What the engine reports about a known adapter."""

    name: str  # full name, "base:adapter"
    path: str
    rank: int
    resident: str  # "slot" | "cpu" | "disk"
    slot: int | None
    in_use: int
    unloading: bool


class AdapterManager:
    """Known adapters of one base model and where each one lives."""

    def __init__(
        self,
        base: str,
        model: nn.Module,
        *,
        max_loaded: int,
        max_rank: int,
        max_cpu: int,
        adapter_dir: str | Path | None,
        device: torch.device,
    ) -> None:
        self.base, self.model, self.device = base, model, device
        self.max_loaded, self.max_rank, self.max_cpu = max_loaded, max_rank, max_cpu
        self.adapter_dir = Path(adapter_dir) if adapter_dir else None
        self.state = LoRAState()
        self._linears: dict[str, LoRALinear] | None = None
        self._paths: dict[str, str] = {}  # known adapters -> directory
        self._salts: dict[str, bytes] = {}
        self._cpu: OrderedDict[str, AdapterWeights] = OrderedDict()
        self._slots: list[str | None] = [None] * max_loaded
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident, least recently used first
        self._pins: dict[str, int] = {}
        self._unloading: set[str] = set()

    # -- registry ---------------------------------------------------------------------------

    def known(self, name: str) -> bool:
        """Is the adapter loaded, or loadable on demand from the adapter directory?"""
        if name in self._unloading:
            return False
        return name in self._paths or self._on_disk(name) is not None

    def loaded(self, name: str) -> bool:
        """Has the adapter been read and registered (whatever tier it is in now)?"""
        return name in self._paths and name not in self._unloading

    def _on_disk(self, name: str) -> Path | None:
        if self.adapter_dir is None:
            return None
        adapter = name.split(":", 1)[1]
        if "/" in adapter or adapter.startswith("."):
            return None
        path = self.adapter_dir / adapter
        return path if (path / "adapter_config.json").is_file() else None

    def read(self, name: str, path: str | Path | None) -> AdapterWeights:
        """Read and check an adapter's weights from disk (no state changes: safe off-lock)."""
        if self.max_loaded < 1:
            raise AdapterError(
                "adapters are disabled for this model (max_loaded_adapters=0)",
                file=str(path),
                field="max_loaded_adapters",
            )
        path = Path(path) if path else self._on_disk(name)
        if path is None:
            raise ModelNotFoundError(name)
        return load_adapter_weights(name, path, self._base_linears(), self.max_rank)

    def _base_linears(self) -> dict[str, nn.Linear]:
        if self._linears is not None:
            return {k: m.base for k, m in self._linears.items()}
        return {k: m for k, m in self.model.named_modules() if isinstance(m, LINEAR_TYPES)}

    def add(self, weights: AdapterWeights) -> None:
        """Register read weights (CPU tier) and make them resident if a slot is free."""
        self._ensure_wrapped()
        name = weights.name
        if name in self._paths and name not in self._unloading:
            self._drop(name)
        self._unloading.discard(name)
        self._paths[name] = weights.path
        self._salts[name] = hashlib.blake2b(
            f"{name}\0{weights.path}\0{next(_generation)}".encode(), digest_size=16
        ).digest()
        self._remember(weights)
        if None in self._slots:
            self._install(name, self._slots.index(None))

    def _ensure_wrapped(self) -> None:
        # Module swap on first use: a model that never serves an adapter pays nothing.
        if self._linears is None:
            self._linears = wrap_linears(self.model, self.max_loaded, self.max_rank, self.state)

    def _remember(self, weights: AdapterWeights) -> None:
        self._cpu[weights.name] = weights
        self._cpu.move_to_end(weights.name)
        while len(self._cpu) > self.max_cpu:
            evicted, _ = self._cpu.popitem(last=False)
            log.info("adapter %s moved from CPU memory to disk only", evicted)

    def remove(self, name: str) -> bool:
        """Unload: refuse new requests now, free the slot once in-flight ones finish.
        True if it was freed immediately."""
        if name not in self._paths or name in self._unloading:
            raise ModelNotFoundError(name)
        if self._pins.get(name, 0) > 0:
            self._unloading.add(name)
            return False
        self._drop(name)
        return True

    def _drop(self, name: str) -> None:
        self._evict(name)
        self._paths.pop(name, None)
        self._cpu.pop(name, None)
        self._salts.pop(name, None)
        self._unloading.discard(name)

    def salt(self, name: str) -> bytes:
        """Prefix-cache salt: blocks computed under different adapters never mix."""
        return self._salts[name]

    # -- slots -------------------------------------------------------------------------------

    def pin(self, name: str) -> int | None:
        """Make the adapter resident and hold it for a request; None if every slot is pinned."""
        slot = self._slot_of(name)
        if slot is None:
            slot = self._free_slot()
            if slot is None:
                return None
            self._install(name, slot)
        self._pins[name] = self._pins.get(name, 0) + 1
        self._lru.move_to_end(name)
        return slot

    def unpin(self, name: str) -> None:
        """Release a request's hold; an adapter being unloaded goes once nobody holds it."""
        self._pins[name] -= 1
        if self._pins[name] == 0:
            del self._pins[name]
            if name in self._unloading:
                self._drop(name)

    def _slot_of(self, name: str) -> int | None:
        return self._slots.index(name) if name in self._slots else None

    def _free_slot(self) -> int | None:
        if None in self._slots:
            return self._slots.index(None)
        for victim in self._lru:
            if self._pins.get(victim, 0) == 0:
                slot = self._slots.index(victim)
                self._evict(victim)
                return slot
        return None

    def _install(self, name: str, slot: int) -> None:
        weights = self._cpu.get(name)
        if weights is None:  # fell out of the CPU tier: back from disk
            weights = load_adapter_weights(
                name, self._paths[name], self._base_linears(), self.max_rank
            )
            self._remember(weights)
        for module, lora in self._linears.items():
            a, b = weights.weights.get(module, (None, None))
            lora.install(slot, _to(a, lora), _to(b, lora))
        self._slots[slot] = name
        self._lru[name] = None
        self._update_rank()

    def _update_rank(self) -> None:
        ranks = [self._cpu[n].config.r for n in self._slots if n is not None and n in self._cpu]
        self.state.rank = (
            max(ranks, default=self.max_rank)
            if len(ranks) == sum(n is not None for n in self._slots)
            else self.max_rank
        )

    def _evict(self, name: str) -> None:
        slot = self._slot_of(name)
        if slot is not None:
            self._slots[slot] = None
            for lora in self._linears.values():
                lora.install(slot, None, None)
        self._lru.pop(name, None)

    def info(self) -> list[AdapterInfo]:
        """Every known adapter with its residency."""
        out = []
        for name, path in self._paths.items():
            slot = self._slot_of(name)
            resident = "slot" if slot is not None else "cpu" if name in self._cpu else "disk"
            rank = self._cpu[name].config.r if name in self._cpu else 0
            out.append(
                AdapterInfo(
                    name,
                    path,
                    rank,
                    resident,
                    slot,
                    self._pins.get(name, 0),
                    name in self._unloading,
                )
            )
        return out


def _to(t: torch.Tensor | None, lora: LoRALinear) -> torch.Tensor | None:
    return None if t is None else t.to(device=lora.lora_a.device, dtype=lora.lora_a.dtype)
