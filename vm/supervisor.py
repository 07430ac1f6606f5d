"""Background loops that outlive their failures.

A loop that raises is logged and started again after a backoff; it never takes the task group
(and with it every other loop, the runs and the idle timer) down. A loop that keeps failing
is a problem `/health` reports, so Fly's checks and the relay see a worker that cannot serve.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import anyio

logger = logging.getLogger(__name__)

CRASH_LOOP = 3  # failures in a row, each within CRASH_WINDOW_S of the last, make a problem
CRASH_WINDOW_S = 60.0


class Supervisor:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failures: dict[str, tuple[int, float]] = {}  # name -> (failures in a row, last at)

    @property
    def problems(self) -> list[str]:
        now = self._clock()
        return [
            f"{name} keeps failing"
            for name, (count, at) in self._failures.items()
            if count >= CRASH_LOOP and now - at < CRASH_WINDOW_S
        ]

    async def keep(self, name: str, loop: Callable[[], Awaitable[None]], *, backoff_s: float = 1.0) -> None:
        """Run `loop` until it returns; after each failure, log it and start it again."""
        delay = backoff_s
        while True:
            try:
                await loop()
                return
            except Exception:
                count, last = self._failures.get(name, (0, 0.0))
                now = self._clock()
                self._failures[name] = (count + 1 if now - last < CRASH_WINDOW_S else 1, now)
                logger.exception("%s failed; starting it again in %.1f s", name, delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, 30.0)
