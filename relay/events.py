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

from common.protocol import MAX_PROMPT, Answer, Attachment, Command, Report
from relay.schedules import EVERY_DAY, MAX_DELAY_S, WEEKDAYS, WORK_DAYS

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
class NewSchedule:
    """`every day|weekday|<weekday> HH:MM <prompt>`, `at HH:MM <prompt>` or `in <N>s|m|h|d
    <prompt>` (relay/schedules.py). `problem`: what is wrong with one the owner clearly meant
    as a schedule (nothing is scheduled, and nothing runs)."""

    kind: ClassVar[str] = "schedule"
    prompt: str
    days: frozenset[int] = frozenset()  # the weekdays it repeats on (Monday 0); empty: once
    clock: tuple[int, int] | None = None  # hour and minute, in the owner's zone (every, at)
    delay_s: float = 0.0  # `in`: this long from now
    problem: str = ""


@dataclass(frozen=True)
class Unschedule:
    """`unschedule <n>` (`number` None: `unschedule all`). `problem`: `unschedule` with no
    number, or one word that is not one: explained, and nothing is removed."""

    kind: ClassVar[str] = "unschedule"
    number: int | None
    problem: str = ""


@dataclass(frozen=True)
class SetZone:
    """`tz <name>`: the owner's time zone, an IANA name."""

    kind: ClassVar[str] = "set_tz"
    name: str


@dataclass(frozen=True)
class SetBudget:
    """`budget <amount>`: the owner's ceiling for this month, in dollars; `amount_usd` is None
    when `amount` is not one the relay takes (the owner is told what it takes)."""

    kind: ClassVar[str] = "set_budget"
    amount_usd: float | None
    amount: str = ""


OWNER_WORDS = frozenset(
    {
        "approve",
        "reject",
        "cancel",
        "status",
        "help",
        "new",
        "retry",
        "repos",
        "model",
        "usage",
        "budget",
        "schedules",
        "tz",
    }
)
# Tapped quick-reply buttons (relay/buttons.py): the button's id is the word.
BUTTON_WORDS = frozenset({"approve", "reject", "cancel"})
_SCREENSHOT = re.compile(r"^screenshot\s+(\S+)$", re.IGNORECASE)
# Two-word commands. Anything longer is a prompt ("use the new API in app.py", "model the data").
_USE = re.compile(r"^use\s+(\S+)$", re.IGNORECASE)
_MODEL = re.compile(r"^model\s+(\S+)$", re.IGNORECASE)
_BUDGET = re.compile(r"^budget\s+(\S+)$", re.IGNORECASE)
_AMOUNT = re.compile(r"^\$?([0-9]{1,7}(?:\.[0-9]{1,2})?)\$?$")  # dollars: up to 9,999,999.99
_TZ = re.compile(r"^tz\s+(\S+)$", re.IGNORECASE)
_UNSCHEDULE = re.compile(r"^unschedule\s+(?:#?([0-9]{1,6})|(all))$", re.IGNORECASE)
# `unschedule` alone or with one other word is a mistyped command, not a prompt for Claude Code
# ("unschedule the cron job in deploy.yml", several words, still is one).
_UNSCHEDULE_WORD = re.compile(r"^unschedule(?:\s+\S+)?$", re.IGNORECASE)
# A time of day: 9:00, 21:05, 9am, 9:30pm. `every <day> <digits>` is a schedule whatever follows
# (a bad time is explained); `at` needs a colon or am/pm, since "at 5 places..." is a prompt.
_TIME = r"(?P<time>[0-9]{1,2}(?::[0-9]{2})?(?:\s*[ap]\.?m\.?)?)"
# Keywords match ASCII letters only ((?a:...)): ignoring case the Unicode way, "ſ" (long s) is an
# "s" and "ı" (dotless i) an "i", which the lookups of the unit and the weekday do not know.
_DAY = r"(?a:(?P<days>day|weekdays?|mon|tue|tues|wed|thu|thur|thurs|fri|sat|sun|" + "|".join(WEEKDAYS) + r")s?)"
_EVERY = re.compile(rf"^every\s+{_DAY}\s+(?:at\s+)?{_TIME}(?:\s+(?P<prompt>.*))?$", re.IGNORECASE | re.DOTALL)
_AT = re.compile(
    r"^at\s+(?P<time>[0-9]{1,2}(?::[0-9]{2}(?:\s*[ap]\.?m\.?)?|\s*[ap]\.?m\.?))(?:\s+(?P<prompt>.*))?$",
    re.IGNORECASE | re.DOTALL,
)
_IN = re.compile(
    r"^in\s+(?P<n>[0-9]{1,7})\s*(?P<unit>(?a:s|secs?|seconds?|m|mins?|minutes?|h|hrs?|hours?|d|days?))"
    r"(?:\s+(?P<prompt>.*))?$",
    re.IGNORECASE | re.DOTALL,
)
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


OwnerEvent = Prompt | Screenshot | Word | Use | SetModel | SetBudget | NewSchedule | Unschedule | SetZone


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
    if match := _TZ.match(stripped):
        return SetZone(match.group(1))
    if match := _UNSCHEDULE.match(stripped):
        return Unschedule(int(match.group(1)) if match.group(1) else None)
    if _UNSCHEDULE_WORD.match(stripped):
        return Unschedule(None, problem="the number *schedules* shows, or all")
    if schedule := _schedule(stripped):
        return schedule
    return Prompt(text=stripped, message_id=message_id)


def _schedule(text: str) -> NewSchedule | None:
    if match := _EVERY.match(text):
        word = match.group("days").lower().rstrip("s") or "day"
        days = EVERY_DAY if word == "day" else WORK_DAYS if word == "weekday" else _weekday(word)
        return _at_clock(match.group("time"), match.group("prompt"), days)
    if match := _AT.match(text):
        return _at_clock(match.group("time"), match.group("prompt"), frozenset())
    if match := _IN.match(text):
        prompt = (match.group("prompt") or "").strip()
        delay = int(match.group("n")) * _UNIT_S[match.group("unit")[0].lower()]
        if not 1 <= delay <= MAX_DELAY_S:
            return NewSchedule(prompt, delay_s=delay, problem="a delay from 1 s to a year")
        return NewSchedule(prompt, delay_s=delay, problem=_prompt_problem(prompt, "the delay"))
    return None


def _weekday(word: str) -> frozenset[int]:
    return frozenset(i for i, name in enumerate(WEEKDAYS) if name.startswith(word[:3]))


def _at_clock(time_text: str, prompt: str | None, days: frozenset[int]) -> NewSchedule:
    prompt = (prompt or "").strip()
    clock = _clock(time_text)
    if clock is None:
        return NewSchedule(prompt, days, problem="a time like 09:00, 21:30 or 9am")
    return NewSchedule(prompt, days, clock, problem=_prompt_problem(prompt, "the time"))


def _prompt_problem(prompt: str, after: str) -> str:
    if not prompt:
        return f"a prompt after {after}"
    # Checked now, not when it fires (the worker refuses a longer prompt): the owner is here now.
    return f"a prompt of at most {MAX_PROMPT:,} characters" if len(prompt) > MAX_PROMPT else ""


def _clock(text: str) -> tuple[int, int] | None:
    """Hour and minute of 9:00, 21:05, 9am or 9:30pm; None for anything else (9, 25:00, 13pm)."""
    match = re.fullmatch(r"([0-9]{1,2})(?::([0-9]{2}))?\s*(?:([ap])\.?m\.?)?", text.strip().lower())
    if match is None or (match.group(2) is None and match.group(3) is None):
        return None
    hour, minute, half = int(match.group(1)), int(match.group(2) or 0), match.group(3)
    if half:
        if not 1 <= hour <= 12:
            return None
        hour = hour % 12 + (12 if half == "p" else 0)
    return (hour, minute) if hour <= 23 and minute <= 59 else None


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
    # Not called: the worker said goodnight, so it holds no run for anyone (but maybe the
    # changes of a scheduled run, which wait for the owner with the worker asleep).
    asleep: bool = False


@dataclass(frozen=True)
class ApprovalExpired:
    kind: ClassVar[str] = "approval_expired"
    deadline: float


@dataclass(frozen=True)
class Stalled:
    """Nothing heard about the current run for STALL_CHECK_MS: time to ask the worker."""

    kind: ClassVar[str] = "stalled"
    check_at: float


@dataclass(frozen=True)
class Fired:
    """A schedule came due (relay/dispatcher.py `fire_schedules`): its prompt runs, or, when it
    was due more than an hour ago (the relay was down), the owner hears it was skipped."""

    kind: ClassVar[str] = "fired"
    schedule: int  # the schedule's row: one schedule waits in the queue at most once
    number: int  # the owner's number for it
    text: str
    message_id: str  # sched-<row>-<due>: the run's id, one per due time
    repo: str = ""
    due: float = 0.0
    late: bool = False


Event = OwnerEvent | Report | Delivered | Unreachable | ApprovalExpired | Stalled | Fired


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


@dataclass(frozen=True)
class AddSchedule:
    """Record a schedule (relay/schedules.py) and tell the owner when it runs."""

    schedule: NewSchedule
    repo: str  # the owner's current repository
    tz: str  # the owner's zone


@dataclass(frozen=True)
class ListSchedules:
    tz: str


@dataclass(frozen=True)
class RemoveSchedule:
    number: int | None  # None: all of the owner's


@dataclass(frozen=True)
class Rezone:
    """The owner changed zone: their repeating schedules keep their wall-clock times in it."""

    tz: str


Effect = (
    Send
    | CallWorker
    | DropCommand
    | ReportStatus
    | ReportUsage
    | RecordBudget
    | AddSchedule
    | ListSchedules
    | RemoveSchedule
    | Rezone
)
