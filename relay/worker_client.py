"""Calls from the relay to the worker, and the loop that waits for a sleeping worker to wake.

On Fly the worker is reached over Flycast: when its Machine is stopped, the proxy starts it
and holds the request, so a sleeping worker shows up as a refused connection (locally) or as
a slow one (on Fly). Either way the relay tells the owner once and waits for the worker: it
announces itself the moment it is up (`POST /callback`), and polling `/health` steadily is
the fallback for a worker that cannot reach the relay.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anyio
import httpx

from common.protocol import Answer, Command, decode_answer, encode_command

logger = logging.getLogger(__name__)

# Statuses that mean "the worker is not there yet" (Fly's proxy while the Machine starts).
ASLEEP_STATUS = frozenset({502, 503, 504})


@dataclass(frozen=True)
class CallResult:
    """`delivered`; or `asleep` (try waking it); or neither: the worker refused the call.
    `answer` is where the owner's run stands, when the worker said."""

    delivered: bool = False
    asleep: bool = False
    reason: str = ""
    answer: Answer | None = None
    unauthorized: bool = False  # the worker refused the token (HTTP 401)


class WorkerClient:
    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        base_url: str,
        token: str,
        call_timeout: float = 3.0,
        poll_interval: float = 0.06,
        poll_timeout: float = 0.5,
        instance: str = "",
    ) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        self.instance = instance
        self._headers = {"Authorization": f"Bearer {token}"}
        if instance:  # one owner's own Machine (relay/fleet.py): Fly's proxy sends it there, waking it
            self._headers["fly-force-instance-id"] = instance
        self._routing = {k: v for k, v in self._headers.items() if k != "Authorization"}  # /health: no token
        self._call_timeout = httpx.Timeout(call_timeout, connect=min(1.0, call_timeout))
        self._poll_interval = poll_interval
        self._poll_timeout = httpx.Timeout(poll_timeout)

    async def call(self, command: Command) -> CallResult:
        try:
            response = await self._http.post(
                f"{self._base}/{command.route}",
                json=encode_command(command),
                headers=self._headers,
                timeout=self._call_timeout,
            )
        except (httpx.TransportError, OSError) as exc:
            return CallResult(asleep=True, reason=type(exc).__name__)
        if response.status_code in ASLEEP_STATUS:
            return CallResult(asleep=True, reason=f"HTTP {response.status_code}")
        answer = decode_answer(_json(response))
        if response.status_code < 300:
            return CallResult(delivered=True, answer=answer)
        return CallResult(reason=_detail(response), answer=answer, unauthorized=response.status_code == 401)

    async def healthy(self) -> bool:
        try:
            response = await self._http.get(self._base + "/health", headers=self._routing, timeout=self._poll_timeout)
        except (httpx.TransportError, OSError):
            return False
        return response.status_code == 200

    async def wait_until_up(self, limit_s: float, up: anyio.Event, *, just_polled: bool = False) -> bool:
        """Until `up` is set (the worker announced itself) or `/health` answers; False if time
        runs out first.

        Polls start `poll_interval` apart, one at a time with a short timeout: a worker that
        cannot announce itself is still found within one interval of being ready. `just_polled`:
        the caller polled a moment ago, so the first poll here waits one interval.
        """
        with anyio.move_on_after(limit_s):
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._poll_until_healthy, up, just_polled)
                await up.wait()
                tg.cancel_scope.cancel()
            return True
        return False

    async def _poll_until_healthy(self, up: anyio.Event, just_polled: bool) -> None:
        if just_polled:
            await anyio.sleep(self._poll_interval)
        while True:
            started = anyio.current_time()
            if await self.healthy():
                up.set()
                return
            await anyio.sleep_until(started + self._poll_interval)

    async def fetch_image(self, name: str) -> bytes | None:
        """The PNG; b"" when the worker says it has no such image (expired: it never will);
        None when it could not be fetched now."""
        try:
            response = await self._http.get(
                f"{self._base}/images/{name}", headers=self._headers, timeout=self._call_timeout
            )
        except (httpx.TransportError, OSError):
            return None
        if response.status_code == 404:
            return b""
        if response.status_code != 200 or response.headers.get("content-type", "").split(";")[0] != "image/png":
            return None
        return response.content


def _json(response: httpx.Response) -> object:
    try:
        return response.json()
    except ValueError:
        return None


def _detail(response: httpx.Response) -> str:
    body = _json(response)
    detail = body.get("detail") if isinstance(body, dict) else None
    return str(detail or f"the VM answered HTTP {response.status_code}")[:300]
