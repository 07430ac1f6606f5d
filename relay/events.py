"""What can happen to an owner's conversation, and what the relay does about it.

Events come from three places: the owner's words (parsed from a WhatsApp message), the
worker's callbacks, and the relay itself (a command was delivered, the VM never woke, the
approval window closed). Effects are what the conversation asks the outside world to do.
Both are plain data so the state machine stays pure and is tested without I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Literal

from common.protocol import Answer, Attachment, Command, Report

# --- the owner's words -------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    kind: ClassVar[str] = "prompt"
    text: str
    message_id: str
    attachments: tuple[Attachment, ...] = ()  # photos and files sent with it (relay/media.py)


@dataclass(frozen=True)
class Screenshot:
    kind: ClassVar[str] = "screenshot"
    url: str
    message_id: str


@dataclass(frozen=True)
class Word:
    """One of the owner's single-word commands: approve, reject, cancel, status, help, new,
    retry, repos, model, usage. `tapped`: for a tapped button, the run its message's buttons
    were for ("" when the relay does not know the message); None when typed (or when Twilio
    named no message)."""

    kind: str
    tapped: str | None = None


@dataclass(frozen=True)
class Use:
    """`use <name>`: switch the owner's current repository."""

    kind: ClassVar[str] = "use"
    name: str


@dataclass(frozen=True)
class SetModel:
    """`model <name>`: the model for the owner's next runs."""

    kind: ClassVar[str] = "set_model"
    name: str


@dataclass(frozen=True)
class SetBudget:
    """`budget <amount>`: the owner's ceiling for this month, in dollars; `amount_usd` is None
    when `amount` is not one the relay takes (the owner is told what it takes)."""

    kind: ClassVar[str] = "set_budget"
    amount_usd: float | None
    amount: str = ""


OWNER_WORDS = frozenset(
    {"approve", "reject", "cancel", "status", "help", "new", "retry", "repos", "model", "usage", "budget"}
)
# Tapped quick-reply buttons (relay/buttons.py): the button's id is the word.
BUTTON_WORDS = frozenset({"approve", "reject", "cancel"})
_SCREENSHOT = re.compile(r"^screenshot\s+(\S+)$", re.IGNORECASE)
# Two-word commands. Anything longer is a prompt ("use the new API in app.py", "model the data").
_USE = re.compile(r"^use\s+(\S+)$", re.IGNORECASE)
_MODEL = re.compile(r"^model\s+(\S+)$", re.IGNORECASE)
_BUDGET = re.compile(r"^budget\s+(\S+)$", re.IGNORECASE)
_AMOUNT = re.compile(r"^\$?([0-9]{1,7}(?:\.[0-9]{1,2})?)\$?$")  # dollars: up to 9,999,999.99


OwnerEvent = Prompt | Screenshot | Word | Use | SetModel | SetBudget


def _budget(amount: str) -> SetBudget:
    """Any one word after `budget` is the command: an amount it cannot take gets a reply saying
    what it takes, never a run of the agent."""
    match = _AMOUNT.match(amount)
    value = float(match.group(1)) if match else 0.0
    return SetBudget(value if value > 0 else None, amount)


def parse_owner_text(text: str, message_id: str) -> OwnerEvent:
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
    if match := _USE.match(stripped):
        return Use(match.group(1).lower().rstrip(".!"))
    if match := _MODEL.match(stripped):
        return SetModel(match.group(1).rstrip(".!"))
    if match := _BUDGET.match(stripped):
        return _budget(match.group(1))
    return Prompt(text=stripped, message_id=message_id)


# --- the relay's own events --------------------------------------------------------


@dataclass(frozen=True)
class Delivered:
    """The worker accepted a call (2xx); `answer` is where the owner's run stands on it."""

    kind: ClassVar[str] = "delivered"
    route: str
    message_id: str = ""
    answer: Answer | None = None


@dataclass(frozen=True)
class Unreachable:
    """The worker never woke within WAKE_TIMEOUT_MS, refused the call, or is known to sleep."""

    kind: ClassVar[str] = "unreachable"
    route: str
    message_id: str = ""
    reason: str = ""
    refused: bool = False  # the worker answered and said no (HTTP 4xx), rather than not answering
    answer: Answer | None = None  # a refusal's account of where the run stands
    asleep: bool = False  # not called: the worker said goodnight, so it holds no run for anyone


@dataclass(frozen=True)
class ApprovalExpired:
    kind: ClassVar[str] = "approval_expired"
    deadline: float


@dataclass(frozen=True)
class Stalled:
    """Nothing heard about the current run for STALL_CHECK_MS: time to ask the worker."""

    kind: ClassVar[str] = "stalled"
    check_at: float


Event = OwnerEvent | Report | Delivered | Unreachable | ApprovalExpired | Stalled


def event_kind(event: Event) -> str:
    return event.type if isinstance(event, Report) else event.kind


# --- effects -----------------------------------------------------------------------


Buttons = Literal["", "decide", "cancel"]


@dataclass(frozen=True)
class Send:
    """A WhatsApp message to the owner; media are image names under PUBLIC_URL/images/;
    `buttons`: the quick replies it carries (Approve and Reject, or Cancel), when they are on."""

    text: str
    media: tuple[str, ...] = ()
    buttons: Buttons = ""
    run: str = ""  # the run its buttons act on: a tap on them later, when another run is current, is stale


CallMode = Literal["wake", "if_awake", "probe"]


@dataclass(frozen=True)
class CallWorker:
    """A command for the worker. `mode` says how hard to try: `wake` wakes a sleeping worker;
    `if_awake` answers at once (Unreachable, asleep) when the worker is known to sleep, and
    wakes it otherwise; `probe` also makes one attempt only, and never tells the owner "waking"."""

    command: Command
    mode: CallMode = "wake"


@dataclass(frozen=True)
class DropCommand:
    """Withdraw a command that has not reached the worker yet (cancel while it wakes)."""

    message_id: str


@dataclass(frozen=True)
class ReportStatus:
    """Answer `status`: needs facts beyond the conversation (VM, failed sends)."""


@dataclass(frozen=True)
class ReportUsage:
    """Answer `usage`: what today and this month cost (relay/usage.py)."""


@dataclass(frozen=True)
class RecordBudget:
    """The owner set this month's budget: record it, then answer with the usage against it."""

    amount_usd: float


Effect = Send | CallWorker | DropCommand | ReportStatus | ReportUsage | RecordBudget
