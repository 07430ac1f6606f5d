"""A stand-in for the Machines API a Fly Machine reaches on its local socket (`/.fly/api`):
suspending the Machine and saying its state. It records calls, can be told to fail, and hands
the suspend to whoever plays the Machine (fakes/flyproxy.py), after `freeze_delay_s`: on Fly the
call is answered first and the Machine paused afterwards, sometimes seconds later."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


@dataclass
class FakeMachines:
    on_suspend: Callable[[], None] = lambda: None
    state: Callable[[], str] = lambda: "started"  # what the Machine's player says it is
    fail: int = 0  # answer this many suspend calls with 500 first
    freeze_delay_s: float = 0.0
    calls: list[str] = field(default_factory=list)
    _suspending: bool = False

    def app(self) -> Starlette:
        path = "/v1/apps/{app}/machines/{machine}"
        return Starlette(
            routes=[
                Route(path, self._get, methods=["GET"]),
                Route(path + "/suspend", self._suspend, methods=["POST"]),
            ]
        )

    async def _get(self, request: Request) -> JSONResponse:
        state = "suspending" if self._suspending else self.state()
        return JSONResponse({"id": request.path_params["machine"], "state": state})

    async def _suspend(self, request: Request) -> JSONResponse:
        self.calls.append(request.url.path)
        if self.fail > 0:
            self.fail -= 1
            return JSONResponse({"error": "could not suspend"}, status_code=500)
        self._suspending = True
        return JSONResponse({"ok": True}, background=BackgroundTask(self._freeze))

    async def _freeze(self) -> None:
        await anyio.sleep(self.freeze_delay_s)
        self.on_suspend()
        self._suspending = False
