"""A stand-in for the Machines API a Fly Machine reaches on its local socket (`/.fly/api`):
the one call the worker makes, suspending its own Machine. It records calls, can be told to
fail, and hands the suspend to whoever plays the Machine (fakes/flyproxy.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


@dataclass
class FakeMachines:
    on_suspend: Callable[[], None] = lambda: None
    fail: int = 0  # answer this many calls with 500 first
    calls: list[str] = field(default_factory=list)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/apps/{app}/machines/{machine}/suspend", self._suspend, methods=["POST"])])

    async def _suspend(self, request: Request) -> JSONResponse:
        self.calls.append(request.url.path)
        if self.fail > 0:
            self.fail -= 1
            return JSONResponse({"error": "could not suspend"}, status_code=500)
        # As on Fly, the answer goes out first; the Machine is suspended right after.
        return JSONResponse({"ok": True}, background=BackgroundTask(self.on_suspend))
