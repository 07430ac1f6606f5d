"""Suspending this worker's own Fly Machine when idle, and noticing when it runs again.

Suspended, a Machine keeps its memory (Chromium, warm agents, page caches) and costs what a
stopped one does; Fly resumes it in a few hundred milliseconds on the next request through its
proxy. The worker asks through the Machines API on the Machine's local socket. If that fails or
the Machine was never frozen, it exits instead, as it would with IDLE_ACTION=exit.

A resumed process cannot tell it was frozen except by its clocks: the wall clock jumps against
the monotonic one (a snapshot restored on Fly), or a short sleep took far longer (a stopped
process, as the local console plays it). A request arriving is proof enough too.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import anyio

logger = logging.getLogger(__name__)

API_TIMEOUT_S = 10.0
JUMP_S = 2.0  # a clock off by more than this was not running
FREEZE_WITHIN_S = 30.0  # asked and answered, but still running after this: exit instead


async def suspend_machine(socket: Path, app: str, machine: str) -> bool:
    """Ask Fly to suspend this Machine; True once it said yes."""
    import httpx  # at idle time only: the worker's boot never pays for it

    if not (app and machine):
        logger.info("cannot suspend: FLY_APP_NAME or FLY_MACHINE_ID is not set (not on Fly?)")
        return False
    transport = httpx.AsyncHTTPTransport(uds=str(socket))
    async with httpx.AsyncClient(transport=transport, base_url="http://flaps") as client:
        try:
            response = await client.post(f"/v1/apps/{app}/machines/{machine}/suspend", timeout=API_TIMEOUT_S)
        except httpx.HTTPError as exc:
            logger.warning("could not ask Fly to suspend this Machine (%s)", type(exc).__name__)
            return False
    if response.status_code >= 300:
        logger.warning("Fly refused to suspend this Machine: HTTP %s %s", response.status_code, response.text[:200])
        return False
    return True


class ResumeWatch:
    """After a suspend was granted: waits until the worker runs again."""

    def __init__(self, *, tick_s: float = 0.1, freeze_within_s: float = FREEZE_WITHIN_S) -> None:
        self._tick, self._freeze_within = tick_s, freeze_within_s
        self._poked: anyio.Event | None = None

    @property
    def waiting(self) -> bool:
        return self._poked is not None

    def poke(self) -> bool:
        """A request came in: if the worker was suspended, it runs again. False if it was not."""
        if self._poked is None:
            return False
        self._poked.set()
        return True

    async def wait(self) -> bool:
        """True once resumed; False if the Machine was never frozen."""
        self._poked = poked = anyio.Event()
        try:
            last = time.monotonic()
            offset = time.time() - last
            deadline = last + self._freeze_within
            while True:
                with anyio.move_on_after(self._tick):
                    await poked.wait()
                now = time.monotonic()
                if poked.is_set() or now - last - self._tick > JUMP_S or abs(time.time() - now - offset) > JUMP_S:
                    logger.info("resumed after a suspend")
                    return True
                if now > deadline:
                    return False
                last = now
        finally:
            self._poked = None
