"""Rebuild the demo zoo from seeds: `python -m models.build [--only STAGE ...] [--budget fast]`.

Stages run in order and each is resumable: a finished stage leaves `models/.build/<stage>.json`
(its figures) and is skipped next time; an interrupted training stage resumes from its last
checkpoint. Stages: data (task examples, tokenizer), demo-base, demo-large, demo-draft,
adapters, eval (bench/demo_eval.py figures), cards (model cards).

Pretraining uses `--threads` torch threads; the adapters train `--jobs` at a time (one process
and one thread each). `models/.build/build.json` adds up the wall times of the finished stages
(each stage's own figure: a stage interrupted and rerun counts its last run).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch

from models import zoo
from models.train import PRECISION_ENV, PRECISIONS

log = logging.getLogger("models.build")

STAGES = ("data", "demo-base", "demo-large", "demo-draft", "adapters", "eval", "cards")
TRAINING = ("demo-base", "demo-large", "demo-draft", "adapters")


def main(argv: list[str] | None = None) -> int:
    """Run the build stages (all, or those named with --only)."""
    parser = argparse.ArgumentParser(prog="python -m models.build", description=__doc__)
    parser.add_argument("--only", nargs="*", choices=STAGES, help="run just these stages")
    parser.add_argument("--force", action="store_true", help="rerun stages already done")
    cpus = os.cpu_count() or 1
    parser.add_argument(
        "--threads",
        type=int,
        default=min(2, cpus),
        help="torch CPU threads of the pretraining stages (1 can be faster on a busy machine)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=os.environ.get(PRECISION_ENV, "auto"),
        help="training precision; auto measures bf16 autocast against float32 per run",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, cpus),
        help="adapters trained at once, one process and one thread each",
    )
    parser.add_argument(
        "--budget", choices=sorted(zoo.BUDGETS), default="full", help="training lengths"
    )
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(ns.threads)
    os.environ[PRECISION_ENV] = ns.precision  # TrainConfig's default, here and in the workers
    plan = zoo.BUDGETS[ns.budget]
    walls: dict[str, float] = {}
    for stage in ns.only or STAGES:
        done = zoo.BUILD / f"{stage}.json"
        if done.is_file() and not ns.force:
            log.info("stage %s: done already (%s)", stage, done)
            continue
        log.info("stage %s: starting", stage)
        t0 = time.perf_counter()
        if stage == "adapters":
            figures = zoo.stage_adapters(plan, jobs=ns.jobs)
        else:
            figures = zoo.STAGE_FUNCTIONS[stage](plan)
        figures["stage_seconds"] = round(time.perf_counter() - t0, 1)
        figures["budget"] = ns.budget
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(figures, indent=2) + "\n")
        log.info("stage %s: done in %.0fs", stage, figures["stage_seconds"])
        walls[stage] = figures["stage_seconds"]
    if walls:
        _record(dict(walls), ns)
    return 0


def _record(walls: dict[str, float], ns: argparse.Namespace) -> None:
    """models/.build/build.json: the wall time of every finished stage (from its figures, so a
    build resumed over several invocations adds up), and which ran in this invocation."""
    ran = list(walls)
    for stage in STAGES:
        done = zoo.BUILD / f"{stage}.json"
        if stage not in walls and done.is_file():
            walls[stage] = json.loads(done.read_text()).get("stage_seconds", 0.0)
    walls = {stage: walls[stage] for stage in STAGES if stage in walls}
    training = sum(v for k, v in walls.items() if k in TRAINING)
    record = {
        "stages_seconds": walls,
        "training_minutes": round(training / 60, 1),
        "total_minutes": round(sum(walls.values()) / 60, 1),
        "threads": ns.threads,
        "jobs": ns.jobs,
        "cpus": os.cpu_count(),
        "budget": ns.budget,
        "precision": ns.precision,
        "ran": ran,
    }
    (zoo.BUILD / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info(
        "built in %.1f min (training %.1f min)", record["total_minutes"], record["training_minutes"]
    )


if __name__ == "__main__":
    raise SystemExit(main())
