"""Which worker serves an owner, and how the relay reaches it.

`WORKER_MODE=shared` (the default): one worker serves every owner, at CLAUDE_HOST.

`WORKER_MODE=per-owner`: each owner has a Machine of their own in the worker app, made through
Fly's Machines API on the owner's first call that needs a worker (owners who never write cost
nothing): a volume, then a Machine on it with vm/fly.toml's services, checks, restart policy,
size and mount, the image of the app's Machine from a plain deploy (or WORKER_IMAGE), and the
owner in its environment and metadata. Every call for the owner goes to CLAUDE_HOST with
`fly-force-instance-id: <its id>`, so Fly's proxy sends it to that Machine, starting it if it
sleeps, as it does for the shared worker.

Making one survives any crash without a second Machine or a lost first: the Machine is found
by its metadata (`textslash_owner`) and the volume by its name before anything is made, and a
create that got no clear answer is looked for before it is tried again. The Machine made is
recorded in SQLite (`machines`), so later calls cost no API call; a relay that lost its
database finds the Machine again the same way.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import tomllib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import anyio
import httpx

from common.machines import Machine, MachinesAPI, MachinesError, MaybeMade, Volume
from common.owners import OWNER_KEY, owner_token, volume_name
from relay import store
from relay.settings import FleetSettings, Settings, mask_phone
from relay.worker_client import WorkerClient

logger = logging.getLogger(__name__)

WORKER_FLY_TOML = Path(__file__).resolve().parents[1] / "vm" / "fly.toml"
START_WAIT_S = 120.0  # a new Machine pulls its image first
CREATE_TRIES = 3
SHARED = ""  # the worker key of the one shared worker


class FleetError(RuntimeError):
    """An owner's Machine could not be made or found; the message is the owner's to read."""


class NoImage(MachinesError):
    """Nothing to make a Machine from: no WORKER_IMAGE, and the worker app has no Machine from
    a plain deploy. Not Fly's failure, and no retry mends it: the owner is told what will."""


NO_IMAGE = "your VM cannot be set up yet: the worker app has no image (deploy it once, or set WORKER_IMAGE)"


@dataclass(frozen=True)
class Placement:
    """An owner's Machine as the relay recorded it."""

    phone: str
    machine_id: str
    volume_id: str
    region: str
    image: str
    created_at: float


def placement(conn: sqlite3.Connection, phone: str) -> Placement | None:
    row = conn.execute("SELECT * FROM machines WHERE phone = ?", (phone,)).fetchone()
    if row is None:
        return None
    return Placement(row["phone"], row["machine_id"], row["volume_id"], row["region"], row["image"], row["created_at"])


def _record(conn: sqlite3.Connection, found: Placement) -> None:
    conn.execute(
        "INSERT INTO machines (phone, machine_id, volume_id, region, image, created_at) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (phone) DO UPDATE SET machine_id = excluded.machine_id, volume_id = excluded.volume_id, "
        "region = excluded.region, image = excluded.image, created_at = excluded.created_at",
        (found.phone, found.machine_id, found.volume_id, found.region, found.image, found.created_at),
    )


def _forget(conn: sqlite3.Connection, phone: str) -> None:
    conn.execute("DELETE FROM machines WHERE phone = ?", (phone,))


def bearer_for(settings: Settings, phone: str) -> str:
    """The token between the relay and the worker that serves `phone`: each owner's own when
    each has a Machine (common/owners.py), so one Machine cannot speak for another owner."""
    return owner_token(settings.worker_token, phone) if settings.per_owner else settings.worker_token


# --- the Machine's config, from vm/fly.toml ---------------------------------------------


@dataclass(frozen=True)
class Template:
    """What vm/fly.toml says a worker Machine is, in the Machines API's terms."""

    region: str
    config: dict[str, Any]  # without image, owner, volume

    @classmethod
    def from_fly_toml(cls, path: Path = WORKER_FLY_TOML) -> Template:
        return cls.from_toml(tomllib.loads(path.read_text()))

    @classmethod
    def from_toml(cls, toml: Mapping[str, Any]) -> Template:
        http = toml["http_service"]
        service = {
            "protocol": "tcp",
            "internal_port": http["internal_port"],
            # `off` here as in vm/fly.toml: the worker stops itself when idle (vm/idle.py).
            "autostop": http.get("auto_stop_machines", "off"),
            "autostart": bool(http.get("auto_start_machines", True)),
            "min_machines_running": http.get("min_machines_running", 0),
            # What flyctl makes of an [http_service]: the proxy's http ports.
            "ports": [
                {"port": 80, "handlers": ["http"], "force_https": bool(http.get("force_https", False))},
                {"port": 443, "handlers": ["tls", "http"]},
            ],
            "checks": [
                {"type": "http", "protocol": "http", **{k: v for k, v in check.items() if k != "headers"}}
                for check in http.get("checks", [])
            ],
        }
        vm = toml["vm"][0]
        config = {
            "env": {str(k): str(v) for k, v in toml.get("env", {}).items()},
            "services": [service],
            "guest": _guest(vm["size"], vm["memory"]),
            # The Machines API's default is `always`, which would start the worker again each
            # time it exits idle: `on-failure`, as for a deployed Machine, lets it sleep.
            "restart": {"policy": "on-failure"},
            "stop_config": {"signal": toml.get("kill_signal", "SIGTERM"), "timeout": f"{toml.get('kill_timeout', 5)}s"},
            "mounts": [{"path": toml["mounts"][0]["destination"]}],
        }
        return cls(region=toml.get("primary_region", ""), config=config)

    def for_owner(self, phone: str, *, image: str, volume_id: str, token: str) -> dict[str, Any]:
        config = dict(self.config)
        # The owner the worker serves, and its own token (common/owners.py): never another's.
        config["env"] = {**self.config["env"], "OWNER_PHONE": phone, "OWNER_TOKEN": token}
        config["mounts"] = [{**self.config["mounts"][0], "volume": volume_id}]
        config["image"] = image
        config["metadata"] = {OWNER_KEY: phone}
        return config


def _guest(size: str, memory: str) -> dict[str, Any]:
    kind = re.fullmatch(r"(shared|performance)-cpu-(\d+)x", size)
    amount = re.fullmatch(r"(\d+)\s*(gb|mb)", memory.strip().lower())
    if kind is None or amount is None:
        raise ValueError(f"vm/fly.toml: size {size!r} or memory {memory!r} is not one the relay can read")
    mb = int(amount.group(1)) * (1024 if amount.group(2) == "gb" else 1)
    return {"cpu_kind": kind.group(1), "cpus": int(kind.group(2)), "memory_mb": mb}


# --- which worker, and how to call it ---------------------------------------------------


class Workers(Protocol):
    """Which worker serves an owner (its key: the lane its calls go in, its row in `workers`),
    and the client that reaches it."""

    def key_of(self, phone: str) -> str: ...
    async def known(self, key: str) -> WorkerClient | None: ...
    async def make(self, key: str, creating: Callable[[], Awaitable[None]] | None = None) -> WorkerClient: ...
    async def gone(self, key: str) -> bool: ...
    async def retoken(self, key: str) -> bool: ...


class SharedWorker:
    """WORKER_MODE=shared: one worker, one key, one client."""

    def __init__(self, client: WorkerClient) -> None:
        self._client = client

    def key_of(self, phone: str) -> str:
        return SHARED

    async def known(self, key: str) -> WorkerClient | None:
        return self._client

    async def make(self, key: str, creating: Callable[[], Awaitable[None]] | None = None) -> WorkerClient:
        return self._client

    async def gone(self, key: str) -> bool:
        return False  # the shared worker is deployed, never made or removed by the relay

    async def retoken(self, key: str) -> bool:
        return False  # its WORKER_TOKEN is set on both apps by hand


@dataclass
class Fleet:
    """WORKER_MODE=per-owner: each owner's own Machine, made on their first call."""

    settings: Settings
    fleet: FleetSettings
    api: MachinesAPI
    db: store.Database
    http: httpx.AsyncClient
    clock: Callable[[], float]
    template: Template = field(default_factory=Template.from_fly_toml)
    _clients: dict[str, WorkerClient] = field(default_factory=dict)
    # One Machine made at a time, across owners: Fly limits creates to about one a second.
    _making: anyio.Lock = field(default_factory=anyio.Lock)

    def key_of(self, phone: str) -> str:
        return phone

    async def known(self, phone: str) -> WorkerClient | None:
        """The client of the owner's Machine if one is recorded; never makes one."""
        if phone in self._clients:
            return self._clients[phone]
        found = await self.db.run(placement, phone)
        return self._client(found) if found is not None else None

    async def make(self, phone: str, creating: Callable[[], Awaitable[None]] | None = None) -> WorkerClient:
        """The owner's Machine, found or made (and started), and recorded; `creating` is awaited
        first when one must be made (to tell the owner)."""
        try:
            async with self._making:
                if (client := await self.known(phone)) is not None:
                    return client
                machine, made = await self._find_or_make(phone, creating)
                found = _placement(phone, machine, self.clock())
                await self.db.run(_record_now, found)  # before the wait: a crash then loses nothing
                logger.info("%s: Machine %s on volume %s", mask_phone(phone), found.machine_id, found.volume_id)
            # Outside the lock: another owner's Machine need not wait for this one to boot.
            if made and not await self.api.wait(machine.id, "started", START_WAIT_S, machine.instance_id):
                # It exists and is recorded; the proxy starts it with the call, like a sleeping one.
                logger.warning("Machine %s did not say it started within %.0f s", machine.id, START_WAIT_S)
        except NoImage:
            logger.warning("could not make the Machine of %s: %s", mask_phone(phone), NO_IMAGE)
            raise FleetError(NO_IMAGE) from None
        except MachinesError as exc:
            logger.warning("could not make the Machine of %s: %s", mask_phone(phone), exc)
            raise FleetError(f"could not create your VM ({exc.status or 'no answer'} from Fly)") from None
        return self._client(found)

    async def gone(self, phone: str) -> bool:
        """Whether the owner's recorded Machine no longer exists (destroyed outside the relay):
        then it is forgotten, and the next call finds or makes another (on the same volume,
        which a destroyed Machine leaves). Asked when the Machine never woke."""
        found = await self.db.run(placement, phone)
        if found is None:
            return False
        try:
            machine = await self.api.machine(found.machine_id)
        except MachinesError as exc:
            if exc.status != 404:
                return False  # Fly cannot say now: the Machine stays recorded
            machine = None
        if machine is not None and machine.state not in ("destroyed", "destroying"):
            return False
        logger.warning("%s: Machine %s is gone; the next call makes another", mask_phone(phone), found.machine_id)
        self._clients.pop(phone, None)
        await self.db.run(_forget, phone)
        return True

    async def retoken(self, phone: str) -> bool:
        """The owner's Machine refused the owner's token: WORKER_TOKEN was changed on the relay
        since it was made, and its OWNER_TOKEN derives from the old one. Its config gets the
        token of now (Fly restarts it on it); True when it did, and the call may go again."""
        found = await self.db.run(placement, phone)
        if found is None:
            return False
        token = bearer_for(self.settings, phone)
        try:
            machine = await self.api.machine(found.machine_id)
            env = machine.config.get("env")
            if not isinstance(env, dict) or env.get("OWNER_TOKEN") == token:
                return False  # it has the right one: something else is wrong, and is reported
            config = {**machine.config, "env": {**env, "OWNER_TOKEN": token}}
            updated = await self.api.update_machine(machine.id, config)
            logger.info("%s: Machine %s given the token of the current WORKER_TOKEN", mask_phone(phone), machine.id)
            await self.api.wait(machine.id, "started", START_WAIT_S, updated.instance_id)
        except MachinesError as exc:
            logger.warning("could not give Machine %s its new token: %s", found.machine_id, exc)
            return False
        return True

    def _client(self, found: Placement) -> WorkerClient:
        client = self._clients.get(found.phone)
        if client is None or client.instance != found.machine_id:
            client = self._clients[found.phone] = WorkerClient(
                self.http,
                base_url=self.settings.claude_host,
                token=bearer_for(self.settings, found.phone),
                poll_interval=self.settings.wake_poll_s,
                instance=found.machine_id,
            )
        return client

    # --- finding and making -------------------------------------------------------------

    async def _find_or_make(self, phone: str, creating: Callable[[], Awaitable[None]] | None) -> tuple[Machine, bool]:
        """The owner's Machine, and whether it was made just now."""
        if (machine := await self._existing(phone)) is not None:
            return machine, False
        if creating is not None:
            await creating()
        region = self.fleet.region or self.template.region
        image = self.fleet.image or await self._plain_image()
        volume = await self._volume(phone, region)
        return await self._create(phone, volume, region, image), True

    async def _existing(self, phone: str) -> Machine | None:
        # One being destroyed (outside the relay) is no longer theirs to use.
        found = [m for m in await self.api.machines({OWNER_KEY: phone}) if m.state not in ("destroyed", "destroying")]
        # Never made so here (one made from outside, say): the same one every time, by id, and said.
        found.sort(key=lambda m: m.id)
        if len(found) > 1:
            logger.warning("%s has %d Machines; using %s", mask_phone(phone), len(found), found[0].id)
        return found[0] if found else None

    async def _plain_image(self) -> str:
        """The image of the app's Machine from a plain deploy (one that belongs to no owner)."""
        for machine in await self.api.machines():
            if OWNER_KEY not in machine.metadata and machine.image:
                return machine.image
        raise NoImage("no image to start from: deploy the worker app once, or set WORKER_IMAGE")

    async def _volume(self, phone: str, region: str) -> Volume:
        name = volume_name(phone)
        for _ in range(CREATE_TRIES):
            volumes = await self.api.volumes()
            free = [v for v in volumes if _usable(v, name, region)]
            if free:
                return free[0]
            await self._not_releasing([v for v in volumes if v.name == name and v.region == region])
            try:
                return await self.api.create_volume(name, region, self.fleet.volume_gb)
            except MaybeMade as exc:
                logger.info("creating the volume of %s: %s; looking for it", mask_phone(phone), exc)
        raise MachinesError(f"the volume could not be created after {CREATE_TRIES} tries")

    async def _not_releasing(self, theirs: list[Volume]) -> None:
        """A volume of the owner's still attached to a Machine that is gone (destroyed outside
        the relay; Fly detaches it a little later) holds their checkouts: wait for it, rather
        than make a second volume and leave their work on the first."""
        for volume in theirs:
            if not volume.attached_machine_id:
                continue
            try:
                holder: Machine | None = await self.api.machine(volume.attached_machine_id)
            except MachinesError as exc:
                if exc.status != 404:
                    raise
                holder = None
            if holder is None or holder.state in ("destroyed", "destroying"):
                raise MachinesError(f"volume {volume.id} is still being released by Fly", 409)

    async def _create(self, phone: str, volume: Volume, region: str, image: str) -> Machine:
        token = bearer_for(self.settings, phone)
        body = {
            "name": f"textslash-{volume.name.removeprefix('owner_')}",
            "region": region,
            "config": self.template.for_owner(phone, image=image, volume_id=volume.id, token=token),
        }
        for _ in range(CREATE_TRIES):
            try:
                return await self.api.create_machine(body)
            except MaybeMade as exc:
                logger.info("creating the Machine of %s: %s; looking for it", mask_phone(phone), exc)
                if (made := await self._existing(phone)) is not None:
                    return made
        raise MachinesError(f"the Machine could not be created after {CREATE_TRIES} tries")


def _usable(volume: Volume, name: str, region: str) -> bool:
    """The owner's volume, free to mount: a Machine of theirs destroyed outside the relay left
    it (with their checkouts), or a create was cut short after it."""
    return (
        volume.name == name and volume.region == region and volume.state == "created" and not volume.attached_machine_id
    )


def _placement(phone: str, machine: Machine, now: float) -> Placement:
    mounts = machine.config.get("mounts")
    # Read defensively: a malformed answer must not fail the owner's lane on every try.
    first = mounts[0] if isinstance(mounts, list) and mounts else {}
    volume = first.get("volume") if isinstance(first, dict) else ""
    return Placement(phone, machine.id, volume if isinstance(volume, str) else "", machine.region, machine.image, now)


def _record_now(conn: sqlite3.Connection, found: Placement) -> None:
    with store.transaction(conn):
        _record(conn, found)
