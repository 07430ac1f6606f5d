"""The worker's HTTP client, made after start-up so it is not on the way to the first /health.

Measured here: importing httpx costs ~40 ms and the first `httpx.AsyncClient()` ~140 ms (it loads
the CA bundle), together about half the worker's boot. A woken worker should answer Fly's proxy
first; its first callback can wait the few milliseconds it takes to finish this on a thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    import httpx


def _new_client() -> httpx.AsyncClient:
    import httpx

    return httpx.AsyncClient()


class LazyHTTP:
    def __init__(self, client: httpx.AsyncClient | None = None) -> None:
        self._client = client
        self._owned = client is None
        self._ready = anyio.Event()
        if client is not None:
            self._ready.set()

    async def build(self) -> None:
        """Make the client on a worker thread (started by the lifespan, after start-up)."""
        if self._client is None:
            self._client = await anyio.to_thread.run_sync(_new_client)
        self._ready.set()

    async def get(self) -> httpx.AsyncClient:
        await self._ready.wait()
        assert self._client is not None
        return self._client

    async def renew(self) -> None:
        """A new client in place of the old one, whose connections a suspend may have broken."""
        if not self._owned or self._client is None:
            return
        old, self._client = self._client, await anyio.to_thread.run_sync(_new_client)
        await old.aclose()

    async def aclose(self) -> None:
        if self._owned and self._client is not None:
            await self._client.aclose()
