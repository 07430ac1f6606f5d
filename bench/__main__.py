"""`python -m bench [--report docs/BENCHMARKS.md] [--only NAME ...]`: every benchmark, on loopback.

Each figure is printed as one JSON line, measured beside its reference in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

from bench import relay_benches, worker_benches
from bench.common import RESULTS, machine

BENCHES: dict[str, Callable[[Path], Awaitable[None]]] = {
    "webhook": relay_benches.webhook_and_memory,
    "wake": relay_benches.wake_overhead,
    "first_reply": relay_benches.first_reply,
    "worker_boot": worker_benches.boot,
    "screenshot": worker_benches.screenshots_and_memory,
    "end_to_end": worker_benches.pair_overhead,
    "follow_up": worker_benches.follow_up,
    "wake_suspend": worker_benches.suspend_vs_exit,
}


async def run_all(names: list[str]) -> None:
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            await BENCHES[name](Path(tmp))


def report(path: Path) -> None:
    """Replace the figures table in the report with this run's."""
    info = machine()
    rows = ["| benchmark | figure | value | reference | ratio | target | met |", "|---|---|---|---|---|---|---|"]
    for r in RESULTS:
        ref = f"{r['reference']} {r['unit']} ({r['reference_name']})" if "reference" in r else ""
        ratio = f"{r['ratio']}x" if r.get("ratio") is not None else ""
        met = {True: "yes", False: "**no**", None: ""}[r.get("met")]
        rows.append(
            f"| {r['bench']} | {r['metric']} | {r['value']} {r['unit']} | {ref} | {ratio} | "
            f"{r.get('target', '')} | {met} |"
        )
    block = "\n".join(
        [
            "<!-- figures:start -->",
            f"Measured {time.strftime('%Y-%m-%d', time.gmtime())} on {info['cpu']}, {info['cores']} cores, "
            f"{info['memory_gb']} GB, Python {info['python']}, everything on 127.0.0.1.",
            "",
            *rows,
            "",
            "Raw JSON lines of this run:",
            "",
            "```",
            *[json.dumps(r, ensure_ascii=False) for r in RESULTS],
            "```",
            "<!-- figures:end -->",
        ]
    )
    text = path.read_text()
    start, end = text.index("<!-- figures:start -->"), text.index("<!-- figures:end -->") + len("<!-- figures:end -->")
    path.write_text(text[:start] + block + text[end:])


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(BENCHES), help="run only these")
    parser.add_argument("--report", type=Path, help="write the figures into this markdown file")
    args = parser.parse_args()
    anyio.run(run_all, args.only or list(BENCHES))
    if args.report:
        report(args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
