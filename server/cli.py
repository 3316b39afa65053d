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
from typing import Any

import msgspec

logger = logging.getLogger("compound")

DEFAULT_CONFIG = "compound.yaml"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `compound` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
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
    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    config = msgspec.structs.replace(config, **overrides)
    # log_config=None: uvicorn's loggers propagate to the root logger configured in main().
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_config=None)
    return 0


COMMANDS: tuple[Callable[[Any], None], ...] = (add_serve,)


if __name__ == "__main__":
    sys.exit(main())
