"""Serving an app with uvicorn so that a graceful stop is a clean exit, for both processes."""

from __future__ import annotations

import signal
import socket

import anyio
import uvicorn


class Listening:
    """Set the moment the server's sockets listen: from then on a request is served at once."""

    def __init__(self) -> None:
        self._done = False
        self._event: anyio.Event | None = None

    def set(self) -> None:
        self._done = True
        if self._event is not None:
            self._event.set()

    async def wait(self) -> None:
        if not self._done:
            self._event = self._event or anyio.Event()
            await self._event.wait()


class Server(uvicorn.Server):
    """uvicorn's server, telling `listening` when its start-up (lifespan, then sockets) is done."""

    def __init__(self, config: uvicorn.Config, listening: Listening | None = None) -> None:
        super().__init__(config)
        self.listening = listening

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.listening is not None:
            self.listening.set()


def serve(server: uvicorn.Server) -> int:
    """Run `server` until SIGTERM or SIGINT has stopped it gracefully, then return 0.

    Once it has shut down, uvicorn raises again the signal that stopped it, so that a default
    handler ends the process with it: supervisors and compose then log a graceful stop as a
    failure (-15), and Ctrl-C prints a traceback. Handlers of ours, installed first and put back
    by uvicorn when it is done, take that signal and let the process return normally.
    """
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stopped)
    server.run()
    return 0


def _stopped(signum: int, frame: object) -> None:
    """The stop uvicorn already carried out, signalled again: nothing left to do."""
