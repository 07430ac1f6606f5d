"""The relay's background work, driven entirely by what SQLite holds.

- inbox lanes (one per phone): take the oldest unhandled event, run it through the
  conversation table and record the effects (messages, worker calls) in one transaction;
- outbox lanes (one per phone): send messages in order, paced, retried with backoff;
- the worker lane: deliver calls in order, waking the worker when it sleeps;
- a timer: close approval windows, and ask the worker about runs silent too long;
- WhatsApp's 24-hour window (relay/window.py): the outbox lane holds what would go outside it
  and sends the template; the inbox lane releases what was held when the owner writes.
Because every step reads its work from the database and commits before it acts, a crash at
any point resumes where it stopped.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any
from zoneinfo import ZoneInfo

import anyio

from common.protocol import (
    TERMINAL,
    Credentials,
    ProtocolError,
    Report,
    decode_answer,
    decode_command,
    decode_report,
    encode_answer,
    encode_command,
    message_id_of,
)
from relay import credentials, fleet, replies, schedules, store, usage, window
from relay.conversation import Context, Conversation, apply, current_repo, owner_zone, run_repo
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
    Prompt,
    RecordBudget,
    RemoveSchedule,
    ReportStatus,
    ReportUsage,
    Rezone,
    Send,
    Stalled,
    Unreachable,
    Word,
    parse_owner_text,
)
from relay.fleet import SHARED, FleetError, Workers
from relay.lanes import Lanes
from relay.media import Media, Taken, prompt_of
from relay.settings import Settings, mask_phone
from relay.twilio import OUTSIDE_WINDOW, SendResult, TwilioSender, fits_a_quick_reply, split_body
from relay.worker_client import WorkerClient
from relay.zones import known

logger = logging.getLogger(__name__)

MAX_SEND_AGE_S = 3600.0  # a message still unsent after an hour is given up, and shown by `status`
MAX_FAILS_WHILE_UP = 3  # a call that fails this often while /health answers is reported, not retried


def decode_event(data: dict[str, Any]) -> Event:
    kind = data.get("type")
    if kind == "owner":
        if data.get("attachments"):  # taken from Twilio before this (`Dispatcher._take_media`)
            return prompt_of(data)
        return parse_owner_text(data["text"], data["message_id"])
    if kind == "delivered":
        return Delivered(
            route=data["route"], message_id=data.get("message_id", ""), answer=decode_answer(data.get("answer"))
        )
    if kind == "unreachable":
        return Unreachable(
            route=data["route"],
            message_id=data.get("message_id", ""),
            reason=data.get("reason", ""),
            refused=bool(data.get("refused")),
            answer=decode_answer(data.get("answer")),
            asleep=bool(data.get("asleep")),
        )
    if kind == "approval_expired":
        return ApprovalExpired(deadline=data["deadline"])
    if kind == "stalled":
        return Stalled(check_at=data["check_at"])
    if kind == "fired":
        return Fired(
            schedule=data["schedule"],
            number=data["number"],
            text=data["text"],
            message_id=data["message_id"],
            repo=data.get("repo", ""),
            due=data.get("due", 0.0),
            late=bool(data.get("late")),
        )
    return decode_report(data)


@dataclass
class Outcome:
    sends: bool = False
    calls: bool = False
    media: tuple[int, dict[str, Any]] | None = None  # not handled: its media must be taken first
    released: window.Released | None = None  # held messages the owner's message released


@dataclass(frozen=True)
class Pricing:
    """What the worker's hours cost, and the monthly ceiling unless an owner set their own.
    `per_owner`: each owner has a Machine of their own (relay/fleet.py), whose hours are theirs."""

    hourly_usd: float = 0.0
    monthly_budget_usd: float | None = None
    per_owner: bool = False

    def worker_of(self, phone: str) -> str:
        return phone if self.per_owner else SHARED


def process_next(conn: sqlite3.Connection, phone: str, ctx: Context, pricing: Pricing = Pricing()) -> Outcome | None:
    """Handle the oldest unhandled event of one phone, atomically; None when there is none."""
    with store.transaction(conn):
        item = store.next_inbox(conn, phone)
        if item is None:
            return None
        inbox_id, data = item
        # The owner wrote: what waited for them goes back in the queue before anything this
        # message writes, so it goes first (relay/window.py).
        released = window.owner_wrote(conn, phone, inbox_id, ctx.now) if data.get("type") == "owner" else None
        if data.get("type") == "owner" and data.get("media") and "attachments" not in data:
            return Outcome(sends=released is not None, media=item, released=released)
        conv = store.load_conversation(conn, phone)
        before = conv
        try:
            event = decode_event(data)
            if released is not None and _acknowledges(event):
                event = Word("status")  # what waited goes first; status says what it was
            if isinstance(event, Word) and isinstance(tapped := data.get("tapped"), str):
                event = replace(event, tapped=store.run_of_buttons(conn, phone, tapped))
            # A run's end is counted first, so the prompt it may start next is weighed with it.
            counted = isinstance(event, Report) and event.type in TERMINAL and _count(conn, before, event, ctx)
            if _may_start_a_run(event):  # no prompt starts (new, queued, kept) once the month is spent
                ctx = replace(ctx, budget=_budget(conn, phone, ctx.now, pricing, owner_zone(conv, ctx)))
            conv, effects = apply(conv, event, ctx)
            if counted:
                effects += _budget_notice(conn, phone, ctx, pricing, owner_zone(conv, ctx))
        except Exception:
            # A poison event must not block the owner's lane forever: log it and move on.
            logger.exception("could not handle inbox event %s of type %r", inbox_id, data.get("type"))
            effects = []
        # One line per event instead of an access log, which would print the owner's number
        # (it is in /callback/{phone}) and the unguessable image names.
        logger.info("%s: %s, %s -> %s", mask_phone(phone), data.get("type"), before.state, conv.state)
        outcome = Outcome(sends=released is not None, released=released)
        kind = window.kind_of(data.get("type"))  # of the first message: a result, an approval...
        for effect in effects:
            _record(conn, conv, effect, ctx, pricing, outcome, kind=kind)
            kind = "message" if isinstance(effect, (Send, ReportStatus)) else kind
        store.save_conversation(conn, conv, ctx.now)
        store.mark_handled(conn, inbox_id, ctx.now)
    return outcome


def _acknowledges(event: Event) -> bool:
    """The owner's message only answers the 24-hour window's template ("ok", "show me"): not a
    prompt to run (relay/window.py ACKNOWLEDGEMENTS)."""
    return isinstance(event, Prompt) and not event.attachments and window.is_acknowledgement(event.text)


def _budget(conn: sqlite3.Connection, phone: str, now: float, pricing: Pricing, tz: ZoneInfo) -> usage.Budget | None:
    limit = usage.limit_for(conn, phone, now, pricing.monthly_budget_usd, tz)
    if limit is None:
        return None
    # Every prompt asks this: the month alone, not the day `usage` shows beside it.
    month = usage.this_month(conn, phone, now, _awake_since(conn, pricing.worker_of(phone)), pricing.hourly_usd, tz)
    return usage.Budget(limit, month.total_usd)


def _awake_since(conn: sqlite3.Connection, worker: str) -> float | None:
    """When the worker, awake now, came up: its hours so far count."""
    row = store.worker_state(conn, worker)
    return row["up_at"] if row is not None and row["awake"] == 1 else None


def _may_start_a_run(event: Event) -> bool:
    """Whether handling `event` may start one of the owner's prompts: every event but the
    worker's progress lines and notices, which are the most frequent and start nothing."""
    return not (isinstance(event, Report) and event.type in ("progress", "notice"))


def _count(conn: sqlite3.Connection, conv: Conversation, report: Report, ctx: Context) -> bool:
    """Count a run's end, once; False when it was counted before. `conv` is the conversation
    as it was before the report. A failure here is logged and costs the owner nothing: the
    report's answer and the next prompt still go."""
    try:
        current = current_repo(conv, ctx)
        repo = run_repo(conv, ctx) if report.run_id == conv.run else current.name if current else ""
        return usage.record_run(conn, conv.phone, report, repo, conv.model or ctx.default_model, ctx.now)
    except Exception:
        logger.exception("could not count the end of run %s", report.run_id)
        return False


def _budget_notice(conn: sqlite3.Connection, phone: str, ctx: Context, pricing: Pricing, tz: ZoneInfo) -> list[Effect]:
    """Tell the owner, once each, when a run took the month past 80% or 100% of their budget."""
    try:
        budget = ctx.budget or _budget(conn, phone, ctx.now, pricing, tz)
        level = usage.threshold_to_tell(conn, phone, budget, ctx.now, tz) if budget is not None else 0
    except Exception:
        logger.exception("could not weigh a run's end against the budget of %s", mask_phone(phone))
        return []
    return [Send(replies.budget_warning(level, budget))] if level and budget is not None else []


def _record(
    conn: sqlite3.Connection,
    conv: Conversation,
    effect: Effect,
    ctx: Context,
    pricing: Pricing,
    outcome: Outcome,
    *,
    kind: str = "message",
) -> None:
    now, tz = ctx.now, owner_zone(conv, ctx)
    if isinstance(effect, ReportStatus):
        effect = Send(_status_text(conn, conv, ctx, pricing) + replies.held_released(outcome.released, now, tz))
    elif isinstance(effect, ReportUsage):
        effect = Send(_usage_text(conn, conv.phone, now, pricing, tz))
    elif isinstance(effect, RecordBudget):
        usage.set_limit(conn, conv.phone, effect.amount_usd, now, tz)
        waiting = conv.kept.text if conv.kept else None  # a prompt held for the budget, say
        text = replies.budget_set(effect.amount_usd, waiting) + "\n\n" + _usage_text(conn, conv.phone, now, pricing, tz)
        effect = Send(text)
    elif isinstance(effect, AddSchedule | ListSchedules | RemoveSchedule | Rezone):
        effect = _schedules(conn, conv.phone, effect, now)
    if isinstance(effect, Send):
        _enqueue(conn, conv.phone, effect, now, buttons=effect.buttons if ctx.buttons else "", kind=kind)
        outcome.sends = True
    elif isinstance(effect, CallWorker):
        command = effect.command
        store.enqueue_worker_call(conn, conv.phone, command.route, encode_command(command), now, effect.mode)
        outcome.calls = True
    elif isinstance(effect, DropCommand):
        store.drop_command(conn, conv.phone, effect.message_id)


def _schedules(
    conn: sqlite3.Connection, phone: str, effect: AddSchedule | ListSchedules | RemoveSchedule | Rezone, now: float
) -> Send:
    """The owner's schedules (relay/schedules.py), changed or shown; what to tell the owner."""
    if isinstance(effect, AddSchedule):
        return Send(_add_schedule(conn, phone, effect, now))
    if isinstance(effect, ListSchedules):
        return Send(replies.schedule_list(schedules.owned(conn, phone), known(effect.tz), now))
    if isinstance(effect, RemoveSchedule):
        gone = schedules.remove(conn, phone, effect.number)
        if not gone and effect.number is not None:
            return Send(replies.no_such_schedule(effect.number))
        return Send(replies.unscheduled(gone))
    tz = known(effect.tz)  # the conversation found it
    schedules.rezone(conn, phone, tz, now)
    return Send(replies.zone_set(tz, now))


def _add_schedule(conn: sqlite3.Connection, phone: str, effect: AddSchedule, now: float) -> str:
    new, tz = effect.schedule, known(effect.tz)
    clock = "" if new.clock is None else f"{new.clock[0]:02d}:{new.clock[1]:02d}"
    if new.clock is None:  # in <N>
        next_at = now + new.delay_s
    else:  # every <days> HH:MM, or at HH:MM: the next such time
        next_at = schedules.next_time(schedules.Rule(new.days, *new.clock), now, tz)
    added = schedules.add(
        conn,
        phone,
        days=new.days,
        clock=clock,
        tz=str(tz),
        prompt=new.prompt,
        repo=effect.repo,
        next_at=next_at,
        now=now,
    )
    return replies.scheduled(added, now) if added else replies.too_many_schedules(schedules.MAX_SCHEDULES)


def fire_schedules(conn: sqlite3.Connection, now: float) -> list[str]:
    """Fire every schedule that is due: its event goes to the owner's inbox, keyed by the
    schedule and its due time, and the schedule moves on to its next time, in one transaction.
    So a due time fires once, across any crash or restart. One due more than MAX_LATE_S ago
    (the relay was down) fires as a word that it was skipped. Returns the owners to wake."""
    owners: list[str] = []
    with store.transaction(conn):
        for row in schedules.due(conn, now):
            conn.execute("SAVEPOINT fire")
            try:
                if _fire(conn, schedules.from_row(row), now):
                    owners.append(row["phone"])
            except Exception:
                # A row that cannot be read or moved on would fail every tick and hold up the rest
                # (a corrupt zone, say): it is removed, and its owner told.
                conn.execute("ROLLBACK TO fire")
                logger.exception("schedule %s cannot fire: removed", row["id"])
                conn.execute("DELETE FROM schedules WHERE id = ?", (row["id"],))
                store.enqueue_send(conn, row["phone"], replies.schedule_broken(row["number"], row["prompt"]), [], now)
                owners.append(row["phone"])
            conn.execute("RELEASE fire")
    return owners


def _fire(conn: sqlite3.Connection, s: schedules.Schedule, now: float) -> bool:
    """One due time of one schedule: its event in the owner's inbox, once, and the schedule moved
    on; False when this due time was fired before."""
    event = {
        "type": "fired",
        "schedule": s.id,
        "number": s.number,
        "text": s.prompt,
        "message_id": f"sched-{s.id}-{s.next_at:.0f}",
        "repo": s.repo,
        "due": s.next_at,
        "late": now - s.next_at > schedules.MAX_LATE_S,
    }
    new = store.insert_inbox(conn, s.phone, f"schedule:{s.id}:{s.next_at!r}", event, now)
    schedules.move_on(conn, s, now)
    return new


def _enqueue(conn: sqlite3.Connection, phone: str, send: Send, now: float, *, buttons: str, kind: str) -> None:
    """A message as the outbox rows that carry it: long ones split into numbered parts, images
    on the last. Buttons go on a quick reply, whose body is sent as one Content variable, and
    Twilio refuses a variable holding a line break, a tab or five spaces in a row (error 21656):
    a one-line message is the quick reply itself; any other goes out as it is, and a one-line
    quick reply after it carries its buttons (an approval request is many lines). The first row
    carries the message's `kind`, the others none, so a held message counts once."""
    media = list(send.media)
    if buttons and fits_a_quick_reply(send.text):
        if media:  # a quick reply carries no picture: the picture first, then the words and buttons
            store.enqueue_send(conn, phone, "", media, now, kind=kind)
            kind = ""
        store.enqueue_send(conn, phone, send.text, [], now, buttons, send.run, kind=kind)
        return
    parts = split_body(send.text)
    for i, part in enumerate(parts):
        # Images ride on the last part, after the text that explains them.
        store.enqueue_send(conn, phone, part, media if i == len(parts) - 1 else [], now, kind=kind if i == 0 else "")
    if buttons:
        store.enqueue_send(conn, phone, replies.BUTTONS_PROMPT[buttons], [], now, buttons, send.run, kind="")


def _usage_text(conn: sqlite3.Connection, phone: str, now: float, pricing: Pricing, tz: ZoneInfo) -> str:
    """`usage`: today and this month in the owner's zone."""
    awake_since = _awake_since(conn, pricing.worker_of(phone))
    today, month = usage.today_and_month(conn, phone, now, awake_since, pricing.hourly_usd, tz)
    limit = usage.limit_for(conn, phone, now, pricing.monthly_budget_usd, tz)
    # Owners who share the worker's hours: only this one when each has their own Machine.
    owners = 1 if pricing.per_owner else conn.execute("SELECT COUNT(*) FROM conversations").fetchone()[0]
    budget = None if limit is None else usage.Budget(limit, month.total_usd)
    return replies.usage(today, month, budget, owners, tz)


def _status_text(conn: sqlite3.Connection, conv: Conversation, ctx: Context, pricing: Pricing) -> str:
    """From the relay's own records: asking never wakes the worker."""
    now = ctx.now
    row = store.worker_state(conn, pricing.worker_of(conv.phone))
    own = fleet.placement(conn, conv.phone) if pricing.per_owner else None
    worker = replies.WorkerInfo(
        awake=None if row is None or row["awake"] is None else bool(row["awake"]),
        last_seen_at=row["last_seen_at"] if row else None,
        slept_at=row["slept_at"] if row else None,
        machine=own.machine_id if own else "",
        per_owner=pricing.per_owner,
    )
    failures = [
        replies.FailedSend(r["error_code"], r["error"] or "", r["sent_at"] or now)
        for r in store.recent_failures(conn, conv.phone)
    ]
    job, tz = conv.job, owner_zone(conv, ctx)
    text = replies.status(
        conv.state,
        job.text if job else None,
        job.started_at if job else None,
        [j.text for j in conv.queue],
        conv.approval_deadline,
        conv.kept.text if conv.kept else None,
        worker,
        failures,
        now,
        repo=run_repo(conv, ctx),
        model=conv.model or ctx.default_model,
        tz=tz,
    )
    text += "".join(f"\n{line}" for line in credentials.status_lines(conn, now))
    owned = schedules.owned(conn, conv.phone)
    return text + ("\n" + replies.schedules_line(owned, tz, now) if owned else "")


@dataclass
class Dispatcher:
    settings: Settings
    db: store.Database
    sender: TwilioSender
    workers: Workers
    clock: Callable[[], float] = time.time
    media: Media | None = None  # takes the owner's photos and files from Twilio
    inbox: Lanes = field(init=False)
    outbox: Lanes = field(init=False)
    calls: Lanes = field(init=False)
    _last_sent: dict[str, float] = field(default_factory=dict)
    # Per worker (one key when shared, each owner's number when each has a Machine):
    _failed_while_up: dict[str, int] = field(default_factory=dict)
    _waking: dict[str, set[str]] = field(default_factory=dict)  # owners told "waking" during its wake-up
    _up: dict[str, anyio.Event] = field(default_factory=dict)  # it said it is up since the last call
    _retokened: set[str] = field(default_factory=set)  # owners' Machines given a new token (relay/fleet.py)

    def __post_init__(self) -> None:
        self.inbox = Lanes("inbox", self._inbox_step)
        self.outbox = Lanes("outbox", self._send_step)
        self.calls = Lanes("worker", self._call_step)  # one lane per worker

    async def run(self, tg: anyio.abc.TaskGroup) -> None:
        """Start the lanes, resume whatever a previous process left undone, and keep the timer."""
        for lanes in (self.inbox, self.outbox, self.calls):
            lanes.start(tg)
        inbox_phones, outbox_phones = await self.db.run(store.phones_with_work)
        for phone in inbox_phones:
            self.inbox.notify(phone)
        for phone in outbox_phones:
            self.outbox.notify(phone)
        if self.settings.template_content_sid:  # a crash between a hold and its template
            for phone in await self.db.run(window.template_owed):
                self.outbox.notify(phone)
        for worker in await self.db.run(_workers_with_calls, self.workers):
            self.calls.notify(worker)
        tg.start_soon(self._timers, name="timers")

    @property
    def busy(self) -> bool:
        return self.inbox.busy or self.outbox.busy or self.calls.busy

    # --- inbox ----------------------------------------------------------------------

    async def _inbox_step(self, phone: str) -> float | None:
        settings = self.settings
        ctx = Context(
            self.clock(),
            settings.approval_timeout_s,
            settings.stall_check_s,
            repos=settings.repos,
            default_model=settings.claude_model,
            run_budget_usd=settings.run_budget_usd,
            buttons=settings.buttons,
            owner_tz=settings.owner_tz,
        )
        pricing = Pricing(settings.vm_cost_per_hour_usd, settings.monthly_budget_usd, settings.per_owner)
        outcome = await self.db.run(process_next, phone, ctx, pricing)
        if outcome is None:
            return None
        if outcome.sends:
            self.outbox.notify(phone)
        if outcome.media is not None:
            await self._take_media(phone, *outcome.media)
            return 0
        if outcome.calls:
            worker = self.workers.key_of(phone)
            self.calls.notify(worker)
            await self._tell_waking(worker, phone)  # the worker is booting right now: say so at once
        return 0

    async def record(self, phone: str, dedupe_key: str, event: dict[str, Any], *, from_worker: bool = False) -> bool:
        """Record an event durably (it is acknowledged right after), then wake the phone's lane."""
        worker = self.workers.key_of(phone) if from_worker else None
        new = await self.db.run(partial(store.record_durably, worker=worker), phone, dedupe_key, event, self.clock())
        if new:
            self.inbox.notify(phone)
        return new

    async def _take_media(self, phone: str, inbox_id: int, data: dict[str, Any]) -> None:
        """Take the files an owner's message names from Twilio, before the message is handled:
        recorded with it, or the message refused, in one transaction. A crash before that takes
        them again (a half-taken file is never named, and is pruned)."""
        taken = Taken() if self.media is None else await self.media.take(data["media"])
        await self.db.run(_record_media, phone, inbox_id, data, taken, self.clock())
        if taken.refused or taken.left_out:
            self.outbox.notify(phone)

    # --- outbox ---------------------------------------------------------------------

    async def _send_step(self, phone: str) -> float | None:
        row = await self.db.run(store.next_outbound, phone)
        now = self.clock()
        # The owner's inbox lane runs while this one waits (on the database, on Twilio): what
        # it knew of their last message, so that a hold decided before they wrote is not made after.
        wrote, closed = await self.db.run(window.before_send, phone, now, self.settings.whatsapp_window_s)
        if row is not None and closed:
            # Due past WhatsApp's 24-hour window (or Twilio said it closed): kept in its place
            # until the owner writes (relay/window.py), and the template tells them.
            reason = "outside WhatsApp's 24-hour window: held until the owner writes"
            if await self.db.run(partial(self._hold, refused=False), row.id, phone, now, reason, wrote):
                logger.info("send %s to %s held: outside WhatsApp's 24-hour window", row.id, mask_phone(phone))
            return 0
        if self.settings.template_content_sid:
            due = await self.db.run(window.template_due, phone, now)
            if due is not None:
                wait = max(due, await self._pacing(phone, now))
                if wait > 0:
                    return wait
                await self._send_template(phone)
                return 0
        if row is None:
            return None
        wait = max(row.next_attempt_at - now, await self._pacing(phone, now))
        if wait > 0:
            return wait
        result = await self.sender.send(phone, row.body, row.media, row.buttons)
        await self._record_send(row, result, wrote)
        return 0

    async def _pacing(self, phone: str, now: float) -> float:
        """How long until the next send to `phone` keeps TWILIO_MIN_SEND_INTERVAL_MS."""
        if phone not in self._last_sent:
            last: float | None = await self.db.run(store.last_sent_at, phone)
            self._last_sent[phone] = last or 0.0
        return self._last_sent[phone] + self.settings.min_send_interval_s - now

    def _hold(
        self,
        conn: sqlite3.Connection,
        outbound_id: int,
        phone: str,
        now: float,
        reason: str,
        wrote: float | None,
        *,
        refused: bool,
    ) -> bool:
        """Hold the message, unless the owner wrote since the send was decided (`wrote`: their
        last message then): the window is open again, and it stays in the queue to go at once.
        Returns whether it was held."""
        configured = bool(self.settings.template_content_sid)
        with store.transaction(conn):
            if window.wrote_since(conn, phone, wrote):
                return False
            window.hold(conn, outbound_id, phone, now, reason, refused=refused, template_configured=configured)
            return True

    async def _send_template(self, phone: str) -> None:
        """The approved template, once until the owner writes: what waits, in plain words, as its
        variable. A failure is recorded for `status`, tried again only when it was a passing one."""
        counts = await self.db.run(window.held_counts, phone)
        summary = replies.held_summary(counts)
        result = await self.sender.send_template(phone, self.settings.template_content_sid, {"1": summary})
        now = self.clock()
        if result.ok:
            self._last_sent[phone] = now
            await self.db.run(_template_sent, phone, result.sid, now)
            logger.info("window template sent to %s (%s)", mask_phone(phone), summary)
            return
        again = await self.db.run(partial(window.template_failed, retryable=result.retryable), phone, result.error, now)
        logger.warning(
            "window template to %s failed: code %s, %s%s",
            mask_phone(phone),
            result.error_code,
            result.error,
            "; trying again" if again else "; not tried again until the owner writes",
        )

    async def message_status(self, sid: str, status: str, error_code: int | None) -> None:
        """Twilio's status callback said a message failed (recorded durably before Twilio gets
        its answer); a 63016 holds the message, and the template may be due."""
        configured = bool(self.settings.template_content_sid)
        phone = await self.db.run(_status_durably, sid, status, error_code, self.clock(), configured)
        if phone is not None:
            self.outbox.notify(phone)

    async def _record_send(self, row: store.Outbound, result: SendResult, wrote: float | None) -> None:
        """What became of a send; `wrote`: the owner's last message when it was decided."""
        now = self.clock()
        if result.ok:
            self._last_sent[row.phone] = now
            await self.db.run(_mark_sent, row.id, result.sid, now, bool(self.settings.template_content_sid))
        elif result.error_code == OUTSIDE_WINDOW:
            if await self.db.run(partial(self._hold, refused=True), row.id, row.phone, now, result.error, wrote):
                logger.info("send %s refused: outside WhatsApp's 24-hour window (63016); held", row.id)
            else:  # the owner wrote while Twilio answered: the window is open again, so it goes again
                logger.info("send %s refused (63016) before the owner wrote; sending it again", row.id)
        elif result.retryable and now - row.created_at < MAX_SEND_AGE_S:
            backoff = min(0.25 * 2**row.attempts, 30.0)
            logger.info("send %s failed (%s); retrying in %.2f s", row.id, result.error, backoff)
            await self.db.run(store.mark_retry, row.id, now + backoff, result.error)
        else:
            logger.warning("send %s refused for good: code %s, %s", row.id, result.error_code, result.error)
            await self.db.run(store.mark_failed, row.id, result.error_code, result.error, now)

    # --- worker calls ---------------------------------------------------------------

    async def _call_step(self, worker: str) -> float | None:
        pending, known_asleep = await self.db.run(_pending_calls, worker)
        if not pending:
            return None
        call = pending[0]
        try:
            command = decode_command(call.route, call.payload)
        except ProtocolError as exc:  # a row no version of this relay could send: say so, go on
            await self._call_done(
                call, Unreachable(call.route, call.payload.get("message_id", ""), str(exc), refused=True)
            )
            return 0
        message_id = message_id_of(command)
        if known_asleep and call.mode != "wake":
            # The worker said goodnight, so it holds no run for anyone: no need to wake it.
            await self._call_done(call, Unreachable(call.route, message_id, "asleep", asleep=True))
            return 0
        client = await self._client(worker, call, message_id)
        if client is None:
            return 0
        up = self._up.get(worker)
        if up is not None and up.is_set():
            self._up[worker] = anyio.Event()  # from here on, only an announcement made after this call counts
        result = None if known_asleep else await client.call(command)
        if result is not None and result.unauthorized and worker not in self._retokened:
            self._retokened.add(worker)  # once per run of the relay: a token that still fails is reported
            if await self.workers.retoken(worker):
                return 0  # the same call again, to the Machine restarted with the token of now
        if result is not None and result.delivered:
            self._failed_while_up[worker] = 0
            await self._call_done(call, Delivered(call.route, message_id, result.answer))
        elif result is not None and (
            not result.asleep or self._failed_while_up.get(worker, 0) >= MAX_FAILS_WHILE_UP or call.mode == "probe"
        ):
            # Refused outright, a probe that found no one, or a worker that answers /health yet
            # keeps failing this call.
            self._failed_while_up[worker] = 0
            await self._call_done(
                call,
                Unreachable(call.route, message_id, result.reason, refused=not result.asleep, answer=result.answer),
            )
        elif not await self._wake(worker, client, pending, known_asleep=known_asleep):
            return None
        return 0

    async def _client(self, worker: str, call: store.WorkerCall, message_id: str) -> WorkerClient | None:
        """How to reach the worker; an owner's own Machine is made on the first call that needs
        a worker (relay/fleet.py). None: the call was answered here (no Machine, none needed)."""
        client = await self.workers.known(worker)
        if client is not None:
            return client
        if call.mode != "wake":  # a status probe, or a cancel: without a Machine nothing runs
            await self._call_done(call, Unreachable(call.route, message_id, "asleep", asleep=True))
            return None
        try:
            return await self.workers.make(worker, partial(self._tell, call.phone, replies.SETTING_UP))
        except FleetError as exc:
            for failed in await self.db.run(store.pending_worker_calls, worker):
                await self._call_done(failed, Unreachable(failed.route, failed.payload.get("message_id", ""), str(exc)))
            return None

    async def _tell(self, phone: str, text: str) -> None:
        await self.db.run(store.enqueue_send, phone, text, [], self.clock())
        self.outbox.notify(phone)

    async def _tell_waking(self, worker: str, phone: str) -> None:
        """ "⏳ Waking up your VM..." once per owner and wake-up, also to owners who write meanwhile."""
        waking = self._waking.get(worker)
        if waking is None or phone in waking:
            return
        waking.add(phone)
        await self._tell(phone, replies.WAKING)

    async def _call_done(self, call: store.WorkerCall, event: Delivered | Unreachable) -> None:
        status = "delivered" if isinstance(event, Delivered) else "failed"
        worker = self.workers.key_of(call.phone)
        if await self.db.run(_finish_call, call, worker, status, event, self.clock()):
            self.inbox.notify(call.phone)

    async def _wake(
        self, worker: str, client: WorkerClient, pending: list[store.WorkerCall], *, known_asleep: bool
    ) -> bool:
        """Tell each waiting owner once, poll until the worker answers; False if it never does."""
        if not known_asleep and await client.healthy():
            self._failed_while_up[worker] = self._failed_while_up.get(worker, 0) + 1  # awake after all: a passing fault
            await self.db.run(store.worker_seen, worker, self.clock())
            return True
        self._waking[worker] = set()
        up = self._up.setdefault(worker, anyio.Event())
        try:
            for phone in dict.fromkeys(call.phone for call in pending if call.mode != "probe"):
                await self._tell_waking(worker, phone)
            logger.info("worker unreachable; waiting up to %.0f s for it to wake", self.settings.wake_timeout_s)
            woke = await client.wait_until_up(self.settings.wake_timeout_s, up, just_polled=not known_asleep)
        finally:
            del self._waking[worker]
        if woke:
            await self.db.run(store.worker_seen, worker, self.clock())
            return True
        reason = f"no answer within {self.settings.wake_timeout_s:.0f} s"
        if await self.workers.gone(worker):
            reason = "your VM was removed; the next prompt sets up another"
        for call in await self.db.run(store.pending_worker_calls, worker):
            await self._call_done(call, Unreachable(call.route, call.payload.get("message_id", ""), reason))
        return False

    async def worker_up(self, boot: str = "", owner: str = "") -> None:
        """A worker announced itself (`owner`: the one it serves): stop waiting and deliver what
        waits for it."""
        worker = self.workers.key_of(owner)
        await self.db.run(store.worker_announced, worker, boot, self.clock())
        self._up.setdefault(worker, anyio.Event()).set()
        self.calls.notify(worker)

    async def credentials_found(self, found: Credentials) -> int:
        """The worker's finding about a credential it depends on (relay/credentials.py): kept for
        `status`, and told to the owners when it is news; returns how many were told."""
        told = await self.db.run(credentials.record, found, self.clock())
        for phone in told:
            self.outbox.notify(phone)
        return len(told)

    async def worker_sleeping(self, awake_s: float | None = None, boot: str = "", owner: str = "") -> None:
        """The worker is about to stop or suspend: `status` says so, nothing wakes it for calls
        that need it only if it is awake, and its hours awake are counted (relay/usage.py)."""
        await self.db.run(store.worker_slept, self.workers.key_of(owner), self.clock(), awake_s, boot)

    # --- timers ---------------------------------------------------------------------

    async def _timers(self) -> None:
        """Schedules that came due, approval windows that closed, and runs silent long enough to
        ask the worker about."""
        while True:
            now = self.clock()
            for phone in await self.db.run(fire_schedules, now):
                self.inbox.notify(phone)
                self.outbox.notify(phone)  # a schedule that could not fire says so
            due = [
                (phone, f"expire:{phone}:{deadline!r}", {"type": "approval_expired", "deadline": deadline})
                for phone, deadline in await self.db.run(store.expired_approvals, now)
            ]
            due += [
                (phone, f"stall:{phone}:{check_at!r}", {"type": "stalled", "check_at": check_at})
                for phone, check_at in await self.db.run(store.stalled_runs, now)
            ]
            for phone, key, event in due:
                if await self.db.run(store.insert_inbox, phone, key, event, now):
                    self.inbox.notify(phone)
            await anyio.sleep(0.5)


def _record_media(
    conn: sqlite3.Connection, phone: str, inbox_id: int, data: dict[str, Any], taken: Taken, now: float
) -> None:
    """What became of a message's media: the files recorded with it, what was left out told, and
    a message with nothing left to run (refused, or no text and no file) handled here."""
    with store.transaction(conn):
        store.update_inbox_event(conn, inbox_id, {**data, **taken.record()})
        goes_ahead = not taken.refused and bool(taken.attachments or str(data.get("text", "")).strip())
        if taken.refused:
            store.enqueue_send(conn, phone, taken.refused, [], now)
        elif taken.left_out:
            left_out = [(x.number, x.content_type, x.reason) for x in taken.left_out]
            store.enqueue_send(conn, phone, replies.media_left_out(left_out, goes_ahead=goes_ahead), [], now)
        if not goes_ahead:
            store.mark_handled(conn, inbox_id, now)
        logger.info(
            "%s: media taken, %d kept, %d left out", mask_phone(phone), len(taken.attachments), len(taken.left_out)
        )


def _template_sent(conn: sqlite3.Connection, phone: str, sid: str, now: float) -> None:
    with store.transaction(conn):
        window.template_sent(conn, phone, sid, now)


def _mark_sent(conn: sqlite3.Connection, outbound_id: int, sid: str, now: float, template_configured: bool) -> None:
    """Sent, and a failure Twilio's status callback reported for it before the REST answer came
    back applied now (relay/window.py)."""
    with store.transaction(conn):
        store.mark_sent(conn, outbound_id, sid, now)
        window.known_status(conn, sid, now, template_configured=template_configured)


def _status_durably(
    conn: sqlite3.Connection, sid: str, status: str, error_code: int | None, now: float, template_configured: bool
) -> str | None:
    """A status callback's failure, synced to disk before Twilio is answered (as webhooks are)."""
    conn.execute("PRAGMA synchronous=FULL")
    try:
        with store.transaction(conn):
            return window.status_reported(conn, sid, status, error_code, now, template_configured=template_configured)
    finally:
        conn.execute("PRAGMA synchronous=NORMAL")


def _pending_calls(conn: sqlite3.Connection, worker: str) -> tuple[list[store.WorkerCall], bool]:
    """The calls waiting for the worker, and whether it told us it went to sleep."""
    row = store.worker_state(conn, worker)
    return store.pending_worker_calls(conn, worker), row is not None and row["awake"] == 0


def _workers_with_calls(conn: sqlite3.Connection, workers: Workers) -> set[str]:
    return {workers.key_of(call.phone) for call in store.pending_worker_calls(conn)}


def _finish_call(
    conn: sqlite3.Connection,
    call: store.WorkerCall,
    worker: str,
    status: str,
    event: Delivered | Unreachable,
    now: float,
) -> bool:
    """Close the call and record what happened, together; False if it was withdrawn meanwhile."""
    with store.transaction(conn):
        was_pending = store.finish_worker_call(conn, call.id, status, getattr(event, "reason", ""))
        # A withdrawn command that reached the worker anyway is still reported: the
        # conversation then stops that run.
        if not was_pending and status != "delivered":
            return False
        data: dict[str, Any] = {"type": event.kind, "route": event.route, "message_id": event.message_id}
        if event.answer is not None:
            data["answer"] = encode_answer(event.answer)
        if isinstance(event, Unreachable):
            data["reason"], data["refused"], data["asleep"] = event.reason, event.refused, event.asleep
        else:
            store.worker_seen(conn, worker, now)
        store.insert_inbox(conn, call.phone, f"call:{call.id}:{status}", data, now)
    return True
