"""A loopback fake of the worker's HTTP surface: records calls, serves images, and can report
events back to the relay the way the real worker does."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from common.protocol import (
    ROUTES,
    VERSION,
    Answer,
    Command,
    OwnerCall,
    Presence,
    PresenceState,
    ProtocolError,
    Report,
    RunPrompt,
    decode_command,
    decode_report,
    encode_answer,
    encode_presence,
    encode_report,
)

PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4"
    b"\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N\x00\x00\x00\x00IEND\xaeB`\x82"
)


@dataclass
class Call:
    path: str
    body: dict[str, Any]
    authorization: str


@dataclass
class FakeWorker:
    token: str
    owner: str = ""  # the one owner it serves, as an owner's own Machine says in its presence
    calls: list[Call] = field(default_factory=list)
    health_polls: int = 0
    answer_status: int = 202
    images: dict[str, bytes] = field(default_factory=dict)
    image_requests: list[str] = field(default_factory=list)  # every GET /images/..., authorized or not
    answer_via: str = ""  # a relay URL: answer every prompt at once, as a very fast agent would
    # What the fake says of each owner's run, as the real worker does in every answer; a test
    # may set it to play a worker that holds changes or lost its state.
    states: dict[str, Answer] = field(default_factory=dict)
    _seq: itertools.count[int] = field(default_factory=itertools.count)
    _http: httpx.AsyncClient | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    def app(self) -> Starlette:
        routes = [Route("/health", self._health, methods=["GET"]), Route("/images/{name}", self._image)]
        routes += [Route(f"/{name}", self._call, methods=["POST"]) for name in ROUTES]
        return Starlette(routes=routes)

    async def announce(
        self, relay_url: str, state: PresenceState = "up", *, http: httpx.AsyncClient | None = None
    ) -> httpx.Response:
        """Say the worker is up (or going to sleep), as the real one does when it listens.
        `http`: a client already made (making one takes the time of a CA bundle)."""
        if http is None:
            http = self._http = self._http or httpx.AsyncClient()
        body = encode_presence(Presence(state, "fake-boot", owner=self.owner))
        headers = {"Authorization": f"Bearer {self.token}"}
        return await http.post(f"{relay_url}/callback", json=body, headers=headers)

    def paths(self) -> list[str]:
        return [c.path for c in self.calls]

    def commands(self) -> list[dict[str, Any]]:
        return [c.body for c in self.calls if c.path == "/command"]

    async def _health(self, request: Request) -> JSONResponse:
        self.health_polls += 1
        return JSONResponse({"status": "ok", "deployed_sha": "fake", "uptime_s": 1, "busy": False})

    async def _call(self, request: Request) -> JSONResponse:
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return JSONResponse({"detail": "unauthorized"}, status_code=401)
        body = await request.json()
        self.calls.append(Call(request.url.path, body, request.headers["authorization"]))
        try:
            command = decode_command(request.url.path.lstrip("/"), body)
        except ProtocolError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=422)
        before = self.states.get(command.phone, Answer("idle"))
        if self.answer_status >= 300:
            return JSONResponse({**encode_answer(before), "detail": "scripted refusal"}, status_code=self.answer_status)
        status, after = self._move(command, before)
        self.states[command.phone] = after
        if isinstance(command, RunPrompt) and status == 202 and self.answer_via:
            # Like the real worker: the run goes on after the 202, not inside the request.
            task = asyncio.get_running_loop().create_task(self._answer(body))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return JSONResponse(encode_answer(after), status_code=status)

    def _move(self, command: Command, before: Answer) -> tuple[int, Answer]:
        """The real worker's answers (vm/worker.py), without its runs: status and new state."""
        if isinstance(command, RunPrompt):
            if before.state != "idle":
                return 409, replace(before, detail="a run is already going or changes wait")
            return 202, Answer("running", command.message_id, command.text)
        if not isinstance(command, OwnerCall) or command.route == "status":
            return (202 if not isinstance(command, OwnerCall) else 200), before
        if command.route == "cancel":
            if before.state in ("running", "cancelling"):
                return 202, replace(before, state="cancelling")
            return 200, replace(before, detail="nothing is running")
        if before.state != "awaiting_approval":
            return 409, replace(before, detail="nothing is waiting for approval")
        return 202, replace(before, state="pushing" if command.route == "approve" else "rolling_back")

    async def _answer(self, command: dict[str, Any]) -> None:
        for _ in range(50):  # the real worker retries its callbacks, so this one does too
            response = await self.report(
                self.answer_via,
                command["phone"],
                "answer",
                run_id=command["message_id"],
                text=f"answer to {command['text']}",
            )
            if response.status_code == 200:
                return

    async def _image(self, request: Request) -> Response:
        self.image_requests.append(request.path_params["name"])
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return JSONResponse({"detail": "unauthorized"}, status_code=401)
        data = self.images.get(request.path_params["name"])
        if data is None:
            return JSONResponse({"detail": "no such image"}, status_code=404)
        return Response(data, media_type="image/png")

    async def report(
        self, relay_url: str, phone: str, event_type: str, run_id: str = "run-1", **fields: Any
    ) -> httpx.Response:
        """POST one event to the relay's callback route, as the worker would."""
        # Fields in their wire form (lists of dicts), through the protocol's own decoder and encoder.
        report = decode_report({"v": VERSION, "type": event_type, "run_id": run_id, "seq": next(self._seq), **fields})
        self._after_report(phone, report)
        body = encode_report(report)
        self._http = self._http or httpx.AsyncClient()  # one client: making one costs an SSL context
        return await self._http.post(
            f"{relay_url}/callback/{phone}", json=body, headers={"Authorization": f"Bearer {self.token}"}
        )

    def _after_report(self, phone: str, report: Report) -> None:
        """Where the real worker's state would be once it reports this."""
        before = self.states.get(phone, Answer("idle"))
        if report.type in ("answer", "cancelled", "error") and not report.changes:
            self.states[phone] = Answer("idle")
        elif report.type in ("answer", "cancelled", "error", "approval_required", "approve_failed", "reject_failed"):
            self.states[phone] = Answer("awaiting_approval", report.run_id, before.prompt)
        elif report.type in ("pr_opened", "rolled_back"):
            self.states[phone] = Answer("idle")

    async def report_raw(self, relay_url: str, phone: str, body: dict[str, Any]) -> httpx.Response:
        """POST a body as given: for tests of what the relay refuses."""
        self._http = self._http or httpx.AsyncClient()
        return await self._http.post(
            f"{relay_url}/callback/{phone}", json=body, headers={"Authorization": f"Bearer {self.token}"}
        )
