"""Quick-reply buttons: the two Content resources the relay sends them with.

Twilio's Content API holds message templates; a `twilio/quick-reply` with a `{{1}}` body and up
to three buttons needs no WhatsApp approval inside the 24-hour session, so one resource per set
of buttons serves every message: the body goes in as the variable. The relay makes each once
through the twilio SDK and finds it again by its name after a restart (listing them), so it is
never made twice. A tapped button comes back as an ordinary message whose `ButtonPayload` is
the button's id: the word itself (relay/app.py).

If the Content API fails, messages go out as plain text (they say what to type anyway), the
reason is logged once, and the API is tried again after a while.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import anyio
from twilio.base.exceptions import TwilioRestException
from twilio.rest.content.v1.content import ContentList

logger = logging.getLogger(__name__)

# kind -> the buttons, as (id, title): the id comes back as ButtonPayload.
BUTTONS: dict[str, tuple[tuple[str, str], ...]] = {
    "decide": (("approve", "Approve"), ("reject", "Reject")),
    "cancel": (("cancel", "Cancel"),),
}
NAME_PREFIX = "textslash_"  # + kind + "_v1": a new layout of buttons gets a new version
VERSION = "v1"
RETRY_AFTER_S = 600.0  # after a failure, plain text until then


def content_name(kind: str) -> str:
    return f"{NAME_PREFIX}{kind}_{VERSION}"


def content_request(kind: str) -> ContentList.ContentCreateRequest:
    actions = [{"id": button_id, "title": title} for button_id, title in BUTTONS[kind]]
    return ContentList.ContentCreateRequest(
        {
            "friendly_name": content_name(kind),
            "language": "en",
            "variables": {"1": "Reply approve or reject."},
            "types": {"twilio/quick-reply": {"body": "{{1}}", "actions": actions}},
        }
    )


class QuickReplies:
    """The Content SIDs of the button sets, made or found on first use."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._sids: dict[str, str] = {}
        self._lock = anyio.Lock()  # two lanes needing buttons at once make one resource, not two
        self._failed_at: float | None = None
        self._logged: set[str] = set()

    async def sid(self, contents: Any, kind: str) -> str | None:
        """The SID to send `kind` with, or None (send plain text) while the Content API fails."""
        if kind in self._sids:
            return self._sids[kind]
        if self._failed_at is not None and self._clock() - self._failed_at < RETRY_AFTER_S:
            return None
        async with self._lock:
            if kind not in self._sids:
                try:
                    self._sids[kind] = await self._find_or_make(contents, kind)
                except Exception as exc:  # noqa: BLE001 - any failure means plain text, said once
                    self.failed(f"could not make the {kind} buttons ({_why(exc)})")
                    return None
            return self._sids[kind]

    async def _find_or_make(self, contents: Any, kind: str) -> str:
        name = content_name(kind)
        async for content in await contents.stream_async(page_size=100):
            if content.friendly_name == name and content.sid:
                return str(content.sid)
        made = await contents.create_async(content_request(kind))
        logger.info("made the %s quick-reply buttons (%s)", kind, made.sid)
        return str(made.sid)

    def failed(self, reason: str) -> None:
        """Buttons failed (making them, or a message sent with them): plain text for a while."""
        self._failed_at = self._clock()
        self._sids.clear()  # a resource deleted behind our back is found or made again
        if reason not in self._logged:
            self._logged.add(reason)
            logger.warning("sending plain text instead of buttons: %s", reason)


def _why(exc: Exception) -> str:
    if isinstance(exc, TwilioRestException):
        return f"HTTP {exc.status}: {exc.msg}"[:200]
    return type(exc).__name__
