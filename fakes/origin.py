"""A bare git repository on disk, standing in for the project's `origin`, and a smart-HTTP
server for it that can be told to stall."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

# safe.directory: the checkouts under test belong to agent users, and the tests read them as root.
IDENTITY = ["-c", "user.name=Test", "-c", "user.email=test@example.invalid", "-c", "safe.directory=*"]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *IDENTITY, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def make_origin(root: Path, files: dict[str, str]) -> Path:
    """`root/origin.git` with one commit on `main` holding `files`."""
    origin = root / "origin.git"
    seed = root / "seed"
    origin.mkdir(parents=True)
    seed.mkdir()
    git(origin, "init", "--quiet", "--bare", "--initial-branch=main")
    git(seed, "init", "--quiet", "--initial-branch=main")
    for name, content in files.items():
        (seed / name).parent.mkdir(parents=True, exist_ok=True)
        (seed / name).write_text(content)
    git(seed, "add", "--all")
    git(seed, "commit", "--quiet", "-m", "initial")
    git(seed, "push", "--quiet", str(origin), "main")
    return origin


def branches(origin: Path) -> list[str]:
    out = git(origin, "for-each-ref", "--format=%(refname:short)", "refs/heads/")
    return sorted(out.split())


def show(origin: Path, ref: str, path: str) -> str:
    return git(origin, "show", f"{ref}:{path}")


@dataclass
class HttpOrigin:
    """Bare repositories below `root`, served over git's smart HTTP protocol by `git
    http-backend`, as GitHub serves them. A service named in `stall` (`git-receive-pack` for a
    push, `git-upload-pack` for a clone) takes the request and never answers, as a stalled
    connection does; `hung_up` counts the stalled requests whose client went away. `requests`
    records each request's path and the Authorization header it came with ("" for none)."""

    root: Path
    stall: set[str] = field(default_factory=set)
    hung_up: int = 0
    requests: list[tuple[str, str]] = field(default_factory=list)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self._serve, methods=["GET", "POST"])])

    async def _serve(self, request: Request) -> Response:
        path = "/" + request.path_params["path"]
        self.requests.append((path, request.headers.get("authorization", "")))
        body = await request.body()
        if request.method == "POST" and path.rsplit("/", 1)[-1] in self.stall:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.hung_up += 1
            return Response(status_code=504)  # never sent: the client is gone
        env = {
            "PATH": os.environ.get("PATH", ""),
            "GIT_PROJECT_ROOT": str(self.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": path,
            "QUERY_STRING": request.url.query,
            "REQUEST_METHOD": request.method,
            "CONTENT_TYPE": request.headers.get("content-type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": "test",  # http-backend takes pushes only from someone
            "REMOTE_ADDR": "127.0.0.1",
        }
        result = await anyio.run_process(["git", "http-backend"], input=body, env=env, check=False)
        head, _, payload = result.stdout.partition(b"\r\n\r\n")
        status, headers = 200, {}
        for line in head.decode().split("\r\n"):
            key, _, value = line.partition(":")
            if key.lower() == "status":
                status = int(value.split()[0])
            elif key:
                headers[key] = value.strip()
        return Response(payload, status_code=status, headers=headers)
