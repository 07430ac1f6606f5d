"""`python -m deploy [--dry-run] [--worker-mode per-owner] [--prune [--yes]]`: deploy the worker,
then the relay, and prove it worked.

Each step is one the deployment reports list as a way a deploy fails silently; each failure
stops the deploy with a message that says what is wrong, and rolls back what was deployed:
  1. a clean tree and a passing test suite;
  2. worker, then relay, built from HEAD with VERSION_SHA;
  3. every machine started with passing checks (stopped ones are started);
  4. every machine's /health reports HEAD (no old code still running);
  5. the worker has no public IP and has a Flycast address;
  6. the worker, stopped, is woken by a request through Flycast from the relay.
In per-owner mode (deploy/owners.py) every owner's own Machine is rolled to the worker's new
image between 2 (worker) and 2 (relay), and `--prune` destroys those of owners who left.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.config import ConfigError, EnvReader
from common.machines import MachinesError
from deploy.flyctl import Fly, FlyError, Machine
from deploy.owners import Owners, OwnersFailed

PUBLIC_IP_TYPES = {"v4", "v6", "shared_v4"}
LAST_GOOD = Path("var/deploy-last-good.json")


class DeployFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class App:
    name: str
    config: str
    dockerfile: str
    port: int


@dataclass
class Deployer:
    fly: Fly
    worker: App
    relay: App
    test_command: str
    wait_s: float = 300.0
    poll_s: float = 5.0
    say: Callable[[str], None] = print
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    owners: Owners | None = None  # per-owner mode: the owners' own Machines to roll
    shared_said: bool = True  # shared mode chosen (flag or WORKER_MODE), not merely the default
    owners_left: bool = False  # shared mode, and the worker app still has owner Machines
    deployed: list[App] = field(default_factory=list)

    def run(self) -> None:
        self.check_mode()
        sha = self.preflight()
        previous = self.last_good()
        try:
            self.deploy_app(self.worker, sha)
            if self.owners is not None:  # the worker's new image is known and proven: now the owners'
                self.owners.roll(sha)
            self.deploy_app(self.relay, sha)
            self.check_worker_is_private()
            self.prove_wake(sha)
        except (DeployFailed, FlyError, OwnersFailed) as exc:
            self.say(f"deploy: FAILED: {exc}")
            self.roll_back(previous)
            raise DeployFailed(str(exc)) from None
        except KeyboardInterrupt:
            # Stopped midway (Ctrl-C): owners' Machines half rolled, one maybe on an image not
            # yet proven, and a worker image no relay was deployed with. Undo, as for a failure.
            self.say("deploy: INTERRUPTED; rolling back what was deployed")
            self.roll_back(previous)
            raise
        self.remember_good()
        if self.fly.dry_run:
            self.say("deploy: dry run; nothing was changed.")
        else:
            self.say(f"deploy: done; both apps run {sha[:12]}, the worker sleeps and wakes through Flycast.")

    def step(self, text: str) -> None:
        self.say(f"==> {text}")

    def check_mode(self) -> None:
        """A relay in per-owner mode (WORKER_MODE is its Fly secret, not in this shell) has owner
        Machines a shared-mode deploy would leave on the old image, silently: refuse unless the
        mode was said (`--worker-mode shared` after switching back leaves them as they are)."""
        if self.owners is not None:
            return
        owned = [m for m in self.fly.machines(self.worker.name) if m.owner]
        if not owned:
            return
        if not self.shared_said:
            raise DeployFailed(
                f"{self.worker.name} has {len(owned)} owner Machine(s) (per-owner mode): deploy with "
                "`--worker-mode per-owner` (and FLY_API_TOKEN) to roll them too, or `--worker-mode shared` "
                "to leave them on the image they run; nothing was deployed"
            )
        self.say(f"deploy: leaving {len(owned)} owner Machine(s) on the image they run (--worker-mode shared)")
        self.owners_left = True

    def deploy_app(self, app: App, sha: str) -> None:
        self.step(f"deploying {app.name} at {sha[:12]}")
        self.deployed.append(app)
        self.fly.deploy(app.name, app.config, app.dockerfile, sha)
        self.wait_started(app)
        self.check_sha(app, sha)

    def machines(self, app: App) -> list[Machine]:
        """The app's own Machines, the ones `flyctl deploy` manages: never an owner's (per-owner
        mode), which deploy/owners.py rolls and which must not be started or stopped here."""
        return [m for m in self.fly.machines(app.name) if not m.owner]

    # --- 1. before anything leaves this machine ----------------------------------------

    def preflight(self) -> str:
        self.step("checking the tree is clean and the tests pass")
        if self.fly.dry_run:
            self.say(f"would check `git status --porcelain` is empty and run: {self.test_command}")
        else:
            dirty = _git("status", "--porcelain")
            if dirty.strip():
                raise DeployFailed("the tree has uncommitted changes; commit or stash them first:\n" + dirty)
            if subprocess.run(self.test_command, shell=True, check=False).returncode != 0:
                raise DeployFailed(f"the tests failed (`{self.test_command}`); nothing was deployed")
        return _git("rev-parse", "HEAD").strip()

    # --- 3. machines started, checks passing ----------------------------------------------

    def wait_started(self, app: App) -> list[Machine]:
        self.step(f"waiting for every {app.name} machine to be started with passing checks")
        deadline = self.clock() + self.wait_s
        started_once = False
        while True:
            machines = self.machines(app)
            if self.fly.dry_run:
                return machines
            if not machines:
                raise DeployFailed(f"{app.name} has no machines")
            stopped = [m for m in machines if m.state == "stopped"]
            if stopped and not started_once:
                started_once = True  # a deploy can leave machines stopped: start them once
                for machine in stopped:
                    self.fly.run("machine", "start", machine.id, "--app", app.name)
            if all(m.healthy for m in machines):
                return machines
            if self.clock() >= deadline:
                raise DeployFailed(
                    f"{app.name} is not healthy after {self.wait_s:.0f} s: "
                    + ", ".join(
                        f"{m.id} {m.state} (checks: {', '.join(f'{n} {s}' for n, s in m.checks) or 'none'})"
                        for m in machines
                        if not m.healthy
                    )
                )
            self.sleep(self.poll_s)

    # --- 4. the code that runs is the code we deployed ------------------------------------

    def check_sha(self, app: App, sha: str) -> None:
        self.step(f"checking every {app.name} machine reports {sha[:12]}")
        for machine in self.machines(app):
            health = self.fly.health(app.name, machine.id, f"http://127.0.0.1:{app.port}/health")
            if not self.fly.dry_run and health.get("deployed_sha") != sha:
                raise DeployFailed(
                    f"{app.name} machine {machine.id} runs {health.get('deployed_sha')!r}, "
                    f"not {sha[:12]}: old code is still running"
                )

    # --- 5. the worker is reachable only through Flycast ----------------------------------

    def check_worker_is_private(self) -> None:
        self.step(f"checking {self.worker.name} has no public IP and a Flycast address")
        ips = self.fly.ips(self.worker.name)
        if self.fly.dry_run:
            return
        public = [address for kind, address in ips if kind in PUBLIC_IP_TYPES]
        if public:
            raise DeployFailed(
                f"{self.worker.name} is reachable from the internet at {', '.join(public)}: "
                f"`flyctl ips release <ip> --app {self.worker.name}`"
            )
        if not any(kind == "private_v6" for kind, _ in ips):
            raise DeployFailed(
                f"{self.worker.name} has no Flycast address, so the relay cannot wake it: "
                f"`flyctl ips allocate-v6 --private --app {self.worker.name}`"
            )

    # --- 6. a stopped worker wakes on a request through Flycast ---------------------------

    def prove_wake(self, sha: str) -> None:
        self.step(f"stopping {self.worker.name} and waking it through Flycast from {self.relay.name}")
        plain = self.machines(self.worker)
        for machine in plain:
            self.fly.stop(self.worker.name, machine.id)
        deadline = self.clock() + self.wait_s
        while not self.fly.dry_run and any(m.state != "stopped" for m in self.machines(self.worker)):
            if self.clock() >= deadline:
                raise DeployFailed(f"{self.worker.name} did not stop within {self.wait_s:.0f} s")
            self.sleep(self.poll_s)
        relay_machine = next(iter(self.machines(self.relay)), None)
        if relay_machine is None:
            raise DeployFailed(f"{self.relay.name} has no machine to call the worker from")
        url = f"http://{self.worker.name}.flycast:{self.worker.port}/health"
        assert relay_machine is not None
        # Per owner, Flycast may route to any Machine of the app, owners' too: ask for the plain
        # one by id, as the relay asks for each owner's (which proves that header works too).
        instance = plain[0].id if (self.owners is not None or self.owners_left) and plain else ""
        health = self.fly.health(self.relay.name, relay_machine.id, url, instance)
        if not self.fly.dry_run and health.get("deployed_sha") != sha:
            raise DeployFailed(f"the worker woken through Flycast reports {health.get('deployed_sha')!r}, not {sha}")

    # --- rollback -------------------------------------------------------------------------

    def last_good(self) -> dict[str, str]:
        """Images of the last release that passed every check (or, the first time, what runs now)."""
        if LAST_GOOD.exists():
            data: dict[str, str] = json.loads(LAST_GOOD.read_text())
            return data
        images = {}
        for app in (self.worker, self.relay):
            running = [m.image for m in self.machines(app) if m.image]
            if running:
                images[app.name] = running[0]
        return images

    def remember_good(self) -> None:
        if self.fly.dry_run:
            return
        images = {app.name: m.image for app in (self.worker, self.relay) for m in self.machines(app)[:1]}
        LAST_GOOD.parent.mkdir(parents=True, exist_ok=True)
        LAST_GOOD.write_text(json.dumps(images, indent=2))

    def roll_back(self, previous: dict[str, str]) -> None:
        if self.owners is not None:  # back to the exact config each had before this deploy
            self.owners.roll_back()
        for app in reversed(self.deployed):
            image = previous.get(app.name)
            if not image:
                self.say(f"deploy: no earlier good release of {app.name} is known; it stays as it is")
                continue
            self.say(f"deploy: rolling {app.name} back to {image}")
            try:
                self.fly.deploy_image(app.name, app.config, image)
            except FlyError as exc:
                self.say(f"deploy: ROLLBACK of {app.name} FAILED: {exc}")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print every flyctl call instead of making it")
    parser.add_argument("--test-command", default="./scripts/test", help="what must pass first")
    parser.add_argument("--relay-app", default="textslash-relay")
    parser.add_argument("--worker-app", default="textslash-vm")
    parser.add_argument("--wait", type=float, default=300.0, help="seconds to wait for machines (default 300)")
    parser.add_argument("--poll", type=float, default=5.0, help="seconds between looks (default 5)")
    parser.add_argument("--flyctl", default="flyctl", help="the flyctl binary")
    parser.add_argument(
        "--worker-mode",
        choices=("shared", "per-owner"),
        help="per-owner: also roll every owner's own Machine (default: WORKER_MODE, else shared)",
    )
    parser.add_argument(
        "--api-url",
        default=os.environ.get("FLY_API_BASE_URL") or "https://api.machines.dev",
        help="Fly's Machines API, without /v1 (default: FLY_API_BASE_URL, else https://api.machines.dev)",
    )
    parser.add_argument(
        "--prune", action="store_true", help="instead of deploying: destroy the Machines of owners who left"
    )
    parser.add_argument("--yes", action="store_true", help="with --prune: do not ask for confirmation")
    parser.add_argument("--allowed", help="with --prune: the allowlist (default: ALLOWED_PHONE_NUMBERS)")
    args = parser.parse_args(argv)
    # Read as the relay reads it (relay/settings.py): `Per-Owner ` is per-owner there, so here too.
    said = args.worker_mode or os.environ.get("WORKER_MODE", "").strip().lower()
    if said not in ("", "shared", "per-owner"):
        return _refuse(f"WORKER_MODE is malformed: expected shared or per-owner, got {said!r}")
    fly = Fly(binary=args.flyctl, dry_run=args.dry_run)
    owners = None
    if said == "per-owner" or args.prune:
        token = os.environ.get("FLY_API_TOKEN", "").strip()
        if not token:
            return _refuse(
                "per-owner mode and --prune need FLY_API_TOKEN in the environment (never on the command line): "
                f"`export FLY_API_TOKEN=$(fly tokens create deploy --app {args.worker_app})`"
            )
        owners = Owners(fly, args.api_url, token, args.worker_app, 3001, args.wait, args.poll)
    if args.prune:
        assert owners is not None
        return _prune(owners, args.allowed, yes=args.yes)
    deployer = Deployer(
        fly=fly,
        worker=App(args.worker_app, "vm/fly.toml", "vm/Dockerfile", 3001),
        relay=App(args.relay_app, "fly.toml", "Dockerfile", 3000),
        test_command=args.test_command,
        wait_s=args.wait,
        poll_s=args.poll,
        owners=owners,
        shared_said=said == "shared",
    )
    try:
        deployer.run()
    except KeyboardInterrupt:
        return 130  # what a shell reports for Ctrl-C; rolled back, and said so
    except DeployFailed as exc:
        if not deployer.deployed:  # failed before deploying: nothing was printed or rolled back
            print(f"deploy: FAILED: {exc}")  # noqa: T201 - a command-line program
        return 1
    return 0


def _prune(owners: Owners, allowed: str | None, *, yes: bool) -> int:
    """Destroys only owners no longer allowed, so it must know who is: never a guess."""
    env = {"ALLOWED_PHONE_NUMBERS": allowed} if allowed is not None else os.environ
    try:
        phones = EnvReader(env).phones("ALLOWED_PHONE_NUMBERS")
    except ConfigError as exc:
        return _refuse(f"{exc}; --prune destroys the Machines of owners not in it, so it needs it (or --allowed)")
    try:
        return owners.prune(phones, yes=yes)
    except (OwnersFailed, MachinesError) as exc:
        print(f"prune: FAILED: {exc}")  # noqa: T201 - a command-line program
        return 1


def _refuse(text: str) -> int:
    print(f"deploy: {text}", file=sys.stderr)  # noqa: T201 - a command-line program
    return 2


if __name__ == "__main__":
    sys.exit(main())
