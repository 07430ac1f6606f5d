"""The worker under test: the real app, the real Claude Code CLI, loopback fakes around it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx

from fakes.anthropic import FakeAnthropic
from fakes.github import FakeGitHub
from fakes.origin import make_origin
from fakes.relay import FakeRelay
from fakes.servers import run_server
from fakes.wiring import FILES, GITHUB_TOKEN, OWNER, WORKER_TOKEN, model_env, new_message_id, worker_env
from vm.agent import Agent
from vm.app import create_app
from vm.settings import Settings


@dataclass
class WorkerStack:
    url: str
    settings: Settings
    anthropic: FakeAnthropic
    relay: FakeRelay
    github: FakeGitHub
    origin: Path
    http: httpx.AsyncClient

    def checkout(self, phone: str = OWNER, repo: str = "") -> Path:
        """The owner's checkout of `repo` ("": the worker's own REPO_URL)."""
        return self.settings.workspace_dir / (f"{phone.lstrip('+')}-{repo}" if repo else phone.lstrip("+"))

    async def post(self, route: str, body: dict[str, Any], token: str = WORKER_TOKEN) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return await self.http.post(f"{self.url}/{route}", json=body, headers=headers)

    async def command(self, text: str, *, phone: str = OWNER, message_id: str | None = None, **extra: Any) -> str:
        message_id = message_id or new_message_id()
        response = await self.post("command", {"phone": phone, "text": text, "message_id": message_id, **extra})
        assert response.status_code == 202, response.text
        return message_id

    async def screenshot(self, url: str, *, phone: str = OWNER) -> httpx.Response:
        response = await self.post("screenshot", {"phone": phone, "url": url, "message_id": new_message_id()})
        assert response.status_code == 202, response.text
        return response

    async def decide(self, route: str, phone: str = OWNER) -> httpx.Response:
        return await self.post(route, {"phone": phone})

    async def settled(self, timeout: float = 10.0) -> None:
        """Until /health says the worker is not busy: after each run and decision it takes the
        next run's snapshot, and only then may it sleep."""
        with anyio.fail_after(timeout):
            while (await self.http.get(f"{self.url}/health")).json()["busy"]:
                await anyio.sleep(0.01)


@asynccontextmanager
async def worker_stack(
    tmp: Path,
    *,
    files: dict[str, str] | None = None,
    progress_interval_s: float = 0.0,
    anthropic: FakeAnthropic | None = None,
    github: FakeGitHub | None = None,
    **env: str,
) -> AsyncIterator[WorkerStack]:
    """`anthropic` and `github`: fakes set up before the worker boots (it checks its credentials
    with them at once: vm/credentials.py)."""
    anthropic, relay, github = anthropic or FakeAnthropic(), FakeRelay(WORKER_TOKEN), github or FakeGitHub(GITHUB_TOKEN)
    origin = make_origin(tmp / "git", files or FILES)
    async with AsyncExitStack() as stack:
        anthropic_url = await stack.enter_async_context(run_server(anthropic.app()))
        relay_url = await stack.enter_async_context(run_server(relay.app()))
        github_url = await stack.enter_async_context(run_server(github.app()))
        settings = Settings.from_env(worker_env(tmp, relay_url=relay_url, github_url=github_url, origin=origin, **env))
        agent = Agent(model_env(anthropic_url, tmp), progress_interval_s=progress_interval_s)
        url = await stack.enter_async_context(run_server(create_app(settings, agent=agent)))
        http = await stack.enter_async_context(httpx.AsyncClient(timeout=30))
        yield WorkerStack(url, settings, anthropic, relay, github, origin, http)
