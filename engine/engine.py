"""The engine: several base models in one process under one memory budget, each with its own
scheduler and KV pool, stepped by one background thread; sync and async front doors."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from concurrent.futures import Future
from pathlib import Path
from typing import TypeVar

import torch

from engine.adapters import AdapterInfo, AdapterManager
from engine.checkpoint import checkpoint_bytes, load_model, resolve_dtype
from engine.config import ModelArgs
from engine.errors import (
    CheckpointError,
    EngineError,
    InvalidRequestError,
    MemoryBudgetError,
    ModelAlreadyLoadedError,
    ModelNotFoundError,
)
from engine.kv_cache import BlockManager, KVCache, block_bytes, resolve_kv_dtype
from engine.model import transpose_linears
from engine.outputs import GenerationRequest, RequestOutput, StreamDelta
from engine.quantize import model_weight_bytes, num_parameters, quant_scheme
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler, Sequence
from engine.spec_decode import Speculator
from engine.speculative import SpeculativeConfig
from engine.tokenizer import Tokenizer
from engine.worker import ModelInfo, ModelWorker, Sink

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_MAX_MODEL_LEN = 8192
DEFAULT_KV_TOKENS = 32768  # per model when num_blocks is not given, capped by the budget


def default_device() -> torch.device:
    """CUDA when there is one, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_memory_budget(device: torch.device) -> int:
    """90% of GPU memory, or half of the memory the OS reports available."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1] * 0.9)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024 // 2
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


class Engine:
    """Multi-model inference engine with paged KV caches and continuous batching."""

    def __init__(self, memory_budget_bytes: int | None = None, device: str | None = None) -> None:
        self.device = torch.device(device) if device else default_device()
        self.memory_budget_bytes = memory_budget_bytes or default_memory_budget(self.device)
        self._workers: dict[str, ModelWorker] = {}
        # `_lock` guards the model table only and is never held across a step: submitting a
        # request from the server's event loop must not wait for a forward pass. State of the
        # workers (schedulers, adapter slots) belongs to the engine thread; other threads change
        # it through commands run between steps (`_in_loop`).
        self._lock = threading.RLock()
        self._load_lock = threading.Lock()
        self._commands: deque = deque()
        self._wake = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None

    # -- models ------------------------------------------------------------------------------

    @property
    def memory_used_bytes(self) -> int:
        """Weights plus KV caches of the loaded models."""
        with self._lock:
            return sum(w.info.weight_bytes + w.info.kv_cache_bytes for w in self._workers.values())

    def load_model(
        self,
        name: str,
        path: str | Path,
        dtype: str = "auto",
        *,
        max_model_len: int | None = None,
        num_blocks: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        prefix_caching: bool = True,
        max_loaded_adapters: int = 8,
        max_lora_rank: int = 64,
        adapter_dir: str | Path | None = None,
        quantization: str | None = None,
        kv_cache_dtype: str = "auto",
        speculative: SpeculativeConfig | None = None,
    ) -> ModelInfo:
        """Load a Hugging Face checkpoint directory under `name`; it serves at once.

        Adapters for it are addressed as `name:adapter`; `adapter_dir` holds adapters loaded on
        demand (`<adapter_dir>/<adapter>/adapter_config.json`). `quantization` (int8,
        int4-g32/64/128, fp8) quantizes a float checkpoint's weights at load time; a checkpoint
        written by `compound quantize` loads with its own scheme. `kv_cache_dtype` is `auto`
        (the model's dtype), `int8` or `fp8` (see engine/kv_cache.py). `speculative` turns on
        speculative decoding for its requests (a draft model must be loaded first)."""
        if not name or ":" in name:
            raise InvalidRequestError("model names are non-empty and have no ':'", param="name")
        with self._load_lock:
            if name in self.model_names():
                raise ModelAlreadyLoadedError(name)
            draft = self._draft_worker(speculative)
            path = Path(path)
            args = ModelArgs.from_dir(path)
            torch_dtype = resolve_dtype(dtype, args, self.device)
            kv_dtype = resolve_kv_dtype(kv_cache_dtype, torch_dtype, self.device)
            # An upper bound when quantizing at load time (the float weights load first).
            weights = checkpoint_bytes(path, torch_dtype)
            max_len = _max_model_len(args, max_model_len)
            num_blocks = self._num_blocks(
                args=args,
                weights=weights,
                max_len=max_len,
                block_size=block_size,
                dtype=kv_dtype,
                requested=num_blocks,
            )
            tokenizer = Tokenizer.from_dir(path)
            args, model = load_model(path, dtype, self.device, quantization=quantization)
            if self.device.type == "cpu":
                transpose_linears(model)
            model.setup_rope(max_len)
            weights = model_weight_bytes(model)
            cache = KVCache(
                args, num_blocks, block_size, torch_dtype, self.device, kv_dtype=kv_dtype
            )
            blocks = BlockManager(num_blocks, block_size, prefix_caching)
            info = ModelInfo(
                name=name,
                path=str(path),
                architecture=args.architecture,
                dtype=str(torch_dtype).removeprefix("torch."),
                max_model_len=max_len,
                num_blocks=num_blocks,
                block_size=block_size,
                weight_bytes=weights,
                kv_cache_bytes=cache.nbytes,
                vocab_size=args.vocab_size,
                num_parameters=num_parameters(model),
                quantization=quant_scheme(model),
                kv_cache_dtype=str(kv_dtype).removeprefix("torch."),
            )
            scheduler = Scheduler(blocks, max_num_seqs, max(max_num_batched_tokens, block_size))
            worker = ModelWorker(
                info=info,
                args=args,
                model=model,
                tokenizer=tokenizer,
                cache=cache,
                scheduler=scheduler,
                adapters=AdapterManager(
                    name,
                    model,
                    max_loaded=max_loaded_adapters,
                    max_rank=max_lora_rank,
                    max_cpu=64,
                    adapter_dir=adapter_dir,
                    device=self.device,
                ),
                device=self.device,
            )
            if speculative is not None:
                _check_draft(worker, draft)
                worker.speculator = Speculator(worker, speculative, draft)
            with self._lock:
                self._workers[name] = worker
            log.info("loaded %s from %s: %s", name, path, info)
            return info

    def _draft_worker(self, config: SpeculativeConfig | None) -> ModelWorker | None:
        """Validate a speculative configuration; the loaded draft model it names, if any."""
        if config is None:
            return None
        if not isinstance(config, SpeculativeConfig):
            raise InvalidRequestError(
                "speculative must be a SpeculativeConfig", param="speculative"
            )
        config.validate()
        if config.draft_model is None:
            return None
        with self._lock:
            draft = self._workers.get(config.draft_model)
        if draft is None:
            raise InvalidRequestError(
                f"draft model {config.draft_model!r} is not loaded; load it first",
                param="speculative.draft_model",
            )
        return draft

    def drafts_of(self, name: str) -> list[str]:
        """Loaded models that use `name` as their draft model."""
        with self._lock:
            return [
                n
                for n, w in self._workers.items()
                if w.speculator.draft is not None and w.speculator.draft.info.name == name
            ]

    def speculative_stats(self, name: str) -> dict[str, int]:
        """Totals of a model's speculative decoding: verification rounds, draft tokens, accepted."""
        spec = self._worker(name).speculator
        return {
            "rounds": spec.rounds,
            "draft_tokens": spec.proposed,
            "accepted_tokens": spec.accepted,
        }

    def _num_blocks(
        self,
        *,
        args: ModelArgs,
        weights: int,
        max_len: int,
        block_size: int,
        dtype: torch.dtype,
        requested: int | None,
    ) -> int:
        free = self.memory_budget_bytes - self.memory_used_bytes - weights
        per_block = block_bytes(args, block_size, dtype)
        needed = -(-max_len // block_size)
        if requested is None:
            requested = min(max(needed, -(-DEFAULT_KV_TOKENS // block_size)), free // per_block)
        if requested * per_block > free or free <= 0:
            raise MemoryBudgetError(
                f"weights ({weights} B) and {requested} KV blocks ({requested * per_block} B) do not "
                f"fit the {free + weights} B left of the engine's memory budget"
            )
        if requested < 1:
            raise MemoryBudgetError("no KV cache block fits the memory budget")
        return requested

    def unload_model(self, name: str) -> None:
        """Abort the model's requests and free its memory."""

        def unload() -> None:
            with self._lock:
                worker = self._workers.pop(name, None)
            if worker is None:
                raise ModelNotFoundError(name)
            worker.abort_all(reason="abort", error=f"model {name!r} was unloaded")

        # Under the load lock: a load_model naming `name` as its draft between the check and
        # the unload would otherwise keep a speculator pointing at a freed worker.
        with self._load_lock:
            users = self.drafts_of(name)
            if users:
                raise InvalidRequestError(
                    f"model {name!r} is the draft model of {users}; unload those first",
                    param="name",
                )
            self._in_loop(unload)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- adapters ----------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str | Path) -> AdapterInfo:
        """Load a PEFT adapter onto a loaded base model as `base:adapter`, without pausing
        running requests: weights are read and checked here, installed between steps."""
        worker, adapter = self._resolve(name)
        if adapter is None:
            raise InvalidRequestError("adapter names look like 'base:adapter'", param="name")
        weights = worker.adapters.read(name, path)

        def install() -> AdapterInfo:
            worker.adapters.add(weights)
            return next(a for a in worker.adapters.info() if a.name == name)

        return self._in_loop(install)

    def unload_adapter(self, name: str) -> bool:
        """Unload an adapter: new requests are refused at once, in-flight ones finish first.
        True if it was freed at once, False if it goes when its last request finishes."""
        worker, adapter = self._resolve(name)
        if adapter is None:
            raise InvalidRequestError("adapter names look like 'base:adapter'", param="name")
        return self._in_loop(lambda: worker.adapters.remove(name))

    def adapters(self, base: str | None = None) -> list[AdapterInfo]:
        """Known adapters (of one base model, or all) with their residency."""
        with self._lock:
            workers = [self._worker(base)] if base else list(self._workers.values())
        return self._in_loop(lambda: [a for w in workers for a in w.adapters.info()])

    def adapter_dir(self, base: str) -> Path | None:
        """The folder a base model loads adapters from on demand (None if not configured)."""
        return self._worker(base).adapters.adapter_dir

    def _resolve(self, name: str) -> tuple[ModelWorker, str | None]:
        """The worker serving `base` or `base:adapter`, and the adapter's full name."""
        base, sep, adapter = name.partition(":")
        worker = self._worker(base)
        return worker, (name if sep and adapter else None)

    def _adapter_ready(self, worker: ModelWorker, name: str) -> None:
        """Make sure a requested adapter is known, loading it from the adapter directory."""
        # Membership reads need no lock; changes go through the engine thread.
        if worker.adapters.loaded(name):
            return
        if not worker.adapters.known(name):
            raise ModelNotFoundError(name)
        weights = worker.adapters.read(name, None)

        def install() -> None:
            if not worker.adapters.loaded(name):
                worker.adapters.add(weights)

        self._in_loop(install)

    def model_names(self) -> list[str]:
        """Names of the loaded models."""
        with self._lock:
            return list(self._workers)

    def model_info(self, name: str) -> ModelInfo:
        """Facts about a loaded model (an adapter name gives its base model's)."""
        return self._resolve(name)[0].info

    def tokenizer(self, name: str) -> Tokenizer:
        """The tokenizer of a loaded model (or of an adapter's base model)."""
        return self._resolve(name)[0].tokenizer

    def serves(self, name: str) -> bool:
        """Is `name` a loaded model, or an adapter of one that is loaded or loadable on demand?"""
        base, sep, adapter = name.partition(":")
        with self._lock:
            worker = self._workers.get(base)
            if worker is None or (sep and not adapter):
                return False
            return not sep or worker.adapters.known(name)

    def block_manager(self, name: str) -> BlockManager:
        """The KV block manager of a loaded model (for metrics and tests)."""
        return self._worker(name).blocks

    def _worker(self, name: str) -> ModelWorker:
        with self._lock:
            worker = self._workers.get(name)
        if worker is None:
            raise ModelNotFoundError(name)
        return worker

    # -- requests ----------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, sink: Sink) -> str:
        """Validate and queue a request; deltas go to `sink` from the engine thread."""
        return self._submit(request, sink)[0]

    def _submit(self, request: GenerationRequest, sink: Sink) -> tuple[str, list[int]]:
        """Queue a request; returns its id and prompt ids (copied: the engine thread appends)."""
        worker, adapter = self._resolve(request.model)
        seq = self._sequence(worker, request, adapter)
        if adapter is not None:
            self._adapter_ready(worker, adapter)
            try:
                seq.adapter, seq.hash_salt = adapter, worker.adapters.salt(adapter)
            except KeyError:  # unloaded meanwhile
                raise ModelNotFoundError(adapter) from None
        prompt_ids = seq.token_ids[:]
        self._commands.append(("add", worker.info.name, seq, request.params, sink))
        self._ensure_thread()
        self._wake.set()
        return seq.request_id, prompt_ids

    def _sequence(
        self, worker: ModelWorker, request: GenerationRequest, adapter: str | None
    ) -> Sequence:
        params = request.params
        params.validate(worker.info.max_model_len)
        worker.speculator.check(params, adapter)
        ids = self._prompt_ids(worker, request)
        limit = worker.info.max_model_len
        if len(ids) + params.max_tokens > limit:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                f"model's context length ({limit})",
                param="max_tokens",
            )
        total = len(ids) + params.max_tokens
        if -(-total // worker.info.block_size) > worker.info.num_blocks:
            raise InvalidRequestError(
                f"request needs {total} tokens of KV cache; the pool holds "
                f"{worker.info.num_blocks * worker.info.block_size}",
                param="max_tokens",
            )
        request_id = request.request_id or f"req-{uuid.uuid4().hex}"
        seq = Sequence(request_id, ids, len(ids), total)
        # Compiled here, in the caller's thread: a bad grammar is the caller's typed error.
        seq.constraint = worker.constraints.compile(params)
        return seq

    @staticmethod
    def _prompt_ids(worker: ModelWorker, request: GenerationRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
            if any(not 0 <= t < worker.info.vocab_size for t in ids):
                raise InvalidRequestError("token id outside the vocabulary", param="prompt")
        elif request.prompt is not None:
            ids = worker.tokenizer.encode(request.prompt)
        else:
            raise InvalidRequestError("give prompt or prompt_token_ids", param="prompt")
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        return ids

    def abort(self, request_id: str) -> None:
        """Stop a request; its sink gets a final delta with finish_reason "abort"."""
        self._commands.append(("abort", request_id))
        self._wake.set()

    def generate(
        self,
        prompts: Seq[str] | Seq[Seq[int]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        model: str | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion through the scheduler (blocking); outputs in prompt order."""
        model = model or self._only_model()
        params_list = _broadcast(params, len(prompts))
        outputs, done = [], []
        for prompt, p in zip(prompts, params_list, strict=True):
            req = _request(model, prompt, p)
            out = RequestOutput(
                request_id="",
                prompt=req.prompt,
                prompt_token_ids=[],
                arrival_time=time.perf_counter(),
            )
            event = threading.Event()
            out.request_id, out.prompt_token_ids = self._submit(req, _collector(out, event))
            outputs.append(out)
            done.append(event)
        for event in done:
            event.wait()
        for out in outputs:
            if out.finish_reason == "error":
                raise EngineError(f"request {out.request_id} failed: {out.error or 'unknown'}")
        return outputs

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        """Async stream of deltas; the request is aborted if the consumer stops early."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamDelta] = asyncio.Queue()
        request_id = await self._submit_off_loop(
            request, lambda d: loop.call_soon_threadsafe(queue.put_nowait, d)
        )
        finished = False
        try:
            while not finished:
                delta = await queue.get()
                finished = delta.finished
                if delta.error is not None and delta.finish_reason == "error":
                    raise EngineError(delta.error)
                yield delta
        finally:
            if not finished:
                self.abort(request_id)

    async def _submit_off_loop(self, request: GenerationRequest, sink: Sink) -> str:
        """`submit` in a worker thread: tokenizing and compiling a grammar take milliseconds to
        seconds, and on the event loop they would stall every other request of the server.

        A consumer cancelled meanwhile cannot abort a request it has no id for: the submission
        finishes in its thread and the request is aborted then."""
        task = asyncio.ensure_future(asyncio.to_thread(self.submit, request, sink))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._abort_submitted)
            raise

    def _abort_submitted(self, task: asyncio.Future[str]) -> None:
        if not task.cancelled() and task.exception() is None:
            self.abort(task.result())

    def logits(self, name: str, token_ids: Seq[int]) -> torch.Tensor:
        """Logits [len(token_ids), vocab] (float32, CPU) of one forward pass over the tokens."""
        worker, adapter = self._resolve(name)
        if not token_ids:
            raise InvalidRequestError("no tokens", param="token_ids")
        if adapter is not None:
            self._adapter_ready(worker, adapter)

        def forward() -> torch.Tensor:
            slot = worker.adapters.pin(adapter) if adapter else -1
            if slot is None:
                raise EngineError(f"no free adapter slot for {adapter!r}; retry later")
            try:
                return worker.runner.logits_standalone(list(token_ids), slot).cpu()
            finally:
                if adapter:
                    worker.adapters.unpin(adapter)

        return self._in_loop(forward)

    def _only_model(self) -> str:
        names = self.model_names()
        if len(names) != 1:
            raise InvalidRequestError("name the model: several or none are loaded", param="model")
        return names[0]

    # -- the loop ----------------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._stopped:
                raise EngineError("the engine is shut down")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
                self._thread.start()

    def _in_loop(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between steps and return its result (or raise)."""
        if threading.current_thread() is self._thread:
            return fn()
        future: Future[T] = Future()
        self._commands.append(("call", fn, future))
        self._ensure_thread()
        self._wake.set()
        return future.result()

    def _loop(self) -> None:
        while not self._stopped:
            self._wake.clear()
            self._drain_commands()
            if not self._step_all():
                self._wake.wait(timeout=1.0)

    def _drain_commands(self) -> None:
        while self._commands:
            cmd = self._commands.popleft()
            if cmd[0] == "add":
                self._add(*cmd[1:])
            elif cmd[0] == "call":
                _call(*cmd[1:])
            else:
                with self._lock:
                    workers = list(self._workers.values())
                for worker in workers:
                    worker.abort(cmd[1])

    def _add(self, model: str, seq: Sequence, params: SamplingParams, sink: Sink) -> None:
        with self._lock:
            worker = self._workers.get(model)
        if worker is None:  # unloaded between submit and now
            sink(
                StreamDelta(
                    seq.request_id,
                    "",
                    [],
                    None,
                    True,
                    "abort",
                    seq.num_prompt_tokens,
                    0,
                    error=f"model {model!r} was unloaded",
                )
            )
            return
        worker.add(seq, params, sink)

    def _step_all(self) -> bool:
        busy = False
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            if worker.scheduler.has_work():
                busy = True
                self._step(worker)
        return busy

    def _step(self, worker: ModelWorker) -> None:
        try:
            worker.step()
        except Exception as e:  # fail this model's requests, keep the engine serving
            log.exception("engine step of %s failed", worker.info.name)
            worker.abort_all(reason="error", error=f"{type(e).__name__}: {e}")

    def shutdown(self) -> None:
        """Stop the loop thread and abort every request."""
        with self._lock:
            self._stopped = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        # The engine thread is gone: its state is ours now.
        while self._commands:
            cmd = self._commands.popleft()
            if cmd[0] == "call":
                cmd[2].set_exception(EngineError("the engine is shut down"))
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.abort_all()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _max_model_len(args: ModelArgs, requested: int | None) -> int:
    if requested is None:
        return min(args.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
    if not 0 < requested <= args.max_position_embeddings:
        raise CheckpointError(
            f"max_model_len {requested} exceeds max_position_embeddings "
            f"({args.max_position_embeddings})",
            file="config.json",
            field="max_position_embeddings",
        )
    return requested


def _check_draft(target: ModelWorker, draft: ModelWorker | None) -> None:
    """A draft model must speak the target's tokenizer: its token ids are the target's."""
    if draft is None:
        return
    probe = 'Speculative decoding: 123 tokens, {"json": true}.'
    same = draft.info.vocab_size == target.info.vocab_size and draft.tokenizer.encode(
        probe
    ) == target.tokenizer.encode(probe)
    if not same:
        raise InvalidRequestError(
            f"draft model {draft.info.name!r} does not share {target.info.name!r}'s tokenizer",
            param="speculative.draft_model",
        )


def _broadcast(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise InvalidRequestError("one SamplingParams per prompt, or one for all", param="params")
    return list(params)


def _request(model: str, prompt, params: SamplingParams) -> GenerationRequest:
    if isinstance(prompt, str):
        return GenerationRequest(model=model, prompt=prompt, params=params)
    return GenerationRequest(model=model, prompt_token_ids=list(prompt), params=params)


def _collector(out: RequestOutput, event: threading.Event) -> Sink:
    def sink(delta: StreamDelta) -> None:
        out.add(delta, time.perf_counter())
        if delta.finished:
            event.set()

    return sink


def _call(fn: Callable[[], T], future: Future[T]) -> None:
    try:
        future.set_result(fn())
    except Exception as e:  # handed to the calling thread
        future.set_exception(e)
