"""Reports from the worker to the relay: spooled to disk, sent in order, retried until accepted.

A report is a fact the owner must see (an answer, a diff, a PR link), so it is written to
the spool (synced) before anything else happens and deleted only when the relay answered
2xx. A worker that restarts sends what it had not yet delivered. The relay deduplicates on
`run_id` + `seq`, so a report sent twice is shown once. A spool file that cannot be read (a
crash before the sync, a full disk) is set aside with a log line, never retried forever.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio

from common.files import set_aside, write_durably
from common.protocol import Report, encode_report, report_bytes
from vm.lazy_http import LazyHTTP

logger = logging.getLogger(__name__)

STUCK_S = 600.0  # failing this long, the spool no longer keeps the worker awake


@dataclass
class CallbackSender:
    spool: Path
    relay_url: str
    token: str = field(repr=False)
    http: LazyHTTP
    _wakeup: anyio.Event = field(default_factory=anyio.Event)
    _last_seq: int = 0
    stuck_s: float = STUCK_S
    _failing_since: float | None = None  # time.monotonic() of the first failure in a row

    def __post_init__(self) -> None:
        self.spool.mkdir(parents=True, exist_ok=True)

    def report(self, phone: str, report: Report) -> int:
        """Spool one report (synchronously, so it is on disk before the caller goes on); returns
        its `seq`."""
        # A clock-based sequence stays unique across restarts; the relay dedupes on run_id + seq.
        self._last_seq = seq = max(time.time_ns(), self._last_seq + 1)
        item = {"phone": phone, "event": encode_report(replace(report, seq=seq))}
        # Named by seq (the order they go out in), then whose they are (for `pending_for`).
        write_durably(self.spool / f"{seq:020d}-{phone.lstrip('+')}.json", json.dumps(item).encode())
        self._wakeup.set()
        return seq

    def tell(self, route: str, name: str, data: dict[str, Any]) -> None:
        """Spool a message about the worker itself, not an owner's run (a credential's health:
        vm/credentials.py), for `POST /<route>` on the relay; it goes out in order with the
        reports. `name` ends the file's name, and is no owner's number."""
        self._last_seq = seq = max(time.time_ns(), self._last_seq + 1)
        write_durably(self.spool / f"{seq:020d}-{name}.json", json.dumps({"route": route, "event": data}).encode())
        self._wakeup.set()

    def _files(self) -> list[Path]:
        return sorted(p for p in self.spool.iterdir() if p.suffix == ".json" and not p.name.startswith("."))

    @property
    def pending(self) -> int:
        return len(self._files())

    @property
    def busy(self) -> bool:
        """Reports are on their way: keep the worker awake, unless the relay has refused them
        for `stuck_s` in a row. Then the worker may sleep; the spool stays on disk and goes out
        at the next boot, so a relay that is down (or one report it cannot take) costs nothing."""
        if self._failing_since is not None and time.monotonic() - self._failing_since >= self.stuck_s:
            return False
        return self.pending > 0

    def pending_for(self, phone: str) -> int:
        """The owner's reports not yet taken by the relay (a spool from before names carried
        the owner counts for everyone)."""
        mine = f"-{phone.lstrip('+')}"
        return sum(1 for path in self._files() if path.stem.endswith(mine) or "-" not in path.stem)

    async def run(self) -> None:
        """Deliver spooled reports forever, oldest first; a failure holds the line and retries."""
        delay = 0.2
        while True:
            files = self._files()
            if not files:
                self._wakeup = anyio.Event()
                await self._wakeup.wait()
                continue
            item = _read(files[0])
            if item is None or await self._deliver(*item):
                files[0].unlink(missing_ok=True)
                delay, self._failing_since = 0.2, None
            else:
                self._failing_since = self._failing_since or time.monotonic()
                await anyio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _deliver(self, path: str, event: dict[str, Any]) -> bool:
        import httpx  # on first use, not at boot (see vm/lazy_http.py)

        kind = event.get("type") or path.strip("/")  # a report's type; else its route (credentials)

        client = await self.http.get()
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        try:
            response = await client.post(
                f"{self.relay_url}{path}", content=report_bytes(event), headers=headers, timeout=10.0
            )
        except httpx.HTTPError as exc:
            logger.warning("callback %s failed (%s); will retry", kind, type(exc).__name__)
            return False
        if response.status_code < 300:
            return True
        if 400 <= response.status_code < 500 and response.status_code not in (401, 408, 429):
            # The relay will never take this one (malformed); holding it would block every later report.
            logger.error(
                "relay refused a %s report for good: HTTP %s %s",
                kind,
                response.status_code,
                response.text[:200],
            )
            return True
        logger.warning("callback %s got HTTP %s; will retry", kind, response.status_code)
        return False


def _read(path: Path) -> tuple[str, dict[str, Any]] | None:
    """Where a spooled message goes on the relay and the message, or None once an unreadable
    one is set aside. A report names its owner; a message of `tell`, its route."""
    try:
        item = json.loads(path.read_bytes())
        event = item["event"]
        target = f"/callback/{item['phone']}" if "phone" in item else f"/{item['route']}"
        if not isinstance(item.get("phone", item.get("route")), str) or not isinstance(event, dict):
            raise ValueError("not a spooled report")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        set_aside(path, type(exc).__name__)
        return None
    return target, event
