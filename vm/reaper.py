"""Find and end every process a run started, wherever it went.

Each run's CLI gets `TEXTSLASH_RUN=<marker>` in its environment and every process below it
inherits it, including ones that daemonized and were re-parented to init, which a walk of the
process tree would miss. /proc is Linux's; the worker only runs there.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio

MARKER_VAR = "TEXTSLASH_RUN"


def marked_pids(prefix: str) -> list[int]:
    """Pids of processes whose TEXTSLASH_RUN starts with `prefix`."""
    needle = f"{MARKER_VAR}={prefix}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue  # gone already, or not ours to read
        if any(var.startswith(needle) for var in environ.split(b"\0")):
            found.append(int(entry.name))
    return found


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


async def kill_marked(prefix: str, grace_s: float = 1.5) -> int:
    """SIGTERM everything marked, SIGKILL what is still there after `grace_s`; returns the count."""
    pids = marked_pids(prefix)
    _signal_all(pids, signal.SIGTERM)
    with anyio.move_on_after(grace_s):
        while marked_pids(prefix):  # noqa: ASYNC110 - no event tells us another process died
            await anyio.sleep(0.05)
    survivors = marked_pids(prefix)
    _signal_all(survivors, signal.SIGKILL)
    with anyio.move_on_after(1.0):
        while any(_alive(pid) for pid in survivors):  # noqa: ASYNC110 - as above
            await anyio.sleep(0.02)
    return len(pids)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"  # a zombie is dead, only unreaped
