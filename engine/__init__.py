"""compound's built-in inference engine: Llama-family models over a paged KV cache with
continuous batching, several base models in one process."""

from engine.engine import Engine
from engine.errors import (
    CheckpointError,
    EngineError,
    InvalidRequestError,
    MemoryBudgetError,
    ModelAlreadyLoadedError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
)
from engine.outputs import GenerationRequest, RequestOutput, StreamDelta
from engine.sampling import SamplingParams, TokenLogprob
from engine.worker import ModelInfo

__all__ = [
    "CheckpointError",
    "Engine",
    "EngineError",
    "GenerationRequest",
    "InvalidRequestError",
    "MemoryBudgetError",
    "ModelAlreadyLoadedError",
    "ModelInfo",
    "ModelNotFoundError",
    "RequestOutput",
    "SamplingParams",
    "StreamDelta",
    "TokenLogprob",
    "UnsupportedArchitectureError",
]
