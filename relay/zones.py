"""Owners' time zones: IANA names, looked up in this machine's zone list (the image's tzdata)."""

from __future__ import annotations

from functools import cache
from zoneinfo import ZoneInfo, available_timezones

UTC = ZoneInfo("UTC")


@cache
def zone_names() -> dict[str, str]:
    """Every IANA zone this machine knows, by its name in lower case (`tz europe/paris` works)."""
    names = {name.lower(): name for name in available_timezones()}
    names.setdefault("utc", "UTC")
    return names


def zone(name: str) -> ZoneInfo | None:
    """The zone an owner named, or None when there is no such zone. Only names from the zone
    list are looked up: a name is never a path."""
    canonical = zone_names().get(name.strip().lower())
    return ZoneInfo(canonical) if canonical else None


def known(name: str) -> ZoneInfo:
    """A zone the relay took before (OWNER_TZ, an owner's `tz`, a schedule's row): UTC should
    this machine's zone list no longer have it."""
    return zone(name) or UTC
