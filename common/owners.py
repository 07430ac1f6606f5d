"""What names an owner's own Machine in `WORKER_MODE=per-owner`, shared by the relay (which
creates and finds them: relay/fleet.py) and `python -m deploy` (which rolls and prunes them)."""

from __future__ import annotations

import hashlib
import hmac

OWNER_KEY = "textslash_owner"  # the Machine's metadata: the owner's number (E.164)
VOLUME_PREFIX = "owner_"


def volume_name(phone: str) -> str:
    """The owner's volume: found again by this name after the relay lost its database. Fly's
    volume names are at most 30 lowercase letters, digits and underscores, so a digest."""
    return VOLUME_PREFIX + hashlib.sha256(phone.encode()).hexdigest()[:16]


def owner_token(worker_token: str, phone: str) -> str:
    """The bearer token between the relay and one owner's Machine, derived from WORKER_TOKEN:
    a Machine holds only its own, so one owner's Machine can neither speak for another owner
    to the relay nor give commands to another owner's Machine."""
    return hmac.new(worker_token.encode(), b"textslash owner " + phone.encode(), hashlib.sha256).hexdigest()
