"""The relay as its own process in WORKER_MODE=per-owner, with loopback fakes of Twilio, Fly's
Machines API, Fly's proxy (routing by `fly-force-instance-id`) and one fake worker per owner."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from common.owners import owner_token
from fakes.flyapi import FakeFlyAPI
from fakes.servers import run_server
from fakes.twilio import FakeTwilio
from fakes.wiring import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    OWNER,
    OWNER2,
    PUBLIC_URL,
    WORKER_TOKEN,
    message_params,
    relay_env,
    signed_form,
)
from fakes.worker import FakeWorker
from tests.support.processes import child, free_port, wait_healthy

FLY_TOKEN = "fly-api-token-for-tests"
PLAIN_IMAGE = "registry.fly.io/textslash-vm:deployment-01PLAIN"


@dataclass
class Routed:
    machine: str  # the fly-force-instance-id it carried ("" without)
    path: str
    authorization: str


@dataclass
class Router:
    """Fly's proxy in front of the worker app, as far as the relay can tell: a request with
    `fly-force-instance-id` goes to that Machine (here, the fake worker of the owner its config
    names); every request is recorded."""

    api: FakeFlyAPI
    workers: dict[str, tuple[str, FakeWorker]]  # owner -> their fake worker and its URL
    http: httpx.AsyncClient
    seen: list[Routed] = field(default_factory=list)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self._forward, methods=["GET", "POST"])])

    async def _forward(self, request: Request) -> Response:
        machine_id = request.headers.get("fly-force-instance-id", "")
        self.seen.append(Routed(machine_id, request.url.path, request.headers.get("authorization", "")))
        machine = self.api.machines.get(machine_id)
        if machine is None or machine["state"] == "destroyed":
            return JSONResponse({"error": "no such instance"}, status_code=502)
        env = machine["config"].get("env", {})
        owner = env.get("OWNER_PHONE", "")
        if owner not in self.workers:
            return JSONResponse({"error": "the Machine serves no owner here"}, status_code=502)
        url, worker = self.workers[owner]
        worker.token = env.get("OWNER_TOKEN", "")  # the Machine runs with the token its config gives it
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        upstream = await self.http.request(
            request.method, url + request.url.path, headers=headers, content=await request.body()
        )
        return Response(upstream.content, status_code=upstream.status_code, media_type="application/json")


@dataclass
class FleetStack:
    tmp: Path
    http: httpx.AsyncClient
    twilio: FakeTwilio
    api: FakeFlyAPI
    router: Router
    workers: dict[str, FakeWorker]
    env: dict[str, str]
    url: str
    plain: str  # the id of the app's Machine from a plain deploy
    _procs: ExitStack = field(default_factory=ExitStack)
    relay: subprocess.Popen[bytes] | None = None

    async def start_relay(self) -> None:
        self.relay = self._procs.enter_context(child("relay", self.env, self.tmp / "relay.log"))
        await wait_healthy(self.url, self.relay)

    def stop_relay(self) -> None:
        assert self.relay is not None
        self.relay.terminate()
        self.relay.wait(timeout=15)

    async def text(self, body: str, sender: str = OWNER, media: Sequence[tuple[str, str]] = ()) -> None:
        params = message_params(body, sender=sender, media=media)
        self.twilio.open_window(sender)
        response = await self.http.post(
            f"{self.url}/webhook", data=params, headers=signed_form(PUBLIC_URL + "/webhook", params)
        )
        assert response.status_code == 200

    def said(self, fragment: str, to: str = OWNER) -> list[str]:
        return [b for b in self.twilio.bodies(to) if fragment in b]

    def owned(self) -> dict[str, list[dict[str, Any]]]:
        """Each owner's live Machines, by the metadata the relay gave them."""
        found: dict[str, list[dict[str, Any]]] = {}
        for machine in self.api.live_machines():
            owner = (machine["config"].get("metadata") or {}).get("textslash_owner")
            if owner:
                found.setdefault(owner, []).append(machine)
        return found


@asynccontextmanager
async def fleet_stack(tmp: Path, **env: str) -> AsyncIterator[FleetStack]:
    twilio, api = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN), FakeFlyAPI(token=FLY_TOKEN)
    plain = api.add_machine(
        {"image": PLAIN_IMAGE, "metadata": {"fly_platform_version": "v2", "fly_process_group": "app"}}
    )
    workers = {phone: FakeWorker(owner_token(WORKER_TOKEN, phone), owner=phone) for phone in (OWNER, OWNER2)}
    relay_port = free_port()
    url = f"http://127.0.0.1:{relay_port}"
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(httpx.AsyncClient(timeout=30))
        twilio.api_url = await stack.enter_async_context(run_server(twilio.app()))
        twilio.cdn_url = await stack.enter_async_context(run_server(twilio.cdn_app()))
        api_url = await stack.enter_async_context(run_server(api.app()))
        worker_urls = {}
        for phone, worker in workers.items():
            worker.answer_via = url
            stack.push_async_callback(worker.aclose)
            worker_urls[phone] = (await stack.enter_async_context(run_server(worker.app())), worker)
        router = Router(api, worker_urls, http)
        router_url = await stack.enter_async_context(run_server(router.app()))
        renv = relay_env(
            tmp / "relay.sqlite3",
            twilio.api_url,
            router_url,
            PORT=str(relay_port),
            HOST="127.0.0.1",
            WORKER_MODE="per-owner",
            FLY_API_BASE_URL=api_url,
            FLY_API_TOKEN=FLY_TOKEN,
            WORKER_APP="textslash-vm",
            **env,
        )
        fleet = FleetStack(tmp, http, twilio, api, router, workers, renv, url, plain["id"])
        with fleet._procs:
            await fleet.start_relay()
            yield fleet
