"""Serving an app with uvicorn so that a graceful stop is a clean exit, for both processes."""

from __future__ import annotations

import signal

import uvicorn


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
