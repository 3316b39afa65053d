"""The zoo's recipe: sizes, data mixture, training lengths, and one function per build stage."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models import tasks
from models.tokenizer_train import IM_END, build_tokenizer, render_chat, save_tokenizer, special_ids
from models.train import (
    Arch,
    Doc,
    TrainConfig,
    batches,
    model_args,
    new_model,
    save_checkpoint,
    train,
)
from tools.kb import generate_world

log = logging.getLogger(__name__)

# COMPOUND_ZOO_DIR builds the zoo elsewhere (dry runs); the shipped zoo lives next to this file.
ROOT = Path(os.environ.get("COMPOUND_ZOO_DIR") or Path(__file__).resolve().parent)
BUILD = ROOT / ".build"
DATA = BUILD / "data"
TOKENIZER = BUILD / "tokenizer"
WORLD_SEED = 0

BASE = Arch(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=384)
DRAFT = BASE  # the draft starts from demo-base's weights, then learns demo-large's outputs
GROWTH = {"width": 4, "extra_layers": 2}  # demo-large = demo-base widened 4x, 2 layers added


@dataclass(frozen=True)
class Budget:
    """How much data and how many steps each stage gets."""

    train_examples: dict[str, int]
    heldout_examples: int
    world_variants: int
    base_steps: int
    large_steps: int
    draft_steps: int
    adapter_steps: dict[str, int]  # per task
    adapter_rank: dict[str, int]  # LoRA rank per task (alpha = 2 * rank)


BUDGETS = {
    "full": Budget(
        train_examples={"router": 8000, "extract": 16000, "planner": 24000, "joiner": 16000},
        heldout_examples=200,
        world_variants=4,
        # 12.3M tokens: copying invented names and numbers, which every task needs, only starts
        # around 6-7M (2900 steps, 5.9M tokens, left bare demo-base at planner 0.435).
        base_steps=6000,
        large_steps=40,
        draft_steps=50,
        # 150 steps each left copying names weak (extract 0.025); extract still gained from
        # 3200 to 10400 steps (0.89 -> 0.975 constrained). Adapters train two at a time, longest
        # first: extract on one core, the other three on the other, where joiner's 4000 steps
        # cost no wall time (bench/RESULTS.md, "Demo zoo: one rebuild from seeds").
        adapter_steps={"router": 600, "extract": 10400, "planner": 1000, "joiner": 4000},
        adapter_rank=dict.fromkeys(("router", "extract", "planner", "joiner"), 16),
    ),
    "fast": Budget(
        train_examples={"router": 200, "extract": 200, "planner": 200, "joiner": 200},
        heldout_examples=20,
        world_variants=1,
        base_steps=20,
        large_steps=4,
        draft_steps=4,
        adapter_steps=dict.fromkeys(("router", "extract", "planner", "joiner"), 4),
        adapter_rank=dict.fromkeys(("router", "extract", "planner", "joiner"), 8),
    ),
}


# -- data -----------------------------------------------------------------------------------


def stage_data(budget: Budget) -> dict:
    """Write train/held-out JSONL per task and train the tokenizer on the training text."""
    world = generate_world(WORLD_SEED)
    DATA.mkdir(parents=True, exist_ok=True)
    counts = {}
    for task in tasks.TASKS:
        for split, n in (
            ("train", budget.train_examples[task]),
            ("heldout", budget.heldout_examples),
            ("validation", budget.heldout_examples),
        ):
            examples = tasks.generate(task, split, n, world)
            write_jsonl(DATA / f"{task}.{split}.jsonl", examples)
            counts[f"{task}.{split}"] = len(examples)
    texts = tasks.world_texts(world, budget.world_variants)
    (DATA / "world.txt").write_text("\n".join(texts) + "\n")
    corpus = texts + [render_chat(e.messages()) for e in read_all("train")]
    tok = build_tokenizer(corpus)
    save_tokenizer(tok, TOKENIZER)
    return {"examples": counts, "world_texts": len(texts), "vocab_size": tok.get_vocab_size()}


def write_jsonl(file: Path, examples: list[tasks.Example]) -> None:
    """One {"messages": [...], "meta": {...}} object per line (the finetune data format)."""
    with file.open("w") as f:
        for e in examples:
            f.write(
                json.dumps({"messages": e.messages(), "meta": e.meta}, ensure_ascii=False) + "\n"
            )


def read_jsonl(file: Path) -> list[tasks.Example]:
    """Examples back from a JSONL file written by write_jsonl."""
    out = []
    for line in file.read_text().splitlines():
        row = json.loads(line)
        msgs = {m["role"]: m["content"] for m in row["messages"]}
        out.append(
            tasks.Example(msgs["system"], msgs["user"], msgs["assistant"], row.get("meta", {}))
        )
    return out


def read_all(split: str) -> list[tasks.Example]:
    """Every task's examples of a split."""
    return [e for task in tasks.TASKS for e in read_jsonl(DATA / f"{task}.{split}.jsonl")]


def load_tokenizer():
    """The trained tokenizers.Tokenizer."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))


def chat_doc(tok, messages: list[dict[str, str]]) -> Doc:
    """Tokens of a chat; weight 1 on the assistant's answer and its <|im_end|>."""
    prompt = render_chat(messages[:-1], add_generation_prompt=True)
    p = tok.encode(prompt, add_special_tokens=False).ids
    a = tok.encode(messages[-1]["content"] + IM_END, add_special_tokens=False).ids
    ids = p + a
    # weights[i] is the weight of predicting ids[i + 1]
    weights = [0.0] * (len(p) - 1) + [1.0] * len(a) + [0.0]
    return Doc(ids, weights)


def text_doc(tok, text: str) -> Doc:
    """A plain text with BOS, every next token weighted."""
    ids = tok.encode(text, add_special_tokens=True).ids
    return Doc(ids, [1.0] * (len(ids) - 1) + [0.0])


def training_docs(tok) -> list[Doc]:
    """The pretraining mixture: every task's train split plus the world's descriptions."""
    docs = [chat_doc(tok, e.messages()) for e in read_all("train")]
    docs += [text_doc(tok, t) for t in (DATA / "world.txt").read_text().splitlines() if t]
    return docs


# -- models ---------------------------------------------------------------------------------


def stage_base(budget: Budget) -> dict:
    """Pretrain demo-base from scratch on the mixture."""
    tok = load_tokenizer()
    args = model_args(BASE, tok.get_vocab_size())
    model = new_model(args, seed=0)
    docs = training_docs(tok)
    cfg = TrainConfig(steps=budget.base_steps, lr=3e-3, seq_len=256, rows=8, warmup=50, seed=0)
    figures = train(
        model,
        list(model.parameters()),
        lambda start: batches(docs, seq_len=cfg.seq_len, rows=cfg.rows, seed=cfg.seed, start=start),
        cfg,
        BUILD / "demo-base",
        label="demo-base",
    )
    save_checkpoint(model, args, TOKENIZER, ROOT / "demo-base", special=special_ids(tok))
    return {"train": figures, "parameters": _count(model), "arch": BASE.__dict__, "lr": cfg.lr}


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def stage_large(budget: Budget) -> dict:
    """demo-large: grown from demo-base (function-preserving), then trained further."""
    from models.grow import grow_checkpoint

    return grow_checkpoint(ROOT / "demo-base", ROOT / "demo-large", GROWTH, budget, BUILD)


def stage_draft(budget: Budget) -> dict:
    """demo-draft: demo-base's weights distilled towards demo-large's next-token distribution."""
    from models.distill import distill

    return distill(ROOT / "demo-large", ROOT / "demo-base", ROOT / "demo-draft", budget, BUILD)


def stage_adapters(budget: Budget, jobs: int = 1) -> dict:
    """One LoRA adapter per task, trained with the same code as `compound finetune`.

    With `jobs` > 1 the adapters train in that many processes of one torch thread each, the
    longest run first (each small model's step is too short to use two threads well, so two
    runs side by side finish sooner than two threads per run).
    """
    order = sorted(tasks.TASKS, key=lambda t: -budget.adapter_steps[t])
    if jobs <= 1:
        figures = {task: train_adapter(budget, task) for task in order}
        return {task: figures[task] for task in tasks.TASKS}
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_worker) as pool:
        futures = {task: pool.submit(train_adapter, budget, task) for task in order}
        wait(futures.values(), return_when=FIRST_EXCEPTION)
        if any(f.done() and f.exception() for f in futures.values()):
            pool.shutdown(cancel_futures=True)  # the queued runs never start; resumable later
        return {task: futures[task].result() for task in tasks.TASKS}


def _worker() -> None:
    """A build worker process: one torch thread, progress lines on stderr, and gone with its
    parent (a killed build must not leave workers training into its folders)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def train_adapter(budget: Budget, task: str) -> dict:
    """Train (or resume) one task's adapter; its figures."""
    from models.finetune import FinetuneConfig, finetune

    rank = budget.adapter_rank[task]
    cfg = FinetuneConfig(steps=budget.adapter_steps[task], rank=rank, alpha=2 * rank, lr=2e-3)
    return finetune(
        ROOT / "demo-base",
        DATA / f"{task}.train.jsonl",
        ROOT / "adapters" / task,
        cfg,
        work_dir=BUILD / "adapters" / task,
    )


def stage_eval(budget: Budget) -> dict:
    """Held-out figures through the engine (bench/demo_eval.py)."""
    from bench.demo_eval import evaluate_zoo

    return evaluate_zoo(
        ROOT, DATA, BUILD / "merged", limit=budget.heldout_examples, constrained="both"
    )


def stage_cards(budget: Budget) -> dict:
    """Write README.md model cards from the stages' figures."""
    from models.cards import write_cards

    return write_cards(ROOT, BUILD)


STAGE_FUNCTIONS = {
    "data": stage_data,
    "demo-base": stage_base,
    "demo-large": stage_large,
    "demo-draft": stage_draft,
    "adapters": stage_adapters,
    "eval": stage_eval,
    "cards": stage_cards,
}
