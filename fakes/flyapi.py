"""A loopback fake of Fly's Machines API for one app (`/v1/apps/{app}/...`): Machines (create,
get, list filtered by metadata, wait, update, start, stop, destroy) and volumes (create, list,
destroy). It records every call, can fail calls with 429 or a 5xx (before acting, or after: the
half-failed create), and tells a `Host` when a Machine should run or stop, which is how the
console starts one worker process per Machine (fakes/flyrouter.py).
"""

from __future__ import annotations

import itertools
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

VOLUME_NAME = re.compile(r"^[a-z0-9_]{1,30}$")  # Fly's rule: lowercase letters, digits, underscores


class Host(Protocol):
    """What plays the Machines: told when one should run (its config may be new) or stop."""

    def started(self, machine: dict[str, Any]) -> None: ...
    def stopped(self, machine: dict[str, Any]) -> None: ...


@dataclass
class Failure:
    method: str
    path: str  # a regular expression matched against the path after /v1/apps/{app}
    status: int
    times: int = 1
    after: bool = False  # do the work, then answer the failure (a create that "failed" halfway)
    retry_after: str = ""


@dataclass
class ApiCall:
    method: str
    path: str
    body: Any
    status: int = 0


@dataclass
class FakeFlyAPI:
    token: str
    app_name: str = "textslash-vm"
    host: Host | None = None
    # Whether a Machine's checks pass, by its config: a test fails the checks of a bad image.
    checks: Callable[[dict[str, Any]], str] = lambda config: "passing"
    machines: dict[str, dict[str, Any]] = field(default_factory=dict)
    volumes: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[ApiCall] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def fail(
        self, method: str, path: str, status: int, *, times: int = 1, after: bool = False, retry_after: str = ""
    ) -> None:
        self.failures.append(Failure(method, path, status, times, after, retry_after))

    # --- what a test sets up or looks at --------------------------------------------

    def add_machine(self, config: dict[str, Any], *, state: str = "started", region: str = "iad") -> dict[str, Any]:
        """A Machine made outside the API under test (a plain `fly deploy`, say)."""
        machine = self._new_machine({"config": config, "region": region})
        machine["state"] = state
        return machine

    def live_machines(self) -> list[dict[str, Any]]:
        return [m for m in self.machines.values() if m["state"] != "destroyed"]

    def live_volumes(self) -> list[dict[str, Any]]:
        return [v for v in self.volumes.values() if v["state"] != "destroyed"]

    def of(self, method: str, pattern: str = "") -> list[ApiCall]:
        return [c for c in self.calls if c.method == method and re.fullmatch(pattern or ".*", c.path)]

    # --- the API ----------------------------------------------------------------------

    def app(self) -> Starlette:
        base = "/v1/apps/{app}"
        return Starlette(
            routes=[
                Route(base + "/{path:path}", self._route, methods=["GET", "POST", "DELETE"]),
            ]
        )

    async def _route(self, request: Request) -> Response:
        path = "/" + request.path_params["path"]
        body = await request.json() if await request.body() else None
        call = ApiCall(request.method, path, body)
        self.calls.append(call)
        response = await self._answer(request, path, body)
        call.status = response.status_code
        return response

    async def _answer(self, request: Request, path: str, body: Any) -> Response:
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return _error(401, "unauthorized")
        if request.path_params["app"] != self.app_name:
            return _error(404, "app not found")
        failure = self._failure(request.method, path)
        if failure is not None and not failure.after:
            return self._failed(failure)
        response = await self._dispatch(request, path, body)
        if failure is not None and response.status_code < 300:
            return self._failed(failure)
        return response

    def _failure(self, method: str, path: str) -> Failure | None:
        for failure in self.failures:
            if failure.times > 0 and failure.method == method and re.fullmatch(failure.path, path):
                failure.times -= 1
                return failure
        return None

    def _failed(self, failure: Failure) -> Response:
        headers = {"retry-after": failure.retry_after} if failure.retry_after else {}
        text = "rate limit exceeded" if failure.status == 429 else "internal error"
        return JSONResponse({"error": text}, status_code=failure.status, headers=headers)

    async def _dispatch(self, request: Request, path: str, body: Any) -> Response:
        method, parts = request.method, path.strip("/").split("/")
        if parts == ["machines"]:
            if method == "GET":
                return JSONResponse([self._view(m) for m in self._listed(request)])
            if method == "POST":
                return self._create_machine(body)
        if parts == ["volumes"]:
            if method == "GET":
                return JSONResponse(self.live_volumes())
            if method == "POST":
                return self._create_volume(body)
        if len(parts) == 2 and parts[0] == "volumes" and method == "DELETE":
            return self._destroy_volume(parts[1])
        if len(parts) >= 2 and parts[0] == "machines":
            machine = self.machines.get(parts[1])
            if machine is None or machine["state"] == "destroyed":
                return _error(404, "machine not found")
            action = parts[2] if len(parts) == 3 else ""
            return await self._machine_action(request, method, action, machine, body)
        return _error(404, "no such route")

    def _listed(self, request: Request) -> list[dict[str, Any]]:
        wanted = {k.removeprefix("metadata."): v for k, v in request.query_params.items() if k.startswith("metadata.")}
        return [
            m
            for m in self.live_machines()
            if all((m["config"].get("metadata") or {}).get(k) == v for k, v in wanted.items())
        ]

    async def _machine_action(
        self, request: Request, method: str, action: str, machine: dict[str, Any], body: Any
    ) -> Response:
        if method == "GET" and action == "":
            return JSONResponse(self._view(machine))
        if method == "GET" and action == "wait":
            return await self._wait(request, machine)
        if method == "POST" and action == "":
            if not isinstance(body, dict) or not isinstance(body.get("config"), dict):
                return _error(400, "config is required")
            machine["config"] = body["config"]
            machine["instance_id"] = _instance_id()
            if body.get("skip_launch") and machine["state"] != "started":
                machine["state"] = "stopped"  # Fly's update starts the Machine unless told not to
            else:
                self._run(machine)
            return JSONResponse(self._view(machine))
        if method == "POST" and action == "start":
            self._run(machine)
            return JSONResponse({"previous_state": "stopped"})
        if method == "POST" and action == "stop":
            machine["state"] = "stopped"
            if self.host is not None:
                self.host.stopped(machine)
            return JSONResponse({"ok": True})
        if method == "DELETE" and action == "":
            if machine["state"] == "started" and request.query_params.get("force") != "true":
                return _error(412, "machine is running; stop it or destroy with force=true")
            machine["state"] = "destroyed"
            if self.host is not None:
                self.host.stopped(machine)
            for volume in self.volumes.values():
                if volume["attached_machine_id"] == machine["id"]:
                    volume["attached_machine_id"] = None
            return JSONResponse({"ok": True})
        return _error(404, "no such route")

    async def _wait(self, request: Request, machine: dict[str, Any]) -> Response:
        state = request.query_params.get("state", "started")
        instance = request.query_params.get("instance_id", "")
        timeout = float(request.query_params.get("timeout", "60"))
        with anyio.move_on_after(timeout):
            # Several handlers change a Machine: a fake polls.
            while not (machine["state"] == state and instance in ("", machine["instance_id"])):  # noqa: ASYNC110
                await anyio.sleep(0.02)
            return JSONResponse({"ok": True})
        return _error(408, "deadline exceeded")

    def _create_machine(self, body: Any) -> Response:
        if not isinstance(body, dict) or not isinstance(body.get("config"), dict) or not body["config"].get("image"):
            return _error(400, "config.image is required")
        for mount in body["config"].get("mounts") or []:
            volume = self.volumes.get(str(mount.get("volume")))
            if volume is None or volume["state"] == "destroyed":
                return _error(400, f"volume {mount.get('volume')} not found")
            if volume["attached_machine_id"]:
                return _error(409, f"volume {volume['id']} is attached to another machine")
        machine = self._new_machine(body)
        for mount in body["config"].get("mounts") or []:
            self.volumes[mount["volume"]]["attached_machine_id"] = machine["id"]
        if not body.get("skip_launch"):
            self._run(machine)
        return JSONResponse(self._view(machine))

    def _new_machine(self, body: dict[str, Any]) -> dict[str, Any]:
        machine_id = f"{next(self._ids):02x}" + secrets.token_hex(6)
        machine = {
            "id": machine_id,
            "name": body.get("name") or f"machine-{machine_id}",
            "state": "created",
            "region": body.get("region") or "iad",
            "instance_id": _instance_id(),
            "config": body["config"],
            "private_ip": f"fdaa::{machine_id[:4]}",
        }
        self.machines[machine_id] = machine
        return machine

    def _run(self, machine: dict[str, Any]) -> None:
        machine["state"] = "started"
        if self.host is not None:
            self.host.started(machine)

    def _view(self, machine: dict[str, Any]) -> dict[str, Any]:
        checks = (
            []
            if machine["state"] != "started"
            else [{"name": "servicecheck-00-http-3001", "status": self.checks(machine["config"]), "output": ""}]
        )
        return {**machine, "checks": checks}

    def _create_volume(self, body: Any) -> Response:
        if not isinstance(body, dict) or not VOLUME_NAME.match(str(body.get("name", ""))):
            return _error(400, "name must be 1-30 lowercase letters, digits or underscores")
        volume_id = f"vol_{secrets.token_hex(8)}"
        volume = {
            "id": volume_id,
            "name": body["name"],
            "state": "created",
            "region": body.get("region") or "iad",
            "size_gb": int(body.get("size_gb") or 1),
            "attached_machine_id": None,
        }
        self.volumes[volume_id] = volume
        return JSONResponse(volume)

    def _destroy_volume(self, volume_id: str) -> Response:
        volume = self.volumes.get(volume_id)
        if volume is None or volume["state"] == "destroyed":
            return _error(404, "volume not found")
        if volume["attached_machine_id"]:
            return _error(412, "volume is attached to a machine")
        volume["state"] = "destroyed"
        return JSONResponse({"ok": True})


def _instance_id() -> str:
    return "01" + secrets.token_hex(12).upper()


def _error(status: int, text: str) -> JSONResponse:
    return JSONResponse({"error": text}, status_code=status)
