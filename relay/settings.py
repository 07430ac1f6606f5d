"""The relay's configuration, read once from the environment and validated.

Every problem names the variable at fault; values of secrets never appear in a message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common.config import E164, ConfigError, EnvReader, mask_phone, repo_url_problem
from common.protocol import MODEL_NAME, REPO_NAME
from relay.zones import zone

__all__ = ["E164", "ConfigError", "Repo", "Settings", "mask_phone"]

# Fly's price for the worker's size in vm/fly.toml (shared-cpu-2x, 2 GB) in iad, started: $13.39
# for 30 days of running on the pricing page (fly.io/docs/about/pricing, as of October-November
# 2026; it was $11.39 before), billed by the second. Regions differ: set yours.
FLY_WORKER_HOUR_USD = 0.0186
# WhatsApp lets a business send free-form messages for 24 hours after the user's last message
# (Twilio error 63016 after that). The relay holds what would be sent later than this: 24 hours
# less 5 minutes, room for a send's retries and Twilio's queue (relay/window.py).
WHATSAPP_WINDOW_MS = 24 * 3_600_000 - 5 * 60_000
CONTENT_SID = r"HX[0-9a-fA-F]{32}"


@dataclass(frozen=True)
class Repo:
    """A repository owners may work on: `name` is what they type (`use <name>`)."""

    name: str
    url: str


@dataclass(frozen=True)
class Settings:
    public_url: str
    twilio_account_sid: str
    twilio_auth_token: str = field(repr=False)
    twilio_whatsapp_number: str
    allowed_phone_numbers: frozenset[str]
    claude_host: str
    worker_token: str = field(repr=False)
    twilio_api_base_url: str = "https://api.twilio.com"
    approval_timeout_s: float = 1800.0
    wake_timeout_s: float = 30.0
    wake_poll_s: float = 0.06
    stall_check_s: float = 120.0
    min_send_interval_s: float = 0.0
    relay_db: Path = Path("var/relay.sqlite3")
    retention_s: float = 30 * 86400.0
    # Every repository an owner may work on, the first the default; empty: the worker's own REPO_URL.
    repos: tuple[Repo, ...] = ()
    whatsapp_window_s: float = WHATSAPP_WINDOW_MS / 1000
    template_content_sid: str = ""  # an approved WhatsApp template that reopens the window; "": none
    buttons: bool = True  # quick-reply buttons (Twilio's Content API) on approvals and "Working on it"
    claude_model: str = ""  # the default model ("" = Claude Code's own default)
    monthly_budget_usd: float | None = None  # per owner, per calendar month (UTC); None: no ceiling
    run_budget_usd: float | None = None  # one run stops when its cost reaches this
    vm_cost_per_hour_usd: float = FLY_WORKER_HOUR_USD
    owner_tz: str = "UTC"  # the zone of schedules' times, until an owner names theirs (`tz <name>`)
    # A Machine of its own for each owner (WORKER_MODE=per-owner: relay/fleet.py); None: one
    # worker for every owner (`shared`).
    fleet: FleetSettings | None = None
    deployed_sha: str = "dev"
    port: int = 3000
    host: str = "0.0.0.0"

    @property
    def per_owner(self) -> bool:
        return self.fleet is not None

    @property
    def images_dir(self) -> Path:
        """The relay's image cache lives beside its database, on the same volume."""
        return self.relay_db.parent / "images"

    @property
    def media_dir(self) -> Path:
        """The photos and files owners send, kept until their prompt is done (relay/media.py)."""
        return self.relay_db.parent / "media"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        reader = EnvReader(env)
        return cls(
            public_url=reader.url("PUBLIC_URL").rstrip("/"),
            twilio_account_sid=reader.matching("TWILIO_ACCOUNT_SID", r"AC[0-9a-fA-F]{32}", "AC + 32 hex digits"),
            twilio_auth_token=reader.secret("TWILIO_AUTH_TOKEN"),
            twilio_whatsapp_number=reader.phone("TWILIO_WHATSAPP_NUMBER"),
            allowed_phone_numbers=reader.phones("ALLOWED_PHONE_NUMBERS"),
            claude_host=reader.url("CLAUDE_HOST").rstrip("/"),
            worker_token=reader.secret("WORKER_TOKEN"),
            twilio_api_base_url=reader.url("TWILIO_API_BASE_URL", "https://api.twilio.com").rstrip("/"),
            approval_timeout_s=reader.millis("APPROVAL_TIMEOUT_MS", 1_800_000),
            wake_timeout_s=reader.millis("WAKE_TIMEOUT_MS", 30_000),
            wake_poll_s=reader.millis("WAKE_POLL_MS", 60, minimum=10),
            stall_check_s=reader.millis("STALL_CHECK_MS", 120_000),
            min_send_interval_s=reader.millis("TWILIO_MIN_SEND_INTERVAL_MS", 0, minimum=0),
            relay_db=Path(env.get("RELAY_DB") or "var/relay.sqlite3"),
            retention_s=reader.integer("RETENTION_DAYS", 30, minimum=1) * 86400.0,
            repos=_repos(env),
            whatsapp_window_s=reader.millis("WHATSAPP_WINDOW_MS", WHATSAPP_WINDOW_MS),
            template_content_sid=_content_sid(reader, "TWILIO_TEMPLATE_CONTENT_SID"),
            buttons=reader.flag("BUTTONS", True),
            claude_model=_model(env),
            monthly_budget_usd=reader.amount("MONTHLY_BUDGET_USD"),
            run_budget_usd=reader.amount("RUN_BUDGET_USD"),
            vm_cost_per_hour_usd=_hourly(reader),
            owner_tz=_zone(env),
            fleet=_fleet(reader),
            deployed_sha=env.get("DEPLOYED_SHA") or "dev",
            port=reader.integer("PORT", 3000, minimum=1, maximum=65535),
            host=env.get("HOST") or "0.0.0.0",
        )


def _repos(env: Mapping[str, str]) -> tuple[Repo, ...]:
    """REPOS (`name=url,name=url`), else REPO_URL alone (named after its last path part)."""
    raw = env.get("REPOS", "").strip()
    if not raw:
        url = env.get("REPO_URL", "").strip()
        if not url:
            return ()
        if problem := repo_url_problem(url):
            raise ConfigError(f"REPO_URL {problem}")
        return (Repo(_name_from_url(url), url),)
    repos: list[Repo] = []
    # Values are never echoed: a malformed pair may hold a URL with a token in it.
    for number, pair in enumerate(raw.split(","), 1):
        name, sep, url = (part.strip() for part in pair.strip().partition("="))
        where = f"REPOS is malformed: pair {number}"
        if not sep or not name or not url:
            raise ConfigError(f"{where} is not name=url (pairs are separated by commas)")
        if not REPO_NAME.match(name):
            raise ConfigError(f"{where}: a name starts with a-z, then a-z, 0-9, _ or - (at most 40)")
        if problem := repo_url_problem(url):
            raise ConfigError(f"{where}: its URL {problem}")  # (no URL in it: "is malformed: ...")
        if any(r.name == name for r in repos):
            raise ConfigError(f"{where} repeats the name {name}")
        repos.append(Repo(name, url))
    return tuple(repos)


def _name_from_url(url: str) -> str:
    tail = url.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1].removesuffix(".git").lower()
    name = re.sub(r"[^a-z0-9_-]+", "-", tail).strip("-_")
    name = name if name[:1].isalpha() else f"repo-{name}".rstrip("-")
    return name[:40] if REPO_NAME.match(name[:40]) else "repo"


def _content_sid(reader: EnvReader, name: str) -> str:
    """An optional Content SID. Not a secret, but like every value it is not echoed when
    malformed: the message names the variable and the expected shape."""
    value = reader.env.get(name, "").strip()
    if value and not re.fullmatch(CONTENT_SID, value):
        raise ConfigError(f"{name} is malformed: expected HX + 32 hex digits (a Content SID)")
    return value


def _model(env: Mapping[str, str]) -> str:
    model = env.get("CLAUDE_MODEL", "").strip()
    if model and not MODEL_NAME.match(model):
        raise ConfigError("CLAUDE_MODEL is malformed: expected opus, sonnet, haiku or a model id")
    return model


def _zone(env: Mapping[str, str]) -> str:
    name = env.get("OWNER_TZ", "").strip() or "UTC"
    found = zone(name)
    if found is None:
        raise ConfigError("OWNER_TZ is not a time zone this machine knows: use an IANA name like Europe/Paris")
    return str(found)


def _hourly(reader: EnvReader) -> float:
    value = reader.env.get("VM_COST_PER_HOUR_USD", "").strip()
    if value in ("0", "0.0"):
        return 0.0  # a worker somebody else pays for
    return reader.amount("VM_COST_PER_HOUR_USD") or FLY_WORKER_HOUR_USD


@dataclass(frozen=True)
class FleetSettings:
    """What the relay needs to make and reach each owner's Machine."""

    api_token: str = field(repr=False)
    api_base_url: str = "http://_api.internal:4280"  # without /v1, which every path adds
    app: str = "textslash-vm"
    image: str = ""  # "": the image of the app's Machine from a plain deploy
    region: str = ""  # "": vm/fly.toml's primary_region
    volume_gb: int = 10


def _fleet(reader: EnvReader) -> FleetSettings | None:
    env = reader.env
    mode = env.get("WORKER_MODE", "").strip().lower() or "shared"
    if mode not in ("shared", "per-owner"):
        raise ConfigError(f"WORKER_MODE is malformed: expected shared or per-owner, got {mode!r}")
    if mode == "shared":
        return None
    region = env.get("WORKER_REGION", "").strip()
    if region and not re.fullmatch(r"[a-z]{3}", region):
        raise ConfigError("WORKER_REGION is malformed: expected a Fly region code like iad")
    image = env.get("WORKER_IMAGE", "").strip()
    if image and not re.fullmatch(r"[\w.:/@-]{1,300}", image):
        raise ConfigError("WORKER_IMAGE is malformed: expected an image reference like registry.fly.io/app:tag")
    app = env.get("WORKER_APP", "").strip() or "textslash-vm"
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", app):
        raise ConfigError("WORKER_APP is malformed: expected a Fly app name")
    return FleetSettings(
        api_token=reader.secret("FLY_API_TOKEN"),
        api_base_url=reader.url("FLY_API_BASE_URL", "http://_api.internal:4280").rstrip("/"),
        app=app,
        image=image,
        region=region,
        volume_gb=reader.integer("WORKER_VOLUME_GB", 10, minimum=1, maximum=500),
    )
