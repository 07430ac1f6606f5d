"""What can happen to an owner's conversation, and what the relay does about it.

Events come from three places: the owner's words (parsed from a WhatsApp message), the
worker's callbacks, and the relay itself (a command was delivered, the VM never woke, the
approval window closed). Effects are what the conversation asks the outside world to do.
Both are plain data so the state machine stays pure and is tested without I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar


class BadEvent(ValueError):
    """A worker event that is not well formed; the callback route answers 422."""


# --- the owner's words -------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    kind: ClassVar[str] = "prompt"
    text: str
    message_id: str


@dataclass(frozen=True)
class Screenshot:
    kind: ClassVar[str] = "screenshot"
    url: str
    message_id: str


@dataclass(frozen=True)
class Word:
    """One of the owner's single-word commands: approve, reject, cancel, status, help, new, retry."""

    kind: str


OWNER_WORDS = frozenset({"approve", "reject", "cancel", "status", "help", "new", "retry"})
_SCREENSHOT = re.compile(r"^screenshot\s+(\S+)$", re.IGNORECASE)


def parse_owner_text(text: str, message_id: str) -> Prompt | Screenshot | Word:
    """Turn a WhatsApp message into an event: commands are trimmed and case-insensitive."""
    stripped = text.strip()
    word = stripped.lower().rstrip(".!")
    if word in OWNER_WORDS:
        return Word(word)
    if match := _SCREENSHOT.match(stripped):
        url = match.group(1)
        if "://" not in url:
            url = "http://" + url
        return Screenshot(url=url, message_id=message_id)
    return Prompt(text=stripped, message_id=message_id)


# --- the worker's reports ----------------------------------------------------------


@dataclass(frozen=True)
class WorkerEvent:
    """A fact the worker reports about a run; the relay decides the wording on the phone."""

    type: str
    run_id: str
    text: str = ""
    changes: bool = False
    cost_usd: float | None = None
    duration_ms: int | None = None
    url: str = ""
    files: tuple[tuple[str, int, int, bool], ...] = ()  # path, added, removed, binary (content not shown)
    diff: str = ""
    images: tuple[str, ...] = ()
    files_count: int = 0  # approval_required: how many files changed (`files` may list fewer)
    uncovered: tuple[str, ...] = ()  # approval_required: ignored paths reject cannot bring back
    left_out: tuple[str, ...] = ()  # pr_opened: paths written after the diff, not committed
    left_out_count: int = 0


# Terminal events end a run: the run's own answer, a cancel, or a failure.
TERMINAL = frozenset({"answer", "cancelled", "error"})
WORKER_TYPES = TERMINAL | {
    "progress", "approval_required", "pr_opened", "approve_failed", "reject_failed", "rolled_back", "notice",
    "sleeping",
}
MAX_FILES = 100  # of an approval's files, the ones kept; a phone shows fewer (replies.LISTED_FILES)
IMAGE_NAME = re.compile(r"^[A-Za-z0-9_-]{16,64}\.png$")


def worker_event_from_json(data: Any) -> tuple[WorkerEvent, int]:
    """Validate a callback body; returns the event and its sequence number."""
    if not isinstance(data, dict):
        raise BadEvent("body must be a JSON object")
    kind = data.get("type")
    if kind not in WORKER_TYPES:
        raise BadEvent(f"unknown event type {kind!r}")
    run_id, seq = data.get("run_id"), data.get("seq")
    if not isinstance(run_id, str) or not 0 < len(run_id) <= 100:
        raise BadEvent("run_id must be a non-empty string")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise BadEvent("seq must be a non-negative integer")
    try:
        event = WorkerEvent(
            type=kind,
            run_id=run_id,
            text=_string(data, "text", 20_000),
            changes=bool(data.get("changes", False)),
            cost_usd=_number(data, "cost_usd"),
            duration_ms=None if data.get("duration_ms") is None else int(data["duration_ms"]),
            url=_string(data, "url", 2_000),
            files=tuple((str(f["path"])[:300], int(f["added"]), int(f["removed"]), f.get("binary") is True)
                        for f in (data.get("files") or ())[:MAX_FILES]),
            diff=_string(data, "diff", 50_000),
            images=tuple(data.get("images") or ()),
            files_count=int(data.get("files_count") or 0),
            uncovered=_paths(data, "uncovered"),
            left_out=_paths(data, "left_out"),
            left_out_count=int(data.get("left_out_count") or 0),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadEvent(f"malformed field: {exc}") from None
    if not all(isinstance(name, str) and IMAGE_NAME.match(name) for name in event.images):
        raise BadEvent("images must be names like <random>.png")
    return event, seq


def worker_event_to_json(event: WorkerEvent) -> dict[str, Any]:
    data = {k: v for k, v in event.__dict__.items() if v not in ("", (), None)}
    data["type"], data["run_id"], data["changes"] = event.type, event.run_id, event.changes
    data["files"] = [{"path": p, "added": a, "removed": r, "binary": b} for p, a, r, b in event.files]
    return data


def _string(data: dict[str, Any], key: str, limit: int) -> str:
    value = data.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    return value[:limit]


def _paths(data: dict[str, Any], key: str, limit: int = 50) -> tuple[str, ...]:
    """A list of paths, at most `limit` of them, each cut to 300 characters."""
    return tuple(str(p)[:300] for p in (data.get(key) or ())[:limit])


def _number(data: dict[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number")
    return float(value)


# --- the relay's own events --------------------------------------------------------


@dataclass(frozen=True)
class Delivered:
    """The worker accepted a call (202)."""

    kind: ClassVar[str] = "delivered"
    route: str
    message_id: str = ""


@dataclass(frozen=True)
class Unreachable:
    """The worker never woke within WAKE_TIMEOUT_MS, or refused the call outright."""

    kind: ClassVar[str] = "unreachable"
    route: str
    message_id: str = ""
    reason: str = ""
    refused: bool = False  # the worker answered and said no (HTTP 4xx), rather than not answering


@dataclass(frozen=True)
class ApprovalExpired:
    kind: ClassVar[str] = "approval_expired"
    deadline: float


Event = Prompt | Screenshot | Word | WorkerEvent | Delivered | Unreachable | ApprovalExpired


def event_kind(event: Event) -> str:
    return event.type if isinstance(event, WorkerEvent) else event.kind


# --- effects -----------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """A WhatsApp message to the owner; media are image names under PUBLIC_URL/images/."""

    text: str
    media: tuple[str, ...] = ()


@dataclass(frozen=True)
class CallWorker:
    route: str  # "command" | "approve" | "reject" | "cancel"
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DropCommand:
    """Withdraw a command that has not reached the worker yet (cancel while it wakes)."""

    message_id: str


@dataclass(frozen=True)
class ReportStatus:
    """Answer `status`: needs facts beyond the conversation (VM, failed sends)."""


Effect = Send | CallWorker | DropCommand | ReportStatus
