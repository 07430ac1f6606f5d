"""Per-owner mode (`WORKER_MODE=per-owner`): the owners' own Machines, which `flyctl deploy`
leaves alone (they are not Fly Launch's), rolled to the worker's new image through the Machines
API one at a time; and `--prune`, which destroys the Machines and volumes of owners who left the
allowlist.

Rolling one Machine: its config with the new image and nothing else changed, the new instance
started, its checks passing, its /health reporting the deployed sha. A Machine that fails goes
back to its previous config, and so does every one rolled before it: the deploy then fails and
rolls the apps back as any other failure does.

A Machine its owner left asleep (stopped or suspended) is rolled and verified like the others
(Fly's update starts it), then stopped again: a sleeping owner costs nothing and keeps costing
nothing, and a Machine that cannot boot the new image is found now, while the deploy can still
undo it, not when the owner next writes. It stays up only if its /health says it is busy (the
owner wrote meanwhile): its own idle timer puts it to sleep after the run.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import httpx

from common.config import mask_phone
from common.machines import Machine, MachinesAPI, MachinesError, Volume
from common.owners import OWNER_KEY, VOLUME_PREFIX, volume_name
from deploy.flyctl import Fly, FlyError

T = TypeVar("T")
AWAKE = "started"


class OwnersFailed(RuntimeError):
    """Rolling or pruning owners' Machines failed; the message names the Machine and why."""


def owner_of(machine: Machine) -> str:
    return machine.metadata.get(OWNER_KEY, "")


def volume_of(machine: Machine) -> str:
    mounts = machine.config.get("mounts") or []
    first = mounts[0] if isinstance(mounts, list) and mounts else {}
    return str(first.get("volume", "")) if isinstance(first, dict) else ""


def describe(machine: Machine) -> str:
    return f"owner Machine {machine.id} ({mask_phone(owner_of(machine))})"


def _has_checks(config: dict[str, Any]) -> bool:
    """Whether the config asks Fly for checks: a Machine that reports none yet is then not healthy."""
    services = config.get("services") or []
    return bool(config.get("checks")) or any(isinstance(s, dict) and s.get("checks") for s in services)


@dataclass
class Owners:
    fly: Fly  # for `machine exec` (the /health check from inside the Machine)
    base_url: str
    token: str = field(repr=False)
    app: str = "textslash-vm"
    port: int = 3001
    wait_s: float = 300.0
    poll_s: float = 5.0
    say: Callable[[str], None] = print
    rolled: list[Machine] = field(default_factory=list)  # as they were before: what a rollback restores

    @property
    def dry_run(self) -> bool:
        return self.fly.dry_run

    # The deploy is synchronous (flyctl is a subprocess); the Machines API client is async.
    def roll(self, sha: str) -> None:
        try:
            self._run(self._roll, sha)
        except MachinesError as exc:  # listing them failed: nothing was changed
            raise OwnersFailed(f"the Machines API failed listing {self.app}'s Machines: {exc}") from None

    def roll_back(self) -> None:
        self._run(self._roll_back)

    def prune(self, allowed: frozenset[str], *, yes: bool, ask: Callable[[str], str] = input) -> int:
        return self._run(self._prune, allowed, yes, ask)

    def _run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return anyio.run(fn, *args)

    @asynccontextmanager
    async def _api(self) -> AsyncIterator[MachinesAPI]:
        async with httpx.AsyncClient() as http:
            yield MachinesAPI(http, self.base_url, self.token, self.app)

    async def _owner_machines(self, api: MachinesAPI) -> list[Machine]:
        return sorted((m for m in await api.machines() if owner_of(m)), key=lambda m: m.id)

    # --- rolling ----------------------------------------------------------------------

    async def _roll(self, sha: str) -> None:
        async with self._api() as api:
            everyone = await api.machines()
            owners = sorted((m for m in everyone if owner_of(m)), key=lambda m: m.id)
            image = self._new_image(everyone)
            self.say(f"==> rolling {len(owners)} owner Machine(s) of {self.app} to {image}, one at a time")
            for machine in owners:
                if machine.image == image and not self.dry_run:
                    self.say(f"{describe(machine)} already runs {image}")
                    continue
                if self.dry_run:
                    await self._dry_roll(machine)
                    continue
                self.rolled.append(machine)  # first: an update that failed halfway is undone too
                try:
                    await self._roll_one(api, machine, image, sha)
                except (MachinesError, FlyError, OwnersFailed) as exc:
                    before = len(self.rolled) - 1
                    raise OwnersFailed(
                        f"{describe(machine)} failed on {image}: {exc}; it"
                        + (f" and the {before} rolled before it go" if before else " goes")
                        + " back to the previous image"
                    ) from None

    def _new_image(self, everyone: list[Machine]) -> str:
        """The image of the app's plain Machine, which `flyctl deploy` just updated."""
        if self.dry_run:
            return "<the image the worker deploy makes>"
        images = {m.image for m in everyone if not owner_of(m)}
        if len(images) != 1:
            raise OwnersFailed(
                f"{self.app} should have one image on its plain (owner-less) Machines after the deploy, "
                f"found {sorted(images) or 'none'}: cannot tell which image to roll the owners to"
            )
        return images.pop()

    async def _dry_roll(self, machine: Machine) -> None:
        asleep = machine.state != AWAKE
        self.say(
            f"would update {describe(machine)}, now {machine.state} on {machine.image}, to the new image, "
            "wait for it started with passing checks"
            + (
                ", check its /health, then stop it again (its owner left it asleep)"
                if asleep
                else ", check its /health"
            )
        )
        self._health(machine.id)

    async def _roll_one(self, api: MachinesAPI, machine: Machine, image: str, sha: str) -> None:
        asleep = machine.state != AWAKE
        self.say(f"updating {describe(machine)} ({machine.state}) from {machine.image}")
        updated = await api.update_machine(machine.id, {**machine.config, "image": image})
        await self._wait_healthy(api, updated)
        health = await anyio.to_thread.run_sync(self._health, machine.id)
        if health.get("deployed_sha") != sha:
            raise OwnersFailed(f"its /health reports {health.get('deployed_sha')!r}, not {sha[:12]}")
        if asleep and health.get("busy") is not True:
            await api.stop(machine.id)
            self.say(f"{describe(machine)} runs {sha[:12]}; stopped again, as its owner left it")
        else:
            self.say(f"{describe(machine)} runs {sha[:12]}")

    async def _wait_healthy(self, api: MachinesAPI, updated: Machine) -> None:
        deadline = anyio.current_time() + self.wait_s
        if not await api.wait(updated.id, AWAKE, self.wait_s, updated.instance_id):
            raise OwnersFailed(f"not started within {self.wait_s:.0f} s")
        while True:
            now = await api.machine(updated.id)
            if now.healthy and (now.checks or not _has_checks(now.config)):
                return
            if anyio.current_time() >= deadline:
                checks = ", ".join(f"{name} {status}" for name, status in now.checks) or "none reported"
                raise OwnersFailed(f"{now.state}, checks not passing after {self.wait_s:.0f} s ({checks})")
            await anyio.sleep(self.poll_s)

    def _health(self, machine_id: str) -> dict[str, Any]:
        return self.fly.health(self.app, machine_id, f"http://127.0.0.1:{self.port}/health")

    async def _roll_back(self) -> None:
        if not self.rolled:
            return
        async with self._api() as api:
            for machine in reversed(self.rolled):
                try:
                    await self._restore(api, machine)
                except MachinesError as exc:
                    self.say(f"deploy: ROLLBACK of {describe(machine)} FAILED: {exc}")
        self.rolled.clear()

    async def _restore(self, api: MachinesAPI, machine: Machine) -> None:
        self.say(f"deploy: rolling {describe(machine)} back to {machine.image}")
        asleep = machine.state != AWAKE
        # A sleeping owner's Machine goes back without booting: it ran this image before.
        updated = await api.update_machine(machine.id, machine.config, skip_launch=asleep)
        if asleep:
            if (await api.machine(machine.id)).state in (AWAKE, "starting"):  # Fly started it all the same
                await api.stop(machine.id)
        elif not await api.wait(machine.id, AWAKE, self.wait_s, updated.instance_id):
            self.say(
                f"deploy: {describe(machine)} is back on {machine.image} but did not start within {self.wait_s:.0f} s"
            )

    # --- pruning ----------------------------------------------------------------------

    async def _prune(self, allowed: frozenset[str], yes: bool, ask: Callable[[str], str]) -> int:
        async with self._api() as api:
            gone = [m for m in await self._owner_machines(api) if owner_of(m) not in allowed]
            orphans = self._orphan_volumes(await api.volumes(), allowed, gone)
            if not gone and not orphans:
                self.say("prune: every owner Machine belongs to an allowed owner; nothing to destroy.")
                return 0
            self.say(f"prune: {len(gone)} Machine(s) of owners no longer in ALLOWED_PHONE_NUMBERS:")
            for machine in gone:
                self.say(
                    f"  {mask_phone(owner_of(machine))}  Machine {machine.id}  volume {volume_of(machine) or 'none'}"
                )
            for volume in orphans:
                self.say(f"  (a removed owner, no Machine)  volume {volume.id} ({volume.name})")
            if self.dry_run:
                self.say("prune: dry run; nothing was destroyed.")
                return 0
            if not yes and not _confirmed(ask):
                self.say("prune: not confirmed; nothing was destroyed.")
                return 1
            volumes = 0
            for machine in gone:
                volumes += await self._destroy(api, machine)
            for volume in orphans:
                await api.destroy_volume(volume.id)
                self.say(f"prune: destroyed volume {volume.id}")
            self.say(f"prune: done; destroyed {len(gone)} Machine(s) and {volumes + len(orphans)} volume(s).")
            return 0

    def _orphan_volumes(self, volumes: list[Volume], allowed: frozenset[str], gone: list[Machine]) -> list[Volume]:
        """Owner volumes with no Machine (a create that failed halfway) whose name is no allowed owner's."""
        kept = {volume_name(phone) for phone in allowed}
        listed = {volume_of(m) for m in gone}
        return [
            v
            for v in volumes
            if v.name.startswith(VOLUME_PREFIX)
            and v.name not in kept
            and not v.attached_machine_id
            and v.id not in listed
            and v.state != "destroyed"
        ]

    async def _destroy(self, api: MachinesAPI, machine: Machine) -> bool:
        """Destroys the Machine (forced: it may be running) and its volume; whether it had one."""
        await api.destroy_machine(machine.id)
        volume = volume_of(machine)
        if volume:
            await self._until_detached(api, volume)
            await api.destroy_volume(volume)
        self.say(
            f"prune: destroyed Machine {machine.id}"
            + (f" and volume {volume}" if volume else " (it had no volume)")
            + f" of {mask_phone(owner_of(machine))}"
        )
        return bool(volume)

    async def _until_detached(self, api: MachinesAPI, volume_id: str) -> None:
        """Fly detaches a destroyed Machine's volume a moment later; an attached one cannot go."""
        deadline = anyio.current_time() + self.wait_s
        while any(v.id == volume_id and v.attached_machine_id for v in await api.volumes()):
            if anyio.current_time() >= deadline:
                raise OwnersFailed(f"volume {volume_id} is still attached {self.wait_s:.0f} s after its Machine went")
            await anyio.sleep(self.poll_s)


def _confirmed(ask: Callable[[str], str]) -> bool:
    try:
        answer = ask("Destroy these Machines and volumes, with everything on them? Type yes to go on: ")
    except EOFError:  # no terminal: never a yes
        return False
    return answer.strip().lower() == "yes"
