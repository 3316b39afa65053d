"""Rebuild the demo zoo from seeds: `python -m models.build [--only STAGE ...] [--budget fast]`.

Stages run in order and each is resumable: a finished stage leaves `models/.build/<stage>.json`
(its figures) and is skipped next time; an interrupted training stage resumes from its last
checkpoint. Stages: data (task examples, tokenizer), demo-base, demo-large, demo-draft,
adapters, eval (bench/demo_eval.py figures), cards (model cards).
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from models import zoo

log = logging.getLogger("models.build")

STAGES = ("data", "demo-base", "demo-large", "demo-draft", "adapters", "eval", "cards")


def main(argv: list[str] | None = None) -> int:
    """Run the build stages (all, or those named with --only)."""
    parser = argparse.ArgumentParser(prog="python -m models.build", description=__doc__)
    parser.add_argument("--only", nargs="*", choices=STAGES, help="run just these stages")
    parser.add_argument("--force", action="store_true", help="rerun stages already done")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)"
    )
    parser.add_argument(
        "--budget", choices=sorted(zoo.BUDGETS), default="full", help="training lengths"
    )
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(ns.threads)
    plan = zoo.BUDGETS[ns.budget]
    for stage in ns.only or STAGES:
        done = zoo.BUILD / f"{stage}.json"
        if done.is_file() and not ns.force:
            log.info("stage %s: done already (%s)", stage, done)
            continue
        log.info("stage %s: starting", stage)
        t0 = time.perf_counter()
        figures = zoo.STAGE_FUNCTIONS[stage](plan)
        figures["stage_seconds"] = round(time.perf_counter() - t0, 1)
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(figures, indent=2) + "\n")
        log.info("stage %s: done in %.0fs", stage, figures["stage_seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
