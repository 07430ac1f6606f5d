"""A bare git repository on disk, standing in for the project's `origin`."""

from __future__ import annotations

import subprocess
from pathlib import Path

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
