"""The owner's conversation as a transition table.

`TRANSITIONS[state][event kind]` names the handler for a pair and the states it may move to;
`ANY_STATE` holds the rows that are the same in every state. A pair missing from both raises
`IllegalTransition`, and a handler that moves anywhere its row does not name raises too.
Handlers are pure: they take the conversation and the event, change the conversation and
return the effects to carry out.

The worker is the source of truth for a run. Every report names its run: the relay shows a
report of the conversation's current run, adopts one of a run it never knew while idle (a fresh
database), and ignores the rest (runs it already closed). Every answer the worker gives to a
call says where the owner's run stands, and the conversation moves there (`_adopt`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal
from zoneinfo import ZoneInfo

from common.protocol import MODEL_NAME, Answer, Attachment, OwnerCall, Report, RunPrompt, RunState, TakeScreenshot
from relay import replies
from relay.events import (
    AddSchedule,
    ApprovalExpired,
    CallWorker,
    Delivered,
    DropCommand,
    Effect,
    Event,
    Fired,
    ListSchedules,
    NewSchedule,
    Prompt,
    RecordBudget,
    RemoveSchedule,
    ReportStatus,
    ReportUsage,
    Rezone,
    Screenshot,
    Send,
    SetBudget,
    SetModel,
    SetZone,
    Stalled,
    Unreachable,
    Unschedule,
    Use,
    Word,
    event_kind,
)
from relay.settings import Repo
from relay.usage import Budget
from relay.zones import known, zone

State = Literal["idle", "working", "awaiting_approval", "applying"]
STATES: tuple[State, ...] = ("idle", "working", "awaiting_approval", "applying")
ENDED_KEPT = 20  # runs remembered as closed, so their late reports change nothing


class IllegalTransition(RuntimeError):
    def __init__(self, state: str, kind: str, detail: str = "") -> None:
        super().__init__(detail or f"no transition for event {kind!r} in state {state!r}")
        self.state, self.kind = state, kind


@dataclass
class Job:
    message_id: str
    text: str
    started_at: float | None = None
    delivered: bool = False
    cancelling: bool = False
    new_session: bool = False  # sent after `new`: kept with the prompt, so a resend keeps it too
    repo: str = ""  # the repository current when the owner wrote it ("": the only one)
    attachments: tuple[Attachment, ...] = ()  # the prompt's files: kept with it, queued or kept for retry
    schedule: int = 0  # the schedule that fired it (its row), 0 for the owner's own prompt

    def __post_init__(self) -> None:
        self.attachments = _attachments(self.attachments)  # as saved: JSON objects


def _attachments(items: Iterable[Any]) -> tuple[Attachment, ...]:
    return tuple(a if isinstance(a, Attachment) else Attachment(**a) for a in items)


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
    run: str = ""  # the run the worker holds for this owner: working on it, or its changes
    ended: list[str] = field(default_factory=list)  # runs the worker's own reports closed
    check_at: float | None = None  # when to ask the worker, if nothing about the run is heard
    heard_seq: int = 0  # the newest report handled: a worker answer older than it is stale
    repo: str = ""  # the owner's current repository (`use <name>`); "": the first of REPOS
    run_repo: str = ""  # the repository `run` works in, when the relay started it ("": unknown)
    model: str = ""  # the owner's model (`model <name>`); "": CLAUDE_MODEL
    tz: str = ""  # the owner's time zone (`tz <name>`); "": OWNER_TZ
    unattended: bool = False  # a schedule started `run`: its changes wait with no deadline

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Conversation:
        job, kept = data.get("job"), data.get("kept")
        return cls(
            phone=data["phone"],
            state=data["state"],
            job=Job(**job) if job else None,
            queue=[Job(**j) for j in data.get("queue", [])],
            approval_deadline=data.get("approval_deadline"),
            kept=Job(**kept) if kept else None,
            fresh_session=data.get("fresh_session", False),
            applying=data.get("applying", ""),
            # A conversation saved before runs were named: its job names the run.
            run=data.get("run", job["message_id"] if job else ""),
            ended=list(data.get("ended", [])),
            check_at=data.get("check_at"),
            heard_seq=data.get("heard_seq", 0),
            repo=data.get("repo", ""),
            run_repo=data.get("run_repo", ""),
            model=data.get("model", ""),
            tz=data.get("tz", ""),
            unattended=data.get("unattended", False),
        )


@dataclass(frozen=True)
class Context:
    now: float
    approval_timeout_s: float
    stall_s: float = 120.0
    repos: tuple[Repo, ...] = ()  # REPOS; empty: the worker's own REPO_URL
    default_model: str = ""  # CLAUDE_MODEL
    run_budget_usd: float | None = None  # RUN_BUDGET_USD
    budget: Budget | None = None  # the owner's month against their ceiling, when a prompt may start
    buttons: bool = False  # BUTTONS: messages carry the quick replies their Send names
    owner_tz: str = "UTC"  # OWNER_TZ: the zone of owners who did not name their own


def zone_of(conv: Conversation, ctx: Context) -> str:
    """The owner's time zone: their own (`tz <name>`), else OWNER_TZ."""
    return conv.tz or ctx.owner_tz


def owner_zone(conv: Conversation, ctx: Context) -> ZoneInfo:
    """The owner's time zone, for their clock times, days and months."""
    return known(zone_of(conv, ctx))


def current_repo(conv: Conversation, ctx: Context) -> Repo | None:
    """The owner's current repository: their choice while it is still configured, else the first."""
    return next((r for r in ctx.repos if r.name == conv.repo), ctx.repos[0] if ctx.repos else None)


def run_repo(conv: Conversation, ctx: Context) -> str:
    """The name of the repository the current run (or its changes) is in: the one it was started
    in, which may not be the owner's current one (`use` while a kept prompt waited), and may no
    longer be configured (REPOS changed across a restart). Without a run: the current one."""
    if conv.run and conv.run_repo:
        return conv.run_repo
    current = current_repo(conv, ctx)
    return current.name if current else ""


def _set_run(conv: Conversation, run_id: str) -> None:
    """The worker's word names the owner's run: a run the relay did not start is in a repository
    it cannot know (the current one is assumed)."""
    if run_id != conv.run:
        conv.run, conv.run_repo, conv.unattended = run_id, "", False


Handler = Callable[[Conversation, Any, Context], list[Effect]]
Target = State | Literal["same"]  # "same": stays in whatever state it was
Row = tuple[Handler, tuple[Target, ...]]  # the handler, and every state it may move to


def apply(conv: Conversation, event: Event, ctx: Context) -> tuple[Conversation, list[Effect]]:
    """Run one event through the table; returns the new conversation and its effects."""
    kind = event_kind(event)
    row = TRANSITIONS[conv.state].get(kind) or ANY_STATE.get(kind)
    if row is None:
        raise IllegalTransition(conv.state, kind)
    handler, targets = row
    new = replace(conv, queue=list(conv.queue), ended=list(conv.ended), job=replace(conv.job) if conv.job else None)
    if isinstance(event, Report):
        new.heard_seq = max(new.heard_seq, event.seq)
    effects = handler(new, event, ctx)
    if new.state not in targets and not ("same" in targets and new.state == conv.state):
        raise IllegalTransition(
            conv.state, kind, f"{handler.__name__} moved {conv.state} to {new.state}, which its row does not name"
        )
    _watch(conv, new, event, ctx)
    return new, effects


def _watch(old: Conversation, new: Conversation, event: Event, ctx: Context) -> None:
    """Keep the stall check: while a delivered run or a decision is under way on the worker,
    anything heard about it (or a change of run) puts the next check STALL_CHECK_MS away."""
    watching = new.state == "applying" or (new.state == "working" and new.job is not None and new.job.delivered)
    if not watching:
        new.check_at = None
    elif new.check_at is None or (new.state, new.run) != (old.state, old.run) or not _from_owner(event):
        new.check_at = ctx.now + ctx.stall_s


def _from_owner(event: Event) -> bool:
    return isinstance(
        event, Prompt | Screenshot | Word | Use | SetModel | SetBudget | NewSchedule | Unschedule | SetZone
    )


# --- starting and finishing work ----------------------------------------------------


def _start(conv: Conversation, job: Job, ctx: Context) -> list[Effect]:
    job = replace(job, started_at=ctx.now, delivered=False, new_session=job.new_session or conv.fresh_session)
    conv.fresh_session = False
    # The repository the prompt was written for; one no longer configured runs in the current one.
    repo = next((r for r in ctx.repos if r.name == job.repo), None) or current_repo(conv, ctx)
    command = RunPrompt(
        conv.phone,
        job.text,
        job.message_id,
        new_session=job.new_session,
        repo=repo.name if repo else "",
        repo_url=repo.url if repo else "",
        model=conv.model or ctx.default_model,
        budget_usd=ctx.run_budget_usd,
        attachments=job.attachments,
        unattended=bool(job.schedule),
    )
    conv.state, conv.job, conv.kept = "working", job, None
    conv.unattended = bool(job.schedule)
    conv.run, conv.approval_deadline, conv.applying = job.message_id, None, ""
    conv.run_repo = repo.name if repo else ""
    return [CallWorker(command)]


def _next_or_idle(conv: Conversation, ctx: Context) -> list[Effect]:
    conv.state, conv.job, conv.approval_deadline, conv.applying, conv.run = "idle", None, None, "", ""
    conv.unattended = False
    if conv.queue and _spent(ctx) and conv.kept is None:
        # Queued before the month was spent, but not started: it waits, kept for `retry`, which
        # starts it (and then the rest) once the owner raises the budget. Nothing is lost.
        conv.kept = conv.queue.pop(0)
        return [Send(replies.held_for_budget(conv.kept.text, len(conv.queue)))]
    if conv.queue:
        job = conv.queue.pop(0)
        return [Send(replies.starting_queued(job.text, len(conv.queue))), *_start(conv, job, ctx)]
    return []


def _spent(ctx: Context) -> bool:
    return ctx.budget is not None and ctx.budget.spent_usd >= ctx.budget.limit_usd


def _close_run(conv: Conversation) -> None:
    """The worker said the run is over: its late reports must change nothing."""
    if conv.run:
        conv.ended = [*conv.ended[-(ENDED_KEPT - 1) :], conv.run]
    conv.run = ""


def _await_approval(conv: Conversation, ctx: Context) -> None:
    """Changes wait for the owner: for APPROVAL_TIMEOUT_MS, after which they are rolled back;
    a scheduled run's changes wait until the owner answers, however late (nobody watched it
    start, and the worker sleeps meanwhile: docs/ARCHITECTURE.md, "Schedules")."""
    conv.state, conv.job, conv.applying = "awaiting_approval", None, ""
    conv.approval_deadline = None if conv.unattended else ctx.now + ctx.approval_timeout_s


def _is_current(conv: Conversation, report: Report) -> bool:
    if not conv.run and conv.state in ("awaiting_approval", "applying"):
        # Saved before runs were named: whichever run the worker reports on is this one.
        return report.run_id not in conv.ended
    return bool(conv.run) and report.run_id == conv.run


def _unknown_while_idle(conv: Conversation, report: Report) -> bool:
    """A run the relay never knew, or let go of without hearing its end (a fresh database, a
    reconciled state): while idle, the worker's word about it is adopted."""
    return conv.state == "idle" and report.run_id not in conv.ended


# --- the worker's answers: where the run stands, adopted -------------------------------

# The conversation state that mirrors each of the worker's run states.
MIRROR: dict[RunState, State] = {
    "idle": "idle",
    "running": "working",
    "cancelling": "working",
    "awaiting_approval": "awaiting_approval",
    "pushing": "applying",
    "rolling_back": "applying",
}


def _adopt(conv: Conversation, answer: Answer | None, ctx: Context, *, say: bool = True) -> list[Effect]:
    """Move to the worker's account of the owner's run, telling the owner (unless `say` is
    false: the caller already did) when that changes what they were told."""
    if answer is None:
        return []
    told, effects = _move_to(conv, answer, ctx)
    return [*told, *effects] if say else effects


def _move_to(conv: Conversation, answer: Answer, ctx: Context) -> tuple[list[Effect], list[Effect]]:
    """The move itself: what to tell the owner about it, and any other effects."""
    target = MIRROR[answer.state]
    if target == "idle":
        if conv.state == "idle" or (conv.state == "working" and conv.job and not conv.job.delivered):
            return [], []  # nothing to undo, or our prompt is still on its way to the worker
        if answer.pending:
            return [], []  # the run ended and its reports are on their way: they will say how
        # Not closed: a report of that run still on its way is shown when it comes.
        gone = replies.run_gone(conv.state)
        conv.run = ""
        return [Send(gone)], _next_or_idle(conv, ctx)
    if answer.run_id in conv.ended or answer.seq < conv.heard_seq:
        return [], []  # older than a report already handled (the one that closed that run, say)
    if conv.run == answer.run_id and conv.state == target:
        if conv.job is not None:
            conv.job.delivered, conv.job.cancelling = True, answer.state == "cancelling"
        return [], []
    prompt = answer.prompt or "an earlier prompt"
    _set_run(conv, answer.run_id)
    if target == "working":
        conv.state, conv.approval_deadline, conv.applying = "working", None, ""
        conv.job = Job(
            answer.run_id, prompt, started_at=ctx.now, delivered=True, cancelling=answer.state == "cancelling"
        )
        return [Send(replies.adopted_run(prompt), buttons="cancel", run=answer.run_id)], []
    if target == "awaiting_approval":
        _await_approval(conv, ctx)
        window = None if conv.unattended else ctx.approval_timeout_s
        return [Send(replies.adopted_changes(prompt, window), buttons="decide", run=answer.run_id)], []
    conv.state, conv.job, conv.approval_deadline = "applying", None, None
    conv.applying = "approve" if answer.state == "pushing" else "reject"
    return [Send(replies.APPLYING[conv.applying])], []


# --- the owner's words ----------------------------------------------------------------


def _refused(conv: Conversation, event: Prompt, ctx: Context) -> list[Effect] | None:
    """Why this prompt cannot be taken (empty, or the month's budget is spent), if it cannot."""
    if not event.text:
        return [Send(replies.EMPTY)]
    if ctx.budget is not None and _spent(ctx):
        return [Send(replies.budget_reached(ctx.budget))]
    return None


def _job(conv: Conversation, event: Prompt, ctx: Context) -> Job:
    repo = current_repo(conv, ctx)
    return Job(event.message_id, event.text, repo=repo.name if repo else "", attachments=event.attachments)


def prompt_when_idle(conv: Conversation, event: Prompt, ctx: Context) -> list[Effect]:
    if (refusal := _refused(conv, event, ctx)) is not None:
        return refusal
    return _start_or_kept_first(conv, _job(conv, event, ctx), ctx)


def _start_or_kept_first(conv: Conversation, job: Job, ctx: Context) -> list[Effect]:
    if conv.kept is None and not conv.queue:
        return _start(conv, job, ctx)
    # Prompts the VM never received go first, in the order they were sent: this one waits.
    conv.queue.append(job)
    first = conv.kept or conv.queue.pop(0)
    return [Send(replies.sending_kept_first(len(conv.queue))), *_start(conv, first, ctx)]


def prompt_queued(conv: Conversation, event: Prompt, ctx: Context) -> list[Effect]:
    if (refusal := _refused(conv, event, ctx)) is not None:
        return refusal
    conv.queue.append(_job(conv, event, ctx))
    return [Send(replies.queued(len(conv.queue), conv.state))]


def screenshot(conv: Conversation, event: Screenshot, ctx: Context) -> list[Effect]:
    # Screenshots do not touch the checkout, so they go straight through in every state.
    return [CallWorker(TakeScreenshot(conv.phone, event.url, event.message_id))]


def _stale_tap(conv: Conversation, event: Word) -> list[Effect] | None:
    """A tapped button acts on the run its message was about, and only while that run is the
    owner's: a tap on an earlier message (WhatsApp keeps its buttons) must not approve changes
    it never showed, nor cancel a later run or drop the queue. The owner is told, and can tap
    the latest message's buttons or type the word."""
    if event.tapped is None or (event.tapped and event.tapped == conv.run):
        return None
    return [Send(replies.stale_button(event.kind, conv.state))]


def decide(conv: Conversation, event: Word, ctx: Context) -> list[Effect]:
    if (stale := _stale_tap(conv, event)) is not None:
        return stale
    conv.state, conv.applying, conv.approval_deadline = "applying", event.kind, None
    return [Send(replies.APPLYING[event.kind]), CallWorker(OwnerCall(event.kind, conv.phone))]  # type: ignore[arg-type]


def ask_worker_to_decide(conv: Conversation, event: Word, ctx: Context) -> list[Effect]:
    """The relay knows of no changes, but the worker may hold some (a fresh database): it decides.
    A worker known to be asleep holds none, and is not woken to say so."""
    if (stale := _stale_tap(conv, event)) is not None:
        return stale
    return [CallWorker(OwnerCall(event.kind, conv.phone), mode="if_awake")]  # type: ignore[arg-type]


def cancel_when_idle(conv: Conversation, event: Word, ctx: Context) -> list[Effect]:
    if (stale := _stale_tap(conv, event)) is not None:
        return stale
    dropped = len(conv.queue) + (conv.kept is not None)
    conv.queue.clear()
    conv.kept = None
    effects: list[Effect] = [Send(replies.dropped_waiting(dropped))] if dropped else []
    # A run the relay does not know of (a fresh database) is stopped too; the answer says.
    return [*effects, CallWorker(OwnerCall("cancel", conv.phone), mode="if_awake")]


def cancel_run(conv: Conversation, event: Word, ctx: Context) -> list[Effect]:
    assert conv.job is not None
    if (stale := _stale_tap(conv, event)) is not None:
        return stale
    dropped = len(conv.queue)
    conv.queue.clear()
    if not conv.job.delivered:
        # The command is still waiting for the VM to wake: withdraw it instead.
        withdrawn = conv.job.message_id
        conv.state, conv.job, conv.run = "idle", None, ""
        return [DropCommand(withdrawn), Send(replies.cancelled_before_start(dropped))]
    # Asked again while cancelling: the worker's answer settles it, whatever happened to the
    # first cancel (a worker that lost the run answers "idle", and the conversation follows).
    text = replies.ALREADY_CANCELLING if conv.job.cancelling else replies.cancelling(dropped)
    conv.job.cancelling = True
    return [Send(text), CallWorker(OwnerCall("cancel", conv.phone))]


def check_applying(conv: Conversation, event: Word, ctx: Context) -> list[Effect]:
    """A push cannot be stopped halfway, but the owner who asks learns where it stands."""
    return [Send(replies.ALREADY_APPLYING), CallWorker(OwnerCall("status", conv.phone), mode="probe")]


def retry(conv: Conversation, event: Word, ctx: Context) -> list[Effect]:
    if conv.kept is None:
        return [Send(replies.NOTHING_TO_RETRY)]
    if ctx.budget is not None and _spent(ctx):  # a kept prompt is a prompt: it waits too
        return [Send(replies.budget_reached(ctx.budget))]
    # The owner is here to retry it: a kept scheduled prompt runs attended (progress, a deadline).
    return [Send(replies.RETRYING), *_start(conv, replace(conv.kept, schedule=0), ctx)]


def new_session(conv: Conversation, event: Word, ctx: Context) -> list[Effect]:
    conv.fresh_session = True
    return [Send(replies.NEW_SESSION)]


def status(conv: Conversation, event: Word, ctx: Context) -> list[Effect]:
    return [ReportStatus()]


def usage(conv: Conversation, event: Word, ctx: Context) -> list[Effect]:
    return [ReportUsage()]


def fired(conv: Conversation, event: Fired, ctx: Context) -> list[Effect]:
    """A schedule came due: its prompt starts like the owner's own (or queues), said with ⏰."""
    if event.late:
        return [Send(replies.fired_late(event.number, event.text, event.due, owner_zone(conv, ctx), ctx.now))]
    if ctx.budget is not None and _spent(ctx):
        return [Send(replies.fired_over_budget(event.text, ctx.budget))]
    if any(job.schedule == event.schedule for job in [conv.kept, *conv.queue] if job is not None):
        # Its last prompt has not started yet: one waiting is enough.
        return [Send(replies.fired_still_waiting(event.text))]
    job = Job(event.message_id, event.text, repo=event.repo, schedule=event.schedule)
    if conv.state == "idle":
        return [Send(replies.fired(event.text)), *_start_or_kept_first(conv, job, ctx)]
    conv.queue.append(job)
    return [Send(replies.fired(event.text) + "\n" + replies.queued(len(conv.queue), conv.state))]


def add_schedule(conv: Conversation, event: NewSchedule, ctx: Context) -> list[Effect]:
    if event.problem:
        return [Send(replies.bad_schedule(event.problem))]
    repo = current_repo(conv, ctx)
    return [AddSchedule(event, repo.name if repo else "", zone_of(conv, ctx))]


def list_schedules(conv: Conversation, event: Word, ctx: Context) -> list[Effect]:
    return [ListSchedules(zone_of(conv, ctx))]


def unschedule(conv: Conversation, event: Unschedule, ctx: Context) -> list[Effect]:
    if event.problem:  # first: its `number` is None, which would mean all of them
        return [Send(replies.bad_unschedule(event.problem))]
    return [RemoveSchedule(event.number)]


def show_zone(conv: Conversation, event: Word, ctx: Context) -> list[Effect]:
    return [Send(replies.zone_is(owner_zone(conv, ctx), ctx.now))]


def set_zone(conv: Conversation, event: SetZone, ctx: Context) -> list[Effect]:
    found = zone(event.name)
    if found is None:
        return [Send(replies.bad_zone(event.name))]
    conv.tz = str(found)
    return [Rezone(conv.tz)]


def set_budget(conv: Conversation, event: SetBudget, ctx: Context) -> list[Effect]:
    if event.amount_usd is None:
        return [Send(replies.bad_budget(event.amount))]
    return [RecordBudget(event.amount_usd)]


# --- repositories and the model ---------------------------------------------------------


def list_repos(conv: Conversation, event: Word, ctx: Context) -> list[Effect]:
    current = current_repo(conv, ctx)
    return [Send(replies.repos(ctx.repos, current.name if current else ""))]


def switch_repo(conv: Conversation, event: Use, ctx: Context) -> list[Effect]:
    """Idle: the owner's next prompts go to another repository (its own checkout and session)."""
    if (refusal := _cannot_use(conv, event, ctx)) is not None:
        return refusal
    conv.repo = event.name
    repo = current_repo(conv, ctx)
    assert repo is not None
    return [Send(replies.switched(repo))]


def refuse_switch(conv: Conversation, event: Use, ctx: Context) -> list[Effect]:
    """A run or its changes belong to the current repository: settle them first."""
    if (refusal := _cannot_use(conv, event, ctx)) is not None:
        return refusal
    current = current_repo(conv, ctx)
    return [Send(replies.cannot_switch(conv.state, current.name if current else "", event.name))]


def _cannot_use(conv: Conversation, event: Use, ctx: Context) -> list[Effect] | None:
    current = current_repo(conv, ctx)
    if not ctx.repos:
        return [Send(replies.ONE_REPO)]
    if not any(r.name == event.name for r in ctx.repos):
        return [Send(replies.unknown_repo(event.name, ctx.repos))]
    if current is not None and current.name == event.name:
        return [Send(replies.already_on(current))]
    return None


def show_model(conv: Conversation, event: Word, ctx: Context) -> list[Effect]:
    return [Send(replies.model(conv.model, ctx.default_model))]


def set_model(conv: Conversation, event: SetModel, ctx: Context) -> list[Effect]:
    name = event.name.lower() if event.name.lower() in replies.MODEL_ALIASES + ("default",) else event.name
    if not MODEL_NAME.match(name):
        return [Send(replies.bad_model(event.name))]
    conv.model = "" if name == "default" else name
    return [Send(replies.model_set(conv.model, ctx.default_model))]


def reply(text: str) -> Handler:
    def say(conv: Conversation, event: Any, ctx: Context) -> list[Effect]:
        return [Send(text)]

    say.__name__ = f"say {text[:24]!r}…"
    return say


# --- the worker's reports -------------------------------------------------------------


def progress(conv: Conversation, event: Report, ctx: Context) -> list[Effect]:
    # A scheduled run tells only how it ended: nobody watches it, and its lines would wait for
    # the owner's next message (the 24-hour window) to arrive all at once.
    if conv.state == "working" and _is_current(conv, event) and event.text and not conv.unattended:
        return [Send(event.text)]
    return []  # a late line from a run that already ended here: nothing to say


def finished(conv: Conversation, event: Report, ctx: Context) -> list[Effect]:
    if _is_current(conv, event) and conv.state != "working":
        return [Send(replies.finished(event, shown=True))]  # the approval request came first
    if not _is_current(conv, event) and not _unknown_while_idle(conv, event):
        return []
    if conv.kept is not None and conv.kept.message_id == event.run_id:
        conv.kept = None  # the VM did get it after all: nothing left to retry
    _set_run(conv, event.run_id)
    effects: list[Effect] = [Send(replies.finished(event, shown=False), event.images)]
    if event.changes:  # the approval request never came (a worker from before it came first)
        _await_approval(conv, ctx)
        return effects
    _close_run(conv)
    return effects + _next_or_idle(conv, ctx)


def approval_required(conv: Conversation, event: Report, ctx: Context) -> list[Effect]:
    current = _is_current(conv, event) and conv.state in ("working", "awaiting_approval")
    if not current and not _unknown_while_idle(conv, event):
        return []  # a decision is under way, or the run is not this conversation's
    if conv.state != "awaiting_approval":
        _set_run(conv, event.run_id)
        _await_approval(conv, ctx)
    window = None if conv.unattended else ctx.approval_timeout_s
    text = replies.approval_request(event, window, repo=run_repo(conv, ctx))
    return [Send(text, event.images, buttons="decide", run=conv.run)]


def applied(conv: Conversation, event: Report, ctx: Context) -> list[Effect]:
    if not _is_current(conv, event) and not _unknown_while_idle(conv, event):
        return []
    _set_run(conv, event.run_id)
    _close_run(conv)
    return [Send(replies.applied(event))] + _next_or_idle(conv, ctx)


def decision_failed(conv: Conversation, event: Report, ctx: Context) -> list[Effect]:
    if not _is_current(conv, event) and not _unknown_while_idle(conv, event):
        return []
    _set_run(conv, event.run_id)
    _await_approval(conv, ctx)
    return [Send(replies.decision_failed(event.type, event.text))]


def notice(conv: Conversation, event: Report, ctx: Context) -> list[Effect]:
    return [Send(event.text or "📎", event.images)]  # screenshots: tied to no run


# --- the relay's own events -------------------------------------------------------------


def delivered(conv: Conversation, event: Delivered, ctx: Context) -> list[Effect]:
    if event.route == "command":
        job = conv.job
        if conv.state == "working" and job is not None and job.message_id == event.message_id:
            job.delivered = True
            if conv.unattended:  # "⏰ <prompt>" said it started; nobody waits to hear it runs
                return []
            return [Send(replies.WORKING, buttons="cancel", run=job.message_id)]
        if event.message_id in conv.ended:
            return []  # its run already reported its end: nothing to stop
        if conv.state == "idle" and not (event.answer and event.answer.state == "idle"):
            # A prompt withdrawn while the VM woke reached it after all: stop that run.
            return [CallWorker(OwnerCall("cancel", conv.phone))]
        return []
    if event.route == "screenshot":
        return []
    return _answered(conv, event.route, event.answer, ctx)


def unreachable(conv: Conversation, event: Unreachable, ctx: Context) -> list[Effect]:
    if event.route == "command":
        return _command_failed(conv, event, ctx)
    if event.route == "screenshot":
        return [Send(replies.refused(event.reason) if event.refused else replies.never_woke(event.reason, kept=False))]
    if event.asleep and conv.state == "awaiting_approval" and conv.unattended:
        return []  # the worker sleeps holding a scheduled run's changes, which wait for the owner
    answer = Answer("idle") if event.asleep else event.answer
    if answer is not None:  # the worker said where things stand (or sleeps, so holds no run)
        return _answered(conv, event.route, answer, ctx, refusal=event.reason if event.refused else "")
    if event.route == "status":
        return []  # a probe that found no one: the next check asks again
    if event.route in ("approve", "reject") and conv.state == "applying":
        if event.refused:  # a worker without an account of its state: it says it holds nothing
            _close_run(conv)
            return [Send(replies.refused(event.reason))] + _next_or_idle(conv, ctx)
        _await_approval(conv, ctx)
        return [Send(replies.never_woke(event.reason, kept=False) + replies.DECIDE_AGAIN)]
    if event.refused:
        return [Send(replies.refused(event.reason))]
    if event.route == "cancel" and conv.job is not None:
        conv.job.cancelling = False
    return [Send(replies.never_woke(event.reason, kept=False))]


def _answered(conv: Conversation, route: str, answer: Answer | None, ctx: Context, refusal: str = "") -> list[Effect]:
    """The worker's answer to approve, reject, cancel or status: where the owner's run stands."""
    if answer is None:
        return []
    holds_nothing = conv.state == "idle" or (
        conv.state == "working" and conv.job is not None and not conv.job.delivered
    )
    if answer.state == "idle" and holds_nothing:
        # Asked while the relay knew of no run, and the worker holds none either.
        if route in ("approve", "reject"):
            return [Send(replies.NOTHING_WAITING)]
        return [Send(replies.NOTHING_RUNNING)] if route == "cancel" else []
    decided = route in ("approve", "reject") and conv.state == "applying"
    if refusal and decided and not (answer.state == "idle" and answer.pending):
        # (With reports still coming, a refusal of a repeated decision is the first one's echo.)
        return [Send(replies.refused(refusal)), *_adopt(conv, answer, ctx, say=False)]
    return _adopt(conv, answer, ctx)


def _command_failed(conv: Conversation, event: Unreachable, ctx: Context) -> list[Effect]:
    job = conv.job
    if conv.state != "working" or job is None or job.message_id != event.message_id:
        return []
    answer = event.answer
    if event.refused and answer is not None and answer.state != "idle":
        # The worker holds another run or its changes: this prompt waits its turn behind them.
        conv.queue.insert(0, replace(job, started_at=None, delivered=False))
        conv.state, conv.job, conv.run = "idle", None, ""
        return [Send(replies.refused(event.reason) + replies.QUEUED_BEHIND), *_adopt(conv, answer, ctx)]
    conv.state, conv.kept, conv.job, conv.run = "idle", replace(job, started_at=None), None, ""
    tail = replies.KEPT + replies.queue_waits(len(conv.queue))
    if event.refused:
        return [Send(replies.refused(event.reason) + tail)]
    return [Send(replies.never_woke(event.reason) + tail)]


def approval_expired(conv: Conversation, event: ApprovalExpired, ctx: Context) -> list[Effect]:
    if conv.approval_deadline is None or abs(conv.approval_deadline - event.deadline) > 1e-6:
        return []  # the owner decided, or a newer window opened, before this one closed
    conv.state, conv.applying, conv.approval_deadline = "applying", "reject", None
    return [Send(replies.approval_expired(ctx.approval_timeout_s)), CallWorker(OwnerCall("reject", conv.phone))]


def stalled(conv: Conversation, event: Stalled, ctx: Context) -> list[Effect]:
    if conv.check_at is None or abs(conv.check_at - event.check_at) > 1e-6:
        return []  # heard from the worker since: no need to ask
    return [CallWorker(OwnerCall("status", conv.phone), mode="probe")]


def ignore(conv: Conversation, event: Any, ctx: Context) -> list[Effect]:
    return []


# --- the table --------------------------------------------------------------------------

SAME: tuple[Target, ...] = ("same",)
# A finished run or decision leads to idle, or to the next queued prompt.
NEXT: tuple[Target, ...] = ("idle", "working", "same")
# An answer from the worker moves to wherever it says the owner's run stands.
ANYWHERE: tuple[Target, ...] = STATES

# Rows that are the same in every state.
ANY_STATE: dict[str, Row] = {
    "status": (status, SAME),
    "help": (reply(replies.HELP), SAME),
    "repos": (list_repos, SAME),
    "model": (show_model, SAME),
    "set_model": (set_model, SAME),
    "usage": (usage, SAME),
    "budget": (usage, SAME),
    "set_budget": (set_budget, SAME),
    "schedule": (add_schedule, SAME),
    "schedules": (list_schedules, SAME),
    "unschedule": (unschedule, SAME),
    "tz": (show_zone, SAME),
    "set_tz": (set_zone, SAME),
    "new": (new_session, SAME),
    "screenshot": (screenshot, SAME),
    "progress": (progress, SAME),
    "answer": (finished, ("awaiting_approval", *NEXT)),
    "cancelled": (finished, ("awaiting_approval", *NEXT)),
    "error": (finished, ("awaiting_approval", *NEXT)),
    "approval_required": (approval_required, ("awaiting_approval", "same")),
    "pr_opened": (applied, NEXT),
    "rolled_back": (applied, NEXT),
    "approve_failed": (decision_failed, ("awaiting_approval", "same")),
    "reject_failed": (decision_failed, ("awaiting_approval", "same")),
    "notice": (notice, SAME),
    "sleeping": (ignore, SAME),
    "delivered": (delivered, ANYWHERE),
    "unreachable": (unreachable, ANYWHERE),
    "approval_expired": (approval_expired, ("applying", "same")),
    "stalled": (stalled, SAME),
}

TRANSITIONS: dict[State, dict[str, Row]] = {
    "idle": {
        "prompt": (prompt_when_idle, ("working", "same")),
        "fired": (fired, ("working", "same")),
        "approve": (ask_worker_to_decide, SAME),
        "reject": (ask_worker_to_decide, SAME),
        "cancel": (cancel_when_idle, SAME),
        "retry": (retry, ("working", "same")),
        "use": (switch_repo, SAME),
    },
    "working": {
        "prompt": (prompt_queued, SAME),
        "fired": (fired, SAME),
        "approve": (reply(replies.STILL_WORKING), SAME),
        "reject": (reply(replies.STILL_WORKING), SAME),
        "cancel": (cancel_run, ("idle", "same")),
        "retry": (reply(replies.STILL_WORKING), SAME),
        "use": (refuse_switch, SAME),
    },
    "awaiting_approval": {
        "prompt": (prompt_queued, SAME),
        "fired": (fired, SAME),
        "approve": (decide, ("applying", "same")),
        "reject": (decide, ("applying", "same")),
        "cancel": (reply(replies.NOTHING_RUNNING_DECIDE), SAME),
        "retry": (reply(replies.DECIDE_FIRST), SAME),
        "use": (refuse_switch, SAME),
    },
    "applying": {
        "prompt": (prompt_queued, SAME),
        "fired": (fired, SAME),
        "approve": (reply(replies.ALREADY_APPLYING), SAME),
        "reject": (reply(replies.ALREADY_APPLYING), SAME),
        "cancel": (check_applying, SAME),
        "retry": (reply(replies.ALREADY_APPLYING), SAME),
        "use": (refuse_switch, SAME),
    },
}
