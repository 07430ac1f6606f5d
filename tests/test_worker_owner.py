"""A worker that serves one owner (OWNER_PHONE, WORKER_MODE=per-owner on the relay): its token is
OWNER_TOKEN, both ways; another owner's command is refused before anything runs; its presence
names its owner; the agent never sees either token. Without OWNER_PHONE nothing changes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from common.owners import owner_token
from fakes.anthropic import FakeAnthropic, Text, bash
from fakes.github import FakeGitHub
from fakes.origin import make_origin
from fakes.relay import FakeRelay
from fakes.servers import run_server
from fakes.wiring import (
    FILES,
    GITHUB_TOKEN,
    OWNER,
    OWNER2,
    WORKER_TOKEN,
    model_env,
    new_message_id,
    worker_env,
)
from tests.support.processes import child, free_port, wait_healthy
from tests.support.waiting import wait_for
from vm.settings import ConfigError, Settings

pytestmark = pytest.mark.anyio
OWNER_TOKEN = owner_token(WORKER_TOKEN, OWNER)
STEP = 90.0


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- the settings ------------------------------------------------------------------------


def base_env(**extra: str) -> dict[str, str]:
    return {"RELAY_CALLBACK_URL": "http://127.0.0.1:9", **extra}


def test_one_owners_worker_takes_owner_token_and_ignores_worker_token() -> None:
    # The relay's own WORKER_TOKEN (the one OWNER_TOKEN derives from) left on the worker app.
    settings = Settings.from_env(base_env(OWNER_PHONE=OWNER, OWNER_TOKEN=OWNER_TOKEN, WORKER_TOKEN=WORKER_TOKEN))
    assert (settings.owner_phone, settings.worker_token, settings.relay_token_here) == (OWNER, OWNER_TOKEN, True)
    assert OWNER_TOKEN not in repr(settings) and WORKER_TOKEN not in repr(settings)
    # The worker app's own WORKER_TOKEN (for its plain-deploy Machine), as docs/DEPLOY.md says.
    own = Settings.from_env(base_env(OWNER_PHONE=OWNER, OWNER_TOKEN=OWNER_TOKEN, WORKER_TOKEN="the-apps-own-token"))
    assert (own.worker_token, own.relay_token_here) == (OWNER_TOKEN, False)
    alone = Settings.from_env(base_env(OWNER_PHONE=OWNER, OWNER_TOKEN=OWNER_TOKEN))
    assert (alone.worker_token, alone.relay_token_here) == (OWNER_TOKEN, False)


def test_without_owner_phone_the_worker_is_as_before() -> None:
    settings = Settings.from_env(base_env(WORKER_TOKEN=WORKER_TOKEN, OWNER_TOKEN=OWNER_TOKEN))
    assert (settings.owner_phone, settings.worker_token, settings.relay_token_here) == ("", WORKER_TOKEN, False)
    with pytest.raises(ConfigError, match="WORKER_TOKEN is required"):
        Settings.from_env(base_env(OWNER_TOKEN=OWNER_TOKEN))


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"OWNER_PHONE": OWNER, "WORKER_TOKEN": WORKER_TOKEN}, "OWNER_TOKEN is required"),
        ({"OWNER_PHONE": OWNER, "OWNER_TOKEN": "short"}, "OWNER_TOKEN is too short"),
        ({"OWNER_PHONE": "15550001111", "OWNER_TOKEN": OWNER_TOKEN}, "OWNER_PHONE is malformed"),
        ({"OWNER_PHONE": "+1555 000", "OWNER_TOKEN": OWNER_TOKEN}, "OWNER_PHONE is malformed"),
    ],
)
def test_a_one_owner_worker_refuses_a_bad_setting_by_name(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as caught:
        Settings.from_env(base_env(**env))
    assert OWNER_TOKEN not in str(caught.value) and WORKER_TOKEN not in str(caught.value)


# --- the real worker process ---------------------------------------------------------------


@dataclass
class OwnerWorker:
    anthropic: FakeAnthropic
    relay: FakeRelay
    env: dict[str, str]
    url: str
    log: Path
    checkout: Path


@asynccontextmanager
async def owner_worker(tmp: Path) -> AsyncIterator[OwnerWorker]:
    """The fakes around a worker for OWNER alone; the relay stand-in takes only OWNER_TOKEN."""
    anthropic, relay, github = FakeAnthropic(), FakeRelay(OWNER_TOKEN), FakeGitHub(GITHUB_TOKEN)
    origin = make_origin(tmp / "git", FILES)
    port = free_port()
    async with AsyncExitStack() as stack:
        anthropic_url = await stack.enter_async_context(run_server(anthropic.app()))
        relay_url = await stack.enter_async_context(run_server(relay.app()))
        github_url = await stack.enter_async_context(run_server(github.app()))
        env = {
            **model_env(anthropic_url, tmp),
            **worker_env(tmp, relay_url=relay_url, github_url=github_url, origin=origin),
            # As on an owner's Machine of an app whose secrets still hold the relay's WORKER_TOKEN.
            "WORKER_TOKEN": WORKER_TOKEN,
            "OWNER_PHONE": OWNER,
            "OWNER_TOKEN": OWNER_TOKEN,
            "FLY_APP_NAME": "textslash-vm",
            "PORT": str(port),
            "HOST": "127.0.0.1",
        }
        checkout = Path(env["WORKSPACE_DIR"]) / OWNER.lstrip("+")
        yield OwnerWorker(anthropic, relay, env, f"http://127.0.0.1:{port}", tmp / "worker.log", checkout)


async def test_a_one_owner_worker_serves_its_owner_only_with_its_own_token(tmp_path: Path) -> None:
    async with owner_worker(tmp_path) as w, httpx.AsyncClient(timeout=30) as http:
        # The agent looks for the tokens in its own environment and every process's it can read.
        snoop = "env > env.txt; for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < \"$f\"; echo; done > all.txt 2>&1"
        w.anthropic.script("look around", bash(snoop, "look around"), Text("Looked."))
        with child("vm", w.env, w.log) as proc:
            await wait_healthy(w.url, proc)
            # Up, announced with OWNER_TOKEN (the stand-in takes no other), naming its owner.
            await wait_for(lambda: w.relay.presence, 10, "the worker's announcement")
            assert [(p.state, p.owner) for _, p in w.relay.presence] == [("up", OWNER)]

            theirs = {"phone": OWNER2, "text": "look around", "message_id": new_message_id()}
            refused = await http.post(f"{w.url}/command", json=theirs, headers=bearer(OWNER_TOKEN))
            assert refused.status_code == 403, refused.text
            assert "serves one owner" in refused.json()["detail"]
            for route in ("status", "approve", "reject", "cancel"):
                answer = await http.post(f"{w.url}/{route}", json={"phone": OWNER2}, headers=bearer(OWNER_TOKEN))
                assert answer.status_code == 403, (route, answer.text)
            shot = {"phone": OWNER2, "url": "http://127.0.0.1:9/", "message_id": new_message_id()}
            assert (await http.post(f"{w.url}/screenshot", json=shot, headers=bearer(OWNER_TOKEN))).status_code == 403
            assert not w.anthropic.requests  # nothing ran for the other owner
            assert not w.checkout.parent.joinpath(OWNER2.lstrip("+")).exists()

            # WORKER_TOKEN, although set, is not this worker's token.
            mine = {"phone": OWNER, "text": "look around", "message_id": new_message_id()}
            wrong = await http.post(f"{w.url}/command", json=mine, headers=bearer(WORKER_TOKEN))
            assert wrong.status_code == 401
            status = await http.post(f"{w.url}/status", json={"phone": OWNER}, headers=bearer(WORKER_TOKEN))
            assert status.status_code == 401

            taken = await http.post(f"{w.url}/command", json=mine, headers=bearer(OWNER_TOKEN))
            assert taken.status_code == 202, taken.text
            # Its reports reach the relay with OWNER_TOKEN (the stand-in refuses any other).
            await wait_for(lambda: w.relay.of_type("approval_required"), STEP, "the run's approval request")
            assert {phone for phone, _ in w.relay.events} == {OWNER}

        seen = (w.checkout / "env.txt").read_text() + (w.checkout / "all.txt").read_text()
        assert "ANTHROPIC_BASE_URL=" in seen  # it did read its environment
        assert OWNER_TOKEN not in seen and WORKER_TOKEN not in seen
        assert "OWNER_TOKEN=" not in seen and "WORKER_TOKEN=" not in seen
        log = w.log.read_text()
        assert "holds the relay's own WORKER_TOKEN" in log and "-a textslash-vm" in log
        assert OWNER_TOKEN not in log and WORKER_TOKEN not in log
