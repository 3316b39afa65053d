"""Engine throughput against Hugging Face `transformers` `generate`, same checkpoint, same run.

Prints one JSON object of figures on stdout (progress goes to stderr). The machine this runs on
is shared and noisy, so every comparison is a ratio of two measurements taken in the same
process, interleaved; absolute numbers are reported beside them for context only.

Scenarios (a random ~30M-parameter Llama, float32, device auto):
  1. decode_batch1    batch-1 greedy decode tokens/s (prefill excluded), ours vs HF.
  2. concurrent       N requests of mixed prompt/output lengths submitted at once; ours vs HF
                      padded static batches (best of a few batch sizes) and vs HF one at a time.
  3. prefix_cache     requests sharing a 512-token prefix: mean time to first token with the
                      prefix cache (warmed by one request) vs without it.
  4. roofline         batch-1 decode as a fraction of the memory-bandwidth bound.

Usage: .venv/bin/python bench/engine_throughput.py [--quick] [--device cpu|cuda]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from engine import Engine, RequestOutput, SamplingParams

log = logging.getLogger("bench.engine_throughput")

MODEL = "bench"
FIRST_REGULAR_TOKEN = 5  # ids below this are the tiny tokenizer's special tokens


@dataclass(frozen=True)
class Config:
    """Sizes of one benchmark run."""

    rounds: int = 3  # interleaved repetitions of the batch-1 decode measurement
    decode_tokens: int = 128
    decode_prompt_len: int = 16
    num_requests: int = 64
    prompt_lens: tuple[int, int] = (16, 512)
    output_lens: tuple[int, int] = (16, 128)
    hf_batch_sizes: tuple[int, ...] = (8, 16)
    hf_sequential_sample: int = 16
    prefix_requests: int = 32
    prefix_len: int = 512
    suffix_len: int = 16
    prefix_output_len: int = 16
    prefix_rounds: int = 1
    prefix_sequential: int = 8  # requests sent one at a time (each pays a whole uncached prefill)
    bandwidth_mib: int = 256

    @staticmethod
    def quick() -> "Config":
        """A smoke-test sized run (well under two minutes on two CPU cores)."""
        return Config(
            rounds=1,
            decode_tokens=32,
            num_requests=12,
            prompt_lens=(16, 128),
            output_lens=(8, 32),
            hf_batch_sizes=(4,),
            hf_sequential_sample=3,
            prefix_requests=8,
            prefix_len=256,
            prefix_output_len=4,
            prefix_sequential=4,
            bandwidth_mib=64,
        )


@dataclass(frozen=True)
class Workload:
    """Prompt token ids and output lengths of a batch of requests."""

    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens of all requests."""
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        """Output tokens of all requests."""
        return sum(self.output_lens)

    def subset(self, indices: Sequence[int]) -> "Workload":
        """The requests at `indices`."""
        return Workload([self.prompts[i] for i in indices], [self.output_lens[i] for i in indices])


# -- helpers ----------------------------------------------------------------------------------


def random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    """n random regular (non-special) token ids."""
    return [rng.randrange(FIRST_REGULAR_TOKEN, vocab) for _ in range(n)]


def greedy(max_tokens: int) -> SamplingParams:
    """Greedy decoding of exactly `max_tokens` tokens."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def sync(device: torch.device) -> None:
    """Wait for queued device work so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds `fn` takes, device work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def ratio(a: float, b: float) -> float:
    """a / b rounded for the report."""
    return round(a / b, 3)


def target(measured: float, goal: float) -> dict:
    """A target line of the report."""
    return {"target": goal, "measured": round(measured, 3), "met": measured >= goal}


# -- Hugging Face baseline ----------------------------------------------------------------------


class TokenTimes:
    """A `generate` streamer that timestamps every new token (its first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        """Record the time a token (or the prompt) came out; `.cpu()` waits for the device."""
        value.cpu()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        """Nothing to flush."""

    def decode_rate(self) -> float:
        """Tokens/s after the first generated token (prefill excluded)."""
        tokens = self.times[1:]
        return (len(tokens) - 1) / (tokens[-1] - tokens[0])


class HFBaseline:
    """`transformers` greedy `generate` on the same checkpoint."""

    def __init__(self, path: Path, device: torch.device) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
        self.model.eval()
        self.pad_id = self.model.generation_config.pad_token_id

    def generate(self, prompts: list[list[int]], new_tokens: int, streamer=None) -> torch.Tensor:
        """Greedy, exactly `new_tokens` per prompt; prompts left-padded to the longest."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=self.pad_id,
                streamer=streamer,
            )
        sync(self.device)
        return out[:, width:]

    def decode_rate(self, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
        """Batch-1 decode tokens/s and the generated ids."""
        times = TokenTimes()
        out = self.generate([prompt], new_tokens, streamer=times)
        return times.decode_rate(), out[0].tolist()

    def padded_batches(self, work: Workload, batch_size: int) -> float:
        """Seconds to run `work` in static batches, each to its longest output length."""
        start = time.perf_counter()
        for i in range(0, len(work.prompts), batch_size):
            lens = work.output_lens[i : i + batch_size]
            self.generate(work.prompts[i : i + batch_size], max(lens))
        return time.perf_counter() - start

    def sequential(self, work: Workload) -> float:
        """Seconds to run `work` one request at a time."""
        start = time.perf_counter()
        for prompt, n in zip(work.prompts, work.output_lens, strict=True):
            self.generate([prompt], n)
        return time.perf_counter() - start


# -- our engine ---------------------------------------------------------------------------------


def ours_decode_rate(eng: Engine, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """Batch-1 decode tokens/s from the output timestamps (prefill excluded) and the ids."""
    out = eng.generate([prompt], greedy(new_tokens), MODEL)[0]
    return (len(out.token_ids) - 1) / (out.finished_time - out.first_token_time), out.token_ids


def ours_batch(
    eng: Engine, work: Workload, model: str = MODEL
) -> tuple[float, list[RequestOutput]]:
    """Seconds to run every request of `work`, all submitted at once, and the outputs."""
    start = time.perf_counter()
    outs = eng.generate(work.prompts, [greedy(n) for n in work.output_lens], model)
    elapsed = time.perf_counter() - start
    got = [len(o.token_ids) for o in outs]
    if got != work.output_lens:
        raise RuntimeError(f"engine produced {got} tokens, expected {work.output_lens}")
    return elapsed, outs


def warm_up(eng: Engine, hf: HFBaseline, vocab: int) -> None:
    """First calls pay for thread start-up, allocator growth and lazy init; keep them out."""
    rng = random.Random(-1)
    work = Workload([random_ids(rng, n, vocab) for n in (8, 40, 130)], [4, 6, 8])
    ours_batch(eng, work)
    hf.generate(work.prompts, 8)
    hf.generate(work.prompts[:1], 8)


# -- scenarios ----------------------------------------------------------------------------------


def decode_batch1(eng: Engine, hf: HFBaseline, cfg: Config, vocab: int) -> dict:
    """Scenario 1: batch-1 greedy decode, interleaved rounds, best of each side."""
    prompt = random_ids(random.Random(1), cfg.decode_prompt_len, vocab)
    rounds = []
    for r in range(cfg.rounds):
        ours, ours_ids = ours_decode_rate(eng, prompt, cfg.decode_tokens)
        theirs, hf_ids = hf.decode_rate(prompt, cfg.decode_tokens)
        rounds.append({"ours_tok_s": round(ours, 2), "hf_tok_s": round(theirs, 2)})
        log.info("decode_batch1 round %d: ours %.1f tok/s, hf %.1f tok/s", r, ours, theirs)
    best_ours = max(r["ours_tok_s"] for r in rounds)
    best_hf = max(r["hf_tok_s"] for r in rounds)
    agree = next(
        (i for i, (a, b) in enumerate(zip(ours_ids, hf_ids, strict=True)) if a != b), len(hf_ids)
    )
    return {
        "decode_tokens": cfg.decode_tokens,
        "prompt_tokens": cfg.decode_prompt_len,
        "ours_tok_s": best_ours,
        "hf_tok_s": best_hf,
        "ratio": ratio(best_ours, best_hf),
        "median_round_ratio": round(
            statistics.median(r["ours_tok_s"] / r["hf_tok_s"] for r in rounds), 3
        ),
        "greedy_tokens_agreeing_with_hf": agree,
        "rounds": rounds,
    }


def mixed_workload(cfg: Config, vocab: int, round_seed: int) -> Workload:
    """Seeded lengths (the same every round); token contents vary with `round_seed` so a
    repeated round gets no prefix-cache hits from the one before."""
    lengths = random.Random(2)
    prompt_lens = [lengths.randint(*cfg.prompt_lens) for _ in range(cfg.num_requests)]
    output_lens = [lengths.randint(*cfg.output_lens) for _ in range(cfg.num_requests)]
    content = random.Random(1000 + round_seed)
    return Workload([random_ids(content, n, vocab) for n in prompt_lens], output_lens)


def rates(work: Workload, seconds: float) -> dict:
    """Output and total (prompt + output) tokens/s of `work` done in `seconds`."""
    return {
        "seconds": round(seconds, 3),
        "output_tok_s": round(work.output_tokens / seconds, 2),
        "total_tok_s": round((work.prompt_tokens + work.output_tokens) / seconds, 2),
    }


def concurrent(eng: Engine, hf: HFBaseline, cfg: Config, vocab: int) -> dict:
    """Scenario 2: all requests at once (ours) vs HF padded batches and HF one at a time.

    Ours runs once before each HF configuration (interleaved) and its best run is kept; HF's
    padded figure is the best batch size. HF one-at-a-time runs on a seeded sample and is
    extrapolated by tokens (its rate is per token, so the sample's rate stands for all)."""
    work = mixed_workload(cfg, vocab, 0)
    ours_runs, padded = [], {}
    for i, bs in enumerate(cfg.hf_batch_sizes):
        seconds, outs = ours_batch(eng, mixed_workload(cfg, vocab, i + 1))
        ours_runs.append(_ours_figures(work, seconds, outs))
        log.info("concurrent ours: %.1f s", seconds)
        padded[bs] = rates(work, hf.padded_batches(work, bs))
        log.info("concurrent hf batch %d: %.1f s", bs, padded[bs]["seconds"])
    ours = min(ours_runs, key=lambda r: r["seconds"])
    best_bs = min(padded, key=lambda b: padded[b]["seconds"])
    sample = sorted(random.Random(3).sample(range(cfg.num_requests), cfg.hf_sequential_sample))
    sub = work.subset(sample)
    seq = rates(sub, hf.sequential(sub))
    log.info("concurrent hf sequential (%d requests): %.1f s", len(sample), seq["seconds"])
    seq["seconds_extrapolated_to_all"] = round(
        seq["seconds"]
        * (work.prompt_tokens + work.output_tokens)
        / (sub.prompt_tokens + sub.output_tokens),
        2,
    )
    return {
        "num_requests": cfg.num_requests,
        "prompt_tokens": work.prompt_tokens,
        "output_tokens": work.output_tokens,
        "ours": ours,
        "ours_runs_seconds": [r["seconds"] for r in ours_runs],
        "hf_padded": {"best_batch_size": best_bs, **padded[best_bs]},
        "hf_padded_by_batch_size": {str(b): padded[b]["seconds"] for b in padded},
        "hf_sequential": seq,
        "hf_sequential_sampled": len(sample),
        "ratio_vs_hf_padded_output": ratio(ours["output_tok_s"], padded[best_bs]["output_tok_s"]),
        "ratio_vs_hf_padded_total": ratio(ours["total_tok_s"], padded[best_bs]["total_tok_s"]),
        "ratio_vs_hf_sequential_output": ratio(ours["output_tok_s"], seq["output_tok_s"]),
        "ratio_vs_hf_sequential_total": ratio(ours["total_tok_s"], seq["total_tok_s"]),
    }


def _ours_figures(work: Workload, seconds: float, outs: list[RequestOutput]) -> dict:
    ttfts = [o.ttft for o in outs]
    return {
        **rates(work, seconds),
        "mean_ttft_s": round(statistics.fmean(ttfts), 3),
        "max_ttft_s": round(max(ttfts), 3),
    }


def prefix_workload(cfg: Config, prefix: list[int], vocab: int, seed: int) -> Workload:
    """`prefix_requests` prompts: the shared prefix plus a distinct suffix each."""
    rng = random.Random(seed)
    prompts = [prefix + random_ids(rng, cfg.suffix_len, vocab) for _ in range(cfg.prefix_requests)]
    return Workload(prompts, [cfg.prefix_output_len] * cfg.prefix_requests)


def prefix_cache(eng: Engine, cfg: Config, path: Path, vocab: int) -> dict:
    """Scenario 3: mean TTFT of requests sharing a prefix, prefix cache on (warmed) vs off.

    Both models get the same warm-up request (the prefix with its own suffix): it fills the
    cache of the caching model, which is the point of a prefix cache, and warms the other one
    the same way. Each round submits fresh suffixes all at once ("burst", the target), then a
    few one at a time ("sequential", a single user's view); the best mean of each is kept."""
    eng.load_model("uncached", path, dtype="float32", prefix_caching=False)
    prefix = random_ids(random.Random(4), cfg.prefix_len, vocab)
    warm = prefix_workload(cfg, prefix, vocab, seed=-4).subset([0])
    figures = {model: {"burst": [], "sequential": []} for model in (MODEL, "uncached")}
    for model in figures:
        ours_batch(eng, warm, model)
    for r in range(cfg.prefix_rounds):
        burst = prefix_workload(cfg, prefix, vocab, seed=2 * r)
        one_by_one = prefix_workload(cfg, prefix, vocab, seed=2 * r + 1)
        for model, modes in figures.items():
            modes["burst"].append(_mean_ttft(cfg, model, ours_batch(eng, burst, model)[1]))
            outs = [
                ours_batch(eng, one_by_one.subset([i]), model)[1][0]
                for i in range(cfg.prefix_sequential)
            ]
            modes["sequential"].append(_mean_ttft(cfg, model, outs))
        log.info("prefix_cache round %d: %s", r, figures)
    eng.unload_model("uncached")
    return _prefix_report(cfg, figures)


def _mean_ttft(cfg: Config, model: str, outs: list[RequestOutput]) -> float:
    if model == MODEL and any(o.num_cached_tokens < cfg.prefix_len for o in outs):
        raise RuntimeError("the warmed prefix was not served from the prefix cache")
    return statistics.fmean(o.ttft for o in outs)


def _prefix_report(cfg: Config, figures: dict) -> dict:
    report: dict = {
        "num_requests": cfg.prefix_requests,
        "prefix_tokens": cfg.prefix_len,
        "suffix_tokens": cfg.suffix_len,
        "output_tokens": cfg.prefix_output_len,
        "sequential_requests": cfg.prefix_sequential,
    }
    for mode in ("burst", "sequential"):
        cached, uncached = min(figures[MODEL][mode]), min(figures["uncached"][mode])
        report[mode] = {
            "mean_ttft_cached_s": round(cached, 4),
            "mean_ttft_uncached_s": round(uncached, 4),
            "speedup": ratio(uncached, cached),
        }
    return report


def weight_bytes_per_token(model: torch.nn.Module) -> dict:
    """Bytes of weights one batch-1 decode step must read.

    Every matrix and norm vector is read in full once per step, with one exception: the input
    embedding is a lookup, so only one row (hidden_size elements) of the table is read. With
    tied embeddings the same table is also the LM head, which reads all of it, so a shared
    tensor counts once, in full. The KV cache read is reported apart (it grows with context)."""
    embedding = model.model.embed_tokens.weight
    head = model.lm_head.weight
    seen, total = set(), 0
    for param in model.parameters():
        if param.data_ptr() in seen:
            continue
        seen.add(param.data_ptr())
        tied = param is embedding and embedding.data_ptr() == head.data_ptr()
        if param is embedding and not tied:
            total += param.shape[1] * param.element_size()
        else:
            total += param.numel() * param.element_size()
    return {"weight_bytes_per_token": total, "all_parameter_bytes": _param_bytes(model)}


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def copy_bandwidth(mib: int, device: torch.device, repeats: int = 5) -> float:
    """Best bytes/s of a tensor copy (bytes read + bytes written), the practical roofline."""
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults are not bandwidth
    best = min(timed(lambda: dst.copy_(src), device) for _ in range(repeats))
    return 2 * src.nbytes / best


def roofline(eng: Engine, hf: HFBaseline, cfg: Config, decode: dict) -> dict:
    """Scenario 4: batch-1 decode tokens/s x bytes per token over measured copy bandwidth."""
    # The HF model holds the same checkpoint under the same module names.
    weights = weight_bytes_per_token(hf.model)
    bandwidth = copy_bandwidth(cfg.bandwidth_mib, eng.device)
    per_token = weights["weight_bytes_per_token"]
    hc = hf.model.config
    head_dim = getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads
    mean_context = cfg.decode_prompt_len + cfg.decode_tokens / 2
    kv_per_token = 2 * hc.num_hidden_layers * hc.num_key_value_heads * head_dim * 4 * mean_context
    return {
        **weights,
        "kv_bytes_per_token_at_mean_context": int(kv_per_token),
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "roofline_tok_s": round(bandwidth / per_token, 1),
        "ours_fraction": round(per_token * decode["ours_tok_s"] / bandwidth, 3),
        "hf_fraction": round(per_token * decode["hf_tok_s"] / bandwidth, 3),
    }


# -- driver -------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU model as the OS names it."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The repository's commit, with "+dirty" when the working tree has changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            check=False,
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            check=False,
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return None
    return f"{head}+dirty" if dirty else head or None


def environment(eng: Engine, device: torch.device) -> dict:
    """Where the figures were measured."""
    import transformers

    info = eng.model_info(MODEL)
    return {
        "device": str(device),
        "cpu": cpu_name(),
        "commit": git_commit(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": {
            "parameters": info.num_parameters,
            "dtype": info.dtype,
            "weight_bytes": info.weight_bytes,
            "num_blocks": info.num_blocks,
            "block_size": info.block_size,
        },
    }


def targets(report: dict) -> dict:
    """The goals of each scenario against what was measured."""
    conc, prefix = report["concurrent"], report["prefix_cache"]
    return {
        "decode_batch1_vs_hf": target(report["decode_batch1"]["ratio"], 1.5),
        "concurrent_vs_hf_padded_output": target(conc["ratio_vs_hf_padded_output"], 2.0),
        "concurrent_vs_hf_sequential_output": target(conc["ratio_vs_hf_sequential_output"], 5.0),
        "prefix_cache_ttft_speedup": target(prefix["burst"]["speedup"], 3.0),
    }


def run(cfg: Config, path: Path, device: torch.device) -> dict:
    """All scenarios on the checkpoint at `path`; the report."""
    eng = Engine(device=str(device))
    try:
        eng.load_model(MODEL, path, dtype="float32")
        hf = HFBaseline(path, device)
        vocab = eng.model_info(MODEL).vocab_size
        warm_up(eng, hf, vocab)
        report: dict = {"benchmark": "engine_throughput", "config": asdict(cfg)}
        report["environment"] = environment(eng, device)
        log.info("scenario 1: batch-1 decode")
        report["decode_batch1"] = decode_batch1(eng, hf, cfg, vocab)
        log.info("scenario 2: %d concurrent requests", cfg.num_requests)
        report["concurrent"] = concurrent(eng, hf, cfg, vocab)
        log.info("scenario 3: shared %d-token prefix", cfg.prefix_len)
        report["prefix_cache"] = prefix_cache(eng, cfg, path, vocab)
        log.info("scenario 4: roofline")
        report["roofline"] = roofline(eng, hf, cfg, report["decode_batch1"])
        report["targets"] = targets(report)
        return report
    finally:
        eng.shutdown()


def checkpoint(directory: str | None) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """The benchmark checkpoint: built in `directory` (kept) or in a temporary one."""
    from tests.engine.tiny_models import make_large_llama

    tmp = None if directory else tempfile.TemporaryDirectory(prefix="bench-llama-")
    path = Path(directory or tmp.name)
    if not (path / "config.json").exists():
        log.info("building a random ~30M-parameter Llama in %s", path)
        make_large_llama(path, params_millions=30)
    return path, tmp


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke-test run")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--checkpoint", default=None, help="reuse/build the checkpoint here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print its JSON report."""
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = Config.quick() if args.quick else Config()
    path, tmp = checkpoint(args.checkpoint)
    start = time.perf_counter()
    try:
        report = run(cfg, path, device)
    finally:
        if tmp is not None:
            tmp.cleanup()
    report["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
