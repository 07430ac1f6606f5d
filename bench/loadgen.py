"""A lean HTTP/1.1 load generator: pre-built requests over keep-alive sockets.

httpx costs about as much CPU per request as the server under test, so with it the figures
measure the client. Here each request is bytes made in advance, sent on one of `concurrency`
persistent connections, and timed from write to the end of the response.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlencode


def form_request(host: str, path: str, params: dict[str, str], headers: dict[str, str]) -> bytes:
    body = urlencode(params).encode()
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/x-www-form-urlencoded",
        f"Content-Length: {len(body)}",
        *[f"{k}: {v}" for k, v in headers.items()],
        "",
        "",
    ]
    return "\r\n".join(head).encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    if length:
        await reader.readexactly(length)
    return status


async def run(host: str, port: int, requests: list[bytes], concurrency: int) -> tuple[float, list[float]]:
    """Send every request; returns (requests per second, latencies in seconds)."""
    queue = list(reversed(requests))
    latencies: list[float] = []

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while queue:
                request = queue.pop()
                started = time.perf_counter()
                writer.write(request)
                status = await _read_response(reader)
                latencies.append(time.perf_counter() - started)
                if status != 200:
                    raise RuntimeError(f"HTTP {status}")
        finally:
            writer.close()

    began = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return len(requests) / (time.perf_counter() - began), latencies
