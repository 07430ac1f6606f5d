"""A local stand-in for Fly's proxy in front of a whole app of worker Machines (WORKER_MODE=per-owner).

On Fly the relay reaches every owner's Machine at one address (the app's Flycast) and names the
Machine with `fly-force-instance-id: <machine id>`; the proxy sends the request there, starting
the Machine first if it is stopped or resuming it if it is suspended. A request without the
header goes to the app's default Machine (the shared worker of a plain deploy).

Here each Machine is a `FlyProxy` (fakes/flyproxy.py: a `python -m vm` started on the first
request, 503 while it boots, SIGSTOP/SIGCONT for suspend and resume), and the router is also the
`Host` of a `FakeFlyAPI` (fakes/flyapi.py): a Machine the API creates, starts or updates gets its
process at once (restarted on a new config), one it stops or destroys loses it, and the state the
API reports follows what the process does (it exits when idle, it is suspended, a request starts
it again).

An id the app has no Machine for (never made, or destroyed) is answered 503 with a detail, as
Fly's proxy answers a request it finds no Machine to send to (its PR04 "could not find a good
candidate"): to the relay that looks like a Machine that does not wake, which is what it is.
Every forced id seen is recorded in `forced`, the unknown ones in `unknown`, for tests.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fakes.flyproxy import FlyProxy

logger = logging.getLogger(__name__)

FORCE_HEADER = "fly-force-instance-id"
STOP_WAIT_S = 12.0  # the worker ends its runs and exits within Fly's 10 s kill timeout
SYNC_S = 0.25  # how often the API's view of each Machine catches up with its process


@dataclass
class Routed:
    proxy: FlyProxy
    machine: dict[str, Any]  # the FakeFlyAPI's own record: its state is kept true here
    config: dict[str, Any]  # the config its process was started with


@dataclass
class FlyRouter:
    """`make(machine)` builds the FlyProxy that plays a Machine (its worker's environment comes
    from the Machine's config); `default` serves requests that name no Machine (None: 503)."""

    make: Callable[[dict[str, Any]], FlyProxy]
    default: FlyProxy | None = None
    forced: list[str] = field(default_factory=list)  # every fly-force-instance-id seen, in order
    unknown: list[str] = field(default_factory=list)  # those no Machine had
    machines: dict[str, Routed] = field(default_factory=dict)

    # --- the Host of FakeFlyAPI -------------------------------------------------------

    def started(self, machine: dict[str, Any]) -> None:
        routed = self.machines.get(machine["id"])
        if routed is not None and routed.config != machine["config"]:
            # An update: the Machine restarts on its new config (image, env), as on Fly.
            _stop(routed.proxy)
            routed = None
        if routed is None:
            routed = Routed(self.make(machine), machine, machine["config"])
            self.machines[machine["id"]] = routed
        routed.machine = machine
        routed.proxy.start()

    def adopt(self, machine: dict[str, Any]) -> None:
        """A Machine the API had before this router (a console restarted): known, not started."""
        self.machines[machine["id"]] = Routed(self.make(machine), machine, machine["config"])

    def stopped(self, machine: dict[str, Any]) -> None:
        routed = self.machines.get(machine["id"])
        if routed is None:
            return
        _stop(routed.proxy)
        if machine["state"] == "destroyed":
            del self.machines[machine["id"]]

    # --- the proxy --------------------------------------------------------------------

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self._forward, methods=["GET", "POST"])])

    async def _forward(self, request: Request) -> Response:
        forced = request.headers.get(FORCE_HEADER, "")
        if forced:
            if forced not in self.forced:
                logger.info("fly-force-instance-id %s: first request for this Machine", forced)
            self.forced.append(forced)
            routed = self.machines.get(forced)
            if routed is None:
                self.unknown.append(forced)
                detail = f"no Machine {forced} in this app (fly-force-instance-id)"
                return JSONResponse({"detail": detail}, status_code=503)
            response = await routed.proxy.forward(request)
            self._sync(routed)
            return response
        if self.default is None:
            return JSONResponse({"detail": "no Machine to route to: name one (fly-force-instance-id)"}, status_code=503)
        return await self.default.forward(request)

    async def keep_states(self) -> None:
        """Keep each Machine's state, as the API reports it, true to its process: a worker that
        exited idle is `stopped`, a suspended one `suspended`. Runs until cancelled."""
        while True:
            for routed in list(self.machines.values()):
                self._sync(routed)
            await anyio.sleep(SYNC_S)

    def _sync(self, routed: Routed) -> None:
        if routed.machine.get("state") != "destroyed":
            routed.machine["state"] = routed.proxy.state()

    def suspend(self, machine_id: str) -> None:
        """What Fly does when a Machine asks to be suspended (fakes/machines.py's on_suspend)."""
        routed = self.machines.get(machine_id)
        if routed is not None:
            routed.proxy.suspend()
            self._sync(routed)
            logger.info("Machine %s suspended", machine_id)

    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [r.proxy.process for r in self.machines.values() if r.proxy.process is not None]

    def resume_all(self) -> None:
        """A suspended worker must run to hear the stop (on the way out)."""
        for routed in self.machines.values():
            routed.proxy.resume()


def _stop(proxy: FlyProxy) -> None:
    """Stop a Machine's worker as Fly stops a Machine: SIGTERM, then SIGKILL past the timeout.
    It blocks (an update or a stop is rare here, and the port must be free before a restart)."""
    proxy.resume()
    process = proxy.process
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        logger.warning("the worker of a stopped Machine did not exit in %.0f s: killing it", STOP_WAIT_S)
        process.kill()
        process.wait()
