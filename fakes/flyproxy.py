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
from pathlib import Path

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
        self._frozen: list[int] = []

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def suspend(self) -> None:
        """What Fly does when the Machine asks to be suspended: its memory kept, nothing runs.
        The Machine here is the worker and its process group (its agents too, when it leads
        one); what was stopped already (a kept CLI) stays stopped after the resume, as in Fly's
        snapshot."""
        if self.running:
            assert self.process is not None
            worker = self.process.pid
            self._frozen = [worker]  # first, so that it starts nothing more
            _signal_all(self._frozen, signal.SIGSTOP)
            self._frozen += [pid for pid in _group(worker) if _state(pid) != "T"]
            _signal_all(self._frozen[1:], signal.SIGSTOP)
            self.suspended = True

    def state(self) -> str:
        """As the Machines API would say it."""
        if not self.running:
            return "stopped"
        return "suspended" if self.suspended else "started"

    def resume(self) -> None:
        if self.suspended and self.running:
            _signal_all(self._frozen, signal.SIGCONT)
            self.resumes += 1
            self.woke_at = time.monotonic()
        self.suspended = False

    def start(self) -> None:
        """Start the worker if it is not running (a suspended one is resumed instead)."""
        self.resume()
        if not self.running:
            if self.process is not None:
                logger.info("worker exited with %s; starting it again", self.process.returncode)
            self.woke_at = time.monotonic()
            self.process = self._start()
            self.starts += 1

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self.forward, methods=["GET", "POST"])])

    async def forward(self, request: Request) -> Response:
        """One request for this Machine (fakes/flyrouter.py routes an app's to each)."""
        if not self.running:
            self.start()
            return JSONResponse({"detail": "starting the worker"}, status_code=503)
        self.resume()
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


def _group(leader: int) -> list[int]:
    """The other processes of the worker's process group, if it leads one."""
    if os.getpgid(leader) != leader:
        return []
    group = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == leader and int(stat.parent.name) != leader:
            group.append(int(stat.parent.name))
    return group


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
