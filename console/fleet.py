"""`python -m console --owners N` (N >= 2): per-owner mode on this machine, with Fly as the engine.

The relay runs with WORKER_MODE=per-owner against a loopback Machines API (fakes/flyapi.py) and
calls every owner's worker through a stand-in for Fly's proxy in front of the worker app
(fakes/flyrouter.py), which routes by `fly-force-instance-id`. Each Machine the relay makes is
one `python -m vm`: its own port, its folder `<data>/machines/<volume id>` (its volume: a Machine
made again on the same volume finds its owner's work), its own FLY_MACHINE_ID and Machines API
socket for suspend (fakes/machines.py), and the Machine's config.env (OWNER_PHONE, OWNER_TOKEN,
vm/fly.toml's [env]) over the console's worker settings, except what says where things are on
this machine.

The fake API's Machines and volumes are kept in `<data>/fly-machines.json` across console runs,
so a restarted relay finds its owners' Machines (as on Fly); the owners' tokens are not in that
file (a secret is never written down): they are derived again from this run's WORKER_TOKEN, as
if the operator had rotated the secret and rolled the Machines.
"""

from __future__ import annotations

import json
import logging
import secrets
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.owners import owner_token
from fakes.flyapi import FakeFlyAPI
from fakes.flyproxy import FlyProxy
from fakes.flyrouter import FlyRouter
from fakes.machines import FakeMachines
from vm.sandbox import AGENT_UID_BASE

logger = logging.getLogger("console")

APP = "textslash-vm"
IMAGE = "textslash-vm:local"  # the relay's WORKER_IMAGE: there is no deployed Machine to copy it from
# What a Machine's config.env may not decide here: where things are on this machine. vm/fly.toml
# says /data/... and the deployed relay's URL; the console says where its own are.
LOCAL = (
    "HOST",
    "PORT",
    "WORKSPACE_DIR",
    "IMAGES_DIR",
    "CLAUDE_CONFIG_DIR",
    "CHROMIUM_PATH",
    "RELAY_CALLBACK_URL",
    "IDLE_TIMEOUT_MS",
    "IDLE_ACTION",
    "FLY_API_SOCKET",
    "FLY_APP_NAME",
    "FLY_MACHINE_ID",
)


UID_RANGE = 1000  # agent uids per Machine


def owners(count: int) -> list[str]:
    """+15550000001 .. : the local owners, the first being the shared mode's one."""
    return [f"+1555{n:07d}" for n in range(1, count + 1)]


class LocalFleet:
    def __init__(
        self,
        data: Path,
        worker_env: dict[str, str],
        worker_token: str,
        *,
        spawn: Callable[[dict[str, str], Path], subprocess.Popen[bytes]],
        free_port: Callable[[], int],
        proxy_http: Any,
        serve_socket: Callable[[FakeMachines, Path], object],
    ) -> None:
        self._data, self._worker_env, self._worker_token = data, worker_env, worker_token
        self._spawn, self._free_port, self._http, self._serve_socket = spawn, free_port, proxy_http, serve_socket
        self.token = secrets.token_urlsafe(24)  # the relay's FLY_API_TOKEN, for this run
        self.router = FlyRouter(self._make)
        self.api = FakeFlyAPI(self.token, app_name=APP, host=self.router)
        self._saved = data / "fly-machines.json"

    def relay_env(self, api_url: str, router_url: str) -> dict[str, str]:
        return {
            "WORKER_MODE": "per-owner",
            "FLY_API_BASE_URL": api_url,
            "FLY_API_TOKEN": self.token,
            "WORKER_APP": APP,
            "WORKER_IMAGE": IMAGE,
            "CLAUDE_HOST": router_url,
        }

    def _make(self, machine: dict[str, Any]) -> FlyProxy:
        """The process that plays `machine`, and its Machines API socket for suspend."""
        machine_id = machine["id"]
        mounts = machine["config"].get("mounts") or [{}]
        folder = self._data / "machines" / str(mounts[0].get("volume") or machine_id)
        folder.mkdir(parents=True, exist_ok=True)
        for path in (folder.parent, folder):  # search only: each owner's agent user must reach its checkout
            path.chmod(0o711)
        port = self._free_port()
        socket = folder / "fly-api.sock"
        socket.unlink(missing_ok=True)  # left by the last run
        config_env = {str(k): str(v) for k, v in (machine["config"].get("env") or {}).items() if k not in LOCAL}
        env = {**self._worker_env, **config_env}
        if env.get("OWNER_PHONE"):
            env.pop("WORKER_TOKEN", None)  # an owner's Machine holds only its own token
        env.update(
            {
                "PORT": str(port),
                "HOST": "127.0.0.1",
                "WORKSPACE_DIR": str(folder / "workspace"),
                "IMAGES_DIR": str(folder / "images"),
                "CLAUDE_CONFIG_DIR": str(folder / "claude"),
                "FLY_API_SOCKET": str(socket),
                "FLY_APP_NAME": APP,
                "FLY_MACHINE_ID": machine_id,
                # Machines share this host's users: each its own range, stable across runs (its
                # volume's place among the volumes), or one worker would end another's agents.
                "AGENT_UID_BASE": str(AGENT_UID_BASE + UID_RANGE * self._place(folder.name)),
            }
        )
        proxy = FlyProxy(lambda: self._spawn(env, folder / "worker.log"), f"http://127.0.0.1:{port}", self._http)
        self._serve_socket(FakeMachines(on_suspend=lambda: self.router.suspend(machine_id), state=proxy.state), socket)
        return proxy

    def _place(self, volume_id: str) -> int:
        known = list(self.api.volumes)
        return 1 + (known.index(volume_id) if volume_id in known else len(known))

    # --- kept across runs ---------------------------------------------------------------

    def load(self) -> None:
        """The Machines and volumes of the last run, stopped (their processes ended with it)."""
        try:
            saved = json.loads(self._saved.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            logger.warning("could not read %s (%s): starting with no Machines", self._saved, exc)
            return
        self.api.volumes.update(saved.get("volumes", {}))
        for machine in saved.get("machines", {}).values():
            env = machine["config"].get("env") or {}
            if env.get("OWNER_PHONE"):
                env["OWNER_TOKEN"] = owner_token(self._worker_token, env["OWNER_PHONE"])
            machine["state"] = "stopped"
            self.api.machines[machine["id"]] = machine
            self.router.adopt(machine)

    def save(self) -> None:
        machines = {}
        for machine in self.api.live_machines():
            config = {**machine["config"], "env": dict(machine["config"].get("env") or {})}
            config["env"].pop("OWNER_TOKEN", None)  # a secret: derived again on the next run
            machines[machine["id"]] = {**machine, "config": config}
        volumes = {v["id"]: v for v in self.api.live_volumes()}
        self._saved.write_text(json.dumps({"machines": machines, "volumes": volumes}, indent=1))
