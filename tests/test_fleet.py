"""WORKER_MODE=per-owner through the real relay process: each owner's own Machine and volume,
made through (a loopback fake of) Fly's Machines API on their first prompt, found again after the
relay lost its database, made once however the API fails, and every call routed to it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import httpx
import pytest

from common.owners import OWNER_KEY, owner_token, volume_name
from common.protocol import Presence, encode_presence
from fakes.wiring import OWNER, OWNER2, WORKER_TOKEN
from relay.fleet import WORKER_FLY_TOML
from tests.support.fleet_harness import PLAIN_IMAGE, FleetStack, fleet_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.anyio


async def answered(fleet: FleetStack, owner: str, prompt: str) -> None:
    await wait_for(lambda: fleet.said(f"answer to {prompt}", owner), 30, f"the answer to {prompt!r} for {owner}")


async def test_two_owners_get_two_machines_and_volumes_and_each_owners_calls_go_to_theirs(tmp_path: Path) -> None:
    async with fleet_stack(tmp_path) as fleet:
        assert fleet.owned() == {} and not fleet.api.of("POST")  # nobody wrote: nothing made
        await fleet.text("hello")
        await answered(fleet, OWNER, "hello")
        await fleet.text("hi there", OWNER2)
        await answered(fleet, OWNER2, "hi there")
        assert fleet.said("Setting up your own VM", OWNER) and fleet.said("Setting up your own VM", OWNER2)

        owned = fleet.owned()
        assert sorted(owned) == sorted([OWNER, OWNER2]) and all(len(m) == 1 for m in owned.values())
        volumes = {v["name"]: v for v in fleet.api.live_volumes()}
        assert sorted(volumes) == sorted([volume_name(OWNER), volume_name(OWNER2)])
        for owner, [machine] in owned.items():
            config = machine["config"]
            assert isinstance(config, dict)
            assert config["image"] == PLAIN_IMAGE
            assert config["env"]["OWNER_PHONE"] == owner
            assert config["env"]["OWNER_TOKEN"] == owner_token(WORKER_TOKEN, owner)
            assert "WORKER_TOKEN" not in config["env"]
            assert config["mounts"] == [{"path": "/data", "volume": volumes[volume_name(owner)]["id"]}]
            assert volumes[volume_name(owner)]["attached_machine_id"] == machine["id"]
            assert_like_fly_toml(config)

        # Every call for an owner carried their Machine's id and their own token, and nothing
        # ever reached the app's own Machine from a plain deploy.
        by_machine = {str(m["id"]): owner for owner, [m] in owned.items()}
        assert fleet.router.seen and all(r.machine in by_machine for r in fleet.router.seen)
        for routed in fleet.router.seen:
            if routed.path != "/health":
                assert routed.authorization == f"Bearer {owner_token(WORKER_TOKEN, by_machine[routed.machine])}"
        for owner, worker in fleet.workers.items():
            assert [c["phone"] for c in worker.commands()] == [owner]

        # `status` answers from the relay's records: the owner's Machine, and no call to it.
        before = len(fleet.router.seen)
        await fleet.text("status", OWNER2)
        [status] = await wait_for(lambda: fleet.said("Your VM", OWNER2), 10, "the status")
        assert f"Your VM ({owned[OWNER2][0]['id']})" in status
        assert len(fleet.router.seen) == before


def assert_like_fly_toml(config: dict[str, object]) -> None:
    """The services, checks, restart policy and size vm/fly.toml gives the app's own Machines."""
    toml = tomllib.loads(WORKER_FLY_TOML.read_text())
    services = config["services"]
    assert isinstance(services, list) and len(services) == 1
    service = services[0]
    http = toml["http_service"]
    assert service["internal_port"] == http["internal_port"] and service["autostart"] is True
    assert service["autostop"] == "off"
    [check] = service["checks"]
    assert check["path"] == "/health" and check["interval"] == http["checks"][0]["interval"]
    assert config["restart"] == {"policy": "on-failure"}  # exit 0 when idle leaves it stopped
    assert config["guest"] == {"cpu_kind": "shared", "cpus": 2, "memory_mb": 2048}
    assert config["metadata"] == {OWNER_KEY: config["env"]["OWNER_PHONE"]}  # type: ignore[index]


async def test_a_relay_with_a_fresh_database_finds_the_owners_machine_by_its_metadata(tmp_path: Path) -> None:
    async with fleet_stack(tmp_path) as fleet:
        await fleet.text("first")
        await answered(fleet, OWNER, "first")
        [machine] = fleet.owned()[OWNER]
        creates = len(fleet.api.of("POST", "/machines|/volumes"))
        assert creates == 2

        fleet.stop_relay()
        fleet.env["RELAY_DB"] = str(tmp_path / "fresh" / "relay.sqlite3")  # all it knew is lost
        await fleet.start_relay()
        fleet.router.seen.clear()
        await fleet.text("second")
        await answered(fleet, OWNER, "second")
        assert len(fleet.api.of("POST", "/machines|/volumes")) == creates  # found, not made again
        assert [m["id"] for m in fleet.owned()[OWNER]] == [machine["id"]]
        assert {r.machine for r in fleet.router.seen} == {machine["id"]}
        assert not fleet.said("Setting up your own VM", OWNER)[1:]  # only the first time


async def test_creates_that_fail_halfway_or_are_rate_limited_make_one_machine_and_one_volume(tmp_path: Path) -> None:
    async with fleet_stack(tmp_path) as fleet:
        # Fly says slow down; then the volume is made but Fly answers 500; the Machine is made
        # but the answer never says so (502); listing Machines fails once too.
        fleet.api.fail("POST", "/volumes", 429, retry_after="0")
        fleet.api.fail("POST", "/volumes", 500, after=True)
        fleet.api.fail("POST", "/machines", 502, after=True)
        fleet.api.fail("GET", "/machines", 503, times=1)
        await fleet.text("make it")
        await answered(fleet, OWNER, "make it")
        assert [v["name"] for v in fleet.api.live_volumes()] == [volume_name(OWNER)]
        assert len(fleet.owned()[OWNER]) == 1
        assert all(f.times == 0 for f in fleet.api.failures)  # every failure was met


async def test_an_api_that_keeps_failing_keeps_the_prompt_and_the_next_try_makes_one(tmp_path: Path) -> None:
    async with fleet_stack(tmp_path) as fleet:
        fleet.api.fail("POST", "/volumes", 503, times=50)
        await fleet.text("make it")
        [told] = await wait_for(lambda: fleet.said("could not create your VM", OWNER), 60, "the failure")
        assert "retry" in told.lower() or "kept" in told.lower(), told
        assert fleet.owned() == {} and fleet.api.live_volumes() == []
        fleet.api.failures.clear()
        await fleet.text("retry")
        await answered(fleet, OWNER, "make it")
        assert len(fleet.owned()[OWNER]) == 1 and len(fleet.api.live_volumes()) == 1


async def test_each_machine_speaks_only_for_its_own_owner(tmp_path: Path) -> None:
    async with fleet_stack(tmp_path) as fleet:
        mine, theirs = fleet.workers[OWNER], fleet.workers[OWNER2]
        # A report for another owner with this Machine's token is refused.
        response = await mine.report_raw(fleet.url, OWNER2, {"v": 3, "type": "answer", "run_id": "r", "seq": 1})
        assert response.status_code == 401
        assert (await theirs.report(fleet.url, OWNER2, "progress", text="ok")).status_code == 200

        async def presence(token: str, owner: str) -> httpx.Response:
            body = encode_presence(Presence("up", "boot", owner=owner))
            return await fleet.http.post(
                f"{fleet.url}/callback", json=body, headers={"Authorization": f"Bearer {token}"}
            )

        assert (await presence(owner_token(WORKER_TOKEN, OWNER), OWNER2)).status_code == 401
        assert (await presence(owner_token(WORKER_TOKEN, OWNER), "")).status_code == 400  # names no owner
        assert (await presence(WORKER_TOKEN, OWNER)).status_code == 401  # the shared token is no owner's
        assert (await presence(owner_token(WORKER_TOKEN, OWNER), OWNER)).status_code == 200


async def test_a_machine_destroyed_outside_the_relay_is_replaced_on_the_same_volume(tmp_path: Path) -> None:
    async with fleet_stack(tmp_path, WAKE_TIMEOUT_MS="2000") as fleet:
        await fleet.text("first")
        await answered(fleet, OWNER, "first")
        [machine] = fleet.owned()[OWNER]
        [volume] = fleet.api.live_volumes()
        machine["state"] = "destroyed"  # `fly machine destroy`, say: the volume is left
        volume["attached_machine_id"] = None

        await fleet.text("second")
        [told] = await wait_for(lambda: fleet.said("your VM was removed", OWNER), 30, "the owner told")
        assert "retry" in told
        await fleet.text("retry")
        await answered(fleet, OWNER, "second")
        [again] = fleet.owned()[OWNER]
        assert again["id"] != machine["id"]
        assert again["config"]["mounts"][0]["volume"] == volume["id"]  # their checkouts come back
        assert fleet.api.live_volumes() == [volume]


async def test_each_machine_gets_only_its_own_owners_files(tmp_path: Path) -> None:
    async with fleet_stack(tmp_path) as fleet:
        url = fleet.twilio.add_media(b"%PDF-1.4 mine", "application/pdf", filename="mine.pdf")
        await fleet.text("read this", media=[(url, "application/pdf")])
        [command] = await wait_for(lambda: fleet.workers[OWNER].commands(), 30, "the prompt with its file")
        [attachment] = command["attachments"]
        path = f"{fleet.url}/media/{attachment['id']}"

        async def fetch(token: str) -> httpx.Response:
            return await fleet.http.get(path, headers={"Authorization": f"Bearer {token}"})

        assert (await fetch(owner_token(WORKER_TOKEN, OWNER))).content == b"%PDF-1.4 mine"
        assert (await fetch(owner_token(WORKER_TOKEN, OWNER2))).status_code == 404  # another owner's Machine
        assert (await fetch(WORKER_TOKEN)).status_code == 401  # the relay's own is no Machine's


async def test_a_new_worker_token_on_the_relay_is_given_to_the_owners_machine(tmp_path: Path) -> None:
    async with fleet_stack(tmp_path) as fleet:
        await fleet.text("first")
        await answered(fleet, OWNER, "first")
        [machine] = fleet.owned()[OWNER]

        fleet.stop_relay()
        fleet.env["WORKER_TOKEN"] = "a-rotated-worker-token"  # noqa: S105 - a test value
        await fleet.start_relay()
        await fleet.text("second")
        await answered(fleet, OWNER, "second")
        # Its config was updated with the owner's token of now (Fly restarted it on it); nothing else.
        assert machine["config"]["env"]["OWNER_TOKEN"] == owner_token("a-rotated-worker-token", OWNER)
        assert len(fleet.api.of("POST", f"/machines/{machine['id']}")) == 1
        assert [m["id"] for m in fleet.owned()[OWNER]] == [machine["id"]]
