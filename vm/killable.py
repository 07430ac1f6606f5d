"""Run a command so that cancelling the caller ends it and everything it started.

`anyio.run_process` kills only the process it started when its caller is cancelled. A `git
push` or `git clone` over the network does its talking in a helper (`git-remote-https`, `ssh`)
and `pack-objects`, children of the `git` it started: killed alone, `git` would leave them
behind, still holding the connection. Here the command gets a process group of its own, and a
cancelled caller (a deadline, the owner's cancel, shutdown) kills the whole group.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import AsyncIterable, Sequence
from pathlib import Path

import anyio


async def run_killable(
    argv: Sequence[str], *, cwd: Path, env: dict[str, str], input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """`anyio.run_process(argv, check=False)`, but in its own session and process group, with
    stdin closed unless `input` is given (no tty either, so nothing can wait for a password)."""
    out: tuple[list[bytes], list[bytes]] = ([], [])

    async def drain(stream: AsyncIterable[bytes], index: int) -> None:
        async for chunk in stream:
            out[index].append(chunk)

    async with await anyio.open_process(
        list(argv),
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        cwd=cwd,
        env=env,
        start_new_session=True,
    ) as process:
        try:
            async with anyio.create_task_group() as tg:
                assert process.stdout is not None and process.stderr is not None
                tg.start_soon(drain, process.stdout, 0)
                tg.start_soon(drain, process.stderr, 1)
                if process.stdin is not None:
                    await process.stdin.send(input or b"")
                    await process.stdin.aclose()
                await process.wait()
        except BaseException:
            # Not reaped yet, so its pid (the group's id) cannot have been given to anyone else.
            if process.returncode is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            raise  # leaving the block reaps the group's leader
    assert process.returncode is not None
    return subprocess.CompletedProcess(list(argv), process.returncode, b"".join(out[0]), b"".join(out[1]))
