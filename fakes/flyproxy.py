"""A local stand-in for Fly's proxy in front of the worker, and for its Machine's suspend.

On Fly the worker's Machine stops when the worker exits idle (or is suspended, when it asks
for that), and the proxy starts or resumes it when the relay calls it over Flycast. Locally
this proxy does the same: a request for a worker that is not running starts `python -m vm` and
is answered 503 until the worker listens, which is what the relay sees while a Machine boots; a
suspended worker is a stopped process (SIGSTOP), resumed with SIGCONT before the request goes
through; once it is up, requests pass straight through.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

logger = logging.getLogger(__name__)

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "content-length", "host"}


class FlyProxy:
    def __init__(
        self, start_worker: Callable[[], subprocess.Popen[bytes]], worker_url: str, http: httpx.AsyncClient
    ) -> None:
        self._start = start_worker
        self._url = worker_url.rstrip("/")
        self._http = http
        self.process: subprocess.Popen[bytes] | None = None
        self.suspended = False
        self.starts = 0
        self.resumes = 0
        self.woke_at: float | None = None  # time.monotonic() of the last start or resume

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def suspend(self) -> None:
        """What Fly does when the Machine asks to be suspended: its memory kept, nothing runs."""
        if self.running:
            self._signal(signal.SIGSTOP)
            self.suspended = True

    def state(self) -> str:
        """As the Machines API would say it."""
        if not self.running:
            return "stopped"
        return "suspended" if self.suspended else "started"

    def resume(self) -> None:
        if self.suspended and self.running:
            self._signal(signal.SIGCONT)
            self.resumes += 1
            self.woke_at = time.monotonic()
        self.suspended = False

    def _signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        pid = self.process.pid
        # The whole Machine when the worker leads its own process group (its agents too).
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self._forward, methods=["GET", "POST"])])

    async def _forward(self, request: Request) -> Response:
        self.resume()
        if not self.running:
            if self.process is not None:
                logger.info("worker exited with %s; starting it again", self.process.returncode)
            self.woke_at = time.monotonic()
            self.process = self._start()
            self.starts += 1
            return JSONResponse({"detail": "starting the worker"}, status_code=503)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            upstream = await self._http.request(
                request.method,
                self._url + request.url.path,
                params=request.query_params,
                headers=headers,
                content=await request.body(),
                timeout=30.0,
            )
        except httpx.TransportError:
            return JSONResponse({"detail": "the worker is starting"}, status_code=503)
        return Response(
            upstream.content,
            status_code=upstream.status_code,
            headers={k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP},
        )
