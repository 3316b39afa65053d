"""The server's error tree, and the one place exceptions become OpenAI-shaped HTTP errors.

Every error a client sees has the body `{"error": {"message", "type", "param", "code"}}`,
whatever raised it: the engine's typed errors, the planner's spec errors, the executor's input
errors, litestar's own validation and routing errors, or an unexpected exception (then the
message is generic and the traceback stays in the log). Errors that point into a spec or into
run inputs add `"errors": [{"path", "message", "line", "column"}]`, one entry per problem.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, SerializationException, ValidationException
from litestar.status_codes import (
    HTTP_400_BAD_REQUEST,
    HTTP_404_NOT_FOUND,
    HTTP_409_CONFLICT,
    HTTP_413_REQUEST_ENTITY_TOO_LARGE,
    HTTP_415_UNSUPPORTED_MEDIA_TYPE,
    HTTP_422_UNPROCESSABLE_ENTITY,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
    HTTP_504_GATEWAY_TIMEOUT,
)
from msgspec import Struct

from engine.errors import (
    AdapterError,
    EngineError,
    InvalidRequestError,
    MemoryBudgetError,
    ModelAlreadyLoadedError,
    ModelNotFoundError,
)
from executor.errors import InputError
from planner.errors import InvariantError, PlanError, SpecError, SpecErrors
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


class PipelineNotFoundError(ServerError):
    """No pipeline of that name (or no such version of it) is registered."""

    def __init__(self, name: str, version: int | None = None, *, reason: str | None = None) -> None:
        what = f"{name!r} version {version}" if version is not None else repr(name)
        super().__init__(f"no pipeline {what} is registered" + (f": {reason}" if reason else ""))
        self.name = name
        self.version = version
        self.reason = reason


class GitError(ServerError):
    """A git command failed, or the pipelines repository is not usable (a server problem)."""


class BadRefError(GitError):
    """A ref that is not a plain branch, tag or commit name (refused before git sees it)."""

    def __init__(self, ref: str) -> None:
        super().__init__(f"{ref!r} is not a valid branch, tag or commit name")
        self.ref = ref


class UnknownRefError(GitError):
    """A ref that names no commit of the repository (or a short commit that is ambiguous)."""

    def __init__(self, ref: str, reason: str = "names no commit") -> None:
        super().__init__(f"{ref!r} {reason}")
        self.ref = ref
        self.reason = reason


class DuplicateNameError(GitError):
    """Several spec files of one commit declare the same pipeline name."""

    def __init__(self, name: str, commit: str, paths: list[str]) -> None:
        super().__init__(f"{', '.join(paths)} all declare pipeline {name!r} at commit {commit}")
        self.name = name


class InvalidAuthorError(GitError):
    """A commit author that is not `Name <email>`."""

    def __init__(self, author: str) -> None:
        super().__init__(f"author {author[:200]!r} is not of the form 'Name <email>'")


class GitConflictError(GitError):
    """The branch moved while the server committed to it."""


class CommitRequiredError(ServerError):
    """A spec POSTed to a server that commits posted specs came without an author."""

    def __init__(self) -> None:
        super().__init__("this server commits posted specs to git: pass ?author=Name <email>")


class RerunMismatchError(ServerError):
    """The stored spec of a run no longer hashes to the run's recorded content hash."""

    def __init__(self, run_id: str, recorded: str, actual: str) -> None:
        super().__init__(
            f"run {run_id!r} ran content {recorded}, but the stored spec hashes to {actual}"
        )
        self.run_id = run_id


class RunNotFoundError(ServerError):
    """No run has that id."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"no run {run_id!r}")
        self.run_id = run_id


class RunFailedError(ServerError):
    """A pipeline run behind a chat completion failed; the run (and its trace) is stored."""

    def __init__(self, run_id: str, error: str | None) -> None:
        super().__init__(f"run {run_id} failed: {error or 'unknown error'}")
        self.run_id = run_id
        self.error = error


class PayloadTooLargeError(ServerError):
    """A spec or body is larger than the configured limit."""

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(f"{what} is {size} bytes; the limit is {limit}")
        self.size = size
        self.limit = limit


class UnsupportedMediaTypeError(ServerError):
    """A spec body came with a Content-Type that is neither YAML nor JSON."""

    def __init__(self, media_type: str) -> None:
        super().__init__(
            f"unsupported Content-Type {media_type!r}: send a spec as application/json "
            "or application/yaml"
        )


class Problem(Struct, kw_only=True):
    """One problem in a spec or in run inputs; `path` is a JSON pointer."""

    path: str
    message: str
    line: int | None = None
    column: int | None = None


class ProblemsResponse(Struct, kw_only=True):
    """`{"error": {...}, "errors": [...]}`: OpenAI's error object plus every problem found."""

    error: ErrorBody
    errors: list[Problem]


Body = ErrorResponse | ProblemsResponse


def error_response(exc: Exception) -> tuple[int, Body]:
    """Map any exception to an HTTP status and OpenAI's error body."""
    for kind, convert in _CONVERTERS:
        if isinstance(exc, kind):
            return convert(exc)
    logger.error("unhandled error", exc_info=exc)
    return HTTP_500_INTERNAL_SERVER_ERROR, _body("internal server error", SERVER_ERROR)


def handle_exception(_: Request[Any, Any, Any], exc: Exception) -> Response[Body]:
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


def _bad_adapter(exc: AdapterError) -> tuple[int, ErrorResponse]:
    # The adapter's own file and field are named; the server's folders are not revealed.
    where = Path(exc.file).name + (f": {exc.field}" if exc.field else "")
    message = f"{where}: {exc.reason}"
    return HTTP_400_BAD_REQUEST, _body(message, INVALID_REQUEST, exc.field, "invalid_adapter")


def _run_failed(exc: RunFailedError) -> tuple[int, ErrorResponse]:
    # 422, not 5xx: clients must not retry a run that failed on its own terms (a bad plan).
    return HTTP_422_UNPROCESSABLE_ENTITY, _body(str(exc), INVALID_REQUEST, None, "run_failed")


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


def _too_deep(exc: RecursionError) -> tuple[int, ErrorResponse]:
    # Raised where nested request input (a JSON body, a schema in it) outruns Python's
    # recursion limit while being decoded or re-encoded: the input's fault, not the server's.
    logger.warning("request input nested too deeply: %s", exc)
    return HTTP_400_BAD_REQUEST, _body("the request is nested too deeply", INVALID_REQUEST)


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


def _problem(exc: SpecError) -> Problem:
    return Problem(path=exc.path, message=exc.message, line=exc.line, column=exc.column)


def _problems(message: str, code: str, problems: list[Problem]) -> tuple[int, ProblemsResponse]:
    param = problems[0].path if problems else None
    error = ErrorBody(message=message, type=INVALID_REQUEST, param=param, code=code)
    return HTTP_422_UNPROCESSABLE_ENTITY, ProblemsResponse(error=error, errors=problems)


def _spec_errors(exc: SpecErrors) -> tuple[int, ProblemsResponse]:
    problems = [_problem(e) for e in exc.errors]
    count = f"{len(problems)} problems" if len(problems) != 1 else "1 problem"
    first = f"; first: {exc.errors[0]}" if exc.errors else ""
    return _problems(f"invalid pipeline spec ({count}){first}", "invalid_spec", problems)


def _spec_error(exc: SpecError) -> tuple[int, ProblemsResponse]:
    code = "invalid_plan" if isinstance(exc, PlanError) else "invalid_spec"
    return _problems(str(exc), code, [_problem(exc)])


def _input_error(exc: InputError) -> tuple[int, ProblemsResponse]:
    # The pointer is into the request body, whose `inputs` member holds the inputs.
    problem = Problem(path=f"/inputs{exc.path}", message=exc.message)
    return _problems(f"invalid inputs: {problem.path}: {exc.message}", "invalid_inputs", [problem])


def _invariant(exc: InvariantError) -> tuple[int, ErrorResponse]:
    # A rewrite rule broke the plan: the planner's fault, not the spec's.
    logger.error("planner invariant broken by rule %s: %s", exc.rule, exc.message)
    return HTTP_500_INTERNAL_SERVER_ERROR, _body(str(exc), SERVER_ERROR, None, "planner_invariant")


def _pipeline_not_found(exc: PipelineNotFoundError) -> tuple[int, ErrorResponse]:
    return HTTP_404_NOT_FOUND, _body(str(exc), INVALID_REQUEST, "name", "pipeline_not_found")


def _git(exc: GitError) -> tuple[int, ErrorResponse]:
    # git's own message may name server paths: it goes to the log, not to the client.
    logger.error("pipelines repository: %s", exc)
    return HTTP_500_INTERNAL_SERVER_ERROR, _body("pipelines repository error", SERVER_ERROR)


def _git_client(exc: ServerError) -> tuple[int, ErrorResponse]:
    conflict = isinstance(exc, GitConflictError | RerunMismatchError | DuplicateNameError)
    status = HTTP_409_CONFLICT if conflict else HTTP_400_BAD_REQUEST
    return status, _body(str(exc), INVALID_REQUEST)


def _run_not_found(exc: RunNotFoundError) -> tuple[int, ErrorResponse]:
    return HTTP_404_NOT_FOUND, _body(str(exc), INVALID_REQUEST, "run_id", "run_not_found")


def _too_large(exc: PayloadTooLargeError) -> tuple[int, ErrorResponse]:
    return HTTP_413_REQUEST_ENTITY_TOO_LARGE, _body(str(exc), INVALID_REQUEST, None, "too_large")


def _media_type(exc: UnsupportedMediaTypeError) -> tuple[int, ErrorResponse]:
    return HTTP_415_UNSUPPORTED_MEDIA_TYPE, _body(str(exc), INVALID_REQUEST, None, "media_type")


# Most specific first: ValidationException is an HTTPException too, PlanError a SpecError.
_CONVERTERS: tuple[tuple[type[Exception], Any], ...] = (
    (SpecErrors, _spec_errors),
    (SpecError, _spec_error),
    (InputError, _input_error),
    (InvariantError, _invariant),
    (PipelineNotFoundError, _pipeline_not_found),
    (RunNotFoundError, _run_not_found),
    (InvalidAuthorError, _git_client),
    (GitConflictError, _git_client),
    (DuplicateNameError, _git_client),
    (CommitRequiredError, _git_client),
    (RerunMismatchError, _git_client),
    (GitError, _git),
    (RunFailedError, _run_failed),
    (PayloadTooLargeError, _too_large),
    (UnsupportedMediaTypeError, _media_type),
    (ModelNotFoundError, _model_not_found),
    (InvalidRequestError, _invalid_request),
    (ModelAlreadyLoadedError, _conflict),
    (AdapterError, _bad_adapter),
    (MemoryBudgetError, _memory),
    (RequestTimeoutError, _timeout),
    (ClientDisconnectedError, _disconnected),
    (EngineError, _engine),
    (ValidationException, _validation),
    (SerializationException, _malformed),
    (HTTPException, _http),
    (RecursionError, _too_deep),
)
