"""`/v1/adapters`: load, list and unload LoRA adapters while the engine serves traffic."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

from litestar import Controller, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_202_ACCEPTED
from msgspec import Meta, Struct

from engine import AdapterInfo, Engine, InvalidRequestError

AdapterName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$")]


class LoadAdapterRequest(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Load `<base>:<name>` from a folder inside the base model's configured adapter_dir."""

    name: AdapterName
    base: str
    path: str | None = None  # relative to adapter_dir; default: the adapter's name


class Adapter(Struct, kw_only=True):
    """One adapter and where it lives now."""

    id: str
    base: str
    rank: int
    resident: str  # "slot" | "cpu" | "disk"
    in_use: int
    unloading: bool


class AdapterList(Struct, kw_only=True):
    """`GET /v1/adapters`."""

    data: list[Adapter]
    object: str = "list"


class AdapterController(Controller):
    """Hot-swapping of LoRA adapters; loading never pauses running requests."""

    path = "/v1/adapters"
    tags = ("adapters",)

    @get("/")
    async def list_adapters(self, engine: NamedDependency[Engine]) -> AdapterList:
        """Every known adapter with its residency (GPU slot, CPU memory or disk)."""
        return AdapterList(data=[_card(a) for a in engine.adapters()])

    @post("/", status_code=HTTP_201_CREATED)
    async def load_adapter(
        self, engine: NamedDependency[Engine], data: JSONBody[LoadAdapterRequest]
    ) -> Adapter:
        """Read and check the adapter off the event loop, then install it between steps."""
        path = _allowed_path(engine, data)
        info = await asyncio.to_thread(engine.load_adapter, f"{data.base}:{data.name}", path)
        return _card(info)

    @delete("/{name:str}", status_code=HTTP_200_OK)
    async def unload_adapter(self, engine: NamedDependency[Engine], name: str) -> Response[dict]:
        """Refuse new requests for it now; it leaves once its in-flight requests finish."""
        freed = engine.unload_adapter(name)
        body = {"id": name, "unloaded": freed, "unloading": not freed}
        return Response(body, status_code=HTTP_200_OK if freed else HTTP_202_ACCEPTED)


def _allowed_path(engine: Engine, data: LoadAdapterRequest) -> Path:
    """The adapter folder, which must lie inside the base model's configured adapter_dir."""
    root = engine.adapter_dir(data.base)
    if root is None:
        raise InvalidRequestError(
            f"model {data.base!r} has no adapter_dir configured; adapters load only from there",
            param="base",
        )
    root = root.resolve()
    path = (root / (data.path or data.name)).resolve()
    if not path.is_relative_to(root):
        raise InvalidRequestError("path must stay inside the model's adapter_dir", param="path")
    return path


def _card(a: AdapterInfo) -> Adapter:
    return Adapter(
        id=a.name,
        base=a.name.split(":", 1)[0],
        rank=a.rank,
        resident=a.resident,
        in_use=a.in_use,
        unloading=a.unloading,
    )
