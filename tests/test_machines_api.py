"""The Machines API client against a loopback fake of Fly's API: what it retries, what it
leaves to its caller, and that it never hands one owner another's Machine."""

from __future__ import annotations

import httpx
import pytest

from common.machines import MachinesAPI, MachinesError, MaybeMade
from fakes.flyapi import FakeFlyAPI
from fakes.servers import run_server

pytestmark = pytest.mark.anyio
TOKEN = "fly-api-token-for-tests"


async def no_wait(_: float) -> None:
    return None


async def test_429_and_5xx_are_retried_and_a_create_that_may_have_happened_is_left_to_the_caller() -> None:
    fake = FakeFlyAPI(token=TOKEN)
    async with run_server(fake.app()) as url, httpx.AsyncClient() as http:
        api = MachinesAPI(http, url, TOKEN, "textslash-vm", sleep=no_wait)
        fake.fail("GET", "/volumes", 429, retry_after="1")
        fake.fail("GET", "/volumes", 503)
        assert await api.volumes() == []
        assert [c.status for c in fake.of("GET", "/volumes")] == [429, 503, 200]

        fake.fail("POST", "/volumes", 429)
        volume = await api.create_volume("owner_0123", "iad", 1)  # a 429 made nothing: tried again
        assert [v["id"] for v in fake.live_volumes()] == [volume.id]

        fake.fail("POST", "/machines", 500, after=True)
        config = {"image": "img", "metadata": {"textslash_owner": "+15550001111"}}
        with pytest.raises(MaybeMade):
            await api.create_machine({"config": config})
        assert len(fake.live_machines()) == 1  # made: the caller must look before creating again
        assert len(fake.of("POST", "/machines")) == 1

        with pytest.raises(MachinesError) as refused:  # a 4xx is an answer, not a hiccup
            await api.create_machine({"config": {}})
        assert refused.value.status == 400 and not isinstance(refused.value, MaybeMade)


async def test_listing_by_metadata_never_returns_another_owners_machine() -> None:
    fake = FakeFlyAPI(token=TOKEN)
    fake.add_machine({"image": "a", "metadata": {"textslash_owner": "+15550001111"}})
    fake.add_machine({"image": "b", "metadata": {"textslash_owner": "+15550002222"}})
    fake.add_machine({"image": "plain", "metadata": {"fly_process_group": "app"}})
    async with run_server(fake.app()) as url, httpx.AsyncClient() as http:
        api = MachinesAPI(http, url, TOKEN, "textslash-vm", sleep=no_wait)
        [mine] = await api.machines({"textslash_owner": "+15550002222"})
        assert mine.image == "b"
        assert len(await api.machines()) == 3
        with pytest.raises(MachinesError) as wrong:
            await MachinesAPI(http, url, "wrong-token", "textslash-vm", sleep=no_wait).machines()
        assert wrong.value.status == 401 and "wrong-token" not in str(wrong.value)


async def test_wait_repeats_fly_s_own_timeouts_until_its_deadline() -> None:
    fake = FakeFlyAPI(token=TOKEN)
    machine = fake.add_machine({"image": "a"}, state="stopped")
    async with run_server(fake.app()) as url, httpx.AsyncClient() as http:
        api = MachinesAPI(http, url, TOKEN, "textslash-vm", sleep=no_wait)
        assert await api.wait(machine["id"], "started", 1.5) is False  # 408s, then its own deadline
        await api.start(machine["id"])
        assert await api.wait(machine["id"], "started", 5) is True
        await api.destroy_machine(machine["id"])
        await api.destroy_machine(machine["id"])  # gone already: fine
        assert fake.live_machines() == []
