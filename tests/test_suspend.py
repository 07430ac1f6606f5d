"""IDLE_ACTION=suspend: the idle worker asks Fly (a fake Machines API on a unix socket) to suspend
its Machine (the local Fly proxy stops its processes), and the next message resumes the same
process, memory and all; if Fly will not, the worker exits as before."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from fakes.anthropic import Text
from fakes.flyproxy import FlyProxy
from fakes.machines import FakeMachines
from fakes.servers import run_server, unix_socket
from tests.support.pair_harness import pair_stack
from tests.support.processes import child, clis_of, process_state, wait_exit, wait_healthy
from tests.support.waiting import wait_for
from tests.test_worker_process import fakes

pytestmark = pytest.mark.anyio
STEP = 60.0
SUSPEND = "/v1/apps/textslash-vm/machines/m-1/suspend"


def fly_env(socket: Path) -> dict[str, str]:
    return {
        "IDLE_ACTION": "suspend",
        "FLY_API_SOCKET": str(socket),
        "FLY_APP_NAME": "textslash-vm",
        "FLY_MACHINE_ID": "m-1",
    }


@pytest.mark.parametrize("in_the_window", [False, True])
async def test_an_idle_worker_is_suspended_and_the_next_message_resumes_the_same_process(
    tmp_path: Path, in_the_window: bool
) -> None:
    """`in_the_window`: the message comes after Fly said yes but before it paused the Machine;
    it must wait for the pause and the resume, not start a run that the pause would freeze."""
    socket = tmp_path / "fly-api.sock"
    async with pair_stack(tmp_path, idle_ms="1500", **fly_env(socket)) as pair, httpx.AsyncClient() as http:

        def start_worker() -> subprocess.Popen[bytes]:
            return pair._procs.enter_context(child("vm", pair.worker_env, tmp_path / "worker.log"))

        proxy = FlyProxy(start_worker, pair.worker_url, http)
        machines = FakeMachines(on_suspend=proxy.suspend, state=proxy.state, freeze_delay_s=1.5)
        async with run_server(machines.app(), unix_socket(str(socket))), run_server(proxy.app()) as proxy_url:
            pair.relay_env["CLAUDE_HOST"] = proxy_url
            await pair.start_relay()
            pair.model.script("first", Text("the first answer"))
            pair.model.script("second", Text("the second answer"))
            await pair.text("first")
            await wait_for(lambda: pair.said("the first answer"), STEP, "the first answer")
            if in_the_window:
                await wait_for(lambda: machines.calls, 30, "the idle worker asking to be suspended")
                assert not proxy.suspended
            else:
                await wait_for(lambda: proxy.suspended, 30, "the idle worker suspended")
                assert proxy.process is not None
                worker = proxy.process.pid
                await wait_for(lambda: process_state(worker) == "T", 5, "the worker to stop")  # nothing runs
            assert machines.calls == [SUSPEND]
            assert proxy.process is not None
            pid = proxy.process.pid
            [cli] = clis_of(pid)  # the first prompt's CLI, kept (stopped) through the suspend
            assert process_state(cli) == "T"
            await pair.text("second")
            await wait_for(lambda: pair.said("the second answer"), STEP, "the second answer, from the resumed worker")
            assert proxy.process.pid == pid and proxy.starts == 1 and proxy.resumes == 1
            assert clis_of(pid) == [cli]  # suspend kept it: the follow-up went to the same CLI
            assert len(pair.said("Waking up")) == 2  # the owner was told both times
            # Resumed, it keeps its idle timer: idle again, it is suspended again.
            await wait_for(lambda: len(machines.calls) == 2, 30, "the second suspend")


async def test_a_worker_fly_will_not_suspend_exits_0_instead(tmp_path: Path) -> None:
    socket = tmp_path / "fly-api.sock"
    machines = FakeMachines(fail=1)
    async with (
        run_server(machines.app(), unix_socket(str(socket))),
        fakes(tmp_path, IDLE_TIMEOUT_MS="1000", **fly_env(socket)) as f,
    ):
        with child("vm", f.env, f.log) as proc:
            await wait_healthy(f.url, proc)
            assert await wait_exit(proc, 20) == 0
        assert machines.calls == [SUSPEND]
        assert f.relay.states() == ["up", "sleeping"]
