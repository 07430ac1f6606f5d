"""Events from the worker to the relay: spooled to disk, sent in order, retried until accepted.

A report is a fact the owner must see (an answer, a diff, a PR link), so it is written to
the spool before anything else happens and deleted only when the relay answered 2xx. A
worker that restarts sends what it had not yet delivered. The relay deduplicates on
`run_id` + `seq`, so a report sent twice is shown once.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from vm.lazy_http import LazyHTTP

logger = logging.getLogger(__name__)


@dataclass
class CallbackSender:
    spool: Path
    relay_url: str
    token: str = field(repr=False)
    http: LazyHTTP
    _wakeup: anyio.Event = field(default_factory=anyio.Event)
    _last_seq: int = 0

    def __post_init__(self) -> None:
        self.spool.mkdir(parents=True, exist_ok=True)

    def report(self, phone: str, event: dict[str, Any]) -> None:
        """Spool one event (synchronously, so it is on disk before the caller goes on)."""
        # A clock-based sequence stays unique across restarts; the relay dedupes on run_id + seq.
        self._last_seq = seq = max(time.time_ns(), self._last_seq + 1)
        name = f"{seq:020d}.json"
        tmp = self.spool / f".{name}.tmp"
        tmp.write_text(json.dumps({"phone": phone, "event": {**event, "seq": seq}}))
        os.replace(tmp, self.spool / name)
        self._wakeup.set()

    @property
    def pending(self) -> int:
        return sum(1 for p in self.spool.iterdir() if p.suffix == ".json" and not p.name.startswith("."))

    async def run(self) -> None:
        """Deliver spooled events forever, oldest first; a failure holds the line and retries."""
        delay = 0.2
        while True:
            files = sorted(p for p in self.spool.iterdir() if p.suffix == ".json" and not p.name.startswith("."))
            if not files:
                self._wakeup = anyio.Event()
                await self._wakeup.wait()
                continue
            if await self._deliver(files[0]):
                files[0].unlink(missing_ok=True)
                delay = 0.2
            else:
                await anyio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _deliver(self, path: Path) -> bool:
        import httpx  # on first use, not at boot (see vm/lazy_http.py)

        item = json.loads(await anyio.Path(path).read_text())
        url = f"{self.relay_url}/callback/{item['phone']}"
        client = await self.http.get()
        try:
            response = await client.post(url, json=item["event"], headers={"Authorization": f"Bearer {self.token}"},
                                            timeout=10.0)
        except httpx.HTTPError as exc:
            logger.warning("callback %s failed (%s); will retry", item["event"].get("type"), type(exc).__name__)
            return False
        if response.status_code < 300:
            return True
        if 400 <= response.status_code < 500 and response.status_code not in (401, 408, 429):
            # The relay will never take this one (malformed); holding it would block every later report.
            logger.error("relay refused a %s event for good: HTTP %s %s", item["event"].get("type"),
                         response.status_code, response.text[:200])
            return True
        logger.warning("callback %s got HTTP %s; will retry", item["event"].get("type"), response.status_code)
        return False
