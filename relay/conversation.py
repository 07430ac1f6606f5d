"""The owner's conversation as a transition table.

`TRANSITIONS[state][event kind]` names the handler for every pair that can happen; a pair
missing from the table raises `IllegalTransition`. Handlers are pure: they take the
conversation and the event, change the conversation and return the effects to carry out.
The worker's terminal reports are authoritative in every state, because the worker is the one
that knows whether a run ended and left changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from relay import replies
from relay.events import (
    ApprovalExpired,
    CallWorker,
    Delivered,
    DropCommand,
    Effect,
    Event,
    Prompt,
    ReportStatus,
    Screenshot,
    Send,
    Unreachable,
    Word,
    WorkerEvent,
    event_kind,
)

State = Literal["idle", "working", "awaiting_approval", "applying"]
STATES: tuple[State, ...] = ("idle", "working", "awaiting_approval", "applying")


class IllegalTransition(RuntimeError):
    def __init__(self, state: str, kind: str) -> None:
        super().__init__(f"no transition for event {kind!r} in state {state!r}")
        self.state, self.kind = state, kind


@dataclass
class Job:
    message_id: str
    text: str
    started_at: float | None = None
    delivered: bool = False
    cancelling: bool = False


@dataclass
class Conversation:
    phone: str
    state: State = "idle"
    job: Job | None = None
    queue: list[Job] = field(default_factory=list)
    approval_deadline: float | None = None
    kept: Job | None = None  # a prompt the VM never received, kept for `retry`
    fresh_session: bool = False  # the owner said `new`: the next prompt starts a new session
    applying: str = ""  # "approve" or "reject" while the worker applies the decision

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Conversation:
        job = data.get("job")
        kept = data.get("kept")
        return cls(
            phone=data["phone"],
            state=data["state"],
            job=Job(**job) if job else None,
            queue=[Job(**j) for j in data.get("queue", [])],
            approval_deadline=data.get("approval_deadline"),
            kept=Job(**kept) if kept else None,
            fresh_session=data.get("fresh_session", False),
            applying=data.get("applying", ""),
        )


@dataclass(frozen=True)
class Context:
    now: float
    approval_timeout_s: float


Handler = Callable[[Conversation, Any, Context], list[Effect]]


def apply(conv: Conversation, event: Event, ctx: Context) -> tuple[Conversation, list[Effect]]:
    """Run one event through the table; returns the new conversation and its effects."""
    kind = event_kind(event)
    handler = TRANSITIONS[conv.state].get(kind) or ANY_STATE.get(kind)
    if handler is None:
        raise IllegalTransition(conv.state, kind)
    new = replace(conv, queue=list(conv.queue), job=replace(conv.job) if conv.job else None)
    effects = handler(new, event, ctx)
    return new, effects


# --- starting and finishing work ----------------------------------------------------


def _start(conv: Conversation, job: Job, ctx: Context) -> list[Effect]:
    payload: dict[str, Any] = {"phone": conv.phone, "text": job.text, "message_id": job.message_id}
    if conv.fresh_session:
        payload["new_session"] = True
        conv.fresh_session = False
    conv.state, conv.job, conv.kept = "working", replace(job, started_at=ctx.now, delivered=False), None
    return [CallWorker("command", payload)]


def _next_or_idle(conv: Conversation, ctx: Context) -> list[Effect]:
    conv.state, conv.job, conv.approval_deadline, conv.applying = "idle", None, None, ""
    if conv.queue:
        job = conv.queue.pop(0)
        return [Send(replies.starting_queued(job.text, len(conv.queue))), *_start(conv, job, ctx)]
    return []


def _await_approval(conv: Conversation, ctx: Context) -> None:
    conv.state, conv.job, conv.applying = "awaiting_approval", None, ""
    conv.approval_deadline = ctx.now + ctx.approval_timeout_s


# --- the owner's words ----------------------------------------------------------------


def prompt_when_idle(conv: Conversation, event: Prompt, ctx: Context) -> list[Effect]:
    if not event.text:
        return [Send(replies.EMPTY)]
    return _start(conv, Job(event.message_id, event.text), ctx)


def prompt_queued(conv: Conversation, event: Prompt, ctx: Context) -> list[Effect]:
    if not event.text:
        return [Send(replies.EMPTY)]
    conv.queue.append(Job(event.message_id, event.text))
    return [Send(replies.queued(len(conv.queue), conv.state))]


def screenshot(conv: Conversation, event: Screenshot, ctx: Context) -> list[Effect]:
    # Screenshots do not touch the checkout, so they go straight through in every state.
    text = f"screenshot {event.url}"
    return [CallWorker("screenshot", {"phone": conv.phone, "text": text, "message_id": event.message_id})]


def decide(conv: Conversation, event: Word, ctx: Context) -> list[Effect]:
    conv.state, conv.applying, conv.approval_deadline = "applying", event.kind, None
    return [Send(replies.APPLYING[event.kind]), CallWorker(event.kind, {"phone": conv.phone})]


def cancel_run(conv: Conversation, event: Word, ctx: Context) -> list[Effect]:
    assert conv.job is not None
    dropped = len(conv.queue)
    conv.queue.clear()
    if not conv.job.delivered:
        # The command is still waiting for the VM to wake: withdraw it instead.
        withdrawn = conv.job.message_id
        conv.state, conv.job = "idle", None
        return [DropCommand(withdrawn), Send(replies.cancelled_before_start(dropped))]
    if conv.job.cancelling:
        return [Send(replies.ALREADY_CANCELLING)]
    conv.job.cancelling = True
    return [Send(replies.cancelling(dropped)), CallWorker("cancel", {"phone": conv.phone})]


def retry(conv: Conversation, event: Word, ctx: Context) -> list[Effect]:
    if conv.kept is None:
        return [Send(replies.NOTHING_TO_RETRY)]
    return [Send(replies.RETRYING), *_start(conv, conv.kept, ctx)]


def new_session(conv: Conversation, event: Word, ctx: Context) -> list[Effect]:
    conv.fresh_session = True
    return [Send(replies.NEW_SESSION)]


def reply(text: str) -> Handler:
    return lambda conv, event, ctx: [Send(text)]


# --- the worker's reports -------------------------------------------------------------


def progress(conv: Conversation, event: WorkerEvent, ctx: Context) -> list[Effect]:
    return [Send(event.text)] if event.text else []


def stale_progress(conv: Conversation, event: WorkerEvent, ctx: Context) -> list[Effect]:
    return []  # a late report from a run that already ended on this side: nothing to say


def finished(conv: Conversation, event: WorkerEvent, ctx: Context) -> list[Effect]:
    if conv.kept is not None and conv.kept.message_id == event.run_id:
        conv.kept = None  # the VM did get it after all: nothing left to retry
    effects: list[Effect] = [Send(replies.finished(event), event.images)]
    if event.changes:
        _await_approval(conv, ctx)
        return effects
    return effects + _next_or_idle(conv, ctx)


def approval_required(conv: Conversation, event: WorkerEvent, ctx: Context) -> list[Effect]:
    if conv.state != "awaiting_approval":
        _await_approval(conv, ctx)
    return [Send(replies.approval_request(event, ctx.approval_timeout_s), event.images)]


def applied(conv: Conversation, event: WorkerEvent, ctx: Context) -> list[Effect]:
    return [Send(replies.applied(event))] + _next_or_idle(conv, ctx)


def approve_failed(conv: Conversation, event: WorkerEvent, ctx: Context) -> list[Effect]:
    _await_approval(conv, ctx)
    return [Send(replies.decision_failed(event.type, event.text))]


def notice(conv: Conversation, event: WorkerEvent, ctx: Context) -> list[Effect]:
    return [Send(event.text or "📎", event.images)]


# --- the relay's own events -------------------------------------------------------------


def delivered(conv: Conversation, event: Delivered, ctx: Context) -> list[Effect]:
    if event.route != "command":
        return []
    job = conv.job
    if conv.state == "working" and job is not None and job.message_id == event.message_id:
        job.delivered = True
        return [Send(replies.WORKING)]
    if conv.state == "idle":
        # A prompt withdrawn while the VM woke reached it after all: stop that run.
        return [CallWorker("cancel", {"phone": conv.phone})]
    return []


def unreachable(conv: Conversation, event: Unreachable, ctx: Context) -> list[Effect]:
    job = conv.job
    if event.route == "command" and conv.state == "working" and job and job.message_id == event.message_id:
        conv.state, conv.kept, conv.job = "idle", replace(job, started_at=None), None
        if event.refused:
            return [Send(replies.refused(event.reason) + replies.KEPT)]
        return [Send(replies.never_woke(event.reason, kept=True))]
    if event.route in ("approve", "reject") and conv.state == "applying":
        if event.refused:  # the worker knows best: nothing waits there, so nothing waits here
            return [Send(replies.refused(event.reason))] + _next_or_idle(conv, ctx)
        _await_approval(conv, ctx)
        return [Send(replies.never_woke(event.reason, kept=False) + replies.DECIDE_AGAIN)]
    if event.refused:
        return [Send(replies.refused(event.reason))]
    if event.route == "cancel" and job is not None:
        job.cancelling = False
    return [Send(replies.never_woke(event.reason, kept=False))]


def approval_expired(conv: Conversation, event: ApprovalExpired, ctx: Context) -> list[Effect]:
    if conv.approval_deadline is None or abs(conv.approval_deadline - event.deadline) > 1e-6:
        return []  # the owner decided, or a newer window opened, before this one closed
    conv.state, conv.applying, conv.approval_deadline = "applying", "reject", None
    return [Send(replies.approval_expired(ctx.approval_timeout_s)), CallWorker("reject", {"phone": conv.phone})]


def status(conv: Conversation, event: Word, ctx: Context) -> list[Effect]:
    return [ReportStatus()]


def ignore(conv: Conversation, event: Any, ctx: Context) -> list[Effect]:
    return []


# Events with the same handler in every state.
ANY_STATE: dict[str, Handler] = {
    "status": status,
    "help": reply(replies.HELP),
    "new": new_session,
    "screenshot": screenshot,
    "answer": finished,
    "cancelled": finished,
    "error": finished,
    "approval_required": approval_required,
    "notice": notice,
    "delivered": delivered,
    "unreachable": unreachable,
    "approval_expired": approval_expired,
    "sleeping": ignore,
}

TRANSITIONS: dict[State, dict[str, Handler]] = {
    "idle": {
        "prompt": prompt_when_idle,
        "approve": reply(replies.NOTHING_WAITING),
        "reject": reply(replies.NOTHING_WAITING),
        "cancel": reply(replies.NOTHING_RUNNING),
        "retry": retry,
        "progress": stale_progress,
        "pr_opened": applied,
        "rolled_back": applied,
        "approve_failed": approve_failed,
        "reject_failed": approve_failed,
    },
    "working": {
        "prompt": prompt_queued,
        "approve": reply(replies.STILL_WORKING),
        "reject": reply(replies.STILL_WORKING),
        "cancel": cancel_run,
        "retry": reply(replies.STILL_WORKING),
        "progress": progress,
        "pr_opened": applied,
        "rolled_back": applied,
        "approve_failed": approve_failed,
        "reject_failed": approve_failed,
    },
    "awaiting_approval": {
        "prompt": prompt_queued,
        "approve": decide,
        "reject": decide,
        "cancel": reply(replies.NOTHING_RUNNING_DECIDE),
        "retry": reply(replies.DECIDE_FIRST),
        "progress": stale_progress,
        "pr_opened": applied,
        "rolled_back": applied,
        "approve_failed": approve_failed,
        "reject_failed": approve_failed,
    },
    "applying": {
        "prompt": prompt_queued,
        "approve": reply(replies.ALREADY_APPLYING),
        "reject": reply(replies.ALREADY_APPLYING),
        "cancel": reply(replies.ALREADY_APPLYING),
        "retry": reply(replies.ALREADY_APPLYING),
        "progress": stale_progress,
        "pr_opened": applied,
        "rolled_back": applied,
        "approve_failed": approve_failed,
        "reject_failed": approve_failed,
    },
}
