"""The server's error tree, and the one place exceptions become OpenAI-shaped HTTP errors.

Every error a client sees has the body `{"error": {"message", "type", "param", "code"}}`,
whatever raised it: the engine's typed errors, litestar's own validation and routing errors,
or an unexpected exception (then the message is generic and the traceback stays in the log).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, SerializationException, ValidationException
from litestar.status_codes import (
    HTTP_400_BAD_REQUEST,
    HTTP_404_NOT_FOUND,
    HTTP_409_CONFLICT,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
    HTTP_504_GATEWAY_TIMEOUT,
)

from engine.errors import (
    EngineError,
    InvalidRequestError,
    MemoryBudgetError,
    ModelAlreadyLoadedError,
    ModelNotFoundError,
)
from server.openai_types import ErrorBody, ErrorResponse

logger = logging.getLogger(__name__)

HTTP_CLIENT_CLOSED_REQUEST = 499
INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class ServerError(Exception):
    """Base class of every error the server raises on purpose."""


class ConfigError(ServerError):
    """The server configuration file is missing, unreadable or invalid; `path` names the field."""

    def __init__(self, message: str, *, file: str, path: str | None = None) -> None:
        where = f"{file}: {path}" if path else file
        super().__init__(f"{where}: {message}")
        self.file = file
        self.path = path


class ClientDisconnectedError(ServerError):
    """The client went away before its response was ready."""

    def __init__(self) -> None:
        super().__init__("the client closed the connection")


class RequestTimeoutError(ServerError):
    """A generation ran past `limits.request_timeout_s`."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"the request did not finish within {timeout_s:g} s")
        self.timeout_s = timeout_s


def error_response(exc: Exception) -> tuple[int, ErrorResponse]:
    """Map any exception to an HTTP status and OpenAI's error body."""
    for kind, convert in _CONVERTERS:
        if isinstance(exc, kind):
            return convert(exc)
    logger.error("unhandled error", exc_info=exc)
    return HTTP_500_INTERNAL_SERVER_ERROR, _body("internal server error", SERVER_ERROR)


def handle_exception(_: Request[Any, Any, Any], exc: Exception) -> Response[ErrorResponse]:
    """Litestar exception handler: every error leaves the app through here."""
    status, body = error_response(exc)
    return Response(body, status_code=status)


def _body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> ErrorResponse:
    return ErrorResponse(error=ErrorBody(message=message, type=type_, param=param, code=code))


def _model_not_found(exc: ModelNotFoundError) -> tuple[int, ErrorResponse]:
    message = f"The model `{exc.model}` does not exist."
    return HTTP_404_NOT_FOUND, _body(message, INVALID_REQUEST, "model", "model_not_found")


def _invalid_request(exc: InvalidRequestError) -> tuple[int, ErrorResponse]:
    return HTTP_400_BAD_REQUEST, _body(str(exc), INVALID_REQUEST, exc.param)


def _validation(exc: ValidationException) -> tuple[int, ErrorResponse]:
    # litestar lists one entry per failed field: {"message", "key", "source"}
    problems = exc.extra if isinstance(exc.extra, list) else []
    first = problems[0] if problems and isinstance(problems[0], dict) else {}
    message, param = _validation_problem(
        str(first.get("message") or exc.detail), first.get("key") or None
    )
    text = f"{param}: {message}" if param else message
    return HTTP_400_BAD_REQUEST, _body(text, INVALID_REQUEST, param)


def _validation_problem(message: str, key: str | None) -> tuple[str, str | None]:
    """Message and param of a litestar validation problem; key "data" is the body itself."""
    if key != "data":
        return message, key
    if message == "'data'":  # litestar's KeyError text when there is no body at all
        return "the request body must be a JSON object", None
    missing = re.search(r"missing required field `([^`]+)`", message)
    if missing:
        return message, missing.group(1)
    return f"request body: {message}", None


def _malformed(exc: SerializationException) -> tuple[int, ErrorResponse]:
    return HTTP_400_BAD_REQUEST, _body(f"malformed JSON body: {exc}", INVALID_REQUEST)


def _http(exc: HTTPException) -> tuple[int, ErrorResponse]:
    type_ = SERVER_ERROR if exc.status_code >= 500 else INVALID_REQUEST
    return exc.status_code, _body(exc.detail, type_)


def _conflict(exc: ModelAlreadyLoadedError) -> tuple[int, ErrorResponse]:
    return HTTP_409_CONFLICT, _body(str(exc), INVALID_REQUEST, "model", "model_already_loaded")


def _memory(exc: MemoryBudgetError) -> tuple[int, ErrorResponse]:
    return HTTP_503_SERVICE_UNAVAILABLE, _body(str(exc), SERVER_ERROR, None, "memory_budget")


def _timeout(exc: RequestTimeoutError) -> tuple[int, ErrorResponse]:
    return HTTP_504_GATEWAY_TIMEOUT, _body(str(exc), SERVER_ERROR, None, "timeout")


def _disconnected(exc: ClientDisconnectedError) -> tuple[int, ErrorResponse]:
    # Nobody reads this response; 499 (nginx's "client closed request") keeps access logs honest.
    return HTTP_CLIENT_CLOSED_REQUEST, _body(str(exc), INVALID_REQUEST)


def _engine(exc: EngineError) -> tuple[int, ErrorResponse]:
    # Raised on purpose by the engine (a failed step, a shut-down engine): the message is safe.
    logger.error("engine error: %s", exc)
    return HTTP_500_INTERNAL_SERVER_ERROR, _body(str(exc), SERVER_ERROR)


# Most specific first: ValidationException is an HTTPException too.
_CONVERTERS: tuple[tuple[type[Exception], Any], ...] = (
    (ModelNotFoundError, _model_not_found),
    (InvalidRequestError, _invalid_request),
    (ModelAlreadyLoadedError, _conflict),
    (MemoryBudgetError, _memory),
    (RequestTimeoutError, _timeout),
    (ClientDisconnectedError, _disconnected),
    (EngineError, _engine),
    (ValidationException, _validation),
    (SerializationException, _malformed),
    (HTTPException, _http),
)
