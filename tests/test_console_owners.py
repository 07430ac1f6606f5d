"""`python -m console --owners 2 --demo`: per-owner mode on loopback, end to end. The relay makes
each owner's Machine through the stand-in of Fly's Machines API, the stand-in of Fly's proxy
routes each owner's calls by `fly-force-instance-id` to that owner's own `python -m vm`, and
each owner's answer comes back to their own conversation on the chat page."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from common.owners import OWNER_KEY
from console.fleet import owners
from fakes.wiring import CHROMIUM, open_for_agents
from tests.support.processes import child, free_port, wait_exit, wait_healthy
from tests.support.waiting import wait_for

pytestmark = pytest.mark.anyio
STEP = 120.0  # two Machines boot and two scripted runs of about a second a step, on a shared CPU


async def answered(http: httpx.AsyncClient, url: str, wanted: set[str], times: int = 1) -> list[dict[str, Any]]:
    """The chat's messages once each owner in `wanted` has textslash's answer `times` times in
    their conversation."""
    with anyio.fail_after(STEP):
        while True:
            messages: list[dict[str, Any]] = (await http.get(f"{url}/api/messages?after=0")).json()
            answers = [m["owner"] for m in messages if m["sender"] == "textslash" and "The app runs" in m["body"]]
            if all(answers.count(owner) >= times for owner in wanted):
                return messages
            await anyio.sleep(0.2)


async def test_two_owners_each_on_their_own_machine(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # Idle soon: each Machine is suspended on its own, and resumed by its owner's next message.
    env = {"CHROMIUM_PATH": CHROMIUM, "HOME": str(tmp_path / "home"), "IDLE_TIMEOUT_MS": "2000"}
    if os.geteuid() == 0:
        open_for_agents(tmp_path)
    data = tmp_path / "d"  # short: each Machine's API socket lives below it (a socket path has 107 bytes)
    one, two = owners(2)
    log = tmp_path / "console.log"
    args = ("--demo", "--owners", "2", "--port", str(port), "--data", str(data))
    async with httpx.AsyncClient(timeout=30) as http:
        with child("console", env, log, *args) as proc:
            await wait_healthy(url, proc, path="/api/info")
            info = (await http.get(f"{url}/api/info")).json()
            assert info["owners"] == [one, two] and info["owner"] == one
            for owner in (one, two):
                sent = await http.post(f"{url}/api/send", json={"text": "run the tests", "as": owner})
                assert sent.status_code == 200, sent.text
            stranger = await http.post(f"{url}/api/send", json={"text": "hi", "as": "+15559990000"})
            assert stranger.status_code == 400
            await answered(http, url, {one, two})
            await wait_for(lambda: log.read_text().count(" suspended\n") >= 2, STEP, "both Machines suspended")
            again = await http.post(f"{url}/api/send", json={"text": "run the tests", "as": one})
            assert again.status_code == 200, again.text
            messages = await answered(http, url, {one}, times=2)
            os.killpg(proc.pid, signal.SIGINT)
            assert await wait_exit(proc, 30) == 0

    # Each answer went to its own owner's conversation, and nothing to anyone else's.
    assert {m["owner"] for m in messages} == {one, two}
    # Two Machines and two volumes, one per owner, made through the Machines API; the console
    # kept them (without the owners' tokens: a secret is never written down).
    saved_text = (data / "fly-machines.json").read_text()
    assert "OWNER_TOKEN" not in saved_text
    saved = json.loads(saved_text)
    machines = list(saved["machines"].values())
    assert sorted(m["config"]["metadata"][OWNER_KEY] for m in machines) == [one, two]
    assert len(saved["volumes"]) == 2
    # The proxy's stand-in saw each Machine named by the relay with fly-force-instance-id.
    console_log = log.read_text()
    for machine in machines:
        assert f"fly-force-instance-id {machine['id']}: first request" in console_log
    # Owner one's Machine was resumed (the same process), not started again; owner two's slept on.
    resumed = {
        machine["config"]["metadata"][OWNER_KEY]: (
            data / "machines" / machine["config"]["mounts"][0]["volume"] / "worker.log"
        )
        .read_text()
        .count("resumed after a suspend")
        for machine in machines
    }
    assert resumed[one] >= 1 and resumed[two] == 0, resumed
    # Two worker processes, each on its own volume with its own owner's checkout only.
    for machine in machines:
        volume = data / "machines" / machine["config"]["mounts"][0]["volume"]
        phone = machine["config"]["metadata"][OWNER_KEY]
        assert (volume / "worker.log").is_file()
        checkouts = [p.name for p in (volume / "workspace").iterdir() if not p.name.startswith(".")]
        assert checkouts and all(name.split("-")[0] == phone.lstrip("+") for name in checkouts), (phone, checkouts)
    assert "Traceback" not in console_log
