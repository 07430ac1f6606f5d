"""Each owner's agent as its own unprivileged OS user: the worker keeps the secrets and the git.

The worker runs as root (in its own Machine, with a trimmed capability set; see vm/Dockerfile).
For every owner it allocates a user `tsagent<uid>` (uid from AGENT_UID_BASE up, remembered on
the volume so files keep their owner across boots) and starts Claude Code through
`vm/agent-exec`, which drops to that user, its own group, no supplementary groups, no
capabilities and no way to regain any. What that user owns, and nothing else of the worker's:

    WORKSPACE_DIR/<number>-<repo>/        the checkout of a named repository (0700), with a
                                          `.git` file naming its git dir
    WORKSPACE_DIR/<number>/               the checkout of the worker's own REPO_URL, for a prompt
                                          that names no repository (and from before REPOS)
    WORKSPACE_DIR/.homes/<number>/        HOME and TMPDIR (0700), one for all the owner's checkouts
    CLAUDE_CONFIG_DIR/<number>/           Claude Code's sessions (0700), kept per checkout inside
    WORKSPACE_DIR/.repos/<number>-<repo>/ the git dirs (and `.repos/<number>/`): root's, readable
                                          by the owner's group only

A number is digits and a repository's name starts with a letter (common/protocol.REPO_NAME), so
no two owners' or repositories' folders can ever be the same. The roots above are 0711
(reachable, not listable); the worker's own state and images are 0700.
With AGENT_ISOLATION=off (a developer's machine) the layout is the same, but everything runs as
the worker's user, which the agent can then read all of.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio

from common.files import write_durably
from common.protocol import REPO_NAME
from vm.reaper import kill_pids, marked_pids, our_child, parent_of, signal_all, stopped_child, user_pids
from vm.workspace import write_new_file

logger = logging.getLogger(__name__)

AGENT_UID_BASE = 20000
EXECUTE_ONLY = 0o711  # Claude Code's binary, for agent users (see Sandbox._check_reachable)
FLY_API_SOCKET = Path("/.fly/api")
AGENT_EXEC = Path(__file__).with_name("agent-exec")
# The agent's environment: what a shell, Claude Code and the model's credential need. Anything
# else the worker was started with (WORKER_TOKEN, GITHUB_TOKEN, a developer's TWILIO_* or cloud
# keys) is dropped by `scrub_environment` at boot, so nothing the worker starts inherits it.
AGENT_ENV_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TERM",
        "COLORTERM",
        "NO_COLOR",
        "FORCE_COLOR",
        "SHELL",
        "USER",
        "LOGNAME",
        "TMPDIR",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "NODE_EXTRA_CA_CERTS",
        "REQUESTS_CA_BUNDLE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "MAX_THINKING_TOKENS",
        "BASH_DEFAULT_TIMEOUT_MS",
        "BASH_MAX_TIMEOUT_MS",
        "MCP_TIMEOUT",
        "MCP_TOOL_TIMEOUT",
        "DISABLE_TELEMETRY",
        "DISABLE_AUTOUPDATER",
        "DISABLE_ERROR_REPORTING",
    }
)
AGENT_ENV_PREFIXES = ("LC_", "ANTHROPIC_", "CLAUDE_CODE_", "CLAUDE_AGENT_SDK_")
AGENT_GITCONFIG = """# Written by the textslash worker. The git dir belongs to the worker: read it, don't write it.
[safe]
\tdirectory = *
[user]
\tname = Claude Code (textslash)
\temail = textslash@users.noreply.github.com
"""


class SandboxError(RuntimeError):
    """An owner's agent user or folders could not be set up; safe to show the owner."""


def agent_may_inherit(name: str) -> bool:
    return name in AGENT_ENV_NAMES or name.startswith(AGENT_ENV_PREFIXES)


def scrub_environment(environ: os._Environ[str]) -> list[str]:
    """Forget every variable the agent may not inherit (the worker read its settings already)."""
    dropped = sorted(name for name in environ if not agent_may_inherit(name))
    for name in dropped:
        del environ[name]
    return dropped


@dataclass(frozen=True)
class AgentSpace:
    """Where one owner's agent lives, and as whom it runs."""

    phone: str
    uid: int
    gid: int
    checkout: Path
    git_dir: Path
    home: Path
    claude_dir: Path

    @property
    def tmp(self) -> Path:
        return self.home / "tmp"


class Sandbox:
    def __init__(
        self,
        *,
        workspace_dir: Path,
        state_dir: Path,
        claude_config_dir: str,
        isolated: bool,
        uid_base: int = AGENT_UID_BASE,
    ) -> None:
        self.isolated = isolated
        self._uid_base = uid_base  # where new owners' uids start (Settings.agent_uid_base)
        self._workspace = workspace_dir
        self._claude_root = Path(claude_config_dir) if claude_config_dir else None
        self._users_file = state_dir / "agent-users.json"
        self._lock = anyio.Lock()
        self._cli: str | None = None

    # --- paths (the same whether isolated or not) --------------------------------------

    def checkout(self, phone: str, repo: str = "") -> Path:
        """The owner's checkout of `repo` ("": the worker's own REPO_URL)."""
        return self._workspace / _folder(phone, repo)

    def git_dir(self, phone: str, repo: str = "") -> Path:
        return self._workspace / ".repos" / _folder(phone, repo)

    def _checkouts(self, phone: str) -> list[Path]:
        """Every checkout the owner has on disk, of any repository."""
        return [self.checkout(phone), *self._workspace.glob(f"{_digits(phone)}-*")]

    def _space(self, phone: str, uid: int, gid: int, repo: str = "") -> AgentSpace:
        home = self._workspace / ".homes" / _digits(phone)
        claude = self._claude_root / _digits(phone) if self._claude_root else home / ".claude"
        return AgentSpace(phone, uid, gid, self.checkout(phone, repo), self.git_dir(phone, repo), home, claude)

    async def start(self, *private: Path) -> None:
        """At boot: reachable-not-listable roots for the agents, private paths for the worker,
        and no process left of any agent (a worker restarted without its Machine).

        Everything else below the roots is made private too: checkouts and Claude folders from
        before isolation were readable by anyone who knew an owner's number. Fly's local API
        socket (FLY_API_SOCKET) answers without a token to anything that can connect (it can
        stop or suspend this Machine and mint the app's OIDC tokens): it becomes root's alone.
        """
        self._secure_folders(private)
        if not self.isolated:
            return
        try:
            for phone, uid in self._load_users().items():
                await self._kill_user(self._space(phone, uid, uid))
        except SandboxError as exc:  # each owner's next run meets it again, and is told
            logger.error("could not check for agents' leftover processes: %s", exc)

    def _secure_folders(self, private: tuple[Path, ...]) -> None:
        roots = [self._workspace, self._workspace / ".repos", self._workspace / ".homes", self._claude_root]
        for root in roots:
            if root is not None:
                root.mkdir(parents=True, exist_ok=True)
                os.chmod(root, 0o711)
        for path in private:
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o700)
        write_new_file(self._agent_gitconfig, AGENT_GITCONFIG, 0o644)
        if not self.isolated:
            return
        if FLY_API_SOCKET.exists():
            os.chmod(FLY_API_SOCKET, 0o600)
        shared = {*roots, *private, self._agent_gitconfig, self._workspace / ".bin"}
        for root in (self._workspace, self._claude_root):
            for entry in root.iterdir() if root is not None else ():
                if entry not in shared and not entry.is_symlink():
                    os.chmod(entry, 0o700 if entry.is_dir() else 0o600)

    @property
    def _agent_gitconfig(self) -> Path:
        # Root's, outside the agent's home: the agent cannot make root write through it.
        return self._workspace / ".agent-gitconfig"

    # --- an owner's space ---------------------------------------------------------------

    async def prepare(self, phone: str, keep: int | None = None, repo: str = "") -> AgentSpace:
        """The owner's user (made on first use) and folders, with the checkout of `repo` ("":
        the worker's own), owned and locked down. `keep`: the owner's Claude Code CLI, kept
        between prompts (see `quiesce`)."""
        async with self._lock:
            uid, gid = (await self._ensure_user(phone)) if self.isolated else (os.getuid(), os.getgid())
        space = self._space(phone, uid, gid, repo)
        await self.quiesce(space, keep)  # nothing of the agent's may race what root does next
        try:
            for folder in (space.home, space.tmp, space.claude_dir, space.checkout):
                self._own_folder(folder, space)
            await anyio.to_thread.run_sync(self._adopt_legacy_sessions, space)
            if self.isolated:
                await anyio.to_thread.run_sync(self._check_reachable, space)
        except OSError as exc:
            raise SandboxError(f"could not set up the agent's folders ({type(exc).__name__})") from None
        return space

    async def quiesce(self, space: AgentSpace, keep: int | None = None) -> None:
        """End every process of the owner's agent before root touches its files.

        `keep`, the owner's Claude Code CLI kept open between prompts, is stopped instead: a
        stopped process runs no code, its user cannot trace it or write its memory (the CLI
        is execute-only for agents, so the kernel makes it undumpable: see `_check_reachable`),
        and no other process of that user is left to continue it. If it cannot be kept so, it
        ends with the rest; `vm.reaper.stopped_child` tells the caller which happened."""
        if self.isolated:
            await (self._kill_user(space) if keep is None else self._end_all_but(space, keep))

    def _adopt_legacy_sessions(self, space: AgentSpace) -> None:
        """Before isolation every owner's Claude sessions shared CLAUDE_CONFIG_DIR; Claude Code
        keeps them per working directory, so the owner's folder moves into the owner's own."""
        if self._claude_root is None:
            return
        legacy = self._claude_root / "projects" / _project(space.checkout)
        target = space.claude_dir / "projects" / legacy.name
        if legacy.is_dir() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(legacy, target)
            if self.isolated:
                _chown_tree(space.claude_dir, space.uid, space.gid)

    async def hand_over(self, space: AgentSpace) -> None:
        """Give the agent what the worker wrote into its checkout (a clone, a restore)."""
        if self.isolated:
            await anyio.to_thread.run_sync(_chown_tree, space.checkout, space.uid, space.gid)

    async def share_git_dir(self, space: AgentSpace) -> None:
        """The git dir stays root's; the owner's group may read it (for `git log`, `git diff`)."""
        if self.isolated:
            await anyio.to_thread.run_sync(_share_tree, space.git_dir, space.gid)

    def _own_folder(self, folder: Path, space: AgentSpace) -> None:
        """Make `folder` a real directory, the agent's, 0700. Some of these live in the agent's
        home, where it may have left a symlink to anywhere: replace it, and change modes and
        owners only through a descriptor opened without following links."""
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            folder.unlink()  # (the parent is a real folder of the agent's, or one of root's)
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            if self.isolated:
                os.fchown(fd, space.uid, space.gid)
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)

    def own(self, space: AgentSpace, path: Path) -> None:
        if self.isolated:
            os.chown(path, space.uid, space.gid, follow_symlinks=False)

    # --- starting and ending the agent ---------------------------------------------------

    def launch(self, space: AgentSpace) -> tuple[str | None, dict[str, str]]:
        """The CLI to start (None: the SDK's own) and the environment the agent gets on top."""
        env = {
            "HOME": str(space.home),
            "TMPDIR": str(space.tmp),
            "CLAUDE_CONFIG_DIR": str(space.claude_dir),
            "SHELL": "/bin/bash",
            "GIT_CONFIG_GLOBAL": str(self._agent_gitconfig),
        }
        if not self.isolated:
            return None, env
        name = f"tsagent{space.uid}"
        env.update(
            {
                "USER": name,
                "LOGNAME": name,
                "TEXTSLASH_AGENT_UID": str(space.uid),
                "TEXTSLASH_AGENT_GID": str(space.gid),
                "TEXTSLASH_AGENT_CLI": self._cli_path(),
            }
        )
        return str(AGENT_EXEC), env

    async def reap(self, space: AgentSpace | None, marker: str, keep: int | None = None) -> None:
        """End every process of a run: all of the agent user's when isolated (nothing escapes a
        uid), else the ones whose marker in their environment starts with `marker`. `keep`: the
        CLI kept for the owner's next prompt, stopped rather than ended (see `quiesce`)."""
        if self.isolated and space is not None:
            await (self._kill_user(space) if keep is None else self._end_all_but(space, keep))
            return
        if keep is not None:
            _stop(keep)
        await kill_pids(lambda: [pid for pid in marked_pids(marker) if pid != keep])

    def cli_of(self, space: AgentSpace, marker: str) -> int | None:
        """The pid of the owner's CLI, just started: our child running as the agent user (whose
        environment the kernel hides from us, see `_check_reachable`), else carrying `marker`."""
        return our_child(user_pids(space.uid) if self.isolated else marked_pids(marker))

    def has_session(self, space: AgentSpace, session_id: str) -> bool:
        """Whether Claude Code saved the session (a CLI ended before its first write leaves an
        id that nothing can resume: "No conversation found")."""
        return (space.claude_dir / "projects" / _project(space.checkout) / f"{session_id}.jsonl").is_file()

    def move_sessions(self, space: AgentSpace, old_checkout: Path) -> bool:
        """Claude Code keeps sessions per working directory: when a checkout moves (vm/repos.py),
        its sessions move with it, so the owner's conversation resumes there. Only while no
        process of the agent's runs; the agent's folders are opened without following a link
        it may have left in their place. False if there was nothing to move."""
        try:
            fd = os.open(space.claude_dir / "projects", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:  # no sessions yet (or not a real folder: nothing of ours to move)
            return False
        try:
            if os.fstat(fd).st_uid != space.uid:  # (`.claude` in the agent's home may be a link)
                return False
            os.rename(_project(old_checkout), _project(space.checkout), src_dir_fd=fd, dst_dir_fd=fd)
        except OSError:  # none there, or the new place is taken: the sessions stay where they were
            return False
        finally:
            os.close(fd)
        return True

    @staticmethod
    def resume(pid: int) -> bool:
        """Let the kept CLI run again, for the owner's next prompt. False if it is gone."""
        if not stopped_child(pid):
            return False
        os.kill(pid, signal.SIGCONT)
        return True

    @staticmethod
    def end(pid: int) -> None:
        """End a kept CLI (SIGKILL works on a stopped process; SIGTERM would wait for SIGCONT)."""
        if parent_of(pid) == os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    async def _end_all_but(self, space: AgentSpace, keep: int) -> None:
        """Stop `keep`, then every process of the agent user at once (kill -STOP -1 as that user:
        a stopped process forks nothing), and kill all of them but `keep`. If `keep` is not left
        alone and stopped after that, everything ends."""
        _stop(keep)
        for _ in range(5):
            await self._kill_as(space, "-STOP")
            others = [pid for pid in user_pids(space.uid) if pid != keep]
            if not others:
                break
            signal_all(others, signal.SIGKILL)
            with anyio.move_on_after(1.0):
                while any(pid in others for pid in user_pids(space.uid)):  # noqa: ASYNC110 - as below
                    await anyio.sleep(0.02)
        if not (stopped_child(keep) and user_pids(space.uid) == [keep]):
            await self._kill_user(space)

    async def _kill_user(self, space: AgentSpace, grace_s: float = 1.5) -> int:
        """SIGTERM, then SIGKILL, to every process of the agent user.

        kill(-1) sent *as the agent user* reaches all of that user's processes at once, which a
        list of pids cannot promise against a process that keeps forking or hides its leader;
        SIGKILL is always sent, whatever a scan of /proc saw.
        """
        uid, found = space.uid, len(user_pids(space.uid))
        if found:
            await self._kill_as(space, "-TERM")
            with anyio.move_on_after(grace_s):
                while user_pids(uid):  # noqa: ASYNC110 - no event tells us another process died
                    await anyio.sleep(0.05)
        for _ in range(5):
            await self._kill_as(space, "-KILL")
            with anyio.move_on_after(1.0):
                while user_pids(uid):  # noqa: ASYNC110 - as above
                    await anyio.sleep(0.02)
            if not user_pids(uid):
                return found
        raise SandboxError("the agent's processes could not be ended")

    @staticmethod
    async def _kill_as(space: AgentSpace, signal_flag: str) -> None:
        as_agent = ["setpriv", f"--reuid={space.uid}", f"--regid={space.gid}", "--clear-groups", "--"]
        await anyio.run_process([*as_agent, "kill", signal_flag, "-1"], check=False)

    def _cli_path(self) -> str:
        if self._cli is None:
            import claude_agent_sdk

            bundled = Path(claude_agent_sdk.__file__).parent / "_bundled" / "claude"
            self._cli = str(bundled) if bundled.is_file() else (shutil.which("claude") or "claude")
        return self._cli

    def _check_reachable(self, space: AgentSpace) -> None:
        """The agent user must reach Claude Code and its own folders; a checkout below a private
        folder (a 0700 home or temp dir) would fail later with an opaque error, so fail now."""
        cli = Path(self._cli_path())
        if not all(_others_may(p, 0o001) for p in cli.parents):
            self._cli = str(cli := self._reachable_copy(cli))
        if stat.S_IMODE(cli.stat().st_mode) != EXECUTE_ONLY:
            # Agents may run Claude Code but not read it: the kernel then makes each CLI
            # undumpable, so nothing the agent starts can trace it, read its memory or write
            # into it, and the CLI kept stopped between prompts stays the one root started.
            try:
                os.chmod(cli, EXECUTE_ONLY)
            except OSError:  # a read-only image: a copy of our own, which we may chmod
                self._cli = str(cli := self._reachable_copy(cli))
        for path in (space.checkout, space.claude_dir):
            blocked = next((p for p in path.parents if not _reachable_by(p, space.uid)), None)
            if blocked is not None:
                raise SandboxError(f"the agent user cannot reach {path}: {blocked} is not searchable by others")

    def _reachable_copy(self, cli: Path) -> Path:
        """Claude Code's binary lives in a folder other users cannot enter (a private venv), or
        on a file system where its mode cannot change: link it (or copy it once) into the
        workspace, where the agents can run it."""
        target = self._workspace / ".bin" / cli.name
        target.parent.mkdir(exist_ok=True)
        os.chmod(target.parent, 0o711)
        if not (target.exists() and target.stat().st_size == cli.stat().st_size):
            partial = target.with_name(f".{cli.name}.partial")
            partial.unlink(missing_ok=True)
            try:
                os.link(cli, partial)
            except OSError:
                shutil.copy2(cli, partial)
            os.replace(partial, target)
        os.chmod(target, EXECUTE_ONLY)
        return target

    # --- users ----------------------------------------------------------------------------

    async def _ensure_user(self, phone: str) -> tuple[int, int]:
        users = self._load_users()
        uid = users.get(phone)
        if uid is None:
            # The owner's folders already say whose they are, if the map was lost; otherwise a
            # uid that neither /etc/passwd nor any folder on the volume knows.
            uid = self._uid_on_disk(phone) or _free_uid(set(users.values()) | self._uids_on_disk(), self._uid_base)
            users[phone] = uid
            self._save_users(users)
        name = f"tsagent{uid}"
        try:
            existing = pwd.getpwuid(uid)
        except KeyError:
            await _run("groupadd", "--gid", str(uid), name, ok_codes=(0, 4, 9))  # 4/9: that group exists
            # No home in /etc/passwd: it would name the owner's number to every agent.
            await _run(
                "useradd",
                "--uid",
                str(uid),
                "--gid",
                str(uid),
                "--no-create-home",
                "--no-user-group",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/bin/bash",
                name,
            )
            existing = pwd.getpwuid(uid)
        if existing.pw_name != name:
            raise SandboxError(f"uid {uid} already belongs to {existing.pw_name!r}, not to an agent user")
        if existing.pw_dir != "/nonexistent":  # made by an earlier version, which named the number
            await _run("usermod", "--home", "/nonexistent", name)
        return uid, existing.pw_gid

    def _uid_on_disk(self, phone: str) -> int | None:
        """The uid the owner's folders say is theirs: a checkout's or the home's owner, else the
        group of a git dir (root's, the agent's group, whose gid is its uid)."""
        git_dirs = [self.git_dir(phone), *(self._workspace / ".repos").glob(f"{_digits(phone)}-*")]
        owned = [(f, False) for f in (*self._checkouts(phone), self._space(phone, 0, 0).home)]
        for folder, by_group in [*owned, *((f, True) for f in git_dirs)]:
            try:
                st = folder.lstat()
            except OSError:
                continue
            uid = st.st_gid if by_group else st.st_uid
            if uid >= AGENT_UID_BASE:
                return uid
        return None

    def _uids_on_disk(self) -> set[int]:
        """Every uid a folder on the volume is someone's by: owners below the roots, and the
        groups of the git dirs, which a new owner's group must never be."""
        found: set[int] = set()
        roots = (self._workspace, self._workspace / ".homes", self._claude_root, self._workspace / ".repos")
        for root in roots:
            for entry in root.iterdir() if root is not None and root.is_dir() else ():
                try:
                    st = entry.lstat()
                except OSError:
                    continue
                found.update((st.st_uid, st.st_gid))
        return found

    def _load_users(self) -> dict[str, int]:
        try:
            data = json.loads(self._users_file.read_text())
            return {str(k): int(v) for k, v in data.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as exc:
            # Guessing here could hand one owner's files to another: stop and say where.
            raise SandboxError(
                f"{self._users_file} is unreadable ({type(exc).__name__}); repair it, or remove "
                "it to rebuild it from the owners' folders"
            ) from None

    def _save_users(self, users: Mapping[str, int]) -> None:
        self._users_file.parent.mkdir(parents=True, exist_ok=True)
        write_durably(self._users_file, json.dumps(dict(users)).encode())


def _stop(pid: int) -> None:
    if parent_of(pid) == os.getpid():  # our own child: never a pid an agent's process reused
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)


def _digits(phone: str) -> str:
    return phone.lstrip("+")


def _folder(phone: str, repo: str) -> str:
    """`<number>` for the worker's own repository, `<number>-<repo>` for a named one."""
    if not repo:
        return _digits(phone)
    if not REPO_NAME.match(repo):  # checked by the protocol; a path must never take anything else
        raise SandboxError(f"{repo!r} is not a repository name")
    return f"{_digits(phone)}-{repo}"


def _project(checkout: Path) -> str:
    """The folder below CLAUDE_CONFIG_DIR/projects where Claude Code keeps a checkout's sessions."""
    return re.sub(r"[^A-Za-z0-9]", "-", str(checkout))


def _free_uid(taken: set[int], base: int = AGENT_UID_BASE) -> int:
    uid = base
    while True:
        if uid not in taken:
            try:
                pwd.getpwuid(uid)
            except KeyError:
                return uid
            if pwd.getpwuid(uid).pw_name == f"tsagent{uid}":
                return uid  # ours, from an earlier volume
        uid += 1


async def _run(*argv: str, ok_codes: tuple[int, ...] = (0,)) -> None:
    result = await anyio.run_process(list(argv), check=False)
    if result.returncode not in ok_codes:
        detail = result.stderr.decode(errors="replace").strip().splitlines()
        raise SandboxError(f"{argv[0]} failed: {detail[-1] if detail else result.returncode}")


def _reachable_by(folder: Path, uid: int) -> bool:
    try:
        st = folder.stat()
    except OSError:
        return False
    return bool(st.st_mode & 0o100) if st.st_uid == uid else bool(st.st_mode & 0o001)


def _others_may(path: Path, bits: int) -> bool:
    try:
        return path.stat().st_mode & bits == bits
    except OSError:
        return False


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    """Hand a tree to the agent without following a symlink anywhere (`find` never does, and
    `chown -h` changes a link itself). GNU find walks any depth: Python's fwalk recurses, and a
    tree a thousand folders deep stops it. No agent process lives meanwhile (Sandbox.quiesce).

    A file with more than one link is never handed over: where the kernel allows linking files
    one does not own (fs.protected_hardlinks=0), it could be a link the agent made to a file of
    root's, its own git dir's config for one, and chown would give that file away.
    """
    result = subprocess.run(
        [
            "find",
            str(root),
            "-xdev",
            "(",
            "-type",
            "d",
            "-o",
            "-links",
            "1",
            ")",
            "(",
            "!",
            "-uid",
            str(uid),
            "-o",
            "!",
            "-gid",
            str(gid),
            ")",
            "-exec",
            "chown",
            "-h",
            f"{uid}:{gid}",
            "--",
            "{}",
            "+",
        ],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()
        raise SandboxError(f"could not hand the files over ({detail[-1] if detail else result.returncode})")


def _share_tree(root: Path, gid: int) -> None:
    """root:<gid>, folders 2750 (new files inherit the group), files group-readable only."""
    os.chown(root, 0, gid)
    os.chmod(root, 0o2750)
    for _, dirs, files, fd in os.fwalk(root, follow_symlinks=False):
        for name in dirs:
            os.chown(name, 0, gid, dir_fd=fd, follow_symlinks=False)
            os.chmod(name, 0o2750, dir_fd=fd)
        for name in files:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                os.chown(name, 0, gid, dir_fd=fd, follow_symlinks=False)
                os.chmod(name, 0o640, dir_fd=fd)
