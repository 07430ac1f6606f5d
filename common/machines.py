"""A small client of Fly's Machines API (`/v1/apps/{app}/...`): the relay creates and finds each
owner's Machine and volume with it (relay/fleet.py), and `python -m deploy` rolls and prunes them.

Fly limits the API's rate (about one request a second per action and Machine, with a small
burst) and answers 429 past it; it also fails now and then with a 5xx. Every call is retried on
those with backoff (Fly's `Retry-After` when it gives one), except a create that failed with a
5xx or a broken connection: that one may have been made all the same, so the caller looks for it
before creating again (creating is idempotent one level up, by name or metadata).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

logger = logging.getLogger(__name__)

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
ATTEMPTS = 6  # 0.5 + 1 + 2 + 4 + 8 s of backoff at most, before jitter
MAX_WAIT_S = 60  # Fly's longest `wait` (longer ones are refused)


class MachinesError(RuntimeError):
    """A call that failed for good; `status` is the HTTP status (0: no answer)."""

    def __init__(self, text: str, status: int = 0) -> None:
        super().__init__(text)
        self.status = status


class MaybeMade(MachinesError):
    """A create that got no clear answer (a 5xx or a broken connection): it may exist."""


@dataclass(frozen=True)
class Machine:
    id: str
    state: str
    region: str
    instance_id: str
    config: dict[str, Any]
    checks: tuple[tuple[str, str], ...] = ()  # (name, status)

    @property
    def metadata(self) -> dict[str, str]:
        found = self.config.get("metadata")
        return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}

    @property
    def image(self) -> str:
        return str(self.config.get("image", ""))

    @property
    def healthy(self) -> bool:
        return self.state == "started" and all(status == "passing" for _, status in self.checks)

    @classmethod
    def from_json(cls, data: Any) -> Machine:
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise MachinesError("the Machines API answered a machine without an id")
        config = data.get("config")
        checks = data.get("checks")
        # Any field but the id may be missing or of another type: a Machine is then taken as
        # having none of it, never a TypeError that fails the owner's lane on each try.
        checks = checks if isinstance(checks, list) else []
        return cls(
            id=data["id"],
            state=str(data.get("state", "")),
            region=str(data.get("region", "")),
            instance_id=str(data.get("instance_id", "")),
            config=config if isinstance(config, dict) else {},
            checks=tuple((str(c.get("name", "")), str(c.get("status", ""))) for c in checks if isinstance(c, dict)),
        )


@dataclass(frozen=True)
class Volume:
    id: str
    name: str
    state: str
    region: str
    attached_machine_id: str

    @classmethod
    def from_json(cls, data: Any) -> Volume:
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise MachinesError("the Machines API answered a volume without an id")
        return cls(
            id=data["id"],
            name=str(data.get("name", "")),
            state=str(data.get("state", "")),
            region=str(data.get("region", "")),
            attached_machine_id=str(data.get("attached_machine_id") or ""),
        )


@dataclass
class MachinesAPI:
    """One app's Machines and volumes. `base_url` is without `/v1` (`http://_api.internal:4280`
    inside Fly's network, `https://api.machines.dev` outside)."""

    http: httpx.AsyncClient
    base_url: str
    token: str = field(repr=False)
    app: str
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep
    backoff_s: float = 0.5
    timeout_s: float = 30.0

    # --- Machines ---------------------------------------------------------------------

    async def machines(self, metadata: Mapping[str, str] | None = None) -> list[Machine]:
        """The app's Machines; with `metadata`, only those whose metadata has every pair."""
        params = {f"metadata.{k}": v for k, v in (metadata or {}).items()}
        machines = [Machine.from_json(m) for m in _listed(await self._call("GET", "/machines", params=params))]
        # Filtered here too: an API that ignored the filter must not hand one owner's Machine to another.
        return [m for m in machines if all(m.metadata.get(k) == v for k, v in (metadata or {}).items())]

    async def machine(self, machine_id: str) -> Machine:
        return Machine.from_json(await self._call("GET", f"/machines/{machine_id}"))

    async def create_machine(self, body: dict[str, Any]) -> Machine:
        return Machine.from_json(await self._call("POST", "/machines", json=body, creates=True))

    async def update_machine(self, machine_id: str, config: dict[str, Any], *, skip_launch: bool = False) -> Machine:
        """The Machine with a new config (a new image, say): Fly restarts it on it (starts it, if
        it was stopped), unless `skip_launch`."""
        body: dict[str, Any] = {"config": config}
        if skip_launch:
            body["skip_launch"] = True
        return Machine.from_json(await self._call("POST", f"/machines/{machine_id}", json=body))

    async def wait(self, machine_id: str, state: str, timeout_s: float, instance_id: str = "") -> bool:
        """Until the Machine is in `state` (of `instance_id`, its config version, if given);
        False when `timeout_s` passed first. Fly's own waits are 60 s at most: longer ones repeat."""
        deadline = anyio.current_time() + timeout_s
        while (left := deadline - anyio.current_time()) > 0:
            params = {"state": state, "timeout": str(max(1, min(MAX_WAIT_S, int(left))))}
            if instance_id:
                params["instance_id"] = instance_id
            try:
                await self._call("GET", f"/machines/{machine_id}/wait", params=params, patience_s=left + 10)
                return True
            except MachinesError as exc:
                if exc.status != 408:
                    raise
        return False

    async def start(self, machine_id: str) -> None:
        await self._call("POST", f"/machines/{machine_id}/start")

    async def stop(self, machine_id: str) -> None:
        await self._call("POST", f"/machines/{machine_id}/stop")

    async def destroy_machine(self, machine_id: str) -> None:
        await self._call("DELETE", f"/machines/{machine_id}", params={"force": "true"}, gone_ok=True)

    # --- volumes ----------------------------------------------------------------------

    async def volumes(self) -> list[Volume]:
        return [Volume.from_json(v) for v in _listed(await self._call("GET", "/volumes"))]

    async def create_volume(self, name: str, region: str, size_gb: int) -> Volume:
        body = {"name": name, "region": region, "size_gb": size_gb}
        return Volume.from_json(await self._call("POST", "/volumes", json=body, creates=True))

    async def destroy_volume(self, volume_id: str) -> None:
        await self._call("DELETE", f"/volumes/{volume_id}", gone_ok=True)

    # --- the one way out ----------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        creates: bool = False,
        gone_ok: bool = False,
        patience_s: float | None = None,
    ) -> Any:
        url = f"{self.base_url.rstrip('/')}/v1/apps/{self.app}{path}"
        what = f"{method} {path}"
        for attempt in range(ATTEMPTS):
            last = attempt == ATTEMPTS - 1
            try:
                response = await self.http.request(
                    method,
                    url,
                    params=params,
                    json=json,
                    headers={"Authorization": f"Bearer {self.token}"},
                    timeout=patience_s or self.timeout_s,
                )
            except (httpx.TransportError, OSError) as exc:
                if creates:
                    raise MaybeMade(f"{what}: no answer ({type(exc).__name__})") from None
                if last:
                    raise MachinesError(f"{what}: no answer ({type(exc).__name__})") from None
                await self.sleep(self._backoff(attempt, None))
                continue
            status = response.status_code
            if status < 300:
                return _json(response)
            if gone_ok and status == 404:
                return None
            if status in RETRY_STATUS and not last:
                if creates and status != 429:  # only a 429 surely made nothing
                    raise MaybeMade(f"{what}: HTTP {status} {_detail(response)}", status)
                wait = self._backoff(attempt, response.headers.get("retry-after"))
                logger.info("Machines API %s: HTTP %d; trying again in %.1f s", what, status, wait)
                await self.sleep(wait)
                continue
            raise (MaybeMade if creates and status >= 500 else MachinesError)(
                f"{what}: HTTP {status} {_detail(response)}", status
            )
        raise AssertionError("unreachable")  # pragma: no cover - the last attempt returns or raises

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        if retry_after and retry_after.strip().isdigit():
            return min(float(retry_after.strip()), 30.0)
        return self.backoff_s * 2.0**attempt * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not secrecy


def _listed(found: Any) -> list[Any]:
    """A list answer. Anything else is an error, not an empty list: taken as "no Machines", it
    would have the relay make a second Machine for an owner who has one."""
    if not isinstance(found, list):
        raise MachinesError("the Machines API answered a list with something else")
    return found


def _json(response: httpx.Response) -> Any:
    try:
        return response.json() if response.content else None
    except ValueError:
        raise MachinesError(f"the Machines API answered HTTP {response.status_code} without JSON") from None


def _detail(response: httpx.Response) -> str:
    """Fly's `error` field, short: never the request (whose env may hold a token)."""
    try:
        body = response.json()
    except ValueError:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    return str(error)[:200] if error else ""
