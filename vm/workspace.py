"""The owner's git checkout: clone, snapshot before a run, diff, roll back, commit and push.

The git dir lives outside the checkout (WORKSPACE_DIR/.repos/<number>) and belongs to the worker:
the agent, which owns the checkout, could otherwise plant configuration (`core.fsmonitor`, a
filter driver) that runs when the worker calls git, or rewrite objects behind the diff. Every
git call here names the git dir and the work tree explicitly and reads no system or global
configuration; the checkout's own `.git` file only serves the agent's `git log` and `git diff`.

A snapshot is the *whole working state* (tracked and untracked files, as `git add -A` sees
them) written as a tree object through a throwaway index, plus HEAD and the list of ignored
paths. Restoring one puts back exactly what was there, untracked files included. What the
owner is shown is the difference between HEAD's tree and the working tree after the run, and
`approve` commits exactly that tree, whatever the checkout holds by then.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio

from vm.killable import run_killable

GIT_IDENTITY = ("-c", "user.name=textslash", "-c", "user.email=textslash@users.noreply.github.com")
# No hooks and no fsmonitor, whatever a config says; and no configuration but the repository's.
GIT_HARDENING = ("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false")
GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_ATTR_NOSYSTEM": "1",
    "GIT_NO_REPLACE_OBJECTS": "1",
    "GIT_TERMINAL_PROMPT": "0",
}
# Only for the calls that reach origin (clone, push): git sets no time limit of its own, and a
# stalled connection would hold the owner's run or approve for good. curl gives up on a transfer
# slower than 1,000 bytes a second for 30 s; ssh on a server that stops answering for a minute,
# and it never asks for a password. A drip-fed transfer gets past both: the deadlines below
# (settings PUSH_TIMEOUT_MS and CLONE_TIMEOUT_MS) end it, killing git and its helpers.
GIT_NETWORK = (
    "-c",
    "http.lowSpeedLimit=1000",
    "-c",
    "http.lowSpeedTime=30",
    "-c",
    "core.sshCommand=ssh -o BatchMode=yes -o ConnectTimeout=30 -o ServerAliveInterval=15 -o ServerAliveCountMax=4",
)
# A push is one approved change, seconds on any link: 3 min is generous and still lets the
# owner try again the same minute. A clone fetches the whole history, so 10 min.
PUSH_TIMEOUT_S = 180.0
CLONE_TIMEOUT_S = 600.0
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
BIG_FILE = "1m"  # git shows files above this as binary: a huge file must not fill the memory
HANDED_OVER = "textslash-handed-over"  # in the git dir: the agent was given the checkout's files
# The owner's photos and files for the agent (vm/attachments.py): ignored through the git dir's
# info/exclude (root's), and left out of every snapshot, diff and reject by pathspec as well,
# which no .gitignore of the agent's can undo. Never in a diff; never kept in a snapshot's tree
# of ignored files (a 16 MB PDF would bloat every snapshot and crowd out the owner's .env);
# never removed or "restored" by reject: it is the owner's input, which a follow-up prompt may
# still need, not the run's work. The worker expires its files itself.
ATTACHMENTS_DIR = ".textslash-attachments"
NOT_ATTACHMENTS = f":(top,exclude){ATTACHMENTS_DIR}"

NO_REPOSITORY = (
    "no repository to work on: this prompt names none and the VM has no REPO_URL "
    "(set REPOS on the relay, or REPO_URL on the worker)"
)
# Only the worker writes the git dir; with isolation the owner's group may read it.
SHARED = "0640"


async def _drop_special_files(root: Path) -> None:
    """Pipes, sockets and devices go. GNU find walks any depth without recursion or one
    descriptor per level, and never follows a symlink (Python's fwalk recurses, and a tree a
    thousand folders deep stops it)."""
    result = await anyio.run_process(
        [
            "find",
            str(root),
            "-xdev",
            "(",
            "-type",
            "p",
            "-o",
            "-type",
            "s",
            "-o",
            "-type",
            "b",
            "-o",
            "-type",
            "c",
            ")",
            "-delete",
        ],
        check=False,
    )
    if result.returncode != 0:
        raise GitError("could not read the checkout (find failed)")


IGNORED_CAP = (20 * 1024 * 1024, 5000)  # bytes and files of ignored content a snapshot keeps


def _within_cap(root: Path, entries: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split ignored entries into those whose files fit in IGNORED_CAP together, and the rest."""
    budget_bytes, budget_files = IGNORED_CAP
    covered, uncovered = [], []
    for entry in entries:
        size, count = _measure(root / entry.rstrip("/"), budget_bytes, budget_files)
        if size <= budget_bytes and count <= budget_files:
            covered.append(entry)
            budget_bytes, budget_files = budget_bytes - size, budget_files - count
        else:
            uncovered.append(entry)
    return tuple(covered), tuple(uncovered)


def _measure(path: Path, max_bytes: int, max_files: int) -> tuple[int, int]:
    """Bytes and files below `path` (no symlink followed), stopping once past either limit."""
    size = count = 0
    stack = [path]
    while stack and size <= max_bytes and count <= max_files:
        current = stack.pop()
        try:
            st = current.lstat()
            if stat.S_ISDIR(st.st_mode):
                stack.extend(Path(e.path) for e in os.scandir(current))
            else:
                size, count = size + st.st_size, count + 1
        except OSError:
            continue
    return size, count


def _not_all_kept(root: Path, entries: tuple[str, ...], kept: set[str]) -> tuple[str, ...]:
    """The entries with a file (or link) below them that is not in `kept`."""
    return tuple(entry for entry in entries if any(f not in kept for f in _files_below(root, [entry])))


def _files_below(root: Path, entries: list[str]) -> list[str]:
    """Every file (or link) below the given entries, relative to `root`, without recursion."""
    found = []
    stack = [root / e.rstrip("/") for e in entries]
    while stack:
        current = stack.pop()
        try:
            if current.is_dir() and not current.is_symlink():
                stack.extend(Path(e.path) for e in os.scandir(current))
            elif current.exists() or current.is_symlink():
                found.append(str(current.relative_to(root)))
        except OSError:
            continue
    return found


def _set_aside(legacy: Path, target: Path) -> str:
    """Move a legacy `.git` to root's own folder; returns the branch it had checked out."""
    branch = _legacy_branch(legacy)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(target.parent, 0o700)
    os.replace(legacy, target)
    return branch


def _legacy_branch(legacy: Path) -> str:
    """The branch a legacy `.git` had checked out, read as plain text and checked, never
    through git (which would obey whatever that folder holds)."""
    try:
        fd = os.open(legacy / "HEAD", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a pipe must not block
        with os.fdopen(fd) as head:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return "main"
            ref = head.read(200).strip()
    except (OSError, UnicodeDecodeError):
        return "main"
    branch = ref.removeprefix("ref: refs/heads/")
    return branch if ref.startswith("ref: refs/heads/") and re.fullmatch(r"[\w./-]{1,100}", branch) else "main"


def remove_tree(path: Path) -> None:
    """Remove a folder the agent may have made: GNU `rm -rf` handles any depth and follows no
    symlink. (shutil.rmtree recurses, one frame and one descriptor a level: a folder a few
    thousand deep stops it, and the owner's every later run, reject and approve with it.)"""
    subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], capture_output=True, check=False)


def write_new_file(path: Path, text: str, mode: int = 0o600) -> None:
    """Replace `path` with a new file, never writing through what stood there: in a folder the
    agent owns, a symlink or a hard link it left could point at any file of root's."""
    if path.is_dir() and not path.is_symlink():
        remove_tree(path)
    else:
        path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    os.fchmod(fd, mode)  # whatever the umask
    with os.fdopen(fd, "w") as out:
        out.write(text)


def _exclude_attachments(git_dir: Path) -> None:
    """Have git ignore ATTACHMENTS_DIR, in the git dir's own exclude file: root's, so the agent
    cannot change it, and readable by the agent's git (a new file takes the folder's group)."""
    exclude, line = git_dir / "info" / "exclude", f"/{ATTACHMENTS_DIR}/"
    try:
        current = exclude.read_text()
    except FileNotFoundError:
        current = ""
    if line in current.splitlines():
        return
    if not exclude.parent.is_dir():
        exclude.parent.mkdir()
        os.chmod(exclude.parent, 0o2750 if (git_dir.stat().st_mode & stat.S_ISGID) else 0o750)
    if current and not current.endswith("\n"):
        current += "\n"
    write_new_file(exclude, f"{current}{line}\n", 0o640)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


class GitError(RuntimeError):
    """A git command failed; the message is safe to show the owner (no secrets)."""


@dataclass(frozen=True)
class Snapshot:
    head: str
    tree: str
    ignored: tuple[str, ...]  # ignored paths as git lists them (a folder stands for all below it)
    ignored_tree: str = ""  # the contents of the ignored paths small enough to keep
    # Ignored paths too big to keep, or holding what a tree cannot (a repository of its own):
    # reject cannot bring them back, and leaves them as they are.
    uncovered: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "head": self.head,
            "tree": self.tree,
            "ignored": list(self.ignored),
            "ignored_tree": self.ignored_tree,
            "uncovered": list(self.uncovered),
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Snapshot:
        ignored, uncovered = data.get("ignored") or [], data.get("uncovered") or []
        assert isinstance(ignored, list) and isinstance(uncovered, list)
        return cls(
            head=str(data["head"]),
            tree=str(data["tree"]),
            ignored=tuple(str(p) for p in ignored),
            ignored_tree=str(data.get("ignored_tree") or ""),
            uncovered=tuple(str(p) for p in uncovered),
        )


@dataclass(frozen=True)
class FileChange:
    path: str
    added: int
    removed: int
    binary: bool = False  # content not shown: a NUL byte in it, or bigger than BIG_FILE


@dataclass(frozen=True)
class Changes:
    """What the owner is shown: HEAD -> `tree`, the working state the diff was made of."""

    files: tuple[FileChange, ...]
    diff: str
    tree: str = ""
    count: int = -1  # files changed in all (`files` may list fewer); -1: as many as listed
    diff_cut: bool = False  # the diff was longer than could be shown

    def __bool__(self) -> bool:
        return bool(self.files)

    @property
    def file_count(self) -> int:
        return self.count if self.count >= 0 else len(self.files)


class Workspace:
    """One checkout of `repo_url` at `path`, with its git dir at `git_dir`."""

    def __init__(
        self,
        path: Path,
        git_dir: Path,
        repo_url: str,
        *,
        github_token: str = "",
        push_timeout_s: float = PUSH_TIMEOUT_S,
        clone_timeout_s: float = CLONE_TIMEOUT_S,
    ) -> None:
        self.path = path
        self.git_dir = git_dir
        self.repo_url = repo_url
        self._token = github_token
        self._push_timeout_s = push_timeout_s
        self._clone_timeout_s = clone_timeout_s

    async def git(
        self,
        *args: str,
        check: bool = True,
        env: dict[str, str] | None = None,
        auth: bool = False,
        cwd: Path | None = None,
        stdin: str | None = None,
        deadline_s: float | None = None,
    ) -> str:
        """Run git on this checkout. Only `auth=True` calls (clone, push) reach origin: they
        carry the token and the network limits. Past `deadline_s`, git and everything it
        started are killed and a GitError says so."""
        full_env = self._env(env, auth=auth, repo=cwd is None)
        network = GIT_NETWORK if auth else ()
        try:
            with anyio.fail_after(deadline_s):
                result = await run_killable(
                    ["git", *GIT_IDENTITY, *GIT_HARDENING, *network, *args],
                    cwd=cwd or self.path,
                    env=full_env,
                    input=stdin.encode() if stdin else None,
                )
        except TimeoutError:
            raise GitError(f"git {args[0]} got no answer from origin within {_duration(deadline_s or 0)}") from None
        if check and result.returncode != 0:
            message = (result.stderr or result.stdout).decode(errors="replace").strip().splitlines()
            detail = message[-1] if message else f"exit {result.returncode}"
            raise GitError(f"git {args[0]} failed: {self._redact(detail)}")
        return result.stdout.decode(errors="replace")

    def _env(self, extra: dict[str, str] | None, *, auth: bool = False, repo: bool = True) -> dict[str, str]:
        where = {"GIT_DIR": str(self.git_dir), "GIT_WORK_TREE": str(self.path)} if repo else {}
        return {**os.environ, **GIT_ENV, **where, **(self._auth_env() if auth else {}), **(extra or {})}

    async def compare(self, *args: str, limit: int = 1_000_000) -> tuple[str, bool]:
        """`git diff` of two trees in the bare repository, its output cut at `limit` characters.

        Bare, because the work tree's `.gitattributes` (the agent's) would otherwise decide what
        counts as binary, or fake the line counts; cut while reading, because a diff of a huge
        file would otherwise fill the worker's memory before any cut could be made. Returns the
        text, cut after its last whole line (or entry) when the cap was hit, and whether it was.
        """
        chunks: list[bytes] = []
        size = 0

        def keep(chunk: bytes) -> bool:
            nonlocal size
            chunks.append(chunk)
            size += len(chunk)
            return size < limit

        await self._stream_diff(args, keep)
        out = b"".join(chunks)
        if size < limit:
            return out.decode(errors="replace"), False
        separator = b"\0" if "-z" in args else b"\n"
        return out[: out.rfind(separator, 0, limit) + 1].decode(errors="replace"), True

    def _auth_env(self) -> dict[str, str]:
        """The token travels in git's environment-only config, never in argv, URLs or logs; and
        only to this repository's host over https (`http.<url>.extraHeader`): whatever else git
        might be sent to, nothing there gets it. Which repositories have a token at all is the
        worker's choice (Settings.token_for)."""
        if not self._token or not self.repo_url.startswith("https://"):
            return {}
        basic = base64.b64encode(f"x-access-token:{self._token}".encode()).decode()
        return {
            "GIT_CONFIG_COUNT": "1",
            "GIT_CONFIG_KEY_0": f"http.https://{urlsplit(self.repo_url).netloc}/.extraHeader",
            "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}",
        }

    def _redact(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text

    # --- setting up -----------------------------------------------------------------------

    async def ensure_clone(self, set_aside: Path) -> bool:
        """Make sure the git dir and the checkout exist. True until `mark_handed_over`: files were
        written that the agent must be given (a crash before that hands them over next time).

        A checkout from before the git dir moved out keeps its working files, but its `.git`
        (which an agent could write, and so may hold hooks, config or alternates of its
        choosing) is never used: it goes to `set_aside`, root's alone, and the git dir is
        cloned afresh, its HEAD on the same branch if origin has it.
        """
        if not self.cloned:
            legacy, branch = self.path / ".git", ""
            if legacy.is_dir() and not legacy.is_symlink():
                branch = _set_aside(legacy, set_aside / f"{self.path.name}-{time.time_ns()}.git")
            await self._clone()
            if branch:
                await self._check_out_branch(branch)
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.git_dir / "index").exists() and await self.head():
            if any(p.name != ".git" for p in self.path.iterdir()):
                await self.git("read-tree", "HEAD")  # files already there stay, shown as changes
            else:
                await self.git("reset", "--quiet", "--hard", "HEAD")
        self.write_git_file()
        _exclude_attachments(self.git_dir)
        return not (self.git_dir / HANDED_OVER).exists()

    @property
    def cloned(self) -> bool:
        return (self.git_dir / "HEAD").is_file()

    def mark_handed_over(self) -> None:
        write_new_file(self.git_dir / HANDED_OVER, "")

    async def _check_out_branch(self, branch: str) -> None:
        """HEAD to origin's copy of `branch` (an approved branch a legacy checkout was on),
        leaving the working files alone: what differs is shown with the next change."""
        remote = f"refs/remotes/origin/{branch}"
        if (await self.git("rev-parse", "--verify", "--quiet", remote, check=False)).strip():
            await self.check_out_commit(remote, branch)
        else:
            await self.git("read-tree", "HEAD")

    def write_git_file(self) -> None:
        """Point the agent's git at the worker's git dir (the agent may have removed the file)."""
        write_new_file(self.path / ".git", f"gitdir: {self.git_dir}\n")  # a folder there goes too

    async def origin_url(self) -> str:
        """The URL the git dir pushes to (its config is the worker's alone: see _write_config)."""
        config = ("config", "--file", str(self.git_dir / "config"), "--get", "remote.origin.url")
        return (await self.git(*config, check=False, cwd=self.git_dir)).strip()

    async def set_origin(self, url: str) -> None:
        await self.git("remote", "set-url", "origin", url, cwd=self.git_dir, env={"GIT_DIR": str(self.git_dir)})

    async def _clone(self) -> None:
        if not self.repo_url:
            raise GitError(NO_REPOSITORY)
        self.git_dir.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=".clone-", dir=self.git_dir.parent))
        try:
            await self.git(
                "clone",
                "--quiet",
                "--no-checkout",
                f"--separate-git-dir={partial / 'git'}",
                self.repo_url,
                str(partial / "tree"),
                auth=True,
                cwd=partial,
                deadline_s=self._clone_timeout_s,
            )
            await self._write_config(partial / "git")
            _exclude_attachments(partial / "git")
            os.replace(partial / "git", self.git_dir)  # a half-finished clone never looks like one
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    async def _write_config(self, git_dir: Path) -> None:
        """A config of ours alone, the remote included, written before the git dir is published."""
        write_new_file(
            git_dir / "config",
            "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n"
            f"\tlogallrefupdates = true\n\tsharedRepository = {SHARED}\n",
        )
        await self.git("remote", "add", "origin", self.repo_url, cwd=git_dir, env={"GIT_DIR": str(git_dir)})

    # --- reading --------------------------------------------------------------------------

    async def head(self) -> str:
        return (await self.git("rev-parse", "--verify", "--quiet", "HEAD", check=False)).strip()

    async def default_branch(self) -> str:
        ref = (await self.git("symbolic-ref", "--quiet", "--short", "refs/remotes/origin/HEAD", check=False)).strip()
        return ref.removeprefix("origin/") or "main"

    async def snapshot(self) -> Snapshot:
        # Three independent git calls, run side by side: this is on every run's path.
        results: dict[str, Any] = {}

        async def keep(key: str, call: Awaitable[Any]) -> None:
            results[key] = await call

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(keep, "head", self.head())
                tg.start_soon(keep, "tree", self.working_tree())
                tg.start_soon(keep, "ignored", self._ignored())
        except* GitError as group:
            raise group.exceptions[0] from None
        ignored = tuple(results["ignored"])
        ignored_tree, uncovered = await self._keep_ignored(ignored)
        return Snapshot(results["head"], results["tree"], ignored, ignored_tree, uncovered)

    async def _keep_ignored(self, ignored: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
        """Ignored files (`.env`, `build/`) are no part of the diff, but a run may delete or
        change them, and reject must put them back: their contents go into a tree of their own,
        as far as IGNORED_CAP allows; the rest (a `node_modules/`) is named, not kept.

        A tree cannot hold everything a folder can. A repository of its own (`vendor/lib/.git`,
        an editable install) is added as a bare gitlink, without its files or its history, which
        git never puts in a tree; a name git refuses (`.GIT`) or a repository without a commit is
        not added at all. Such an entry is named too, rather than kept in part: the owner is
        warned before deciding, and reject leaves it as the run left it (never deleting what the
        tree lacks). What was kept is read back from the index, so whatever git's reason for
        leaving a file out, the entry holding it is named, never counted as covered."""
        covered, uncovered = await anyio.to_thread.run_sync(_within_cap, self.path, ignored)
        if not covered:
            return "", uncovered
        with tempfile.TemporaryDirectory() as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index"), "GIT_LITERAL_PATHSPECS": "1"}
            paths = ("--pathspec-from-file=-", "--pathspec-file-nul")
            # --ignore-errors: one file git refuses must not keep the others out (nor fail the run).
            await self.git("add", "--force", "--ignore-errors", *paths, env=env, stdin="\0".join(covered), check=False)
            staged = await self.git("ls-files", "--stage", "-z", env=env)
            # A gitlink (mode 160000) stands for a repository: none of its files are in the tree.
            kept = {e.partition("\t")[2] for e in staged.split("\0") if e and not e.startswith("160000")}
            partial = await anyio.to_thread.run_sync(_not_all_kept, self.path, covered, kept)
            if partial:
                drop = ("rm", "--cached", "-r", "--quiet", "--force", "--ignore-unmatch", *paths)
                await self.git(*drop, env=env, stdin="\0".join(partial))
            return (await self.git("write-tree", env=env)).strip(), uncovered + partial

    async def working_tree(self) -> str:
        """The whole working state as a tree object, through a throwaway index that starts from
        HEAD, so a tracked file stays in the tree even where a .gitignore pattern matches it.

        Pipes, sockets and devices cannot be committed and make `git add` fail: they go first
        (the agent has no process left by now, see Sandbox.quiesce)."""
        await _drop_special_files(self.path)
        with tempfile.TemporaryDirectory() as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            await self.git("read-tree", "HEAD" if await self.head() else "--empty", env=env)
            await self.git("add", "--all", env=env)
            if await anyio.to_thread.run_sync(os.path.lexists, self.path / ATTACHMENTS_DIR):
                # Ignored through info/exclude; but a .gitignore of the agent's comes first and
                # could un-ignore it. (An exclude pathspec would do it in the `add`, but git
                # then fails on the ignored folder it names.)
                drop = ("rm", "--cached", "-r", "--quiet", "--ignore-unmatch", "--", ATTACHMENTS_DIR)
                await self.git(*drop, env=env)
            return (await self.git("write-tree", env=env)).strip()

    async def _ignored(self) -> list[str]:
        out = await self.git("ls-files", "--others", "--ignored", "--exclude-standard", "--directory", "-z")
        return [p for p in out.split("\0") if p and p.split("/", 1)[0] != ATTACHMENTS_DIR]

    async def changes_since(self, snap: Snapshot, *, max_diff_chars: int = 100_000) -> Changes:
        """Nothing if the run left the working state as it found it; else HEAD -> now."""
        now = await self.working_tree()
        if now == snap.tree:
            return Changes((), "", now)
        base = f"{snap.head}^{{tree}}" if snap.head else EMPTY_TREE
        flags = ("--no-renames", "--no-ext-diff", "--no-textconv", "--no-color")
        numstat, files_cut = await self.compare("--numstat", "-z", *flags, base, now, limit=20_000_000)
        files = []
        for entry in numstat.split("\0"):
            added, _, rest = entry.partition("\t")
            removed, _, path = rest.partition("\t")
            if not path:
                continue
            binary = added == "-"  # counted as one changed line, and named as not shown, never hidden
            files.append(FileChange(path, 1 if binary else int(added), 0 if binary else int(removed), binary))
        count = await self._count_changed(base, now) if files_cut else len(files)
        diff, diff_cut = await self.compare(*flags, base, now, limit=max_diff_chars)
        return Changes(tuple(files), diff, now, count=count, diff_cut=diff_cut)

    async def _count_changed(self, base: str, now: str) -> int:
        """How many files changed in all, when there were too many to list: counted as git
        streams them, never held."""
        count = 0

        def tally(chunk: bytes) -> bool:
            nonlocal count
            count += chunk.count(b"\0")
            return True

        await self._stream_diff(("--name-only", "-z", "--no-renames", base, now), tally)
        return count

    async def _stream_diff(self, args: tuple[str, ...], consume: Callable[[bytes], bool]) -> None:
        """`git diff` in the bare repository, its output handed to `consume` as it comes; git is
        ended as soon as `consume` says it has had enough."""
        command = ["git", "--bare", "-c", f"core.bigFileThreshold={BIG_FILE}", *GIT_HARDENING, "diff", *args]
        env = {**self._env(None, repo=False), "GIT_DIR": str(self.git_dir)}
        async with await anyio.open_process(command, cwd=self.git_dir, env=env, stderr=None) as process:
            assert process.stdout is not None
            async for chunk in process.stdout:
                if not consume(chunk):
                    process.kill()
                    break
            code = await process.wait()
        if code not in (0, -9):
            raise GitError(f"git diff failed (exit {code})")

    async def paths_differing(self, tree: str) -> list[str]:
        """Paths where the working state differs from `tree` (what an approve left out)."""
        now = await self.working_tree()
        if now == tree:
            return []
        out, _ = await self.compare("--name-only", "--no-renames", "-z", tree, now, limit=10_000_000)
        return [p for p in out.split("\0") if p]

    # --- changing -------------------------------------------------------------------------

    async def restore(self, snap: Snapshot) -> list[str]:
        """Put the checkout back exactly as the snapshot found it. Whatever the run made that
        cannot be written or deleted gets its permissions fixed and a second try; the paths
        that still cannot be removed are returned (a file made immutable, a mount)."""
        try:
            await self._restore_files(snap)
        except GitError:
            await self._fix_permissions()
            await self._restore_files(snap)
        stuck = []
        keep = set((await self.git("ls-tree", "-r", "-z", "--name-only", snap.tree)).split("\0"))
        untracked = (await self.git("ls-files", "--others", "--exclude-standard", "-z", "--", NOT_ATTACHMENTS)).split(
            "\0"
        )
        for rel in [p for p in untracked if p and p not in keep]:
            if not await self._remove(rel):
                stuck.append(rel)
        for rel in sorted(set(await self._ignored()) - set(snap.ignored)):
            if not await self._remove(rel):
                stuck.append(rel)
        if snap.ignored_tree:
            stuck += await self._restore_ignored(snap)
        return stuck

    async def _restore_files(self, snap: Snapshot) -> None:
        if snap.head:
            await self.git("reset", "--quiet", "--hard", snap.head)
        await self.git("read-tree", snap.tree)
        await self.git("checkout-index", "--all", "--force")
        if snap.head:
            await self.git("reset", "--quiet", snap.head)  # index back to HEAD; files stay as restored

    async def _fix_permissions(self) -> None:
        """Make every folder and file of the checkout writable by its owner again (a run may
        leave a read-only folder behind). Links are never followed, and a file with more than
        one link is left alone: it may be someone else's file."""
        await anyio.run_process(
            [
                "find",
                str(self.path),
                "-xdev",
                "(",
                "-type",
                "d",
                "-o",
                "(",
                "-type",
                "f",
                "-links",
                "1",
                ")",
                ")",
                "-exec",
                "chmod",
                "u+rwX",
                "{}",
                "+",
            ],
            check=False,
        )

    async def _restore_ignored(self, snap: Snapshot) -> list[str]:
        """The kept ignored files back as they were, and what the run added among them gone."""
        with tempfile.TemporaryDirectory() as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            await self.git("read-tree", snap.ignored_tree, env=env)
            await self.git("checkout-index", "--all", "--force", env=env)
        kept, repositories = set(), []
        for entry in (await self.git("ls-tree", "-r", "-z", snap.ignored_tree)).split("\0"):
            meta, _, path = entry.partition("\t")
            kept.add(path)
            if meta.startswith("160000"):
                repositories.append(path + "/")
        # A gitlink is in the trees of snapshots taken before such folders were named (an
        # approval pending across an upgrade): what is below it was never kept, so never removed.
        roots = [p for p in snap.ignored if p not in snap.uncovered]
        added = await anyio.to_thread.run_sync(_files_below, self.path, roots)
        ours = [rel for rel in added if rel not in kept and not rel.startswith(tuple(repositories))]
        return [rel for rel in ours if not await self._remove(rel)]

    async def commit_tree(self, tree: str, parent: str, message: str) -> str:
        """A commit of exactly `tree` on `parent` (no index, no working files involved)."""
        # The message (the owner's prompt) on stdin: argv is readable by every process.
        return (
            await self.git("commit-tree", tree, *(("-p", parent) if parent else ()), "-F", "-", stdin=message)
        ).strip()

    async def push(self, commit: str, branch: str) -> None:
        await self.git(
            "push", "--quiet", "origin", f"{commit}:refs/heads/{branch}", auth=True, deadline_s=self._push_timeout_s
        )

    async def check_out_commit(self, commit: str, branch: str) -> None:
        """Move HEAD to `branch` at `commit` without touching a working file: a follow-up
        prompt builds on the approved work, and anything left out stays as a change."""
        await self.git("update-ref", f"refs/heads/{branch}", commit)
        await self.git("symbolic-ref", "HEAD", f"refs/heads/{branch}")
        await self.git("read-tree", commit)

    async def _remove(self, rel: str) -> bool:  # only while no agent process lives (Sandbox.quiesce)
        """Delete a path the run created, then any folders it leaves empty (git cannot see those);
        False if it is still there after a second try with permissions fixed. `rm -rf` removes
        a tree of any depth (shutil.rmtree recurses) and follows no symlink."""
        path = self.path / rel.rstrip("/")
        for attempt in range(2):
            if attempt:
                await self._fix_permissions()
            await anyio.run_process(["rm", "-rf", "--one-file-system", "--", str(path)], check=False)
            if not await anyio.to_thread.run_sync(os.path.lexists, path):
                break
        await anyio.to_thread.run_sync(self._remove_empty_parents, path)
        return not await anyio.to_thread.run_sync(os.path.lexists, path)

    def _remove_empty_parents(self, path: Path) -> None:
        parent = path.parent
        try:
            while parent != self.path and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
        except OSError:  # an empty folder left behind changes nothing git shows
            pass
