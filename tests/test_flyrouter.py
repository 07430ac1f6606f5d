"""The stand-in for Fly's proxy in front of a whole app (fakes/flyrouter.py), with the loopback
Machines API as what makes its Machines: each Machine a real process (a tiny HTTP server that
says which Machine it is), routed by `fly-force-instance-id`, started, suspended, resumed,
restarted on a new config and stopped as Fly would."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from fakes.flyapi import FakeFlyAPI
from fakes.flyproxy import FlyProxy
from fakes.flyrouter import FlyRouter
from fakes.servers import run_server
from tests.support.processes import free_port, process_state
from tests.support.waiting import wait_for

pytestmark = pytest.mark.anyio
TOKEN = "fly-api-token-for-tests"


@dataclass
class App:
    api: FakeFlyAPI
    router: FlyRouter
    api_url: str
    url: str
    http: httpx.AsyncClient

    async def create(self, name: str) -> str:
        config = {"image": "worker:1", "env": {"WHO": name}}
        response = await self.http.post(
            f"{self.api_url}/v1/apps/textslash-vm/machines", json={"config": config}, headers=self.auth
        )
        assert response.status_code == 200, response.text
        machine_id: str = response.json()["id"]
        return machine_id

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    async def state(self, machine_id: str) -> str:
        response = await self.http.get(f"{self.api_url}/v1/apps/textslash-vm/machines/{machine_id}", headers=self.auth)
        state: str = response.json()["state"]
        return state

    async def get(self, machine_id: str | None) -> httpx.Response:
        headers = {"fly-force-instance-id": machine_id} if machine_id else {}
        return await self.http.get(f"{self.url}/who.txt", headers=headers)

    async def who(self, machine_id: str) -> str:
        """What the Machine says it is, once it answers (the first requests start it: 503)."""
        answered: list[str] = []

        async def answers() -> bool:
            response = await self.get(machine_id)
            if response.status_code == 200:
                answered.append(response.text)
            return bool(answered)

        await wait_async(answers, 20, f"Machine {machine_id} to answer")
        return answered[0]


async def wait_async(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    try:
        with anyio.fail_after(timeout):
            while not await check():
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


@asynccontextmanager
async def fly_app(tmp: Path) -> AsyncIterator[App]:
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(httpx.AsyncClient(timeout=10))

        def make(machine: dict[str, Any]) -> FlyProxy:
            """A Machine: a server on its own port, serving a file that names it and its config."""
            port = free_port()
            folder = tmp / machine["id"]
            folder.mkdir(exist_ok=True)
            (folder / "who.txt").write_text(f"{machine['id']} {machine['config']['env']['WHO']}")
            command = [
                sys.executable,
                "-m",
                "http.server",
                str(port),
                "--bind",
                "127.0.0.1",
                "--directory",
                str(folder),
            ]

            def start() -> subprocess.Popen[bytes]:
                return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

            return FlyProxy(start, f"http://127.0.0.1:{port}", http)

        router = FlyRouter(make)
        api = FakeFlyAPI(TOKEN, host=router)
        api_url = await stack.enter_async_context(run_server(api.app()))
        url = await stack.enter_async_context(run_server(router.app()))
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(router.keep_states)
                yield App(api, router, api_url, url, http)
                tg.cancel_scope.cancel()
        finally:
            router.resume_all()
            for process in router.processes():
                process.kill()
                process.wait()


async def test_each_forced_id_reaches_its_own_machine_and_the_rest_is_refused(tmp_path: Path) -> None:
    async with fly_app(tmp_path) as app:
        one, two = await app.create("one"), await app.create("two")
        assert await app.who(one) == f"{one} one"
        assert await app.who(two) == f"{two} two"
        assert set(app.router.forced) == {one, two}
        # An id the app has no Machine for: 503, as Fly's proxy finds no Machine to send it to.
        unknown = await app.get("0123456789abcd")
        assert unknown.status_code == 503 and "no Machine 0123456789abcd" in unknown.json()["detail"]
        assert app.router.unknown == ["0123456789abcd"]
        # No header and no default Machine (per-owner: every call names its Machine).
        assert (await app.get(None)).status_code == 503
        assert [r.proxy.starts for r in app.router.machines.values()] == [1, 1]  # started once each


async def test_a_machine_is_resumed_started_restarted_and_stopped_as_fly_would(tmp_path: Path) -> None:
    async with fly_app(tmp_path) as app:
        one, two = await app.create("one"), await app.create("two")
        await app.who(one)
        await app.who(two)
        proxy = app.router.machines[one].proxy
        assert proxy.process is not None
        pid = proxy.process.pid

        # Suspended (the worker asked Fly): the API says so, and a request resumes the same process.
        app.router.suspend(one)
        await wait_for(lambda: process_state(pid) == "T", 5, "the Machine's process to stop")
        assert await app.state(one) == "suspended"
        assert await app.who(one) == f"{one} one"
        assert proxy.process.pid == pid and proxy.resumes == 1 and await app.state(one) == "started"

        # Exited (idle, with IDLE_ACTION=exit): stopped, and the next request starts it again.
        proxy.process.kill()
        proxy.process.wait()

        async def stopped() -> bool:
            return await app.state(one) == "stopped"

        await wait_async(stopped, 5, "the API to see the Machine stopped")
        assert (await app.get(one)).status_code == 503  # booting
        assert await app.who(one) == f"{one} one"
        assert proxy.starts == 2 and await app.state(one) == "started"

        # Updated (a deploy rolls it to a new config): restarted on it.
        base = f"{app.api_url}/v1/apps/textslash-vm/machines/{one}"
        update = {"config": {"image": "worker:2", "env": {"WHO": "one, rolled"}}}
        assert (await app.http.post(base, json=update, headers=app.auth)).status_code == 200
        assert await app.who(one) == f"{one} one, rolled"
        assert app.router.machines[one].proxy is not proxy and proxy.process.poll() is not None

        # Stopped and destroyed through the API: its process ends, and its id is unknown after.
        second = app.router.machines[two].proxy
        stop = await app.http.post(f"{app.api_url}/v1/apps/textslash-vm/machines/{two}/stop", headers=app.auth)
        assert stop.status_code == 200
        assert second.process is not None and second.process.poll() is not None
        destroy = await app.http.delete(f"{app.api_url}/v1/apps/textslash-vm/machines/{two}", headers=app.auth)
        assert destroy.status_code == 200
        assert (await app.get(two)).status_code == 503 and app.router.unknown == [two]
        assert await app.who(one) == f"{one} one, rolled"  # the other Machine is untouched
