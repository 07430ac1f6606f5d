"""`python -m deploy` in per-owner mode: the real deploy process against the loopback fake
Machines API (two owners' Machines and the app's plain one) and the fake flyctl, which keeps the
worker app's Machines in that same fake API, so both see one truth."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from common.config import mask_phone
from common.machines import MachinesAPI
from common.owners import OWNER_KEY, volume_name
from fakes.flyapi import FakeFlyAPI
from fakes.origin import git
from fakes.servers import run_server
from tests.support.processes import ROOT
from tests.support.waiting import wait_for

pytestmark = pytest.mark.anyio

TOKEN = "fly-test-token-not-for-output"  # noqa: S105 - a test's token
APP = "textslash-vm"
A, B = "+15550000001", "+15550000002"
OLD = f"registry.fly.io/{APP}:deployment-old"
NEW = f"registry.fly.io/{APP}:deployment-1"  # what the fake flyctl's first build is called
RELAY_OLD = "registry.fly.io/textslash-relay:deployment-old"
FAKE_FLYCTL = ROOT / "fakes" / "flyctl.py"


@dataclass
class Fleet:
    api: FakeFlyAPI
    url: str
    tmp: Path
    plain: str
    machine: dict[str, str]  # owner -> Machine id
    volume: dict[str, str]  # owner -> volume id

    def config(self, phone: str) -> dict[str, Any]:
        return dict(self.api.machines[self.machine[phone]]["config"])

    def statuses(self, method: str, path: str) -> list[int]:
        return [c.status for c in self.api.of(method, path)]


@dataclass
class Run:
    code: int
    output: str
    flyctl: list[list[str]]

    def execs(self, machine_id: str) -> list[list[str]]:
        return [c for c in self.flyctl if c[:3] == ["machine", "exec", machine_id]]


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    api = FakeFlyAPI(token=TOKEN, app_name=APP)
    async with run_server(api.app()) as url:
        plain = api.add_machine({"image": OLD, "metadata": {"fly_platform_version": "v2"}})
        machines, volumes = {}, {}
        async with httpx.AsyncClient() as http:  # made as the relay makes them
            client = MachinesAPI(http, url, TOKEN, APP)
            for phone in (A, B):
                volume = await client.create_volume(volume_name(phone), "iad", 10)
                config = {
                    "image": OLD,
                    "metadata": {OWNER_KEY: phone},
                    "mounts": [{"volume": volume.id, "path": "/data"}],
                    "env": {"ALLOWED_PHONE_NUMBERS": phone},
                    "guest": {"cpu_kind": "shared", "cpus": 2, "memory_mb": 2048},
                }
                machines[phone] = (await client.create_machine({"config": config})).id
                volumes[phone] = volume.id
        api.calls.clear()
        yield Fleet(api, url, tmp_path, plain["id"], machines, volumes)


async def deploy(
    fleet: Fleet, *args: str, stdin: str = "", token: str = TOKEN, extra_env: dict[str, str] | None = None
) -> Run:
    """Runs `python -m deploy` in a fresh committed repository, flyctl being the fake."""
    tmp = fleet.tmp
    repo = tmp / "repo"
    if not repo.exists():
        repo.mkdir()
        git(repo, "init", "--quiet")
        (repo / "README.md").write_text("x\n")
        git(repo, "add", "--all")
        git(repo, "commit", "--quiet", "-m", "x")
        relay = {"id": "r1", "state": "started", "checks": [{"name": "http", "status": "passing"}]}
        state = {
            "scenario": {},
            "images": {OLD: "old-sha", RELAY_OLD: "old-sha"},
            "api": {"url": fleet.url, "app": APP},
            "apps": {
                "textslash-relay": {"sha": "old-sha", "machines": [{**relay, "config": {"image": RELAY_OLD}}]},
            },
        }
        (tmp / "state.json").write_text(json.dumps(state))
        (tmp / "bin").mkdir()
        (tmp / "bin" / "flyctl").write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE_FLYCTL} "$@"\n')
        (tmp / "bin" / "flyctl").chmod(0o755)
    log = tmp / "calls.log"
    log.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in {"ALLOWED_PHONE_NUMBERS", "WORKER_MODE", "FLY_API_BASE_URL"}}
    env |= {
        "PATH": f"{tmp / 'bin'}:{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "FAKE_FLY_STATE": str(tmp / "state.json"),
        "FAKE_FLY_LOG": str(log),
        "FLY_API_TOKEN": token,
        **(extra_env or {}),
    }
    command = [sys.executable, "-m", "deploy", "--test-command", "true", "--wait", "2", "--poll", "0.05"]
    with anyio.fail_after(90):
        result = await anyio.run_process(
            [*command, "--api-url", fleet.url, *args], cwd=repo, env=env, input=stdin.encode(), check=False
        )
    output = result.stdout.decode() + result.stderr.decode()
    assert TOKEN not in output  # never printed, whatever happened
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    assert all(TOKEN not in " ".join(c) for c in calls)  # never in flyctl's argv either
    return Run(result.returncode, output, calls)


def head(fleet: Fleet) -> str:
    return git(fleet.tmp / "repo", "rev-parse", "HEAD").strip()


# --- rolling --------------------------------------------------------------------------------


async def test_a_deploy_rolls_every_owner_machine_between_worker_and_relay_and_checks_its_sha(fleet: Fleet) -> None:
    before = {phone: fleet.config(phone) for phone in (A, B)}
    run = await deploy(fleet, "--worker-mode", "per-owner")
    assert run.code == 0, run.output
    for phone in (A, B):
        assert fleet.config(phone) == {**before[phone], "image": NEW}  # the image changed, nothing else
        assert fleet.api.machines[fleet.machine[phone]]["state"] == "started"
        assert any("127.0.0.1:3001/health" in c[3] for c in run.execs(fleet.machine[phone]))
    assert fleet.api.machines[fleet.plain]["config"]["image"] == NEW
    # one at a time, in a stable order: A's Machine (made first) is rolled and proven before B's
    updates = [c.path for c in fleet.api.of("POST", r"/machines/[0-9a-f]+") if c.path != f"/machines/{fleet.plain}"]
    assert updates == [f"/machines/{fleet.machine[A]}", f"/machines/{fleet.machine[B]}"]
    out = run.output
    assert out.index("deploying textslash-vm") < out.index("rolling 2 owner") < out.index("deploying textslash-relay")
    # the wake is proven on the plain Machine, asked for by id: Flycast may route to owners' too
    wake = [c for c in run.flyctl if c[:2] == ["machine", "exec"] and ".flycast" in c[3]]
    assert wake and f"'fly-force-instance-id': '{fleet.plain}'" in wake[0][3]
    assert not fleet.api.of("POST", rf"/machines/({fleet.machine[A]}|{fleet.machine[B]})/stop")


async def test_a_machine_failing_its_checks_goes_back_with_those_rolled_before_and_the_deploy_fails(
    fleet: Fleet,
) -> None:
    second = fleet.machine[B]
    fleet.api.checks = lambda config: (
        "critical" if config["image"] == NEW and config["metadata"].get(OWNER_KEY) == B else "passing"
    )
    before = {phone: fleet.config(phone) for phone in (A, B)}
    run = await deploy(fleet, "--worker-mode", "per-owner")
    assert run.code == 1
    assert f"FAILED: owner Machine {second} ({mask_phone(B)}) failed on {NEW}" in run.output, run.output
    assert "critical" in run.output and "the 1 rolled before it" in run.output
    first_update = fleet.api.of("POST", f"/machines/{fleet.machine[A]}")[0]
    assert first_update.body["config"]["image"] == NEW  # A had been rolled, and proven...
    for phone in (A, B):
        assert fleet.config(phone) == before[phone]  # ...and both are back on exactly their old config
    assert fleet.api.machines[fleet.plain]["config"]["image"] == OLD  # the app rolled back too
    deploys = [c[c.index("--app") + 1] for c in run.flyctl if c[0] == "deploy"]
    assert deploys == [APP, APP]  # built, then rolled back; the relay was never deployed
    assert f"--image {OLD}" in " ".join(next(c for c in run.flyctl if c[0] == "deploy" and "--image" in c))


async def test_429s_and_5xx_during_the_roll_are_retried(fleet: Fleet) -> None:
    a, b = fleet.machine[A], fleet.machine[B]
    fleet.api.fail("POST", f"/machines/{a}", 429, retry_after="0")
    fleet.api.fail("GET", f"/machines/{b}/wait", 503)
    fleet.api.fail("GET", f"/machines/{b}", 502, after=True)
    run = await deploy(fleet, "--worker-mode", "per-owner")
    assert run.code == 0, run.output
    assert fleet.statuses("POST", f"/machines/{a}") == [429, 200]
    assert fleet.statuses("GET", f"/machines/{b}/wait")[:2] == [503, 200]
    assert fleet.statuses("GET", f"/machines/{b}")[:2] == [502, 200]
    assert {fleet.config(A)["image"], fleet.config(B)["image"]} == {NEW}


async def test_a_sleeping_owners_machine_is_rolled_and_proven_then_left_asleep(fleet: Fleet) -> None:
    asleep = fleet.machine[B]
    fleet.api.machines[asleep]["state"] = "stopped"
    run = await deploy(fleet, "--worker-mode", "per-owner")
    assert run.code == 0, run.output
    assert fleet.config(B)["image"] == NEW
    assert run.execs(asleep)  # its /health was read while it ran the new image
    assert fleet.api.machines[asleep]["state"] == "stopped"
    assert fleet.api.machines[fleet.machine[A]]["state"] == "started"  # an awake one stays awake


async def test_a_sleeping_machine_that_fails_goes_back_without_being_woken(fleet: Fleet) -> None:
    asleep = fleet.machine[A]
    fleet.api.machines[asleep]["state"] = "stopped"
    fleet.api.checks = lambda config: (
        "critical" if config["image"] == NEW and OWNER_KEY in config["metadata"] else "passing"
    )
    run = await deploy(fleet, "--worker-mode", "per-owner")
    assert run.code == 1 and f"owner Machine {asleep}" in run.output
    assert fleet.config(A)["image"] == OLD and fleet.api.machines[asleep]["state"] == "stopped"
    assert fleet.api.of("POST", f"/machines/{asleep}")[-1].body.get("skip_launch") is True
    assert fleet.config(B)["image"] == OLD  # never reached


async def test_a_dry_run_reads_but_changes_nothing(fleet: Fleet) -> None:
    run = await deploy(fleet, "--worker-mode", "per-owner", "--dry-run")
    assert run.code == 0, run.output
    assert run.flyctl == []
    assert fleet.api.calls and all(c.method == "GET" for c in fleet.api.calls)
    assert f"would update owner Machine {fleet.machine[A]} ({mask_phone(A)})" in run.output
    assert f"would update owner Machine {fleet.machine[B]} ({mask_phone(B)})" in run.output


async def test_per_owner_mode_without_a_token_is_refused_before_anything(fleet: Fleet) -> None:
    run = await deploy(fleet, "--worker-mode", "per-owner", token="")
    assert run.code == 2 and "FLY_API_TOKEN" in run.output
    assert run.flyctl == [] and fleet.api.calls == []


async def test_a_deploy_that_is_not_told_the_mode_refuses_to_leave_owner_machines_behind(fleet: Fleet) -> None:
    # WORKER_MODE=per-owner is the relay's Fly secret, not in the operator's shell: a deploy in the
    # default (shared) mode would put the new image on the plain Machine only, silently.
    run = await deploy(fleet)
    assert run.code == 1 and "2 owner Machine(s)" in run.output and "--worker-mode per-owner" in run.output
    assert [c for c in run.flyctl if c[0] == "deploy"] == []  # nothing was deployed
    assert fleet.api.machines[fleet.plain]["config"]["image"] == OLD


async def test_shared_mode_said_out_loud_deploys_and_leaves_owner_machines_as_they_are(fleet: Fleet) -> None:
    before = {phone: fleet.config(phone) for phone in (A, B)}
    run = await deploy(fleet, "--worker-mode", "shared")
    assert run.code == 0, run.output
    assert "leaving 2 owner Machine(s)" in run.output
    assert fleet.api.machines[fleet.plain]["config"]["image"] == NEW
    assert {phone: fleet.config(phone) for phone in (A, B)} == before
    # the wake still asks for the plain Machine by id: through Flycast an owner's might answer
    wake = [c for c in run.flyctl if c[:2] == ["machine", "exec"] and ".flycast" in c[3]]
    assert wake and f"'fly-force-instance-id': '{fleet.plain}'" in wake[0][3]


@pytest.mark.parametrize("mode", ["Per-Owner", " per-owner "])
async def test_worker_mode_in_the_environment_is_read_as_the_relay_reads_it(fleet: Fleet, mode: str) -> None:
    run = await deploy(fleet, extra_env={"WORKER_MODE": mode})
    assert run.code == 0, run.output
    assert {fleet.config(A)["image"], fleet.config(B)["image"]} == {NEW}


async def test_a_malformed_worker_mode_is_refused_before_anything(fleet: Fleet) -> None:
    run = await deploy(fleet, extra_env={"WORKER_MODE": "per_owner"})
    assert run.code == 2 and "WORKER_MODE is malformed" in run.output
    assert run.flyctl == [] and fleet.api.calls == []


async def test_a_roll_interrupted_midway_puts_everything_back(fleet: Fleet) -> None:
    """Ctrl-C while B's Machine waits for its checks: A (rolled, proven) and B go back to their
    old config, and the worker app to its old image, as after a failure."""
    fleet.api.checks = lambda config: (
        "critical" if config["image"] == NEW and config["metadata"].get(OWNER_KEY) == B else "passing"
    )
    before = {phone: fleet.config(phone) for phone in (A, B)}
    waiting_on_b = f"/machines/{fleet.machine[B]}"
    await deploy(fleet, "--dry-run")  # makes the repository and the fake flyctl's state
    fleet.api.calls.clear()
    job = _interruptible(fleet)
    log = fleet.tmp / "interrupted.out"
    with log.open("wb") as out:
        process = await anyio.open_process(job.command, cwd=job.cwd, env=job.env, stdout=out, stderr=subprocess.STDOUT)
        try:
            await wait_for(lambda: any(c.method == "GET" and c.path == waiting_on_b for c in fleet.api.calls), 60)
            process.send_signal(signal.SIGINT)
            with anyio.fail_after(60):
                await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    code, output = process.returncode, log.read_text()
    assert code == 130, output
    assert "INTERRUPTED" in output and TOKEN not in output
    for phone in (A, B):
        assert fleet.config(phone) == before[phone]
    assert fleet.api.machines[fleet.plain]["config"]["image"] == OLD


@dataclass
class Command:
    command: list[str]
    cwd: Path
    env: dict[str, str]


def _interruptible(fleet: Fleet) -> Command:
    tmp = fleet.tmp
    env = {k: v for k, v in os.environ.items() if k not in {"ALLOWED_PHONE_NUMBERS", "WORKER_MODE", "FLY_API_BASE_URL"}}
    env |= {
        "PATH": f"{tmp / 'bin'}:{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "FAKE_FLY_STATE": str(tmp / "state.json"),
        "FAKE_FLY_LOG": str(tmp / "calls.log"),
        "FLY_API_TOKEN": TOKEN,
        "PYTHONUNBUFFERED": "1",
    }
    command = [sys.executable, "-m", "deploy", "--test-command", "true", "--wait", "30", "--poll", "0.05"]
    return Command([*command, "--api-url", fleet.url, "--worker-mode", "per-owner"], tmp / "repo", env)


async def test_a_rollback_that_fails_for_one_machine_still_puts_back_the_others_and_says_so(fleet: Fleet) -> None:
    a, b = fleet.machine[A], fleet.machine[B]
    fleet.api.checks = lambda config: (
        "critical" if config["image"] == NEW and config["metadata"].get(OWNER_KEY) == B else "passing"
    )
    before_b = fleet.config(B)
    # A's update to NEW succeeds; its update back fails for good (six 500s).
    run_task: list[Run] = []

    async def fail_a_rollback() -> None:
        with anyio.fail_after(60):
            while not fleet.api.of("POST", f"/machines/{b}"):
                await anyio.sleep(0.02)
        fleet.api.fail("POST", f"/machines/{a}", 500, times=6, retry_after="0")

    async with anyio.create_task_group() as tg:
        tg.start_soon(fail_a_rollback)
        run_task.append(await deploy(fleet, "--worker-mode", "per-owner"))
    run = run_task[0]
    assert run.code == 1
    assert f"ROLLBACK of owner Machine {a}" in run.output and "FAILED" in run.output
    assert fleet.config(B) == before_b  # the other one went back all the same
    assert fleet.api.machines[fleet.plain]["config"]["image"] == OLD  # and the app


async def test_prune_dry_run_lists_but_destroys_nothing(fleet: Fleet) -> None:
    before = live(fleet)
    run = await deploy(fleet, "--prune", "--yes", "--dry-run", "--allowed", A)
    assert run.code == 0, run.output
    assert fleet.machine[B] in run.output and "dry run" in run.output
    assert live(fleet) == before and all(c.method == "GET" for c in fleet.api.calls)


# --- pruning --------------------------------------------------------------------------------


def live(fleet: Fleet) -> tuple[set[str], set[str]]:
    return {m["id"] for m in fleet.api.live_machines()}, {v["id"] for v in fleet.api.live_volumes()}


async def test_prune_lists_asks_then_destroys_only_the_removed_owners_machine_and_volume(fleet: Fleet) -> None:
    run = await deploy(fleet, "--prune", "--allowed", A, stdin="yes\n")
    assert run.code == 0, run.output
    listed = run.output[: run.output.index("Type yes")]
    assert mask_phone(B) in listed and fleet.machine[B] in listed and fleet.volume[B] in listed
    assert fleet.machine[A] not in listed and B not in run.output  # only ever masked
    machines, volumes = live(fleet)
    assert machines == {fleet.plain, fleet.machine[A]}
    assert volumes == {fleet.volume[A]}
    assert f"destroyed Machine {fleet.machine[B]} and volume {fleet.volume[B]}" in run.output
    assert run.flyctl == []  # prune deploys nothing


@pytest.mark.parametrize("answer", ["no\n", "", "y e s\n"])
async def test_prune_destroys_nothing_without_confirmation(fleet: Fleet, answer: str) -> None:
    before = live(fleet)
    run = await deploy(fleet, "--prune", "--allowed", A, stdin=answer)
    assert run.code == 1 and "nothing was destroyed" in run.output
    assert live(fleet) == before and fleet.api.of("DELETE") == []


async def test_prune_yes_skips_asking_and_rides_out_429s(fleet: Fleet) -> None:
    fleet.api.fail("DELETE", f"/machines/{fleet.machine[B]}", 429, retry_after="0")
    fleet.api.fail("DELETE", f"/volumes/{fleet.volume[B]}", 429, retry_after="0")
    run = await deploy(fleet, "--prune", "--yes", "--allowed", f"{A},+15559999999")
    assert run.code == 0, run.output
    assert "Type yes" not in run.output
    assert fleet.statuses("DELETE", f"/machines/{fleet.machine[B]}") == [429, 200]
    assert fleet.statuses("DELETE", f"/volumes/{fleet.volume[B]}") == [429, 200]
    assert live(fleet) == ({fleet.plain, fleet.machine[A]}, {fleet.volume[A]})


async def test_prune_takes_a_volume_a_removed_owner_left_without_a_machine(fleet: Fleet) -> None:
    async with httpx.AsyncClient() as http:
        orphan = await MachinesAPI(http, fleet.url, TOKEN, APP).create_volume(volume_name("+15557777777"), "iad", 10)
    run = await deploy(fleet, "--prune", "--yes", "--allowed", f"{A},{B}")
    assert run.code == 0, run.output
    assert live(fleet)[1] == {fleet.volume[A], fleet.volume[B]}  # only the orphan went
    assert orphan.id in run.output and fleet.api.of("DELETE", r"/machines/.*") == []


@pytest.mark.parametrize("allowed", [None, "", "15550000001"])
async def test_prune_without_a_valid_allowlist_is_refused(fleet: Fleet, allowed: str | None) -> None:
    run = await deploy(fleet, "--prune", "--yes", *([] if allowed is None else ["--allowed", allowed]))
    assert run.code == 2 and "ALLOWED_PHONE_NUMBERS" in run.output
    assert fleet.api.calls == []
