"""The relay's configuration, read once from the environment and validated.

Every problem names the variable at fault; values of secrets never appear in a message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common.config import E164, ConfigError, EnvReader, mask_phone

__all__ = ["E164", "ConfigError", "Settings", "mask_phone"]


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
    deployed_sha: str = "dev"
    port: int = 3000
    host: str = "0.0.0.0"

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
            deployed_sha=env.get("DEPLOYED_SHA") or "dev",
            port=reader.integer("PORT", 3000, minimum=1, maximum=65535),
            host=env.get("HOST") or "0.0.0.0",
        )
