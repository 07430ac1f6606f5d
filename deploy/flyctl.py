"""A thin, typed wrapper around the `flyctl` commands the deploy uses."""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common.owners import OWNER_KEY

# Run inside a Machine; `{headers}` is a dict literal (`fly-force-instance-id` picks one Machine).
HEALTH_PROBE = (
    'python -c "import urllib.request as u;'
    "print(u.urlopen(u.Request('{url}', headers={headers}), timeout=60).read().decode())\""
)


class FlyError(RuntimeError):
    """A flyctl call failed; the message says which and why."""


@dataclass(frozen=True)
class Machine:
    id: str
    state: str
    checks: tuple[tuple[str, str], ...]  # (name, status)
    image: str
    owner: str = ""  # an owner's own Machine (per-owner mode): flyctl deploy leaves it alone

    @property
    def healthy(self) -> bool:
        return self.state == "started" and all(status == "passing" for _, status in self.checks)


@dataclass
class Fly:
    """Runs flyctl, or with `dry_run` only prints what it would run."""

    binary: str = "flyctl"
    dry_run: bool = False
    say: Callable[[str], None] = print
    calls: list[list[str]] = field(default_factory=list)

    def run(self, *args: str, read: bool = False) -> str:
        argv = [self.binary, *args]
        self.calls.append(argv)
        if self.dry_run:
            self.say("would run: " + shlex.join(argv))
            return "[]" if read else ""
        self.say("$ " + shlex.join(argv))
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise FlyError(f"`{shlex.join(argv[:4])} ...` failed: {detail[-1] if detail else result.returncode}")
        return result.stdout

    def json(self, *args: str) -> Any:
        out = self.run(*args, "--json", read=True)
        try:
            return json.loads(out or "null")
        except ValueError:
            raise FlyError(f"`flyctl {' '.join(args)}` did not print JSON") from None

    def machines(self, app: str) -> list[Machine]:
        if self.dry_run:  # show the per-machine calls too, with a stand-in id
            self.json("machines", "list", "--app", app)
            return [Machine(id=f"<{app}-machine>", state="started", checks=(), image=f"<{app}-image>")]
        return [
            Machine(
                id=m["id"],
                state=m.get("state", ""),
                checks=tuple((c.get("name", ""), c.get("status", "")) for c in m.get("checks") or []),
                image=(m.get("config") or {}).get("image", ""),
                owner=str(((m.get("config") or {}).get("metadata") or {}).get(OWNER_KEY, "")),
            )
            for m in self.json("machines", "list", "--app", app) or []
        ]

    def ips(self, app: str) -> list[tuple[str, str]]:
        return [(ip.get("Type", ""), ip.get("Address", "")) for ip in self.json("ips", "list", "--app", app) or []]

    def deploy(self, app: str, config: str, dockerfile: str, sha: str) -> None:
        self.run(
            "deploy",
            ".",
            "--app",
            app,
            "--config",
            config,
            "--dockerfile",
            dockerfile,
            "--build-arg",
            f"VERSION_SHA={sha}",
            "--yes",
        )

    def deploy_image(self, app: str, config: str, image: str) -> None:
        self.run("deploy", ".", "--app", app, "--config", config, "--image", image, "--yes")

    def health(self, app: str, machine_id: str, url: str, instance: str = "") -> dict[str, Any]:
        """GET `url` from inside a machine of `app` (so Flycast and localhost work as there);
        `instance`: the Machine Fly's proxy must send it to (and start), as the relay does."""
        headers = {"fly-force-instance-id": instance} if instance else {}
        probe = HEALTH_PROBE.format(url=url, headers=repr(headers))
        out = self.run("machine", "exec", machine_id, probe, "--app", app, read=True)
        if self.dry_run:
            return {}
        try:
            start = out.index("{")
            data: dict[str, Any] = json.loads(out[start : out.rindex("}") + 1])
            return data
        except ValueError:
            raise FlyError(
                f"/health from {app} machine {machine_id} did not answer JSON: {out.strip()[:200]}"
            ) from None

    def stop(self, app: str, machine_id: str) -> None:
        self.run("machine", "stop", machine_id, "--app", app)
