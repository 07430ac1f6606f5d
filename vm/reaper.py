"""Find and end every process a run started, wherever it went.

With isolation, every process of an owner's agent runs as that owner's user, and a process
cannot shed its uid: `user_pids` finds them all. Without it (AGENT_ISOLATION=off), each run's CLI
gets `TEXTSLASH_RUN=<marker>` in its environment and everything below it inherits it, including
processes that daemonized and were re-parented to init, which a walk of the process tree would
miss (but a process that clears its environment escapes). /proc is Linux's; the worker only
runs there.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import anyio

MARKER_VAR = "TEXTSLASH_RUN"


def _pids() -> list[int]:
    me = os.getpid()
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and int(e.name) != me]


def marked_pids(prefix: str) -> list[int]:
    """Pids of processes whose TEXTSLASH_RUN starts with `prefix`."""
    needle = f"{MARKER_VAR}={prefix}".encode()
    found = []
    for pid in _pids():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue  # gone already, or not ours to read
        if any(var.startswith(needle) for var in environ.split(b"\0")):
            found.append(pid)
    return found


def user_pids(uid: int) -> list[int]:
    """Pids of live processes whose real or effective uid is `uid`."""
    found = []
    for pid in _pids():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        uids = next((line.split()[1:3] for line in status.splitlines() if line.startswith("Uid:")), [])
        if str(uid) in uids and _alive(pid):
            found.append(pid)
    return found


def our_child(candidates: list[int]) -> int | None:
    """The one of `candidates` that is this process's child (the CLI the SDK started: agent-exec
    execs it in place, so it keeps the pid). No process of an agent's can become our child, so
    one that looks like it elsewhere is never taken for it."""
    return next((pid for pid in candidates if parent_of(pid) == os.getpid()), None)


def parent_of(pid: int) -> int | None:
    facts = _stat(pid)
    return int(facts[1]) if facts else None


def stopped_child(pid: int) -> bool:
    """`pid` is this process's child, stopped (SIGSTOP): it runs nothing until we continue it."""
    facts = _stat(pid)
    return facts is not None and facts[0] == "T" and int(facts[1]) == os.getpid()


def _stat(pid: int) -> list[str] | None:
    """State and parent from /proc/<pid>/stat (after the command name, which may hold spaces)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    except (OSError, IndexError):
        return None


def signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


async def kill_pids(select: Callable[[], list[int]], grace_s: float = 1.5) -> int:
    """SIGTERM what `select` finds, SIGKILL what is still there after `grace_s`; returns the count.

    Each SIGKILL pass selects again, so a process forked during the previous one is caught too.
    """
    pids = select()
    signal_all(pids, signal.SIGTERM)
    with anyio.move_on_after(grace_s):
        while select():  # noqa: ASYNC110 - no event tells us another process died
            await anyio.sleep(0.05)
    for _ in range(3):  # a process forked during the last pass is caught by the next
        survivors = select()
        if not survivors:
            break
        signal_all(survivors, signal.SIGKILL)
        with anyio.move_on_after(1.0):
            while any(_alive(pid) for pid in survivors):  # noqa: ASYNC110 - as above
                await anyio.sleep(0.02)
    return len(pids)


async def kill_marked(prefix: str, grace_s: float = 1.5) -> int:
    return await kill_pids(lambda: marked_pids(prefix), grace_s)


def _alive(pid: int) -> bool:
    """A process is alive while any of its threads is: a leader that ended only its own thread
    shows as a zombie while the others run on."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False
    for task in tasks:
        try:
            if (task / "stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z":
                return True
        except OSError:
            continue
    return False
