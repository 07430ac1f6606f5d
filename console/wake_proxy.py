"""A local stand-in for Fly's proxy in front of the worker.

On Fly the worker's Machine stops when the worker exits idle, and the proxy starts it again
when the relay calls it over Flycast. Locally this proxy does the same: a request for a worker
that is not running starts `python -m vm` and is answered 503 until the worker listens, which
is what the relay sees while a Machine boots; once it is up, requests pass straight through.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

logger = logging.getLogger(__name__)

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "content-length", "host"}


class WakeProxy:
    def __init__(
        self, start_worker: Callable[[], subprocess.Popen[bytes]], worker_url: str, http: httpx.AsyncClient
    ) -> None:
        self._start = start_worker
        self._url = worker_url.rstrip("/")
        self._http = http
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self._forward, methods=["GET", "POST"])])

    async def _forward(self, request: Request) -> Response:
        if not self.running:
            if self.process is not None:
                logger.info("worker exited with %s; starting it again", self.process.returncode)
            self.process = self._start()
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
