"""Everything the owner reads, in one place: short, plain, made for a phone screen."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from common.protocol import Credentials, Report
from common.visible import clip_path, visible
from relay.schedules import Schedule, clock, describe_days, when
from relay.settings import Repo
from relay.twilio import WHATSAPP_LIMIT
from relay.usage import Budget, Period
from relay.window import Released
from relay.zones import UTC, known

HELP = (
    "🤖 *textslash* drives Claude Code on your VM.\n"
    "• Any message: a prompt for the agent (a photo or a file may come with it)\n"
    "• *approve* / *reject*: decide on the changes it made (or tap the buttons)\n"
    "• *cancel*: stop the current run\n"
    "• *status*: what runs, what waits, is the VM awake\n"
    "• *new*: start a fresh agent session\n"
    "• *screenshot <url>*: a picture of a page\n"
    "• *retry*: resend a prompt the VM never received\n"
    "• *repos* / *use <name>*: your repositories, and switching between them\n"
    "• *model* / *model <name>*: the model (opus, sonnet, haiku or a model id)\n"
    "• *usage*: what today and this month cost\n"
    "• *budget <amount>*: this month's ceiling, in dollars\n"
    "• *every day 09:00 <prompt>* (or *every weekday*, *every monday*...), *at 14:30 <prompt>*, "
    "*in 10m <prompt>*: run it later; *schedules* lists them, *unschedule <n>* removes one\n"
    "• *tz* / *tz <zone>*: your time zone, e.g. tz Europe/Paris"
)
# The one-line quick reply that carries a longer message's buttons, just after it.
BUTTONS_PROMPT = {
    "decide": "👆 Decide on the changes above: *approve* opens a pull request, *reject* rolls them back.",
    "cancel": "👆 *cancel* stops the run.",
}
WAKING = "⏳ Waking up your VM..."
SETTING_UP = "🛠️ Setting up your own VM; the first time takes about a minute..."
WORKING = "🤖 Working on it..."
EMPTY = "🤔 That message had no text. Send a prompt, or *help*."
NOTHING_WAITING = "Nothing is waiting for approval."
NOTHING_RUNNING = "Nothing is running."
NOTHING_RUNNING_DECIDE = "Nothing is running. Changes are waiting: *approve* or *reject*."
STILL_WORKING = "⏳ Still working. Nothing to decide yet; *cancel* stops the run."
DECIDE_FIRST = "Changes are waiting: *approve* or *reject* them first."
ALREADY_APPLYING = "⏳ Already applying your decision; one moment."
ALREADY_CANCELLING = "🛑 Already cancelling."
NOTHING_TO_RETRY = "Nothing to retry."
RETRYING = "🔁 Sending your prompt again."
NEW_SESSION = "🆕 Your next prompt starts a fresh agent session."
DECIDE_AGAIN = " Your changes are still waiting: *approve* or *reject* again."
KEPT = " Your prompt is kept: send *retry* to resend it."
QUEUED_BEHIND = " Your prompt is queued and starts after that."
APPLYING = {
    "approve": "🚀 Approved: pushing a branch and opening a pull request...",
    "reject": "↩️ Rejected: rolling the changes back...",
}


def queued(position: int, state: str) -> str:
    why = "once you approve or reject the changes" if state == "awaiting_approval" else "when the current run ends"
    return f"📥 Queued (#{position}); it starts {why}."


def starting_queued(text: str, remaining: int) -> str:
    more = f" ({remaining} more queued)" if remaining else ""
    return f"▶️ Starting the next prompt{more}: “{_clip(text, 80)}”"


def cancelling(dropped: int) -> str:
    return "🛑 Cancelling the current run..." + _dropped(dropped)


def cancelled_before_start(dropped: int) -> str:
    return "🛑 Cancelled before it reached the VM." + _dropped(dropped)


def sending_kept_first(queued_count: int) -> str:
    return f"🔁 Sending your kept prompt first; this one is queued (#{queued_count}) and starts when the kept one ends."


def dropped_waiting(count: int) -> str:
    return f"🛑 Dropped {count} prompt{'s' if count != 1 else ''} that never reached the VM."


def queue_waits(count: int) -> str:
    if not count:
        return ""
    return f" {count} queued prompt{'s' if count != 1 else ''} wait{'s' if count == 1 else ''} behind it."


def run_gone(state: str) -> str:
    """The worker holds nothing of what the conversation believed (a restart, a lost report)."""
    if state == "working":
        return (
            "⚠️ The VM has no run going for you any more (it may have restarted). Send the prompt again if you need it."
        )
    return "⚠️ The VM no longer holds those changes; there is nothing to decide."


def adopted_run(prompt: str) -> str:
    return f"🤖 The VM is working on “{_clip(prompt, 80)}”; *cancel* stops it."


def adopted_changes(prompt: str, window_s: float | None) -> str:
    """`window_s` None: a scheduled run's changes, which wait with no deadline."""
    within = f"within {_duration(window_s)}" if window_s is not None else "they wait for you; the VM sleeps meanwhile"
    return (
        f"📝 Changes from “{_clip(prompt, 80)}” wait on the VM: reply *approve* to open a pull request "
        f"or *reject* to roll back ({within})."
    )


def _dropped(count: int) -> str:
    return f" Dropped {count} queued prompt{'s' if count != 1 else ''}." if count else ""


def finished(event: Report, *, shown: bool) -> str:
    """The run's end. `shown`: the approval request for its changes came first."""
    if event.stop == "budget":
        head = "💸 The run stopped at its budget (RUN_BUDGET_USD)" + _cost(event) + "."
    elif event.type == "cancelled":
        head = "🛑 Run cancelled."
    elif event.type == "error":
        head = f"❌ The run failed: {event.text or 'no reason given'}"
    else:
        head = "✅ Done" + _cost(event)
    body = event.text if event.type == "answer" and event.text else ""
    tail = ""
    if event.changes:
        tail = "\n\n👆 Its changes are above: *approve* or *reject*." if shown else "\n\nThe run left changes."
    return f"{head}\n\n{body}".strip() + tail


def _cost(event: Report) -> str:
    parts = []
    if event.duration_ms is not None:
        parts.append(f"{event.duration_ms / 1000:.1f} s")
    if event.cost_usd is not None:
        parts.append(f"${event.cost_usd:.4f}")
    return f" ({', '.join(parts)})" if parts else ""


LISTED_FILES = 30  # a phone message names this many; the count says how many in all
MESSAGE_LIMIT = WHATSAPP_LIMIT  # per message (relay/twilio.py splits anything longer)


def approval_request(event: Report, window_s: float | None, *, repo: str = "") -> str:
    """One WhatsApp message, however big the change: the files first (at most LISTED_FILES that
    fit, names cut to their ends, and how many more), then as much of the diff excerpt as still
    fits (the picture has more)."""
    limit = MESSAGE_LIMIT
    count = max(event.files_count, len(event.files))
    # No window: a scheduled run's changes wait for the owner, with the VM asleep meanwhile.
    within = f"within {_duration(window_s)}" if window_s is not None else "they wait for you; the VM sleeps meanwhile"
    tail = f"\n\nReply *approve* to open a pull request or *reject* to roll back ({within})."
    if event.uncovered:
        names = ", ".join(clip_path(visible(p), 40) for p in event.uncovered[:5])
        more = f" and {len(event.uncovered) - 5} more" if len(event.uncovered) > 5 else ""
        tail += (
            f"\n⚠️ Reject cannot bring back {names}{more}"
            " (ignored by git, and too big to keep or a repository of its own)."
        )
    lines: list[str] = []
    budget = limit - len(tail) - 200  # room for the heading and "… and N more"
    for path, added, removed, binary in event.files[:LISTED_FILES]:
        name = clip_path(visible(path))
        line = f"• {name} (binary or over 1 MB, not shown)" if binary else f"• {name} +{added} −{removed}"
        if sum(len(x) + 1 for x in lines) + len(line) > budget:
            break
        lines.append(line)
    if count > len(lines):
        lines.append(f"• … and {count - len(lines)} more")
    where = f" in *{repo}*" if repo else ""
    head = f"📝 {count} file{'s' if count != 1 else ''} changed{where}:\n" + "\n".join(lines)
    room = limit - len(head) - len(tail) - len("\n```\n\n```")
    excerpt = _cut_at_line(event.diff.strip(), room)
    diff = f"\n```\n{excerpt}\n```" if excerpt else ""
    return head + diff + tail


def _cut_at_line(text: str, limit: int) -> str:
    """`text` if it fits, else its whole lines that fit and "…"; never half a line."""
    if len(text) <= limit:
        return text
    cut = text[: max(limit - 2, 0)]
    return f"{cut.rsplit(chr(10), 1)[0]}\n…" if "\n" in cut else ""


def applied(event: Report) -> str:
    if event.type == "pr_opened":
        done = (
            f"✅ Pull request opened: {event.url}"
            if event.url
            else f"✅ Pushed branch {event.text or '(unnamed)'}. No pull request: they are opened only for "
            "repositories on GitHub, and only when the VM has a GITHUB_TOKEN."
        )
        return done + left_out(event)
    done = "↩️ Rolled back: the checkout is as it was before the run."
    count = max(event.left_out_count, len(event.left_out))
    if not count:
        return done
    more = f" and {count - len(event.left_out)} more" if count > len(event.left_out) else ""
    names = ", ".join(clip_path(visible(p)) for p in event.left_out)
    return (
        f"↩️ Rolled back, except {names}{more}: the run left {'it' if count == 1 else 'them'} "
        "and it could not be removed, even with its permissions fixed."
    )


def left_out(event: Report) -> str:
    """Files that changed after the owner saw the diff: committed as shown, these stayed behind."""
    count = max(event.left_out_count, len(event.left_out))
    if not count:
        return ""
    more = f" and {count - len(event.left_out)} more" if count > len(event.left_out) else ""
    names = ", ".join(clip_path(visible(p)) for p in event.left_out)
    return (
        f"\n⚠️ Left out: {names}{more} changed after you saw the diff; "
        "committed is exactly what you were shown. They stay in the checkout, uncommitted."
    )


def decision_failed(kind: str, reason: str) -> str:
    what = "open the pull request" if kind == "approve_failed" else "roll the changes back"
    return f"❌ Could not {what}: {reason or 'no reason given'}\nThe changes are kept: *approve* or *reject* again."


def refused(reason: str) -> str:
    return f"⚠️ The VM said no: {reason or 'no reason given'}."


def never_woke(reason: str, *, kept: bool = True) -> str:
    why = f" ({reason})" if reason else ""
    if kept:
        return f"😴 Your VM did not wake up{why}."
    return f"😴 Your VM could not be reached{why}."


def approval_expired(window_s: float) -> str:
    return f"⌛ No answer within {_duration(window_s)}: the changes are being rolled back."


@dataclass(frozen=True)
class WorkerInfo:
    awake: bool | None  # None: never heard from it
    last_seen_at: float | None
    slept_at: float | None
    machine: str = ""  # the owner's own Machine (WORKER_MODE=per-owner), "": none made yet
    per_owner: bool = False


@dataclass(frozen=True)
class FailedSend:
    error_code: int | None
    error: str
    at: float


def status(
    conv_state: str,
    job_text: str | None,
    job_started: float | None,
    queue: list[str],
    deadline: float | None,
    kept: str | None,
    worker: WorkerInfo,
    failures: list[FailedSend],
    now: float,
    *,
    repo: str = "",
    model: str = "",
    tz: ZoneInfo = UTC,
) -> str:
    lines = [_state_line(conv_state, job_text, job_started, deadline, now)]
    if repo:
        lines.append(f"📁 Repository: *{repo}*")
    lines.append(f"🧠 Model: {model or 'Claude Code’s default'}")
    if queue:
        lines.append(f"📥 Queued: {len(queue)} (next: “{_clip(queue[0], 60)}”)")
    if kept:
        lines.append(f"🔁 Kept for *retry*: “{_clip(kept, 60)}”")
    lines.append(_worker_line(worker, now, tz))
    for failure in failures:
        code = f"error {failure.error_code}" if failure.error_code else "error"
        lines.append(f"⚠️ A message could not be delivered {_ago(failure.at, now)} ago: {code} {failure.error}".rstrip())
    return "\n".join(lines)


def _state_line(state: str, job_text: str | None, started: float | None, deadline: float | None, now: float) -> str:
    if state == "working" and job_text is not None:
        since = f" for {_ago(started, now)}" if started else ""
        return f"🤖 Working{since} on: “{_clip(job_text, 80)}”"
    if state == "awaiting_approval":
        left = f" ({_duration(max(0.0, deadline - now))} left)" if deadline else ""
        return f"📝 Changes wait for *approve* or *reject*{left}."
    if state == "applying":
        return "⏳ Applying your decision."
    return "💤 Idle: nothing running."


def _worker_line(worker: WorkerInfo, now: float, tz: ZoneInfo) -> str:
    if worker.per_owner and not worker.machine:
        return "🖥️ VM: none yet; your first prompt sets up your own (about a minute)."
    vm = f"🖥️ Your VM ({worker.machine})" if worker.machine else "🖥️ VM"
    if worker.awake is None:
        return f"{vm}: not heard from yet."
    if worker.awake:
        seen = f" (last heard {_ago(worker.last_seen_at, now)} ago)" if worker.last_seen_at else ""
        return f"{vm}: awake{seen}."
    since = f" since {when(worker.slept_at, now, tz)}" if worker.slept_at else ""
    return f"{vm}: asleep{since}; your next prompt wakes it."


def _ago(then: float | None, now: float) -> str:
    return _duration(max(0.0, now - (then or now)))


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- repositories ------------------------------------------------------------------------

ONE_REPO = "📁 There is one repository (the VM's REPO_URL). Set REPOS on the relay to work on several."


def repos(configured: Sequence[Repo], current: str) -> str:
    if not configured:
        return ONE_REPO
    lines = [f"{'👉' if r.name == current else '▫️'} *{r.name}*  {_clip(r.url, 60)}" for r in configured]
    return "📁 Your repositories (*use <name>* switches):\n" + "\n".join(lines)


def switched(repo: Repo) -> str:
    return f"📁 Now on *{repo.name}*: your prompts work there, in its own checkout and session."


def already_on(repo: Repo) -> str:
    return f"📁 Already on *{repo.name}*."


def unknown_repo(name: str, configured: Sequence[Repo]) -> str:
    names = ", ".join(f"*{r.name}*" for r in configured)
    return f"🤔 No repository called “{_clip(name, 40)}”. Yours: {names}. (To send it as a prompt, add a word.)"


def cannot_switch(state: str, current: str, wanted: str) -> str:
    where = f" in *{current}*" if current else ""
    why = {
        "working": f"a run is going{where}: wait for it or *cancel* it",
        "awaiting_approval": f"changes{where} wait for you: *approve* or *reject* them",
        "applying": f"your decision{where} is being applied: wait a moment",
    }.get(state, "something is under way")
    return f"⚠️ Not switching to *{_clip(wanted, 40)}* yet: {why}, then send *use {_clip(wanted, 40)}* again."


# --- the model ---------------------------------------------------------------------------

MODEL_ALIASES = ("opus", "sonnet", "haiku")


def model(current: str, default: str) -> str:
    shown = current or default or "Claude Code’s default"
    return (
        f"🧠 Model: *{shown}*.\nChoices: *opus*, *sonnet*, *haiku*, or a full model id "
        "(*model <name>*; *model default* goes back to the default)."
    )


def model_set(current: str, default: str) -> str:
    if not current:
        return f"🧠 Back to the default model ({default or 'Claude Code’s own'}) from your next prompt."
    return f"🧠 Your next prompts use *{current}*."


def bad_model(name: str) -> str:
    return f"🤔 “{_clip(name, 40)}” is not a model name: send *opus*, *sonnet*, *haiku* or a model id."


# --- usage and the budget ------------------------------------------------------------------


def usage(today: Period, month: Period, budget: Budget | None, owners: int, tz: ZoneInfo = UTC) -> str:
    shared = " (one VM for all owners)" if owners > 1 else ""
    lines = [
        f"📊 Usage ({tz})",
        "*Today:* " + _period(today),
        "*This month:* " + _period(month),
    ]
    if shared:
        lines.append(f"VM hours are the machine's{shared}.")
    if budget is not None:
        spent, limit = _usd(budget.spent_usd), _usd(budget.limit_usd)
        lines.append(f"💰 Budget: {spent} of {limit} this month ({budget.share:.0%}).")
    return "\n".join(lines)


def _period(p: Period) -> str:
    runs = f"{p.runs} run{'s' if p.runs != 1 else ''}"
    tokens = f"{_tokens(p.input_tokens)} tokens in, {_tokens(p.output_tokens)} out"
    return (
        f"{runs}, {tokens}, {_usd(p.model_usd)} model; VM awake {p.awake_hours:.1f} h ≈ {_usd(p.vm_usd)}; "
        f"total {_usd(p.total_usd)}"
    )


def _tokens(n: int) -> str:
    return f"{n / 1_000_000:.1f}M" if n >= 1_000_000 else f"{n / 1000:.1f}k" if n >= 1000 else str(n)


def budget_reached(budget: Budget) -> str:
    return (
        f"🛑 This month's budget is spent: {_usd(budget.spent_usd)} of {_usd(budget.limit_usd)}. "
        "New prompts wait for a higher budget: send *budget <amount>* (in dollars, for this month) "
        "to raise it. *usage* shows where it went."
    )


def budget_warning(level: int, budget: Budget) -> str:
    if level >= 100:
        return (
            f"🛑 Budget reached: {_usd(budget.spent_usd)} of {_usd(budget.limit_usd)} this month. "
            "New prompts are refused until you raise it with *budget <amount>*."
        )
    return (
        f"⚠️ {budget.share:.0%} of this month's budget is spent ({_usd(budget.spent_usd)} of "
        f"{_usd(budget.limit_usd)}). *budget <amount>* raises it."
    )


def bad_budget(amount: str) -> str:
    return (
        f"🤔 “{_clip(amount, 20)}” is not a budget: send *budget <amount>* in dollars, more than $0 and "
        "at most $9,999,999.99, like *budget 20* or *budget 7.50*."
    )


def stale_button(word: str, state: str) -> str:
    """A button tapped on an earlier message: it did nothing."""
    if word == "cancel":
        now = "send *cancel* to stop the current run" if state == "working" else "nothing runs now"
        return f"⚠️ That Cancel is on an earlier run's message, so nothing was stopped: {now}."
    if state == "awaiting_approval":
        now = "the changes waiting now are in the latest message: tap its buttons, or send *approve* or *reject*"
    else:
        now = "those changes are no longer waiting (*status* says what is)"
    return f"⚠️ That button is on an earlier message, so it did nothing: {now}."


def budget_set(amount_usd: float, waiting: str | None = None) -> str:
    """`waiting`: a prompt kept for `retry` (held for the budget, or never received by the VM)."""
    retry = f"\n🔁 Send *retry* to start “{_clip(waiting, 60)}”." if waiting else ""
    return f"💰 This month's budget is now {_usd(amount_usd)}.{retry}"


def held_for_budget(text: str, more: int) -> str:
    queued = f" ({more} more queued behind it)" if more else ""
    return (
        f"⏸️ This month's budget is spent, so “{_clip(text, 60)}” waits for a higher budget{queued}: "
        "raise it with *budget <amount>*, then send *retry*."
    )


def _usd(amount: float) -> str:
    """Dollars as a person reads them; a run on a cheap model costs fractions of a cent."""
    if 0 < amount < 0.01:
        return "$" + f"{amount:.5f}".rstrip("0") if amount >= 0.00001 else "<$0.00001"
    return f"${amount:.2f}"


# --- photos and files (relay/media.py) ---------------------------------------------------

VOICE_NOT_UNDERSTOOD = (
    "🎙️ Voice notes and other audio are not understood yet, so nothing was sent to the agent. Please type your prompt."
)
VIDEO_NOT_UNDERSTOOD = (
    "🎬 Videos are not understood yet, so nothing was sent to the agent. "
    "Send a screenshot instead, or describe it in words."
)
NOT_FROM_TWILIO = "not a Twilio media link, so it was not fetched"
NOT_STORED = "the relay could not store it"


def too_many_attachments(count: int, limit: int) -> str:
    return (
        f"📎 That message had {count} attachments; one prompt takes at most {limit}. "
        "Nothing was sent to the agent: send them in smaller groups."
    )


def not_fetched(why: str) -> str:
    return f"could not be fetched ({why})"


def over_limit(limit_bytes: int) -> str:
    return f"over {limit_bytes // (1024 * 1024)} MB"


def media_left_out(items: list[tuple[int, str, str]], *, goes_ahead: bool) -> str:
    """Attachments that could not be passed on, each named by its place in the message and
    its type, with the reason; and whether the message runs without them."""
    names = "\n".join(f"• attachment {number} ({kind or 'unknown type'}): {why}" for number, kind, why in items)
    tail = "Your message goes ahead without them." if goes_ahead else "Nothing was left to send to the agent."
    return f"⚠️ Not passed on:\n{names}\n{tail}"


def look_at(images: int, files: int) -> str:
    """The prompt of a message that has attachments and no caption."""
    what = [f"image{'s' if images > 1 else ''}" if images else "", f"file{'s' if files > 1 else ''}" if files else ""]
    return f"Look at the attached {' and '.join(w for w in what if w)}."


# --- schedules ---------------------------------------------------------------------------


def scheduled(schedule: Schedule, now: float) -> str:
    """The answer to a schedule command: when it runs, and how to take it back."""
    tz = known(schedule.tz)
    how = describe_days(schedule.days)
    first = "First run" if schedule.repeats else "Runs"
    if not schedule.clock:  # in <N>: how long, then the time
        first += f" in {_duration(schedule.next_at - now)},"
    return (
        f"⏰ Scheduled *{schedule.number}*, {how}: “{_clip(schedule.prompt, 80)}”.\n"
        f"{first} {when(schedule.next_at, now, tz)} ({schedule.tz}). *unschedule {schedule.number}* removes it."
    )


def schedule_list(items: Sequence[Schedule], tz: ZoneInfo, now: float) -> str:
    """One line per schedule, its number first, then its time as HH:MM."""
    if not items:
        return "⏰ No schedules. Try *every weekday 09:00 run the tests*, *at 14:30 …* or *in 10m …*."
    lines = [f"⏰ Your schedules ({tz}):"]
    for s in items:
        repeat = describe_days(s.days)
        lines.append(
            f"{s.number}. {clock(s.next_at, tz)} {repeat}: “{_clip(s.prompt, 60)}”, next {when(s.next_at, now, tz)}"
        )
    lines.append("*unschedule <n>* removes one.")
    return "\n".join(lines)


def schedules_line(items: Sequence[Schedule], tz: ZoneInfo, now: float) -> str:
    """`status`'s line about the owner's schedules: how many, and the next one due."""
    soonest = min(items, key=lambda s: s.next_at)
    count = f"{len(items)} schedule{'s' if len(items) != 1 else ''}"
    return f"⏰ {count}; next {when(soonest.next_at, now, tz)}: “{_clip(soonest.prompt, 40)}”"


def unscheduled(gone: Sequence[Schedule]) -> str:
    if len(gone) == 1:
        return f"🗑️ Removed schedule {gone[0].number}: “{_clip(gone[0].prompt, 80)}”."
    return f"🗑️ Removed {len(gone)} schedules." if gone else "⏰ No schedules to remove."


def no_such_schedule(number: int) -> str:
    return f"⏰ There is no schedule {number}. *schedules* lists them."


def bad_unschedule(needs: str) -> str:
    return f"🤔 *unschedule <n>* needs {needs}: *unschedule 2*, *unschedule all*."


def too_many_schedules(limit: int) -> str:
    return f"⏰ You have {limit} schedules, the most there can be. *unschedule <n>* removes one."


def bad_schedule(needs: str) -> str:
    return (
        f"🤔 A schedule needs {needs}: *every day 09:00 <prompt>*, *every weekday 9am <prompt>*, "
        "*every monday 18:30 <prompt>*, *at 14:30 <prompt>* or *in 10m <prompt>* (s, m, h, d)."
    )


def fired(prompt: str) -> str:
    return f"⏰ {_clip(prompt, 200)}"


def fired_late(number: int, prompt: str, due: float, tz: ZoneInfo, now: float) -> str:
    return (
        f"⏰ Skipped schedule {number}, “{_clip(prompt, 80)}”: it was due {when(due, now, tz)}, more than an hour "
        "ago (the relay was not running then). Send the prompt to run it now."
    )


def schedule_broken(number: int, prompt: str) -> str:
    return f"⚠️ Schedule {number}, “{_clip(prompt, 80)}”, could not be read and was removed. Schedule it again."


def fired_over_budget(prompt: str, budget: Budget) -> str:
    return f"⏰ Skipped “{_clip(prompt, 80)}”: " + budget_reached(budget)


def fired_still_waiting(prompt: str) -> str:
    return f"⏰ Skipped “{_clip(prompt, 80)}”: its last run has not started yet (it waits in your queue)."


def zone_is(tz: ZoneInfo, now: float) -> str:
    return f"🕐 Your time zone: {tz} (it is {clock(now, tz)} there). *tz <zone>* changes it, e.g. *tz Europe/Paris*."


def zone_set(tz: ZoneInfo, now: float) -> str:
    return f"🕐 Your time zone is now {tz} (it is {clock(now, tz)} there). Repeating schedules keep their times in it."


def bad_zone(name: str) -> str:
    return f"🤔 “{_clip(name, 40)}” is not a time zone I know. Use a name like Europe/Paris, America/New_York or UTC."


# --- credentials (relay/credentials.py) --------------------------------------------------

SERVICE_NAMES = {"claude": "Claude", "github": "GitHub"}
GITHUB_SCOPES = "Contents and Pull requests: read and write (a classic token: repo)"


def credentials_warning(found: Credentials, now: float) -> str:
    """What every owner is told once when a credential the worker depends on is rejected or
    expires within a week: which service, what is wrong, and how to renew it."""
    service = SERVICE_NAMES[found.service]
    what = _credential_name(found)
    if found.state == "rejected":
        why = f" ({found.detail})" if found.detail else ""
        head = f"🔑 {service} refused the VM's {what}{why}: runs that need it fail until it is renewed."
    else:
        head = f"🔑 The VM's {what} for {service} {_expiry(found.expires_at, now)}."
    return f"{head}\nTo renew it: {how_to_renew(found)}"


def how_to_renew(found: Credentials) -> str:
    app = found.app or "<worker app>"
    if found.credential == "ANTHROPIC_API_KEY":
        return (
            "make a new key at console.anthropic.com/settings/keys, then run "
            f"`fly secrets set ANTHROPIC_API_KEY=<key> -a {app}`"
        )
    if found.service == "claude":  # an OAuth token (or Claude Code's own login)
        return (
            f"run `claude setup-token` on a computer, then `fly secrets set CLAUDE_CODE_OAUTH_TOKEN=<token> -a {app}`"
        )
    return (
        f"make a new token at github.com/settings/tokens with {GITHUB_SCOPES}, then run "
        f"`fly secrets set GITHUB_TOKEN=<token> -a {app}`"
    )


def credentials_line(found: Credentials, now: float) -> str:
    """One line of `status` per service the worker depends on."""
    service = SERVICE_NAMES[found.service]
    what = _credential_name(found)
    checked = f"checked {_ago(found.checked_at, now)} ago"
    if found.state == "rejected":
        why = f" ({found.detail})" if found.detail else ""
        return f"🔑 {service}: the {what} was refused{why}, {checked}. Renew it: {how_to_renew(found)}"
    if found.state == "expiring":
        return f"🔑 {service}: the {what} {_expiry(found.expires_at, now)}, {checked}."
    until = f", until {_date(found.expires_at)}" if found.expires_at is not None else ""
    return f"🔑 {service}: the {what} works{until}, {checked}."


CREDENTIALS_UNCHECKED = "🔑 Credentials: not checked yet (the VM checks them when it wakes)."


def _credential_name(found: Credentials) -> str:
    return {
        "ANTHROPIC_API_KEY": "API key (ANTHROPIC_API_KEY)",
        "CLAUDE_CODE_OAUTH_TOKEN": "token (CLAUDE_CODE_OAUTH_TOKEN)",
        "login": "Claude Code login",
        "GITHUB_TOKEN": "token (GITHUB_TOKEN)",
    }.get(found.credential, found.credential)


def _expiry(expires_at: float | None, now: float) -> str:
    if expires_at is None:
        return "is about to expire"
    days = math.ceil(max(0.0, expires_at - now) / 86400)
    when = "today" if days <= 0 else "tomorrow" if days == 1 else f"in {days} days"
    return f"expires on {_date(expires_at)}, {when}"


def _date(at: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(at or 0))


# --- WhatsApp's 24-hour window (relay/window.py) ---------------------------------------------

_HELD_WORDS = (
    ("result", "result", "results"),
    ("approval", "approval", "approvals"),
    ("message", "message", "messages"),
)


def held_summary(counts: Mapping[str, int]) -> str:
    """What waits, in plain words: the template's one variable ("2 results and 1 approval")."""
    parts = [f"{n} {one if n == 1 else many}" for kind, one, many in _HELD_WORDS if (n := counts.get(kind, 0))]
    if not parts:
        return "a message"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def held_released(released: Released | None, now: float, tz: ZoneInfo = UTC) -> str:
    """For `status`, when the message that asked released what WhatsApp's window had held: those
    went just before this answer; and whether the template told the owner about them (when, in
    the owner's zone, like status's other times)."""
    if released is None:
        return ""
    what = held_summary(released.counts)
    line = f"\n📬 {what} waited for you (WhatsApp's 24-hour window had closed): they are just above."
    if released.template == "sent" and released.template_at is not None:
        return line + f" A reminder went out {when(released.template_at, now, tz)} ({tz})."
    if released.template == "failed":
        return line + f" The reminder template could not be sent: {released.template_error or 'refused'}."
    if released.template == "unset":
        return line + " No reminder went: TWILIO_TEMPLATE_CONTENT_SID is not set on the relay."
    return line
