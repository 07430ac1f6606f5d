"""Relay and worker as separate processes (`python -m relay`, `python -m vm`), with loopback
fakes of Twilio, the Messages API and GitHub, and a bare `origin`: the pair as deployed."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from fakes.anthropic import FakeAnthropic
from fakes.github import FakeGitHub
from fakes.origin import make_origin
from fakes.servers import run_server
from fakes.twilio import FakeTwilio
from fakes.wiring import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    FILES,
    GITHUB_TOKEN,
    OWNER,
    PUBLIC_URL,
    message_params,
    model_env,
    relay_env,
    signed_form,
    worker_env,
)
from tests.support.processes import child, free_port, wait_exit, wait_healthy


@dataclass
class Pair:
    tmp: Path
    http: httpx.AsyncClient
    twilio: FakeTwilio
    model: FakeAnthropic
    github: FakeGitHub
    origin: Path
    relay_env: dict[str, str]
    worker_env: dict[str, str]
    relay_url: str
    worker_url: str
    _procs: ExitStack = field(default_factory=ExitStack)
    relay: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None

    @property
    def checkout(self) -> Path:
        return Path(self.worker_env["WORKSPACE_DIR"]) / OWNER.lstrip("+")

    async def start_relay(self) -> None:
        self.relay = self._procs.enter_context(child("relay", self.relay_env, self.tmp / "relay.log"))
        await wait_healthy(self.relay_url, self.relay)

    async def start_worker(self, *, wait: bool = True) -> None:
        self.worker = self._procs.enter_context(child("vm", self.worker_env, self.tmp / "worker.log"))
        if wait:
            await wait_healthy(self.worker_url, self.worker)

    async def kill(self, which: str, sig: signal.Signals = signal.SIGKILL) -> int:
        proc = self.relay if which == "relay" else self.worker
        assert proc is not None
        proc.send_signal(sig)
        return await wait_exit(proc, 15)

    async def text(self, body: str, *, sender: str = OWNER, media: Sequence[tuple[str, str]] = ()) -> None:
        params = message_params(body, sender=sender, media=media)
        response = await self.http.post(
            f"{self.relay_url}/webhook", data=params, headers=signed_form(PUBLIC_URL + "/webhook", params)
        )
        assert response.status_code == 200

    def said(self, fragment: str, to: str = OWNER) -> list[str]:
        return [b for b in self.twilio.bodies(to) if fragment in b]

    def checkout_of(self, phone: str) -> Path:
        return Path(self.worker_env["WORKSPACE_DIR"]) / phone.lstrip("+")

    def logs(self) -> str:
        return "".join(
            (self.tmp / f"{name}.log").read_text()
            for name in ("relay", "worker")
            if (self.tmp / f"{name}.log").exists()
        )


@asynccontextmanager
async def pair_stack(tmp: Path, *, idle_ms: str = "600000", **worker_overrides: str) -> AsyncIterator[Pair]:
    twilio, model, github = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN), FakeAnthropic(), FakeGitHub(GITHUB_TOKEN)
    origin = make_origin(tmp / "git", FILES)
    relay_port, worker_port = free_port(), free_port()
    relay_url, worker_url = f"http://127.0.0.1:{relay_port}", f"http://127.0.0.1:{worker_port}"
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(httpx.AsyncClient(timeout=30))
        twilio_url = twilio.api_url = await stack.enter_async_context(run_server(twilio.app()))
        twilio.cdn_url = await stack.enter_async_context(run_server(twilio.cdn_app()))
        model_url = await stack.enter_async_context(run_server(model.app()))
        github_url = await stack.enter_async_context(run_server(github.app()))
        renv = relay_env(tmp / "relay.sqlite3", twilio_url, worker_url, PORT=str(relay_port), HOST="127.0.0.1")
        wenv = {
            **model_env(model_url, tmp),
            **worker_env(
                tmp,
                relay_url=relay_url,
                github_url=github_url,
                origin=origin,
                PORT=str(worker_port),
                HOST="127.0.0.1",
                IDLE_TIMEOUT_MS=idle_ms,
                WORKSPACE_DIR=str(tmp / "workspace"),
                **worker_overrides,
            ),
        }
        pair = Pair(tmp, http, twilio, model, github, origin, renv, wenv, relay_url, worker_url)
        with pair._procs:
            yield pair
