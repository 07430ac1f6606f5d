"""A loopback fake of GitHub's REST API: pull requests, recorded, with scripted failures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


@dataclass
class FakeGitHub:
    token: str
    pulls: list[dict[str, Any]] = field(default_factory=list)
    fail_next: list[int] = field(default_factory=list)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/repos/{owner}/{repo}/pulls", self._pulls, methods=["GET", "POST"])])

    async def _pulls(self, request: Request) -> JSONResponse:
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return JSONResponse({"message": "Bad credentials"}, status_code=401)
        repo = f"{request.path_params['owner']}/{request.path_params['repo']}"
        if request.method == "GET":
            head = request.query_params.get("head", "").split(":")[-1]
            return JSONResponse([p for p in self.pulls if p["head"] == head and p["repo"] == repo])
        if self.fail_next:
            return JSONResponse({"message": "scripted failure"}, status_code=self.fail_next.pop(0))
        body = await request.json()
        if any(p["head"] == body["head"] and p["repo"] == repo for p in self.pulls):
            return JSONResponse({"message": "Validation Failed: A pull request already exists"}, status_code=422)
        number = len(self.pulls) + 1
        pull = {**body, "repo": repo, "number": number, "html_url": f"https://github.com/{repo}/pull/{number}"}
        self.pulls.append(pull)
        return JSONResponse(pull, status_code=201)
