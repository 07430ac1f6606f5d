"""The worker's only way to stop: after IDLE_TIMEOUT_MS with nothing to do, exit 0 (or, with
IDLE_ACTION=suspend, have Fly suspend the Machine and serve again once it is resumed).

Fly's proxy counts only proxied requests as load, so its auto-stop would stop a Machine in
the middle of a run that outlived its 202. This timer knows better: it waits while a run or
an approval is pending, and restarts on every authenticated request (not on /health, which
Fly's checks call all the time).

Going to sleep is a decision, not a race: `closing` turns true in the same step that finds
the worker idle, with no await in between, and from then on every authenticated call is
refused with 503 (the relay takes that for sleep and wakes the worker again). A call that
came before the decision touched the timer, so the decision was not taken.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import anyio

logger = logging.getLogger(__name__)


class IdleWatch:
    def __init__(
        self,
        timeout_s: float,
        *,
        busy: Callable[[], bool],
        on_idle: Callable[[], Awaitable[bool]],
        clock: Callable[[], float] = time.monotonic,
        tick_s: float = 0.25,
    ) -> None:
        self._timeout, self._busy, self._on_idle, self._clock, self._tick = timeout_s, busy, on_idle, clock, tick_s
        self._last = clock()
        self.closing = False

    def touch(self) -> None:
        self._last = self._clock()

    @property
    def idle_for(self) -> float:
        return self._clock() - self._last

    async def run(self) -> None:
        while True:
            await anyio.sleep(self._tick)
            if self._busy():
                self.touch()  # the countdown starts when the work ends, not before
            elif self.idle_for >= self._timeout:
                self.closing = True
                logger.info("idle for %.0f s with nothing pending: the Machine can stop", self.idle_for)
                try:
                    back = await self._on_idle()  # True: suspended and resumed, so serve on
                except BaseException:
                    # No exit after all: serve again rather than refuse every call forever.
                    self.closing = False
                    raise
                if not back:
                    return
                self.closing = False
                self.touch()
