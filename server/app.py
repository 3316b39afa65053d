"""The litestar application: routes, dependencies, error handling and the engine's lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import ServiceUnavailableException
from litestar.openapi import OpenAPIConfig

from engine import Engine
from server.adapters_api import AdapterController
from server.catalog import provider_targets
from server.config import LimitsConfig, ModelConfig, ServerConfig
from server.errors import handle_exception
from server.health import HealthController
from server.metrics_api import MetricsController
from server.openai_api import OpenAIController
from server.pipelines_api import (
    PipelineController,
    RegistryController,
    RunController,
    reload_pipelines,
)
from server.runtime import build_backends
from server.service import PipelineService
from server.store import Store
from tools import default_registry

logger = logging.getLogger(__name__)

VERSION = "0.1.0"


def create_app(config: ServerConfig, engine: Engine | None = None) -> Litestar:
    """The app; without `engine`, the lifespan creates one and loads the configured models."""
    return Litestar(
        route_handlers=[
            OpenAIController,
            AdapterController,
            PipelineController,
            RunController,
            RegistryController,
            reload_pipelines,
            HealthController,
            MetricsController,
        ],
        dependencies={
            "engine": Provide(provide_engine, sync_to_thread=False),
            "limits": Provide(provide_limits, sync_to_thread=False),
            "pipelines": Provide(provide_pipelines, sync_to_thread=False),
        },
        # Entered in order, left in reverse: the pipelines need the engine, not the other way.
        lifespan=[_engine_lifespan, _pipelines_lifespan],
        state=State({"config": config, "given_engine": engine}),
        exception_handlers={Exception: handle_exception},
        request_max_body_size=config.limits.max_body_bytes,
        openapi_config=OpenAPIConfig(title="compound", version=VERSION),
        # Logging belongs to the process (the CLI configures it), not to the app.
        logging_config=None,
    )


def provide_engine(state: State) -> Engine:
    """The running engine; 503 while it is starting or after shutdown."""
    engine = state.get("engine")
    if engine is None:
        raise ServiceUnavailableException("the engine is not running")
    return engine


def provide_pipelines(state: State) -> PipelineService:
    """The pipeline service; 503 while it is starting or after shutdown."""
    service = state.get("pipelines")
    if service is None:
        raise ServiceUnavailableException("the pipeline service is not running")
    return service


def provide_limits(state: State) -> LimitsConfig:
    """The request limits of the server configuration."""
    return state.config.limits


@asynccontextmanager
async def _engine_lifespan(app: Litestar) -> AsyncIterator[None]:
    # An engine passed to create_app belongs to the caller: only one made here is shut down.
    given: Engine | None = app.state.given_engine
    engine = given or start_engine(app.state.config)
    app.state.engine = engine
    try:
        yield
    finally:
        app.state.engine = None
        if given is None:
            engine.shutdown()
            logger.info("engine shut down")


@asynccontextmanager
async def _pipelines_lifespan(app: Litestar) -> AsyncIterator[None]:
    config: ServerConfig = app.state.config
    service = await asyncio.to_thread(start_pipelines, config, app.state.engine)
    app.state.pipelines = service
    poller = (
        asyncio.create_task(poll_registry(service, config.poll_interval_s), name="registry-poll")
        if service.registry is not None and config.poll_interval_s > 0
        else None
    )
    leases = asyncio.create_task(service.runs.keep_leases(config.run_lease_s), name="run-leases")
    try:
        yield
    finally:
        background = [t for t in (poller, leases) if t is not None]
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        app.state.pipelines = None
        await service.runs.shutdown()
        await service.close()
        logger.info("pipeline service shut down")


def start_pipelines(config: ServerConfig, engine: Engine) -> PipelineService:
    """Migrate the database, build tools, backends and statistics, register shipped specs."""
    store = Store.open(config.database_url)
    served = provider_targets(config.providers)
    service = PipelineService(
        store,
        backends=build_backends(engine, config.providers),
        tools=default_registry(config.tools),
        # `engine.serves`: loaded models and their adapters (`demo-base:planner`, on demand)
        models=lambda target: target in served or engine.serves(target),
        limits=config.limits,
    )
    service.refresh_statistics()
    # Runs left unfinished by a server that died (this one's last life, or another replica's).
    service.runs.sweep(config.run_lease_s)
    service.register_directory(config.pipelines_dir)
    if config.pipelines_repo is not None:
        service.use_git(
            config.pipelines_repo,
            branch=config.pipelines_branch,
            commit_posted=config.commit_posted,
        )
    return service


async def poll_registry(service: PipelineService, interval_s: float) -> None:
    """Follow new commits of the pipelines branch every `interval_s` seconds until cancelled;
    a failed check is logged and retried at the next tick (serving goes on)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            if await asyncio.to_thread(service.reload):
                logger.info(
                    "pipelines branch moved to %s",
                    service.registry and service.registry.status().head,
                )
        except Exception:
            logger.exception("checking the pipelines repository failed")


def load_order(models: Sequence[ModelConfig]) -> list[ModelConfig]:
    """Draft models first: a model's speculative configuration names an already loaded one."""
    drafts = {m.speculative.draft_model for m in models if m.speculative is not None}
    return sorted(models, key=lambda m: m.name not in drafts)


def start_engine(config: ServerConfig) -> Engine:
    """An engine with the configured models loaded; missing checkpoints are skipped."""
    engine = Engine(
        memory_budget_bytes=config.engine.memory_budget_bytes, device=config.engine.device
    )
    for model in load_order(config.models):
        if not Path(model.path).exists():
            logger.warning(
                "model %s: checkpoint %s does not exist; skipped", model.name, model.path
            )
            continue
        engine.load_model(model.name, model.path, **model.load_kwargs())
    logger.info("engine ready on %s with models %s", engine.device, engine.model_names())
    return engine
