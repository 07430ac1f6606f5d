"""Telling the relay the worker is up, or about to sleep (`POST /callback`, common/protocol.py).

"Up" goes out the moment the worker listens, on boot and after a resume, whether or not it
knows any owner yet: the relay then delivers what waits at once instead of finding out by its
next poll. Neither is spooled: a stale "sleeping" delivered after the next boot would lie, and
a lost "up" costs one poll interval, because the relay polls as well.

The announcement is worth something only if it beats the relay's next poll (50 ms apart), so it
does not wait for the worker's httpx client, which is made off the boot path and takes a few
hundred milliseconds (vm/lazy_http.py). It is one small request, written with h11 (the HTTP/1.1
state machine httpx and uvicorn use, already loaded by uvicorn) over an anyio stream, with TLS
from the system's CA store when the relay is reached over https.
"""

from __future__ import annotations

import functools
import json
import logging
import secrets
import ssl
import time
from urllib.parse import urlsplit

import anyio
import h11

from common.protocol import Presence, PresenceState, encode_presence

logger = logging.getLogger(__name__)

RETRIES_S = (0.2, 0.5, 1.0)  # a relay that restarts (a deploy) is back within these
TIMEOUT_S = 2.0
MAX_ANSWER = 64 * 1024


class Announcer:
    def __init__(self, relay_url: str, token: str, *, owner: str = "") -> None:
        self._url, self._token = f"{relay_url.rstrip('/')}/callback", token
        self._owner = owner  # a worker serving one owner says whose it is (WORKER_MODE=per-owner)
        self.boot = secrets.token_hex(8)  # a new one per process: a restart, not a resume
        self._up_since = time.monotonic()  # since the boot, or the last resume

    async def say(self, state: PresenceState, *, retries: tuple[float, ...] = ()) -> bool:
        """Post the worker's presence; True once the relay took it. Going to sleep, it says how
        long it was up: the relay counts the machine's hours from that (relay/usage.py)."""
        awake_ms = int((time.monotonic() - self._up_since) * 1000) if state == "sleeping" else 0
        body = json.dumps(encode_presence(Presence(state, self.boot, awake_ms, self._owner))).encode()
        for pause in (*retries, None):
            try:
                status = await post_json(self._url, body, self._token)
                if status < 300:
                    return True
                reason = f"HTTP {status}"
            except (OSError, TimeoutError, anyio.BrokenResourceError, anyio.EndOfStream, h11.ProtocolError) as exc:
                reason = type(exc).__name__
            if pause is None:
                logger.info("could not tell the relay the worker is %s (%s)", state, reason)
                return False
            await anyio.sleep(pause)
        return False

    async def up(self) -> bool:
        self._up_since = time.monotonic()
        return await self.say("up", retries=RETRIES_S)


async def post_json(url: str, body: bytes, token: str, timeout_s: float = TIMEOUT_S) -> int:
    """POST `body` to `url` with a bearer token; the response's status."""
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    host = parts.hostname or ""
    request = h11.Request(
        method="POST",
        target=parts.path + (f"?{parts.query}" if parts.query else ""),
        headers=[
            ("Host", parts.netloc.rpartition("@")[2]),
            ("Authorization", f"Bearer {token}"),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ],
    )
    conn = h11.Connection(h11.CLIENT)
    with anyio.fail_after(timeout_s):
        stream = await _connect(host, parts.port or (443 if secure else 80), secure)
        async with stream:
            await stream.send(conn.send(request) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
            received = 0
            while True:
                event = conn.next_event()
                if isinstance(event, h11.Response):
                    return event.status_code
                if event is h11.NEED_DATA:
                    chunk = await stream.receive()
                    received += len(chunk)
                    if received > MAX_ANSWER:
                        raise h11.RemoteProtocolError("answer too long")
                    conn.receive_data(chunk)
                elif isinstance(event, h11.ConnectionClosed):
                    raise anyio.EndOfStream


async def _connect(host: str, port: int, secure: bool) -> anyio.abc.ByteStream:
    if secure:
        # Not waiting for the relay's close_notify once its answer is read: a proxy that just
        # drops the connection would otherwise turn a taken announcement into a failed one.
        return await anyio.connect_tcp(host, port, tls=True, ssl_context=_tls_context(), tls_standard_compatible=False)
    return await anyio.connect_tcp(host, port)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()  # the system's CA store, loaded once per process
