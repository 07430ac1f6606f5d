"""A local stand-in for GitHub's pull-request API: for `--demo`, local runs and the tests.

Pull requests are recorded (and can be made to fail, or to stall); each gets a small web page,
so the link the owner receives opens something real. `GET /user` answers as GitHub does for the
token: 401 for any other (or once `revoked`), and the token's expiry in GitHub's header.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route


@dataclass
class FakeGitHub:
    token: str
    web_url: str = "https://github.com"
    pulls: list[dict[str, Any]] = field(default_factory=list)
    fail_next: list[int] = field(default_factory=list)
    stall: bool = False  # take a pull request and never answer; `hung_up` counts clients that left
    hung_up: int = 0
    revoked: bool = False  # the token is refused everywhere, as GitHub refuses a revoked one
    expiration: str = ""  # `github-authentication-token-expiration` on every answer ("": none)
    user_requests: int = 0

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/user", self._user, methods=["GET"]),
                Route("/repos/{owner}/{repo}/pulls", self._pulls, methods=["GET", "POST"]),
                Route("/{owner}/{repo}/pull/{number:int}", self._page),
            ]
        )

    async def _page(self, request: Request) -> HTMLResponse:
        repo = f"{request.path_params['owner']}/{request.path_params['repo']}"
        pull = next((p for p in self.pulls if p["repo"] == repo and p["number"] == request.path_params["number"]), None)
        if pull is None:
            return HTMLResponse("<h1>No such pull request</h1>", status_code=404)
        return HTMLResponse(
            f"<!doctype html><meta charset='utf-8'><title>{escape(pull['title'])}</title>"
            f"<body style='font-family:sans-serif;max-width:40em;margin:2em auto'>"
            f"<p>Local stand-in for GitHub</p><h1>{escape(pull['title'])} #{pull['number']}</h1>"
            f"<p><code>{escape(pull['head'])}</code> → <code>{escape(pull['base'])}</code></p>"
            f"<pre style='white-space:pre-wrap'>{escape(pull.get('body') or '')}</pre></body>"
        )

    def _refused(self, request: Request) -> JSONResponse | None:
        if self.revoked or request.headers.get("authorization") != f"Bearer {self.token}":
            return JSONResponse({"message": "Bad credentials"}, status_code=401)
        return None

    def _headers(self) -> dict[str, str]:
        return {"github-authentication-token-expiration": self.expiration} if self.expiration else {}

    async def _user(self, request: Request) -> JSONResponse:
        self.user_requests += 1
        if (refused := self._refused(request)) is not None:
            return refused
        return JSONResponse({"login": "textslash-bot", "id": 1}, headers=self._headers())

    async def _pulls(self, request: Request) -> JSONResponse:
        if (refused := self._refused(request)) is not None:
            return refused
        repo = f"{request.path_params['owner']}/{request.path_params['repo']}"
        if request.method == "GET":
            head = request.query_params.get("head", "").split(":")[-1]
            return JSONResponse([p for p in self.pulls if p["head"] == head and p["repo"] == repo])
        if self.stall:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.hung_up += 1
            return JSONResponse({}, status_code=504)  # never sent: the client is gone
        if self.fail_next:
            return JSONResponse({"message": "scripted failure"}, status_code=self.fail_next.pop(0))
        body = await request.json()
        if any(p["head"] == body["head"] and p["repo"] == repo for p in self.pulls):
            return JSONResponse({"message": "Validation Failed: A pull request already exists"}, status_code=422)
        number = len(self.pulls) + 1
        pull = {**body, "repo": repo, "number": number, "html_url": f"{self.web_url}/{repo}/pull/{number}"}
        self.pulls.append(pull)
        return JSONResponse(pull, status_code=201)
