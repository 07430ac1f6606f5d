"""Run ASGI apps on real loopback sockets."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import uvicorn

from common.serve import Listening, Server


def reserve_port() -> socket.socket:
    """A socket bound to a free loopback port but not listening: connections are refused until
    a server is started on it, which is exactly what a sleeping worker looks like."""
    return reserve_port_at(0)


def reserve_port_at(port: int) -> socket.socket:
    # proto must say TCP: asyncio sets TCP_NODELAY on accepted connections only when it does, and
    # without it Nagle's algorithm and the peer's delayed ACK hold a response's body back 40 ms.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


def url_of(sock: socket.socket) -> str:
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"  # reached with httpx's `uds` transport
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}"


@asynccontextmanager
async def run_server(
    app: Any, sock: socket.socket | None = None, *, listening: Listening | None = None, tls: Path | None = None
) -> AsyncIterator[str]:
    """Serve `app` with uvicorn (lifespan included) until the block ends; yields its base URL.
    `listening` is set the moment the socket listens, as in the real processes. `tls`: a folder
    with cert.pem and key.pem (`make_certificate`), to serve https."""
    sock = sock or reserve_port()
    with contextlib.closing(sock):
        async with _serving(app, sock, listening, tls) as url:
            yield url


def make_certificate(folder: Path) -> Path:
    """A self-signed certificate for 127.0.0.1, made by openssl: `folder`/cert.pem and key.pem."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(folder / "key.pem")]
        + ["-out", str(folder / "cert.pem")],
        check=True,
        capture_output=True,
    )
    return folder


@asynccontextmanager
async def _serving(
    app: Any, sock: socket.socket, listening: Listening | None, tls: Path | None = None
) -> AsyncIterator[str]:
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="auto",
        timeout_graceful_shutdown=2,
        # Above httpx's own 5 s: a client then always drops an idle connection before the server
        # does. With both at 5 s, a request sent on a connection the server was closing that very
        # moment failed with ReadError (a test that waited ~5 s between two calls, now and then).
        timeout_keep_alive=30,
        ssl_certfile=str(tls / "cert.pem") if tls else None,
        ssl_keyfile=str(tls / "key.pem") if tls else None,
    )
    server = Server(config, listening)
    # uvicorn would take over SIGINT/SIGTERM from the main thread; tests must keep pytest's.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    stopped = anyio.Event()

    async def serve() -> None:
        try:
            await server.serve([sock])
        finally:
            stopped.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        with anyio.fail_after(10):
            while not server.started:
                if server.should_exit:
                    raise RuntimeError("server failed to start")
                await anyio.sleep(0.005)
        try:
            url = url_of(sock)
            yield url.replace("http://", "https://", 1) if tls else url
        finally:
            server.should_exit = True
            # Wait for the graceful shutdown here, even when the block failed: leaving the task
            # group with an exception would cancel serve() and leak its open connections.
            with anyio.move_on_after(5, shield=True):
                await stopped.wait()


def unix_socket(path: str) -> socket.socket:
    """A socket bound to `path`, not listening yet (as `reserve_port` is for TCP)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    return sock
