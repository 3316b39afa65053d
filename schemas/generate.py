"""Write `schemas/pipeline.schema.json` from the spec Structs in `planner/spec.py`.

`python -m schemas.generate` rewrites the file; `--check` exits 1 when it is stale (CI).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from planner.spec import json_schema

logger = logging.getLogger(__name__)

SCHEMA_PATH = Path(__file__).with_name("pipeline.schema.json")


def render() -> str:
    """The committed text of the schema: sorted keys, two-space indent, final newline."""
    return json.dumps(json_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Rewrite the schema file, or with `--check` report whether it is current."""
    parser = argparse.ArgumentParser(prog="python -m schemas.generate", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    text = render()
    current = SCHEMA_PATH.read_text(encoding="utf-8") if SCHEMA_PATH.exists() else None
    if args.check:
        if current != text:
            logger.error("%s is stale: run `python -m schemas.generate`", SCHEMA_PATH)
            return 1
        return 0
    if current != text:
        SCHEMA_PATH.write_text(text, encoding="utf-8")
        logger.info("wrote %s", SCHEMA_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
