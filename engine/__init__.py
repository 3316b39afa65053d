"""compound's built-in inference engine: Llama-family models over a paged KV cache with
continuous batching, several base models and their LoRA adapters in one process.

Names are imported lazily (PEP 562) so that `engine.errors` and friends load without torch:
the CLI's `validate` and `explain` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Engine": "engine.engine",
    "AdapterInfo": "engine.adapters",
    "AdapterError": "engine.errors",
    "CheckpointError": "engine.errors",
    "EngineError": "engine.errors",
    "InvalidRequestError": "engine.errors",
    "MemoryBudgetError": "engine.errors",
    "ModelAlreadyLoadedError": "engine.errors",
    "ModelNotFoundError": "engine.errors",
    "QuantizationError": "engine.errors",
    "UnsupportedArchitectureError": "engine.errors",
    "GenerationRequest": "engine.outputs",
    "RequestOutput": "engine.outputs",
    "StreamDelta": "engine.outputs",
    "SamplingParams": "engine.sampling",
    "SpeculativeConfig": "engine.spec_config",
    "SpeculativeOverride": "engine.spec_config",
    "TokenLogprob": "engine.sampling",
    "ModelInfo": "engine.worker",
}

__all__ = [
    "AdapterError",
    "AdapterInfo",
    "CheckpointError",
    "Engine",
    "EngineError",
    "GenerationRequest",
    "InvalidRequestError",
    "MemoryBudgetError",
    "ModelAlreadyLoadedError",
    "ModelInfo",
    "ModelNotFoundError",
    "QuantizationError",
    "RequestOutput",
    "SamplingParams",
    "SpeculativeConfig",
    "SpeculativeOverride",
    "StreamDelta",
    "TokenLogprob",
    "UnsupportedArchitectureError",
]

if TYPE_CHECKING:
    from engine.adapters import AdapterInfo
    from engine.engine import Engine
    from engine.errors import (
        AdapterError,
        CheckpointError,
        EngineError,
        InvalidRequestError,
        MemoryBudgetError,
        ModelAlreadyLoadedError,
        ModelNotFoundError,
        QuantizationError,
        UnsupportedArchitectureError,
    )
    from engine.outputs import GenerationRequest, RequestOutput, StreamDelta
    from engine.sampling import SamplingParams, TokenLogprob
    from engine.spec_config import SpeculativeConfig, SpeculativeOverride
    from engine.worker import ModelInfo


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
