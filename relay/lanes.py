"""Background lanes: at most one task per key, running while that key has work.

The inbox and the outbox each run one lane per phone (so one owner's slow send never holds
up another's), the worker calls run in a single lane. `notify` is cheap and may be called
any number of times; a lane that finds no work ends, unless it was notified meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import TaskGroup

logger = logging.getLogger(__name__)

# A step does one unit of work for a key and says what next: None when there is nothing to
# do, 0 to go again at once, or a number of seconds to wait (a backoff or a pacing gap).
Step = Callable[[str], Awaitable[float | None]]


class Lanes:
    def __init__(self, name: str, step: Step) -> None:
        self._name = name
        self._step = step
        self._running: set[str] = set()
        self._dirty: set[str] = set()
        self._tg: TaskGroup | None = None

    def start(self, tg: TaskGroup) -> None:
        self._tg = tg

    def notify(self, key: str) -> None:
        if self._tg is None:
            return  # not started yet: start-up notifies every key with work
        if key in self._running:
            self._dirty.add(key)
        else:
            self._running.add(key)
            self._tg.start_soon(self._run, key, name=f"{self._name}:{key}")

    @property
    def busy(self) -> bool:
        return bool(self._running)

    async def _run(self, key: str) -> None:
        try:
            while True:
                self._dirty.discard(key)
                try:
                    delay = await self._step(key)
                except Exception:
                    logger.exception("%s lane failed; trying again in 1 s", self._name)
                    delay = 1.0
                if delay is None:
                    # Checked and cleared with no await in between, so no notify is lost.
                    if key in self._dirty:
                        continue
                    return
                if delay > 0:
                    await anyio.sleep(delay)
        finally:
            self._running.discard(key)
