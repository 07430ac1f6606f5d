"""Reading settings from the environment, and the logging set-up, shared by the relay and the worker.

Every problem names the variable at fault; values of secrets never appear in a message.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

E164 = re.compile(r"^\+[1-9]\d{6,14}\Z")  # \Z: no trailing newline, which $ allows


def configure_logging(level: str) -> None:
    """One format for both processes, and none of the libraries' per-request lines: they are
    noise (a line per /health poll while the VM wakes), and their URLs hold the owner's number
    (`/callback/{phone}`)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("httpx", "twilio.async_http_client"):
        logging.getLogger(name).setLevel(logging.WARNING)


def mask_phone(phone: str) -> str:
    """A phone number as logs show it: enough to tell owners apart, not enough to dial."""
    return phone[:4] + "…" + phone[-2:]


class ConfigError(ValueError):
    """A missing or malformed setting; the message names the variable."""


_REPO_URL_SCHEMES = re.compile(r"^(https://|http://|ssh://|git@|file://|/)")
# A password in any URL, or anything before an @ in an http(s) one: `https://<token>@host/` is a
# token all the same.
_CREDENTIALS_IN_URL = re.compile(r"^[a-z]+://[^/@]*:[^/@]*@|^https?://[^/]*@")


def repo_url_problem(url: str) -> str:
    """Why `url` cannot be a repository to clone and push ("" when it can), worded to follow its
    name: "REPO_URL " + problem. One check for the worker's REPO_URL, the relay's REPOS and the
    `repo_url` a prompt carries, so none of them takes what another would refuse."""
    if not _REPO_URL_SCHEMES.match(url):
        return "is malformed: expected an https, ssh or file URL"
    if re.search(r"[\x00-\x1f\x7f]", url):
        return "is malformed: it holds a control character"
    if _CREDENTIALS_IN_URL.match(url):
        # It would sit in the git dir's config, which the owner's agent may read.
        return "must not hold a password or token: put the token in GITHUB_TOKEN"
    authority = re.match(r"^(?:[a-z]+://|git@)?([^/:]*)", url)
    if authority is not None and authority.group(1).rpartition("@")[2].lstrip("[").startswith("-"):
        return "is malformed: a host cannot start with -"  # git would read it as an option
    return ""


@dataclass(frozen=True)
class EnvReader:
    """Reads and checks one variable at a time; every error names the variable."""

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

    def repo_url(self, name: str) -> str:
        """A repository's clone URL (see `repo_url_problem`), or "" when not set."""
        value = self.env.get(name, "").strip()
        if value and (problem := repo_url_problem(value)):
            raise ConfigError(f"{name} {problem}")
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

    def amount(self, name: str) -> float | None:
        """A positive number (dollars), or None when unset."""
        raw = self.env.get(name, "").strip().removeprefix("$")
        if not raw:
            return None
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} is malformed: expected a number like 25 or 0.50, got {raw!r}") from None
        if not 0 < value < 1e9:  # also refuses nan and inf
            raise ConfigError(f"{name} is out of range: {raw}")
        return value

    def millis(self, name: str, default: int, *, minimum: int = 1) -> float:
        return self.integer(name, default, minimum=minimum) / 1000

    def flag(self, name: str, default: bool = False) -> bool:
        raw = self.env.get(name, "").strip().lower()
        if not raw:
            return default
        if raw in ("1", "true", "yes", "on"):
            return True
        if raw in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} is malformed: expected true or false, got {raw!r}")
