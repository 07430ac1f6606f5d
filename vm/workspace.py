"""The owner's git checkout: clone, snapshot before a run, diff, roll back, commit and push.

A snapshot is the *whole working state* (tracked and untracked files, as `git add -A` sees
them) written as a tree object through a throwaway index, plus HEAD and the list of ignored
paths. Comparing two such trees shows everything a run changed, even if the agent committed
on its own; restoring one puts back exactly what was there, untracked files included.
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

GIT_IDENTITY = ("-c", "user.name=textslash", "-c", "user.email=textslash@users.noreply.github.com")


class GitError(RuntimeError):
    """A git command failed; the message is safe to show the owner (no secrets)."""


@dataclass(frozen=True)
class Snapshot:
    head: str
    tree: str
    ignored: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {"head": self.head, "tree": self.tree, "ignored": list(self.ignored)}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Snapshot:
        ignored = data.get("ignored") or []
        assert isinstance(ignored, list)
        return cls(head=str(data["head"]), tree=str(data["tree"]), ignored=tuple(str(p) for p in ignored))


@dataclass(frozen=True)
class FileChange:
    path: str
    added: int
    removed: int


@dataclass(frozen=True)
class Changes:
    files: tuple[FileChange, ...]
    diff: str

    def __bool__(self) -> bool:
        return bool(self.files)


class Workspace:
    """One checkout of REPO_URL, at `path`."""

    def __init__(self, path: Path, repo_url: str, *, github_token: str = "") -> None:
        self.path = path
        self.repo_url = repo_url
        self._token = github_token

    async def git(self, *args: str, check: bool = True, env: dict[str, str] | None = None) -> str:
        full_env = {**os.environ, **self._auth_env(), **(env or {}), "GIT_TERMINAL_PROMPT": "0"}
        result = await anyio.run_process(["git", *GIT_IDENTITY, *args], cwd=self.path, env=full_env, check=False)
        if check and result.returncode != 0:
            message = (result.stderr or result.stdout).decode(errors="replace").strip().splitlines()
            detail = message[-1] if message else f"exit {result.returncode}"
            raise GitError(f"git {args[0]} failed: {self._redact(detail)}")
        return result.stdout.decode(errors="replace")

    def _auth_env(self) -> dict[str, str]:
        # The token travels in git's environment-only config, never in argv, URLs or logs.
        if not self._token or not self.repo_url.startswith("https://"):
            return {}
        basic = base64.b64encode(f"x-access-token:{self._token}".encode()).decode()
        return {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "http.extraHeader",
                "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}"}

    def _redact(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text

    async def ensure_clone(self) -> None:
        if (self.path / ".git").is_dir():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=".clone-", dir=self.path.parent))
        try:
            clone = Workspace(partial, self.repo_url, github_token=self._token)
            await clone.git("clone", "--quiet", self.repo_url, ".")
            os.replace(partial, self.path)  # a half-finished clone never looks like a checkout
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    async def default_branch(self) -> str:
        ref = (await self.git("symbolic-ref", "--quiet", "--short", "refs/remotes/origin/HEAD", check=False)).strip()
        return ref.removeprefix("origin/") or "main"

    async def snapshot(self) -> Snapshot:
        # Three independent git calls, run side by side: this is on every run's path.
        results: dict[str, Any] = {}

        async def keep(key: str, call: Awaitable[Any]) -> None:
            results[key] = await call

        async with anyio.create_task_group() as tg:
            tg.start_soon(keep, "head", self.git("rev-parse", "--verify", "--quiet", "HEAD", check=False))
            tg.start_soon(keep, "tree", self._working_tree())
            tg.start_soon(keep, "ignored", self._ignored())
        return Snapshot(head=results["head"].strip(), tree=results["tree"], ignored=tuple(results["ignored"]))

    async def _working_tree(self) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            await self.git("add", "--all", ".", env=env)
            return (await self.git("write-tree", env=env)).strip()

    async def _ignored(self) -> list[str]:
        out = await self.git("ls-files", "--others", "--ignored", "--exclude-standard", "--directory", "-z")
        return [p for p in out.split("\0") if p]

    async def changes_since(self, snap: Snapshot, *, max_diff_chars: int = 100_000) -> Changes:
        now = await self._working_tree()
        if now == snap.tree:
            return Changes((), "")
        numstat = await self.git("diff", "--numstat", "--no-renames", snap.tree, now)
        files = []
        for line in numstat.splitlines():
            added, removed, path = line.split("\t", 2)
            # Binary files show "-": count them as one changed line so they are not hidden.
            files.append(FileChange(path, int(added) if added != "-" else 1, int(removed) if removed != "-" else 0))
        diff = await self.git("diff", "--no-color", "--no-renames", snap.tree, now)
        return Changes(tuple(files), diff[:max_diff_chars])

    async def restore(self, snap: Snapshot) -> None:
        """Put the checkout back exactly as the snapshot found it."""
        if snap.head:
            await self.git("reset", "--quiet", "--hard", snap.head)
        await self.git("read-tree", snap.tree)
        await self.git("checkout-index", "--all", "--force")
        if snap.head:
            await self.git("reset", "--quiet", snap.head)  # index back to HEAD; files stay as restored
        keep = set((await self.git("ls-tree", "-r", "-z", "--name-only", snap.tree)).split("\0"))
        untracked = (await self.git("ls-files", "--others", "--exclude-standard", "-z")).split("\0")
        for rel in [p for p in untracked if p and p not in keep]:
            self._remove(rel)
        for rel in set(await self._ignored()) - set(snap.ignored):
            self._remove(rel)

    async def commit_to_branch(self, branch: str, message: str) -> str:
        """Commit everything on a new branch (or the existing one, on a retry); returns the sha."""
        current = (await self.git("rev-parse", "--abbrev-ref", "HEAD", check=False)).strip()
        if current != branch:
            await self.git("checkout", "--quiet", "-B", branch)
        await self.git("add", "--all", ".")
        if (await self.git("status", "--porcelain")).strip():  # nothing staged on a retry after a commit
            await self.git("commit", "--quiet", "--no-verify", "-m", message)
        return (await self.git("rev-parse", "HEAD")).strip()

    async def push(self, branch: str) -> None:
        await self.git("push", "--quiet", "origin", f"{branch}:refs/heads/{branch}")


    def _remove(self, rel: str) -> None:
        """Delete a path the run created, then any folders it leaves empty (git cannot see those)."""
        path = self.path / rel.rstrip("/")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        parent = path.parent
        while parent != self.path and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
