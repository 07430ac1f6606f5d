"""Suspending this worker's own Fly Machine when idle, and noticing when it runs again.

Suspended, a Machine keeps its memory (Chromium, warm agents, page caches) and costs what a
stopped one does; Fly resumes it in a few hundred milliseconds on the next request through its
proxy. The worker asks through the Machines API on the Machine's local socket. If that fails or
the Machine was never frozen, it exits instead, as it would with IDLE_ACTION=exit.

A resumed process cannot tell it was frozen except by its clocks: the wall clock jumps against
the monotonic one (a snapshot restored on Fly), or a short sleep took far longer (a stopped
process, as the local console plays it). A request arriving is proof only once Fly says the
Machine is started again (see ResumeWatch).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

API_TIMEOUT_S = 10.0
JUMP_S = 2.0  # a clock off by more than this was not running
FREEZE_WITHIN_S = 30.0  # asked and answered, but still running after this: exit instead
CHECK_EVERY_S = 0.2  # how often a request may make the worker ask Fly whether it was resumed


class Machine:
    """This worker's own Fly Machine, through the Machines API on the Machine's local socket."""

    def __init__(self, socket: Path, app: str, machine: str) -> None:
        self._socket, self._path = socket, f"/v1/apps/{app}/machines/{machine}"
        self.known = bool(app and machine)

    async def suspend(self) -> bool:
        """Ask Fly to suspend this Machine; True once it said yes."""
        if not self.known:
            logger.info("cannot suspend: FLY_APP_NAME or FLY_MACHINE_ID is not set (not on Fly?)")
            return False
        response = await self._call("POST", "/suspend")
        if response is None or response.status_code >= 300:
            detail = "no answer" if response is None else f"HTTP {response.status_code} {response.text[:200]}"
            logger.warning("Fly did not suspend this Machine: %s", detail)
            return False
        return True

    async def state(self) -> str:
        """What Fly says of this Machine ("started", "suspending"...), or "" if it cannot say."""
        response = await self._call("GET", "")
        if response is None or response.status_code != 200:
            return ""
        try:
            state = response.json().get("state")
        except (ValueError, AttributeError):
            return ""
        return state if isinstance(state, str) else ""

    async def _call(self, method: str, path: str) -> httpx.Response | None:
        import httpx  # at idle time only: the worker's boot never pays for it

        transport = httpx.AsyncHTTPTransport(uds=str(self._socket))
        async with httpx.AsyncClient(transport=transport, base_url="http://flaps") as client:
            try:
                return await client.request(method, self._path + path, timeout=API_TIMEOUT_S)
            except httpx.HTTPError as exc:
                logger.warning("the Machines API did not answer (%s)", type(exc).__name__)
                return None


class ResumeWatch:
    """After a suspend was granted: waits until the worker runs again.

    Fly answers the suspend call first and pauses the Machine afterwards, sometimes seconds
    later; a request in between is not a resume, and a command accepted then would be frozen
    mid-run. So a request counts as a resume only once the Machines API says the Machine is
    started again (asked at most every CHECK_EVERY_S), and the worker refuses it until then.
    """

    def __init__(self, machine: Machine, *, tick_s: float = 0.1, freeze_within_s: float = FREEZE_WITHIN_S) -> None:
        self._machine, self._tick, self._freeze_within = machine, tick_s, freeze_within_s
        self._resumed: anyio.Event | None = None
        self._checking = anyio.Lock()
        self._checked_at = -CHECK_EVERY_S

    @property
    def waiting(self) -> bool:
        return self._resumed is not None

    async def confirm(self) -> bool:
        """A request came in while suspended: True if the Machine runs again (then serve it)."""
        resumed = self._resumed
        if resumed is None:
            return False
        async with self._checking:  # one question to the API at a time, whoever asks
            if not resumed.is_set() and time.monotonic() - self._checked_at >= CHECK_EVERY_S:
                self._checked_at = time.monotonic()
                if await self._machine.state() == "started":
                    resumed.set()
        return resumed.is_set()

    async def wait(self) -> bool:
        """True once resumed; False if the Machine was never frozen."""
        self._resumed = resumed = anyio.Event()
        self._checked_at = -CHECK_EVERY_S
        try:
            last = time.monotonic()
            offset = time.time() - last
            deadline = last + self._freeze_within
            while True:
                with anyio.move_on_after(self._tick):
                    await resumed.wait()
                now = time.monotonic()
                if resumed.is_set() or now - last - self._tick > JUMP_S or abs(time.time() - now - offset) > JUMP_S:
                    logger.info("resumed after a suspend")
                    return True
                if now > deadline:
                    return False
                last = now
        finally:
            self._resumed = None
