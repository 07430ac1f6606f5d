"""Start the real `python -m relay` / `python -m vm` as child processes, and always end them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx

from fakes.servers import reserve_port

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    sock = reserve_port()
    port: int = sock.getsockname()[1]
    sock.close()
    return port


def process_state(pid: int) -> str:
    """R, S, T (stopped)...: the third field of /proc/<pid>/stat; "gone" once it is."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def clis_of(parent: int) -> list[int]:
    """The live Claude Code processes that `parent` (a worker) started."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            name, rest = stat.read_text().rsplit(")", 1)
        except OSError:
            continue
        if name.endswith("(claude") and int(rest.split()[1]) == parent and rest.split()[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def image_command(dockerfile: Path, python: str = sys.executable) -> list[str]:
    """The image's CMD (exec form), with `python` as the given interpreter."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    cmd = [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("CMD ")][-1]
    return [python if arg == "python" else arg for arg in json.loads(cmd)]


def worker_command() -> list[str]:
    """As root, the worker starts the way its image starts it (with the image's capability set)."""
    if os.geteuid() == 0:
        return image_command(ROOT / "vm" / "Dockerfile")
    return [sys.executable, "-m", "vm"]


@contextmanager
def child(module: str, env: dict[str, str], log: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """Run `python -m module` in its own process group; killed (group and all) when the block ends."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "ANTHROPIC_"))}
    full_env.update(env)
    full_env["PYTHONPATH"] = str(ROOT)
    command = worker_command() if module == "vm" else [sys.executable, "-m", module]
    with log.open("ab") as out:
        # The child runs in the test's own folder, so a developer's .env is never read.
        proc = subprocess.Popen(
            [*command, *args],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=log.parent,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


async def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0, path: str = "/health") -> None:
    async with httpx.AsyncClient() as client:
        with anyio.fail_after(timeout):
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"process exited early with {proc.returncode}")
                try:
                    if (await client.get(f"{url}{path}", timeout=0.5)).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.02)


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    with anyio.fail_after(timeout):
        while proc.poll() is None:
            await anyio.sleep(0.02)
    return proc.returncode
