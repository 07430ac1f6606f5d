"""The relay's configuration, read once from the environment and validated.

Every problem names the variable at fault; values of secrets never appear in a message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

E164 = re.compile(r"^\+[1-9]\d{6,14}$")


class ConfigError(ValueError):
    """A missing or malformed setting; the message names the variable."""


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
    min_send_interval_s: float = 0.0
    relay_db: Path = Path("var/relay.sqlite3")
    deployed_sha: str = "dev"
    port: int = 3000
    host: str = "0.0.0.0"

    @property
    def images_dir(self) -> Path:
        """The relay's image cache lives beside its database, on the same volume."""
        return self.relay_db.parent / "images"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        reader = _Reader(env)
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
            min_send_interval_s=reader.millis("TWILIO_MIN_SEND_INTERVAL_MS", 0, minimum=0),
            relay_db=Path(env.get("RELAY_DB") or "var/relay.sqlite3"),
            deployed_sha=env.get("DEPLOYED_SHA") or "dev",
            port=reader.integer("PORT", 3000, minimum=1, maximum=65535),
            host=env.get("HOST") or "0.0.0.0",
        )


@dataclass(frozen=True)
class _Reader:
    env: Mapping[str, str]

    def required(self, name: str) -> str:
        value = self.env.get(name, "").strip()
        if not value:
            raise ConfigError(f"{name} is required but not set")
        return value

    def secret(self, name: str) -> str:
        value = self.required(name)
        if len(value) < 8:
            # Say how long, never what: the value is a secret.
            raise ConfigError(f"{name} is too short ({len(value)} characters; at least 8)")
        return value

    def matching(self, name: str, pattern: str, meaning: str) -> str:
        value = self.required(name)
        if not re.fullmatch(pattern, value):
            raise ConfigError(f"{name} is malformed: expected {meaning}")
        return value

    def url(self, name: str, default: str | None = None) -> str:
        value = self.env.get(name, "").strip() or default
        if value is None:
            raise ConfigError(f"{name} is required but not set")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"{name} is malformed: expected an http(s) URL, got {value!r}")
        if parts.query or parts.fragment:
            raise ConfigError(f"{name} must be a base URL without query or fragment")
        return value

    def phone(self, name: str) -> str:
        value = self.required(name).removeprefix("whatsapp:")
        if not E164.match(value):
            raise ConfigError(f"{name} is malformed: expected an E.164 number like +14155238886")
        return value

    def phones(self, name: str) -> frozenset[str]:
        numbers = [part.strip().removeprefix("whatsapp:") for part in self.required(name).split(",")]
        bad = [n for n in numbers if not E164.match(n)]
        if bad or not numbers:
            raise ConfigError(f"{name} is malformed: {bad!r} not E.164 (comma-separated, like +15551234567)")
        return frozenset(numbers)

    def integer(self, name: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
        raw = self.env.get(name, "").strip()
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} is malformed: expected a whole number, got {raw!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise ConfigError(f"{name} is out of range: {value}")
        return value

    def millis(self, name: str, default: int, *, minimum: int = 1) -> float:
        return self.integer(name, default, minimum=minimum) / 1000
