"""`compound run`, `compound explain` and `compound validate`: pipelines without a server.

They read the same `compound.yaml` as the server. `explain` and `validate` build the planner's
catalog from the names in the configuration (models, providers, tools, the pipelines folder)
and load no weights; `run` starts the engine with the configured models and executes the plan
in-process, reporting each step on stderr and printing the outputs as JSON on stdout.

Exit status: 0 success, 1 a spec, input or run error, 2 a usage or configuration problem.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, TextIO

from executor import events
from executor.errors import InputError
from planner import (
    Catalog,
    PhysicalPlan,
    PipelineSpec,
    SpecError,
    SpecErrors,
    compile_spec,
    compile_text,
    explain,
    load_spec,
)
from server.catalog import (
    build_catalog,
    config_models,
    directory_specs,
    provider_targets,
    require,
    spec_files,
    spec_format,
)
from server.config import ServerConfig, load_config
from server.errors import ConfigError
from tools import default_registry

logger = logging.getLogger("compound")

OK, FAILED, USAGE = 0, 1, 2


class UsageError(Exception):
    """A command line the command cannot act on (unreadable file, malformed --input)."""


# -- validate -----------------------------------------------------------------------------------


def validate(
    paths: list[str], *, config_path: str, bind: bool, explicit_config: bool, out: TextIO
) -> int:
    """Check each spec; print `file:line:col: /pointer: message` per problem; 1 if any.

    None given: every spec file here, and also every pipeline name declared by more than one
    file (the git registry could not tell which one to serve), as CI checks a repository."""
    whole_folder = not paths
    paths = paths or [str(p) for p in spec_files(".") if not p.name.startswith(".")]
    catalog = None
    if bind:
        config = _optional_config(config_path, explicit=explicit_config)
        if config is not None:
            catalog = _config_catalog(config, extra=_names(paths) | _sibling_names(paths))
    failures = sum(not _validate_one(Path(p), catalog, out) for p in paths)
    if whole_folder:  # a name clash is a property of the repository, not of one file
        failures += _duplicate_names(paths, out)
    logger.info(
        "%d of %d spec(s) valid%s",
        len(paths) - failures,
        len(paths),
        "" if catalog is not None else " (loaded only, not bound)",
    )
    return FAILED if failures else OK


def _validate_one(path: Path, catalog: Catalog | None, out: TextIO) -> bool:
    try:
        text = path.read_bytes()
    except OSError as e:
        out.write(f"{path}: cannot read ({e.strerror})\n")
        return False
    try:
        if catalog is None:
            load_spec(text, fmt=spec_format(path), source=str(path))
        else:
            compile_text(text, catalog=catalog, fmt=spec_format(path), source=str(path))
    except SpecErrors as e:
        out.writelines(problem_line(path, err) + "\n" for err in e.errors)
        return False
    except SpecError as e:
        out.write(problem_line(path, e) + "\n")
        return False
    return True


def problem_line(path: Path | str, error: SpecError) -> str:
    """`file:line:col: /pointer: message` (`file: /pointer: message` without a position)."""
    where = f"{path}:{error.line}:{error.column or 1}" if error.line is not None else f"{path}"
    return f"{where}: {error.path}: {error.message}"


def _names(paths: Iterable[str]) -> set[str]:
    """Pipeline names of the given files (so that they may call each other)."""
    names = set()
    for p in paths:
        try:
            names.add(load_spec(Path(p).read_bytes(), fmt=spec_format(Path(p))).name)
        except (SpecErrors, OSError):
            continue
    return names


def _sibling_names(paths: Iterable[str]) -> set[str]:
    """Pipeline names of the spec files next to the given ones: a pre-commit hook sees only
    the changed files, but a changed spec may call an unchanged one."""
    folders = {Path(p).parent for p in paths}
    return _names(str(s) for f in folders for s in spec_files(f))


def _duplicate_names(paths: Iterable[str], out: TextIO) -> int:
    """Report names declared by more than one of the given files (the git registry would
    not know which to serve); the number of such names."""
    files: dict[str, list[str]] = {}
    for p in paths:
        for name in _names([p]):
            files.setdefault(name, []).append(p)
    clashes = {n: f for n, f in files.items() if len(f) > 1}
    for name, where in sorted(clashes.items()):
        out.write(f"{', '.join(where)}: pipeline name {name!r} declared by {len(where)} files\n")
    return len(clashes)


# -- explain ------------------------------------------------------------------------------------


def explain_file(
    path: str, *, config_path: str, fmt: Literal["text", "json", "mermaid"], out: TextIO
) -> int:
    """Print the plan of a spec compiled against the configuration's catalog."""
    config = load_config(config_path)
    file = Path(path)
    text = _read(file)
    catalog = _config_catalog(config, extra=_names([path]))
    plan = _compile(file, text, catalog)
    out.write(explain(plan, fmt) + "\n")
    return OK


# -- run ----------------------------------------------------------------------------------------


def run_file(
    path: str,
    *,
    config_path: str,
    pairs: list[str],
    inputs_json: str | None,
    out: TextIO,
    err: TextIO,
) -> int:
    """Run a spec on the configured models; outputs as JSON on `out`, progress on `err`."""
    # The engine pulls in torch: only `run` pays for it, `validate` stays quick.
    from server.app import start_engine

    config = load_config(config_path)
    file = Path(path)
    text = _read(file)
    engine = start_engine(config)
    try:
        served = set(engine.model_names()) | provider_targets(config.providers)
        tools = default_registry(config.tools)
        specs = directory_specs(config.pipelines_dir)
        catalog = build_catalog(
            models=served, tools=tools.schemas(), pipelines=set(specs) | _names([path])
        )
        plan = _compile(file, text, catalog)
        inputs = parse_inputs(plan.spec, pairs, inputs_json)
        result = asyncio.run(
            _execute(plan, inputs, config, catalog, specs, engine=engine, tools=tools, err=err)
        )
    finally:
        engine.shutdown()
    if result.status != "succeeded":
        step = f" (step {result.failed_step})" if result.failed_step else ""
        err.write(f"run failed{step}: {result.error}\n")
        return FAILED
    out.write(json.dumps(result.outputs, ensure_ascii=False, indent=2, default=repr) + "\n")
    return OK


async def _execute(
    plan: PhysicalPlan,
    inputs: dict[str, Any],
    config: ServerConfig,
    catalog: Catalog,
    specs: dict[str, PipelineSpec],
    *,
    engine: Any,
    tools: Any,
    err: TextIO,
) -> Any:
    from executor.run import execute
    from server.runtime import SubPipelineCall, SubPipelines, build_backends, run_limits
    from server.store import content_hash

    backends = build_backends(engine, config.providers)
    limits = run_limits(config.limits)

    def resolve(ref: str, _commit: str | None) -> tuple[PhysicalPlan, SubPipelineCall]:
        spec = require(specs, ref)  # the folder's specs: no commits, no stored versions
        call = SubPipelineCall(
            caller=None,
            ref=ref,
            name=spec.name,
            version=None,
            content_hash=content_hash(spec),
            commit=None,
        )
        return compile_spec(spec, catalog=catalog), call

    resolver = SubPipelines(
        resolve,
        backends=backends,
        tools=tools,
        limits=limits,
    )
    progress = Progress(err)
    return await execute(
        plan,
        inputs,
        backends=backends,
        tools=tools,
        pipelines=resolver,
        limits=limits,
        emit=progress,
    )


class Progress:
    """Writes one line per step event: `[  1.23s] answer finished (1 attempt, 42 tokens)`."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.started = time.monotonic()

    def __call__(self, event: events.Event) -> None:
        """The executor's `emit` callback."""
        line = progress_line(event)
        if line is not None:
            self.stream.write(f"[{time.monotonic() - self.started:7.2f}s] {line}\n")
            self.stream.flush()


_PROGRESS: dict[type, Callable[[Any], str]] = {
    events.RunStarted: lambda e: f"run {e.pipeline} started",
    events.StepStarted: lambda e: f"{e.step} started",
    events.StepRetried: lambda e: f"{e.step} attempt {e.attempt} after: {e.error}",
    events.StepSkipped: lambda e: f"{e.step} skipped: {e.reason}",
    events.StepFinished: lambda e: (
        f"{e.step} finished ({e.attempts} attempt(s), {e.tokens} tokens)"
    ),
    events.StepFailed: lambda e: f"{e.step} FAILED: {e.error}",
    events.RunFinished: lambda e: f"run finished in {e.duration_s:.2f} s, {e.tokens} tokens",
    events.RunFailed: lambda e: f"run FAILED: {e.error}",
    events.RunCancelled: lambda _: "run cancelled",
}


def progress_line(event: events.Event) -> str | None:
    """What a person watching a run wants to read about one event (token deltas: nothing)."""
    describe = _PROGRESS.get(type(event))
    return describe(event) if describe is not None else None


def parse_inputs(spec: PipelineSpec, pairs: list[str], inputs_json: str | None) -> dict[str, Any]:
    """`--inputs '{...}'` then each `--input name=value`; a value is JSON unless the input is
    declared a string (then it is taken as written)."""
    inputs: dict[str, Any] = {}
    if inputs_json is not None:
        try:
            inputs = json.loads(inputs_json)
        except ValueError as e:
            raise UsageError(f"--inputs: not JSON ({e})") from e
        if not isinstance(inputs, dict):
            raise UsageError("--inputs: must be a JSON object")
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--input {pair!r}: expected NAME=VALUE")
        inputs[name] = _input_value(spec.inputs.get(name, {}), value)
    return inputs


def _input_value(schema: dict[str, Any], value: str) -> Any:
    if schema.get("type") == "string":
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


# -- shared -------------------------------------------------------------------------------------


def _config_catalog(config: ServerConfig, *, extra: set[str]) -> Catalog:
    """The catalog by names only: configured models and providers, tools, shipped pipelines."""
    pipelines = set(directory_specs(config.pipelines_dir)) | extra
    tools = default_registry(config.tools)
    return build_catalog(models=config_models(config), tools=tools.schemas(), pipelines=pipelines)


def _compile(file: Path, text: bytes, catalog: Catalog) -> PhysicalPlan:
    """Compile a spec file; a single bind error comes back as `SpecErrors` naming the file."""
    try:
        return compile_text(text, catalog=catalog, fmt=spec_format(file), source=str(file))
    except SpecErrors:
        raise
    except SpecError as e:
        raise SpecErrors([e], source=str(file)) from e


def _read(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as e:
        raise UsageError(f"{file}: cannot read ({e.strerror})") from e


def _optional_config(path: str, *, explicit: bool) -> ServerConfig | None:
    """The configuration; None (load-only checks) when the default file is absent."""
    if not explicit and not Path(path).exists():
        logger.info("no %s here: specs are loaded but not bound (pass --config)", path)
        return None
    return load_config(path)


def report(error: ConfigError | UsageError | SpecErrors | InputError, stream: TextIO) -> int:
    """Write what went wrong and return the exit status for it."""
    if isinstance(error, SpecErrors):
        stream.writelines(problem_line(error.source, e) + "\n" for e in error.errors)
        return FAILED
    if isinstance(error, InputError):
        stream.write(f"invalid inputs: {error.path or '/'}: {error.message}\n")
        return FAILED
    stream.write(f"error: {error}\n")
    return USAGE


def guarded(command: Callable[..., int], *args: Any, **kwargs: Any) -> int:
    """Run a command function, turning the errors users cause into messages and exit codes."""
    try:
        return command(*args, **kwargs)
    except (ConfigError, UsageError, SpecErrors, InputError) as e:
        return report(e, sys.stderr)
