"""One error tree for the engine; the server maps these to HTTP in one place."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class CheckpointError(EngineError):
    """A checkpoint directory is missing a file or a field, or holds a bad value."""

    def __init__(self, message: str, *, file: str, field: str | None = None) -> None:
        where = f"{file}: {field}" if field else file
        super().__init__(f"{where}: {message}")
        self.file = file
        self.field = field
        self.reason = message


class UnsupportedArchitectureError(CheckpointError):
    """`config.json` names an architecture the engine has no model code for."""


class ModelNotFoundError(EngineError):
    """A request named a model that is not loaded."""

    def __init__(self, model: str) -> None:
        super().__init__(f"model {model!r} is not loaded")
        self.model = model


class ModelAlreadyLoadedError(EngineError):
    """`load_model` was called with a name already in use."""

    def __init__(self, model: str) -> None:
        super().__init__(f"a model named {model!r} is already loaded")
        self.model = model


class InvalidRequestError(EngineError):
    """A generation request is malformed or exceeds a limit; `param` names the field."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class MemoryBudgetError(EngineError):
    """Loading a model would exceed the engine's memory budget."""


class AdapterError(CheckpointError):
    """A LoRA adapter is malformed or does not fit its base model."""


class QuantizationError(CheckpointError):
    """A quantization scheme is unknown, or a checkpoint's `quantization_config` or tensors do
    not match it; `file` and `field` say where."""
