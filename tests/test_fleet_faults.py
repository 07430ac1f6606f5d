"""Per-owner mode against what goes wrong outside it: Machines API answers of the wrong shape,
an app with no image to make Machines from, and a database from before workers had keys."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from common.machines import MachinesAPI, MachinesError
from fakes.flyapi import FakeFlyAPI
from fakes.servers import run_server
from fakes.wiring import OWNER, OWNER2, relay_env
from relay import store, usage
from relay.fleet import Fleet, FleetError
from relay.settings import Settings
from relay.zones import UTC
from tests.support.fleet_harness import fleet_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.anyio
TOKEN = "fly-api-token-for-tests"


async def no_wait(_: float) -> None:
    return None


def mangled(fake: FakeFlyAPI, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Every Machine the fake answers passes through `change` (an API of another shape)."""
    view = fake._view
    fake._view = lambda machine: change(view(machine))  # type: ignore[method-assign]


@pytest.mark.parametrize(
    "change",
    [
        lambda m: {**m, "checks": 5},
        lambda m: {**m, "config": {**m["config"], "mounts": 7}},
        lambda m: {**m, "config": {**m["config"], "mounts": {"volume": "v"}}},
        lambda m: {**m, "config": {**m["config"], "mounts": [{"volume": 9}]}},
        lambda m: {**m, "config": {**m["config"], "metadata": ["x"]}},
    ],
    ids=["checks-int", "mounts-int", "mounts-dict", "volume-int", "metadata-list"],
)
async def test_machines_of_the_wrong_shape_make_a_machine_or_a_clear_error_never_a_crash(
    tmp_path: Path, change: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    fake = FakeFlyAPI(token=TOKEN)
    fake.add_machine({"image": "registry.fly.io/textslash-vm:plain"})
    mangled(fake, change)
    settings = Settings.from_env(
        relay_env(
            tmp_path / "db", "http://127.0.0.1:9", "http://127.0.0.1:9", WORKER_MODE="per-owner", FLY_API_TOKEN=TOKEN
        )
    )
    assert settings.fleet is not None
    db = store.Database(tmp_path / "relay.sqlite3")
    async with run_server(fake.app()) as url, httpx.AsyncClient() as http:
        api = MachinesAPI(http, url, TOKEN, "textslash-vm", sleep=no_wait)
        fleet = Fleet(settings, settings.fleet, api, db, http, time.time)
        try:
            client = await fleet.make(OWNER)
        except FleetError:
            return  # a clear answer for the owner; the lane goes on
        # And made once: a second make (a relay with its records) finds it, makes nothing.
        assert len(fake.live_machines()) == 2
        assert (await fleet.make(OWNER)).instance == client.instance
        assert len(fake.live_machines()) == 2
    db.close()


async def test_a_list_of_the_wrong_shape_is_an_error_not_an_empty_list(tmp_path: Path) -> None:
    """Taken as "no Machines", it would have the relay make an owner a second one."""
    fake = FakeFlyAPI(token=TOKEN)
    fake.add_machine({"image": "a", "metadata": {"textslash_owner": OWNER}})
    async with run_server(fake.app()) as url, httpx.AsyncClient() as http:
        api = MachinesAPI(http, url, TOKEN, "textslash-vm", sleep=no_wait)
        assert len(await api.machines({"textslash_owner": OWNER})) == 1
        dispatch = fake._dispatch

        async def wrapped(request: Request, path: str, body: Any) -> Response:
            answer = await dispatch(request, path, body)
            return JSONResponse({"machines": json.loads(bytes(answer.body))}) if path == "/machines" else answer

        fake._dispatch = wrapped  # type: ignore[method-assign]
        with pytest.raises(MachinesError, match="a list"):
            await api.machines({"textslash_owner": OWNER})


async def test_an_app_without_an_image_tells_the_owner_what_to_do_and_keeps_the_prompt(tmp_path: Path) -> None:
    async with fleet_stack(tmp_path) as fleet:
        fleet.api.machines[fleet.plain]["state"] = "destroyed"  # never deployed, or removed
        await fleet.text("make it")
        [told] = await wait_for(lambda: fleet.said("cannot be set up yet", OWNER), 30, "the owner told")
        assert "WORKER_IMAGE" in told and "no answer from Fly" not in told
        assert fleet.owned() == {} and fleet.api.live_volumes() == []  # nothing made for nothing
        fleet.api.add_machine({"image": "registry.fly.io/textslash-vm:deployment-02", "metadata": {}})
        await fleet.text("retry")
        await wait_for(lambda: fleet.said("answer to make it", OWNER), 30, "the prompt answered")
        assert [m["config"]["image"] for m in fleet.owned()[OWNER]] == ["registry.fly.io/textslash-vm:deployment-02"]


def test_a_database_from_before_per_owner_mode_keeps_its_worker_state_and_hours(tmp_path: Path) -> None:
    path = tmp_path / "relay.sqlite3"
    store.Database(path).close()
    now = 1781524800.0  # mid-June 2026, UTC: the hours below fall in one month
    with sqlite3.connect(path) as old:  # back to the schema of the last release, with its rows
        old.executescript(
            "DROP TABLE workers; DROP TABLE awake;"
            "CREATE TABLE worker_state (id INTEGER PRIMARY KEY CHECK (id = 1), awake INTEGER,"
            " last_seen_at REAL, slept_at REAL, up_at REAL, boot TEXT);"
            "CREATE TABLE awake (id INTEGER PRIMARY KEY, boot TEXT NOT NULL, seconds REAL NOT NULL,"
            " ended_at REAL NOT NULL);"
        )
        old.execute("INSERT INTO worker_state VALUES (1, 1, ?, NULL, ?, 'bootA')", (now - 10, now - 600))
        old.execute("INSERT INTO awake (boot, seconds, ended_at) VALUES ('bootZ', 3600, ?)", (now - 60,))
    db = store.Database(path)
    row = store.worker_state(db.conn, "")
    assert row is not None and row["awake"] == 1 and row["boot"] == "bootA" and row["up_at"] == now - 600
    assert db.conn.execute("SELECT name FROM sqlite_master WHERE name = 'worker_state'").fetchone() is None
    for owner in (OWNER, OWNER2):  # the shared worker's hours are every owner's, as before
        month = usage.this_month(db.conn, owner, now, row["up_at"], 1.0, UTC)
        assert month.awake_hours == pytest.approx(1 + 600 / 3600, abs=0.01)
    db.close()
    store.Database(path).close()  # and opening it again changes nothing


async def test_a_volume_still_attached_to_a_destroyed_machine_is_waited_for_not_doubled(tmp_path: Path) -> None:
    async with fleet_stack(tmp_path, WAKE_TIMEOUT_MS="2000") as fleet:
        await fleet.text("first")
        await wait_for(lambda: fleet.said("answer to first", OWNER), 30, "the first answer")
        [machine] = fleet.owned()[OWNER]
        [volume] = fleet.api.live_volumes()
        machine["state"] = "destroyed"  # destroyed outside; Fly has not detached the volume yet
        assert volume["attached_machine_id"] == machine["id"]

        await fleet.text("second")
        await wait_for(lambda: fleet.said("your VM was removed", OWNER), 30, "the owner told")
        await fleet.text("retry")
        await wait_for(lambda: fleet.said("could not create your VM", OWNER), 30, "told to try again")
        assert fleet.api.live_volumes() == [volume] and fleet.owned() == {}  # no second volume

        volume["attached_machine_id"] = None  # Fly let it go
        await fleet.text("retry")
        await wait_for(lambda: fleet.said("answer to second", OWNER), 30, "the prompt answered")
        [again] = fleet.owned()[OWNER]
        assert again["config"]["mounts"][0]["volume"] == volume["id"] and fleet.api.live_volumes() == [volume]
