"""What every benchmark shares: child processes, loopback servers, percentiles, one JSON line."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS: list[dict[str, Any]] = []


def emit(
    bench: str,
    metric: str,
    value: float,
    unit: str,
    *,
    reference: float | None = None,
    reference_name: str = "",
    target: str = "",
    met: bool | None = None,
    **extra: Any,
) -> None:
    """Print one figure as a JSON line (and keep it for the report)."""
    line: dict[str, Any] = {"bench": bench, "metric": metric, "value": round(value, 3), "unit": unit}
    if reference is not None:
        line.update(
            reference=round(reference, 3),
            reference_name=reference_name,
            ratio=round(value / reference, 3) if reference else None,
        )
    if target:
        line.update(target=target, met=met)
    line.update(extra)
    RESULTS.append(line)
    print(json.dumps(line, ensure_ascii=False), flush=True)  # noqa: T201 - the benchmark's output


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def median(values: list[float]) -> float:
    return statistics.median(values)


@contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "ANTHROPIC_"))}
    full.update(env)
    full["PYTHONPATH"] = str(ROOT)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, *args],
            env=full,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=log.parent,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        proc.wait()


async def until_healthy(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60) -> float:
    """Poll /health every 2 ms; returns the moment (monotonic) it first answered 200."""
    async with httpx.AsyncClient() as client:
        with anyio.fail_after(timeout):
            while True:
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"process exited with {proc.returncode}")
                try:
                    if (await client.get(f"{url}/health", timeout=1)).status_code == 200:
                        return time.monotonic()
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.002)


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds each process used inside the `with` block: on a 2-core machine shared with
    the load generator and the fakes, where the cycles went explains the figures."""

    def __init__(self, *pids: int) -> None:
        self.pids = pids
        self.seconds: list[float] = []

    def __enter__(self) -> CpuMeter:
        self._start = [cpu_seconds(pid) for pid in self.pids]
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = [cpu_seconds(pid) - start for pid, start in zip(self.pids, self._start, strict=True)]


def tree_rss_kb(pid: int) -> int:
    """RSS of a process and all its descendants (the worker and its Chromium)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            total += rss_kb(current)
        except OSError:
            pass
        stack.extend(children.get(current, []))
    return total


def machine() -> dict[str, str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory_gb": f"{int(mem) / 1024 / 1024:.0f}",
        "python": sys.version.split()[0],
    }


async def listening_at(port: int, limit_s: float = 60.0) -> float:
    """The moment a socket starts listening on `port`, seen in /proc/net/tcp: passively, so
    watching it neither connects to the server nor slows it."""
    with anyio.fail_after(limit_s):
        while True:
            now = time.monotonic()
            if _listens(port):
                return now
            await anyio.sleep(0.001)


def _listens(port: int) -> bool:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        # Columns: sl, local_address (hex ip:port), rem_address, st; st 0A is LISTEN.
        rows = [line.split() for line in Path(table).read_text().splitlines()[1:]]
        if any(row[1].endswith(f":{port:04X}") and row[3] == "0A" for row in rows):
            return True
    return False
