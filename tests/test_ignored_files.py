"""Reject and ignored files (vm/workspace.py `_keep_ignored`): what a snapshot keeps comes back
exactly, and what a git tree cannot hold is named before the owner decides, never counted as
kept, and left alone by reject."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from fakes.origin import git, make_origin
from vm.workspace import Workspace

pytestmark = pytest.mark.anyio


async def checkout(tmp: Path, gitignore: str) -> Workspace:
    origin = make_origin(tmp / "git", {"README.md": "# demo\n", ".gitignore": gitignore})
    workspace = Workspace(tmp / "checkout", tmp / "repo.git", str(origin))
    await workspace.ensure_clone(tmp / "legacy")
    return workspace


def nested_repository(path: Path, *, commit: bool = True) -> None:
    path.mkdir(parents=True)
    (path / "code.py").write_text("precious = 1\n")
    git(path, "init", "--quiet")
    if commit:
        git(path, "add", "--all")
        git(path, "commit", "--quiet", "-m", "vendored")


async def test_an_ignored_folder_holding_a_repository_is_named_and_reject_leaves_it(tmp_path: Path) -> None:
    workspace = await checkout(tmp_path, "vendor/\n.env\n")
    lib = workspace.path / "vendor" / "lib"
    nested_repository(lib)
    (lib / "local-notes.txt").write_text("uncommitted\n")
    (workspace.path / ".env").write_text("SECRET=1\n")

    snap = await workspace.snapshot()
    # A tree would hold vendor/lib as a bare gitlink, without its files or history: named.
    assert snap.uncovered == ("vendor/",)

    # The run changes the code, the repository's copy and the secrets.
    (workspace.path / "README.md").write_text("changed\n")
    (workspace.path / ".env").write_text("SECRET=2\n")
    (lib / "code.py").write_text("precious = 2\n")
    (lib / "new.py").write_text("x = 1\n")
    assert await workspace.restore(snap) == []

    assert (workspace.path / "README.md").read_text() == "# demo\n"
    assert (workspace.path / ".env").read_text() == "SECRET=1\n"
    # Left as the run left it, as the owner was told; nothing of it deleted.
    assert (lib / "code.py").read_text() == "precious = 2\n" and (lib / "new.py").exists()
    assert (lib / "local-notes.txt").read_text() == "uncommitted\n"
    assert git(lib, "log", "--format=%s") == "vendored\n"


async def test_what_git_refuses_to_keep_is_named_and_the_rest_comes_back(tmp_path: Path) -> None:
    workspace = await checkout(tmp_path, "build/\ncache/\n*.log\n")
    (workspace.path / "build" / ".GIT").mkdir(parents=True)
    (workspace.path / "build" / ".GIT" / "x").write_text("a name git refuses\n")
    nested_repository(workspace.path / "cache" / "empty", commit=False)  # git cannot add it at all
    (workspace.path / "[ab].log").write_text("a name, not a pattern\n")
    (workspace.path / "a.log").write_text("a\n")

    snap = await workspace.snapshot()  # it used to fail: "git add failed", and every run with it
    assert snap.uncovered == ("build/", "cache/")

    (workspace.path / "[ab].log").unlink()
    (workspace.path / "a.log").write_text("changed\n")
    (workspace.path / "b.log").write_text("new\n")
    assert await workspace.restore(snap) == []

    assert (workspace.path / "[ab].log").read_text() == "a name, not a pattern\n"
    assert (workspace.path / "a.log").read_text() == "a\n" and not (workspace.path / "b.log").exists()
    assert (workspace.path / "build" / ".GIT" / "x").read_text() == "a name git refuses\n"
    assert (workspace.path / "cache" / "empty" / "code.py").read_text() == "precious = 1\n"


async def test_a_snapshot_from_before_keeps_reject_off_a_repository_it_holds_as_a_gitlink(tmp_path: Path) -> None:
    """An approval pending across the upgrade: its snapshot kept vendor/ with a bare gitlink."""
    workspace = await checkout(tmp_path, "vendor/\n")
    lib = workspace.path / "vendor" / "lib"
    nested_repository(lib)
    index = {"GIT_INDEX_FILE": str(tmp_path / "old-index")}
    await workspace.git("add", "--force", "vendor/", env=index)  # what the snapshot used to do
    old = replace(await workspace.snapshot(), ignored_tree=(await workspace.git("write-tree", env=index)).strip())
    old = replace(old, uncovered=())
    assert await workspace.restore(old) == []
    assert (lib / "code.py").read_text() == "precious = 1\n" and git(lib, "log", "--format=%s") == "vendored\n"
