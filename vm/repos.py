"""An owner's repositories on the worker: which origin a named checkout keeps, and moving the
checkout from before REPOS into the named layout.

Before REPOS, each owner had one checkout, of the worker's REPO_URL: `WORKSPACE_DIR/<number>`,
its git dir `WORKSPACE_DIR/.repos/<number>` (vm/sandbox.py has the layout). A repository a
prompt names lives at `<number>-<name>` in both places. When the relay starts naming repositories,
the first prompt that names one whose URL is the one the old checkout was cloned from takes that
checkout over: both folders are renamed, so nothing is cloned again and nothing uncommitted is
lost, and the owner's Claude session moves with them (Sandbox.move_sessions).
"""

from __future__ import annotations

import logging
import os

from vm.settings import github_repo_from_url
from vm.workspace import GitError, Workspace

logger = logging.getLogger(__name__)


def same_repository(a: str, b: str) -> bool:
    """Two URLs of one repository: the same text, or the same owner/name on GitHub (https and
    ssh forms, with or without `.git`; GitHub's names are case-insensitive)."""
    on_github = github_repo_from_url(a).lower()
    return a == b or (on_github != "" and on_github == github_repo_from_url(b).lower())


async def adopt_legacy(legacy: Workspace, named: Workspace) -> bool:
    """Move `legacy`'s checkout and git dir to `named`'s places if `named` has no git dir yet and
    `legacy` was cloned from `named`'s repository. True if it moved.

    Only while nothing of the agent's runs and the owner holds nothing in the legacy checkout
    (no run, no approval: the owner's one run lifecycle is in `named` now). Renames on one
    volume; the checkout goes first, so a crash between the two renames is finished next time
    (the git dir still waits at its old place, and nothing is at the new one)."""
    if (named.git_dir / "HEAD").exists() or not (legacy.git_dir / "HEAD").is_file():
        return False
    if not same_repository(await legacy.origin_url(), named.repo_url):
        return False
    if legacy.path.is_dir() and not legacy.path.is_symlink():
        if named.path.is_dir() and not named.path.is_symlink():
            try:
                named.path.rmdir()  # made empty by Sandbox.prepare; anything in it stays
            except OSError:
                logger.warning("%s is not empty: the old checkout stays where it is", named.path.name)
                return False
        os.rename(legacy.path, named.path)
    elif not (named.path.is_dir() and any(named.path.iterdir())):
        return False  # the old checkout was removed by hand: the named one is cloned afresh
    os.rename(legacy.git_dir, named.git_dir)
    named.write_git_file()
    return True


async def keep_origin(workspace: Workspace, name: str) -> None:
    """A named checkout pushes to the repository it was cloned from. The same repository under
    another URL (GitHub's https and ssh forms) becomes its origin; another repository under the
    same name is refused, because pushing there would carry this one's history along."""
    current = await workspace.origin_url()
    if current == workspace.repo_url:
        return
    if same_repository(current, workspace.repo_url):
        await workspace.set_origin(workspace.repo_url)
        return
    # Both folders: the git dir alone records the origin, so deleting the checkout is not enough.
    raise GitError(
        f"your checkout of {name} was cloned from {current}, not {workspace.repo_url}: give the new "
        f"repository another name in REPOS, or delete {workspace.path} and {workspace.git_dir} on the VM "
        "(anything uncommitted there goes too)"
    )
