"""Liveness and readiness probes."""

from __future__ import annotations

from litestar import Controller, Response, get
from litestar.datastructures import State
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE
from msgspec import Struct, field


class Health(Struct, kw_only=True):
    """Body of `/healthz`."""

    status: str


class Readiness(Struct, kw_only=True):
    """Body of `/readyz`: whether the engine runs, and the models it serves."""

    status: str
    models: list[str] = field(default_factory=list)


class HealthController(Controller):
    """`/healthz`: the process answers. `/readyz`: the engine is up (and which models it serves)."""

    tags = ("health",)

    @get("/healthz")
    async def healthz(self) -> Health:
        """Always 200 while the process serves HTTP."""
        return Health(status="ok")

    @get("/readyz")
    async def readyz(self, state: State) -> Response[Readiness]:
        """200 with the loaded models once the engine runs, else 503."""
        engine = state.get("engine")
        if engine is None:
            return Response(
                Readiness(status="unavailable"), status_code=HTTP_503_SERVICE_UNAVAILABLE
            )
        return Response(
            Readiness(status="ok", models=engine.model_names()), status_code=HTTP_200_OK
        )
