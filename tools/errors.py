"""One error tree for tools: what a tool call can fail with, with structured fields.

Every message is safe to show to the user who wrote the spec: it names the tool, the argument
or the entity, never a Python object. The server maps these to HTTP in one place.
"""

from __future__ import annotations


class ToolError(Exception):
    """Base class of every error a tool call raises on purpose; `tool` names the tool if known."""

    def __init__(self, message: str, *, tool: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.tool = tool


class ToolNotFound(ToolError):
    """No tool of that name is registered."""

    def __init__(self, name: str, *, available: tuple[str, ...] = ()) -> None:
        hint = f"; registered tools: {', '.join(available)}" if available else ""
        super().__init__(f"unknown tool {name!r}{hint}", tool=name)
        self.name = name
        self.available = available


class ToolArgumentError(ToolError):
    """The arguments do not match the tool's schema; `path` is a JSON pointer into the args."""

    def __init__(self, path: str, message: str, *, tool: str | None = None) -> None:
        super().__init__(f"{path or '/'}: {message}", tool=tool)
        self.path = path
        self.message = message


class ToolTimeout(ToolError):
    """The call ran longer than its time limit."""

    def __init__(self, name: str, timeout_s: float) -> None:
        super().__init__(f"tool {name!r} timed out after {timeout_s:g} s", tool=name)
        self.timeout_s = timeout_s


class ToolRegistrationError(ToolError):
    """A tool cannot be registered or loaded: bad name, duplicate, unsupported signature."""


class UnknownEntity(ToolError):
    """`kb.lookup` or `kb.describe` named no entity of the knowledge base."""

    def __init__(self, entity: str, *, suggestions: tuple[str, ...] = ()) -> None:
        hint = f"; did you mean: {', '.join(suggestions)}?" if suggestions else ""
        super().__init__(f"unknown entity {entity!r}{hint}")
        self.entity = entity
        self.suggestions = suggestions


class UnknownField(ToolError):
    """`kb.lookup` named a field that the entity's type does not have."""

    def __init__(
        self, entity: str, entity_type: str, field: str, *, valid: tuple[str, ...]
    ) -> None:
        super().__init__(
            f"{entity} is a {entity_type} and has no field {field!r}; "
            f"fields of a {entity_type}: {', '.join(valid)}"
        )
        self.entity = entity
        self.entity_type = entity_type
        self.field = field
        self.valid = valid


class WorldError(ToolError):
    """The synthetic world cannot be generated or stored: bad sizes, or a file that is not a KB."""
