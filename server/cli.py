"""The `compound` command line.

Each subcommand is one `add_<name>(subparsers)` function that declares its arguments and sets
`func`, the function that runs it and returns the exit status; `COMMANDS` lists them in the
order `--help` shows them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

logger = logging.getLogger("compound")

DEFAULT_CONFIG = "compound.yaml"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `compound` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    # Alembic announces each of its plugins at INFO; the migrations it runs are worth seeing.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    return args.func(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="compound", description="Declarative compound-AI pipelines on a built-in engine."
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="logging verbosity",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def add_serve(subparsers: Any) -> None:
    """`compound serve`: the OpenAI-compatible HTTP server."""
    parser = subparsers.add_parser(
        "serve",
        help="run the HTTP server",
        description="Serve the OpenAI-compatible API over the engine.",
    )
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help=f"server configuration file (default: {DEFAULT_CONFIG})",
    )
    parser.add_argument("--host", help="address to bind (default: from the config file)")
    parser.add_argument("--port", type=int, help="port to bind (default: from the config file)")
    parser.add_argument(
        "--pipelines-repo",
        metavar="PATH",
        help="serve pipelines from this local git repository (name, name@tag|branch|commit)",
    )
    parser.add_argument("--pipelines-branch", metavar="BRANCH", help="branch to follow")
    parser.add_argument(
        "--poll-interval", type=float, metavar="SECONDS", help="check the branch this often"
    )
    parser.add_argument(
        "--commit-posted",
        action="store_true",
        default=None,
        help="commit specs POSTed to /v1/pipelines to the pipelines branch",
    )
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """Load the configuration and run uvicorn until interrupted; 2 when the config is invalid."""
    # Imported here so that `compound --help` does not wait for torch.
    import uvicorn

    from server.app import create_app
    from server.config import load_config
    from server.errors import ConfigError

    try:
        config = load_config(args.config)
    except ConfigError as e:
        logger.error("%s", e)
        return 2
    config = msgspec.structs.replace(config, **_serve_overrides(args))
    problem = check_pipelines_repo(config)
    if problem is not None:
        logger.error("%s", problem)
        return 2
    # log_config=None: uvicorn's loggers propagate to the root logger configured in main().
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_config=None)
    return 0


def check_pipelines_repo(config: Any) -> str | None:
    """Why the configured pipelines repository cannot be served (None when it can), so that a
    typo fails `compound serve` at once with a message instead of a start-up traceback."""
    from server.errors import GitError
    from server.git_repo import GitRepo

    if config.pipelines_repo is None:
        return None
    try:
        GitRepo(config.pipelines_repo).resolve(config.pipelines_branch)
    except GitError as e:
        return f"pipelines_repo {config.pipelines_repo} (branch {config.pipelines_branch}): {e}"
    return None


def _serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config fields given on the command line (a relative repository path is from here)."""
    given = {
        "host": args.host,
        "port": args.port,
        "pipelines_repo": str(Path(args.pipelines_repo).resolve()) if args.pipelines_repo else None,
        "pipelines_branch": args.pipelines_branch,
        "poll_interval_s": args.poll_interval,
        "commit_posted": args.commit_posted,
    }
    return {k: v for k, v in given.items() if v is not None}


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        help=f"server configuration file (default: {DEFAULT_CONFIG})",
    )


def add_run(subparsers: Any) -> None:
    """`compound run SPEC`: execute a pipeline in-process on the configured models."""
    parser = subparsers.add_parser(
        "run",
        help="run a pipeline spec without a server",
        description="Load the configured models, compile SPEC and run it; per-step progress "
        "on stderr, the outputs as JSON on stdout; exit 1 when the run fails.",
    )
    parser.add_argument("spec", help="pipeline spec file (.yaml, .yml or .json)")
    parser.add_argument(
        "--input",
        "-i",
        dest="inputs",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an input; VALUE is JSON unless the input is declared a string (repeatable)",
    )
    parser.add_argument(
        "--inputs", dest="inputs_json", metavar="JSON", help="inputs as a JSON object"
    )
    _add_config(parser)
    parser.set_defaults(func=run_run)


def run_run(args: argparse.Namespace) -> int:
    """Run the spec; 0 on success, 1 when it fails, 2 on a usage or configuration error."""
    from server import pipeline_cli

    return pipeline_cli.guarded(
        pipeline_cli.run_file,
        args.spec,
        config_path=args.config or DEFAULT_CONFIG,
        pairs=args.inputs,
        inputs_json=args.inputs_json,
        out=sys.stdout,
        err=sys.stderr,
    )


def add_explain(subparsers: Any) -> None:
    """`compound explain SPEC`: the physical plan, without loading any model."""
    parser = subparsers.add_parser(
        "explain",
        help="print the plan of a pipeline spec",
        description="Compile SPEC against the models and tools the configuration names "
        "(no weights are loaded) and print the plan with estimates and the critical path.",
    )
    parser.add_argument("spec", help="pipeline spec file (.yaml, .yml or .json)")
    parser.add_argument("--format", choices=["text", "json", "mermaid"], default="text")
    _add_config(parser)
    parser.set_defaults(func=run_explain)


def run_explain(args: argparse.Namespace) -> int:
    """Print the plan; 1 when the spec is invalid."""
    from server import pipeline_cli

    return pipeline_cli.guarded(
        pipeline_cli.explain_file,
        args.spec,
        config_path=args.config or DEFAULT_CONFIG,
        fmt=args.format,
        out=sys.stdout,
    )


def add_validate(subparsers: Any) -> None:
    """`compound validate [SPEC...]`: check specs, e.g. as a pre-commit hook or in CI."""
    parser = subparsers.add_parser(
        "validate",
        help="check pipeline specs",
        description="Load each SPEC and bind it against the configuration's models, tools and "
        "pipelines (specs next to it count as pipelines); print `file:line:col: /pointer: "
        "message` per problem, and files that declare the same pipeline name; exit 1 on any. "
        "Without SPEC, every spec file of the current folder (a pipelines repository in CI). "
        f"Without --config and without {DEFAULT_CONFIG} here, specs are only loaded.",
    )
    parser.add_argument(
        "specs", nargs="*", metavar="SPEC", help="pipeline spec files (default: all here)"
    )
    parser.add_argument(
        "--no-bind",
        action="store_true",
        help="only load the specs (syntax, types, expressions); do not resolve names",
    )
    _add_config(parser)
    parser.set_defaults(func=run_validate)


def run_validate(args: argparse.Namespace) -> int:
    """Report every problem of every spec; 1 when there is any."""
    from server import pipeline_cli

    return pipeline_cli.guarded(
        pipeline_cli.validate,
        args.specs,
        config_path=args.config or DEFAULT_CONFIG,
        bind=not args.no_bind,
        explicit_config=args.config is not None,
        out=sys.stdout,
    )


def add_diff(subparsers: Any) -> None:
    """`compound diff NAME@A NAME@B`: spec and plan differences between two git versions."""
    parser = subparsers.add_parser(
        "diff",
        help="compare two versions of a pipeline in git",
        description="Read NAME@REF (tag, branch or commit; NAME alone: HEAD) from the "
        "pipelines repository; print the unified diff of the two specs and of their EXPLAIN "
        "plans; exit 0 when identical, 1 when they differ, 2 on an error.",
    )
    parser.add_argument("left", metavar="NAME@A")
    parser.add_argument("right", metavar="NAME@B")
    parser.add_argument("--repo", default=".", help="pipelines repository (default: here)")
    _add_config(parser)
    parser.set_defaults(func=run_diff)


def run_diff(args: argparse.Namespace) -> int:
    """Print both diffs; diff(1)'s exit status."""
    from server import pipeline_cli
    from server.pipeline_diff import diff_refs

    return pipeline_cli.guarded(
        diff_refs,
        args.left,
        args.right,
        repo=args.repo,
        config_path=args.config or DEFAULT_CONFIG,
        explicit_config=args.config is not None,
        out=sys.stdout,
    )


def add_finetune(subparsers: Any) -> None:
    """`compound finetune --base DIR --data FILE.jsonl --out DIR`: train a LoRA adapter."""
    parser = subparsers.add_parser(
        "finetune",
        help="train a LoRA adapter (PEFT format)",
        description="LoRA supervised fine-tuning of an engine checkpoint on chat examples "
        '(JSONL: {"messages": [...]} or {"prompt", "completion"}); resumable; writes '
        "adapter_config.json and adapter_model.safetensors that peft loads.",
    )
    parser.add_argument("--base", required=True, help="base checkpoint directory")
    parser.add_argument("--data", required=True, help="training examples (JSONL)")
    parser.add_argument("--out", required=True, help="adapter output directory")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r (default: 8)")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default: 16)")
    parser.add_argument(
        "--target-modules",
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        help="comma-separated linear layers to adapt (default: all of them)",
    )
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the data")
    parser.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate (default: 2e-3)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument(
        "--precision",
        choices=("auto", "float32", "bf16"),
        help="auto (default) times bf16 autocast against float32 on the first batch",
    )
    parser.set_defaults(func=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    """Train and save the adapter; 2 when the inputs cannot be used."""
    import torch

    from engine.errors import CheckpointError
    from models.finetune import FinetuneConfig, FinetuneError, finetune

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = FinetuneConfig(
        rank=args.rank,
        alpha=args.alpha,
        target_modules=tuple(m.strip() for m in args.target_modules.split(",") if m.strip()),
        lr=args.lr,
        steps=args.steps,
        epochs=args.epochs,
        precision=args.precision,
    )
    try:
        figures = finetune(args.base, args.data, args.out, cfg)
    except (FinetuneError, CheckpointError, OSError) as e:
        logger.error("%s", e)
        return 2
    sys.stdout.write(msgspec.json.encode(figures).decode() + "\n")
    return 0


def add_quantize(subparsers: Any) -> None:
    """`compound quantize --model DIR --scheme int8|int4-g64|fp8 --out DIR`."""
    parser = subparsers.add_parser(
        "quantize",
        help="write a weight-quantized copy of a checkpoint",
        description="Quantize every linear layer (and untied embeddings) of a Hugging Face "
        "checkpoint; config.json of the copy carries `quantization_config`, which the engine "
        "reads when it loads the copy.",
    )
    parser.add_argument("--model", required=True, help="float checkpoint directory")
    parser.add_argument(
        "--scheme",
        required=True,
        choices=["int8", "int4-g32", "int4-g64", "int4-g128", "fp8"],
        help="weight format",
    )
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    parser.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    """Quantize and print what was written as JSON; 2 when the checkpoint cannot be used."""
    from engine.checkpoint import quantize_checkpoint
    from engine.errors import CheckpointError

    try:
        figures = quantize_checkpoint(args.model, args.scheme, args.out)
    except (CheckpointError, OSError) as e:
        logger.error("%s", e)
        return 2
    sys.stdout.write(msgspec.json.encode(figures).decode() + "\n")
    return 0


COMMANDS: tuple[Callable[[Any], None], ...] = (
    add_serve,
    add_run,
    add_explain,
    add_validate,
    add_diff,
    add_finetune,
    add_quantize,
)


if __name__ == "__main__":
    sys.exit(main())
