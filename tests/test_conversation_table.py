"""The owner's conversation table, walked without I/O."""

from __future__ import annotations

from typing import Any

import pytest

from common.protocol import Answer, OwnerCall, Report, RunPrompt
from relay import replies
from relay.conversation import ANY_STATE, STATES, TRANSITIONS, Context, Conversation, IllegalTransition, Job, apply
from relay.events import (
    AddSchedule,
    ApprovalExpired,
    CallWorker,
    Delivered,
    DropCommand,
    Fired,
    ListSchedules,
    Prompt,
    RemoveSchedule,
    ReportStatus,
    Rezone,
    Screenshot,
    Send,
    Stalled,
    Unreachable,
    Word,
    parse_owner_text,
)

CTX = Context(now=1000.0, approval_timeout_s=60.0)
EFFECTS = Send | CallWorker | DropCommand | ReportStatus | AddSchedule | ListSchedules | RemoveSchedule | Rezone
PHONE = "+15550001111"


def conv(state: str = "idle", **kw: Any) -> Conversation:
    c = Conversation(phone=PHONE, state=state, **kw)  # type: ignore[arg-type]
    if state == "working" and c.job is None:
        c.job = Job("m1", "first", started_at=990.0, delivered=True)
    if state != "idle" and not c.run:
        c.run = c.job.message_id if c.job else "m1"
    if state == "awaiting_approval":
        c.approval_deadline = 1060.0
    return c


def sends(effects: list[Any]) -> list[str]:
    return [e.text for e in effects if isinstance(e, Send)]


ALL_EVENTS: list[Any] = [
    Prompt("hi", "m9"),
    Screenshot("http://x", "m8"),
    *[Word(w) for w in ("approve", "reject", "cancel", "status", "help", "new", "retry")],
    *[
        Report(t, run)
        for t in (
            "progress",
            "answer",
            "cancelled",
            "error",
            "approval_required",
            "pr_opened",
            "approve_failed",
            "reject_failed",
            "rolled_back",
            "notice",
            "sleeping",
        )
        for run in ("m1", "other")
    ],
    Delivered("command", "m1"),
    Unreachable("command", "m1"),
    Unreachable("approve", refused=True),
    *[
        Delivered(route, answer=Answer(state, "m1" if state != "idle" else "", "p"))
        for route in ("cancel", "status")
        for state in ("idle", "running", "cancelling", "awaiting_approval", "pushing", "rolling_back")
    ],
    Unreachable("status", asleep=True),
    Unreachable("cancel", reason="timeout"),
    ApprovalExpired(1060.0),
    Stalled(1120.0),
    Fired(7, 1, "run the tests", "sched-7-1"),
    Fired(7, 1, "run the tests", "sched-7-1", late=True),
    *[parse_owner_text(t, "m7") for t in ("every day 09:00 x", "in 3s x", "unschedule 1", "tz UTC")],
    *[Word(w) for w in ("schedules", "tz")],
]


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("event", ALL_EVENTS, ids=lambda e: getattr(e, "type", None) or e.kind)
def test_every_pair_has_an_answer(state: str, event: Any) -> None:
    new, effects = apply(conv(state), event, CTX)
    assert new.state in STATES
    assert all(
        isinstance(
            e, Send | CallWorker | DropCommand | ReportStatus | AddSchedule | ListSchedules | RemoveSchedule | Rezone
        )
        for e in effects
    )


def test_a_missing_pair_raises_the_named_error() -> None:
    with pytest.raises(IllegalTransition, match="'nonsense' in state 'idle'"):
        apply(conv(), Word("nonsense"), CTX)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("  APPROVE ", Word("approve"), id="approve-any-case"),
        pytest.param("Cancel!", Word("cancel"), id="cancel-punctuated"),
        pytest.param("status", Word("status"), id="status"),
        pytest.param("screenshot example.com", Screenshot("http://example.com", "s"), id="screenshot-bare-host"),
        pytest.param("Screenshot https://a.b/c?d=1", Screenshot("https://a.b/c?d=1", "s"), id="screenshot-url"),
        pytest.param(
            "approve the plan and build it", Prompt("approve the plan and build it", "s"), id="prompt-with-word"
        ),
        pytest.param(" fix the bug ", Prompt("fix the bug", "s"), id="prompt-trimmed"),
    ],
)
def test_owner_words(text: str, expected: Any) -> None:
    assert parse_owner_text(text, "s") == expected


def test_prompt_when_idle_starts_work() -> None:
    new, effects = apply(conv(), Prompt("build", "m2"), CTX)
    assert new.state == "working" and new.job is not None and new.job.started_at == CTX.now
    assert effects == [CallWorker(RunPrompt(PHONE, "build", "m2"))]


def test_prompt_while_working_is_queued_with_its_place() -> None:
    new, effects = apply(conv("working"), Prompt("next", "m2"), CTX)
    assert [j.text for j in new.queue] == ["next"]
    assert sends(effects) == [replies.queued(1, "working")]


def test_answer_without_changes_starts_the_next_queued_prompt() -> None:
    c = conv("working", queue=[Job("m2", "next")])
    new, effects = apply(c, Report("answer", "m1", text="ok"), CTX)
    assert new.state == "working" and new.job is not None and new.job.message_id == "m2"
    assert CallWorker(RunPrompt(PHONE, "next", "m2")) in effects


def test_answer_with_changes_opens_the_approval_window() -> None:
    new, _ = apply(conv("working"), Report("answer", "m1", changes=True), CTX)
    assert new.state == "awaiting_approval" and new.approval_deadline == CTX.now + 60


def test_approve_asks_the_worker_and_waits() -> None:
    new, effects = apply(conv("awaiting_approval"), Word("approve"), CTX)
    assert new.state == "applying" and new.approval_deadline is None
    assert CallWorker(OwnerCall("approve", PHONE)) in effects


def test_failed_push_keeps_the_changes_waiting() -> None:
    new, effects = apply(conv("applying"), Report("approve_failed", "m1", text="push refused"), CTX)
    assert new.state == "awaiting_approval" and "push refused" in sends(effects)[0]


def test_cancel_of_an_undelivered_command_withdraws_it() -> None:
    c = conv("working", job=Job("m1", "x", delivered=False), queue=[Job("m2", "y")])
    new, effects = apply(c, Word("cancel"), CTX)
    assert new.state == "idle" and new.queue == []
    assert DropCommand("m1") in effects and not any(isinstance(e, CallWorker) for e in effects)


def test_withdrawn_command_that_arrived_anyway_is_cancelled() -> None:
    _, effects = apply(conv("idle"), Delivered("command", "m1"), CTX)
    assert effects == [CallWorker(OwnerCall("cancel", PHONE))]


def test_unreachable_keeps_the_prompt_for_retry() -> None:
    c = conv("working", job=Job("m1", "x", delivered=False))
    new, _ = apply(c, Unreachable("command", "m1", "timeout"), CTX)
    assert new.state == "idle" and new.kept is not None and new.kept.message_id == "m1"
    again, effects = apply(new, Word("retry"), CTX)
    assert again.state == "working" and effects[-1] == CallWorker(RunPrompt(PHONE, "x", "m1"))


def test_stale_approval_expiry_is_ignored() -> None:
    c = conv("awaiting_approval")
    new, effects = apply(c, ApprovalExpired(deadline=999.0), CTX)
    assert new.state == "awaiting_approval" and effects == []
    expired, effects = apply(c, ApprovalExpired(deadline=1060.0), CTX)
    assert expired.state == "applying" and CallWorker(OwnerCall("reject", PHONE)) in effects


def test_new_marks_the_next_command_only() -> None:
    new, _ = apply(conv(), Word("new"), CTX)
    started, effects = apply(new, Prompt("hi", "m3"), CTX)
    assert effects[0] == CallWorker(RunPrompt(PHONE, "hi", "m3", new_session=True))
    assert started.fresh_session is False


def test_conversation_survives_json() -> None:
    c = conv("working", queue=[Job("m2", "y")], kept=Job("m0", "z"), fresh_session=True)
    assert Conversation.from_json(c.to_json()) == c


def test_table_covers_the_same_events_in_every_state() -> None:
    keys = {state: set(TRANSITIONS[state]) for state in STATES}
    assert all(k == keys["idle"] for k in keys.values())


def test_a_refused_decision_trusts_the_worker() -> None:
    new, effects = apply(conv("applying", applying="approve"), Unreachable("approve", "", "nothing waits", True), CTX)
    assert new.state == "idle" and "nothing waits" in sends(effects)[0]


# --- reports name their run; the worker's answers are adopted ---------------------------


@pytest.mark.parametrize(
    "kind",
    ["progress", "answer", "error", "approval_required", "pr_opened", "rolled_back", "approve_failed", "reject_failed"],
)
@pytest.mark.parametrize("state", ["working", "awaiting_approval", "applying"])
def test_a_report_of_another_run_changes_nothing(kind: str, state: str) -> None:
    before = conv(state, run="m1", ended=["m0"])
    for run in ("m0", "other"):
        new, effects = apply(before, Report(kind, run, text="late", changes=True), CTX)
        assert (new.state, new.run, new.job, new.queue) == (before.state, before.run, before.job, before.queue)
        assert effects == []


def test_a_closed_runs_late_report_changes_nothing_when_idle() -> None:
    idle = conv("idle", ended=["m1"])
    for kind in ("answer", "approval_required", "pr_opened", "approve_failed"):
        new, effects = apply(idle, Report(kind, "m1", changes=True), CTX)
        assert new.state == "idle" and effects == []


def test_an_approval_from_a_run_the_relay_never_knew_is_adopted_while_idle() -> None:
    new, effects = apply(conv("idle"), Report("approval_required", "w1", files_count=1), CTX)
    assert new.state == "awaiting_approval" and new.run == "w1" and new.approval_deadline == CTX.now + 60
    assert sends(effects)[0].startswith("📝")


def test_approval_comes_first_then_the_answer_only_adds_words() -> None:
    waiting, _ = apply(conv("working"), Report("approval_required", "m1", files_count=1), CTX)
    assert waiting.state == "awaiting_approval"
    new, effects = apply(waiting, Report("answer", "m1", text="did it", changes=True), CTX)
    assert new.state == "awaiting_approval" and new.approval_deadline == waiting.approval_deadline
    assert "did it" in sends(effects)[0] and "above" in sends(effects)[0]


def test_cancel_again_asks_the_worker_and_its_idle_answer_ends_the_run() -> None:
    stuck = conv("working", job=Job("m1", "x", delivered=True, cancelling=True), queue=[Job("m2", "y")])
    asked, effects = apply(stuck, Word("cancel"), CTX)
    assert CallWorker(OwnerCall("cancel", PHONE)) in effects and asked.queue == []
    new, effects = apply(asked, Delivered("cancel", answer=Answer("idle")), CTX)
    assert new.state == "idle" and new.job is None and "no run going" in sends(effects)[0]


def test_approve_while_idle_reaches_a_worker_that_holds_changes() -> None:
    asked, effects = apply(conv("idle"), Word("approve"), CTX)
    assert effects == [CallWorker(OwnerCall("approve", PHONE), mode="if_awake")]
    new, effects = apply(asked, Delivered("approve", answer=Answer("pushing", "w1", "make it")), CTX)
    assert new.state == "applying" and new.run == "w1" and sends(effects) == [replies.APPLYING["approve"]]
    done, effects = apply(new, Report("pr_opened", "w1", url="https://x/pull/1"), CTX)
    assert done.state == "idle" and "pull/1" in sends(effects)[0] and done.ended == ["w1"]


@pytest.mark.parametrize(
    "event", [Unreachable("approve", asleep=True), Unreachable("approve", refused=True, answer=Answer("idle"))]
)
def test_approve_while_idle_with_nothing_on_the_worker_says_so(event: Unreachable) -> None:
    new, effects = apply(conv("idle"), event, CTX)
    assert new.state == "idle" and sends(effects) == [replies.NOTHING_WAITING]


def test_a_prompt_refused_because_changes_wait_is_queued_behind_them() -> None:
    c = conv("working", job=Job("m5", "next thing", delivered=False))
    answer = Answer("awaiting_approval", "w1", "earlier")
    new, effects = apply(c, Unreachable("command", "m5", "changes are waiting", refused=True, answer=answer), CTX)
    assert new.state == "awaiting_approval" and new.run == "w1" and [j.text for j in new.queue] == ["next thing"]
    assert "queued" in sends(effects)[0] and "earlier" in sends(effects)[1]


def test_a_silent_run_is_checked_and_a_worker_asleep_ends_it() -> None:
    working, _ = apply(conv("idle"), Prompt("build", "m2"), CTX)
    assert working.check_at is None  # not delivered yet: the wake loop owns that wait
    delivered, _ = apply(working, Delivered("command", "m2"), CTX)
    assert delivered.check_at == CTX.now + CTX.stall_s
    later = Context(CTX.now + 500, 60.0)
    asked, effects = apply(delivered, Stalled(delivered.check_at), later)
    assert effects == [CallWorker(OwnerCall("status", PHONE), mode="probe")]
    assert asked.check_at == later.now + later.stall_s
    _, effects = apply(asked, Stalled(delivered.check_at), later)
    assert effects == []  # an older check, already superseded
    new, effects = apply(asked, Unreachable("status", asleep=True), later)
    assert new.state == "idle" and "no run going" in sends(effects)[0]


def test_a_new_prompt_after_unreachable_goes_behind_the_kept_one_and_the_queue() -> None:
    c = conv("working", job=Job("m1", "first", delivered=False), queue=[Job("m2", "second")])
    kept, effects = apply(c, Unreachable("command", "m1", "timeout"), CTX)
    assert kept.state == "idle" and kept.kept is not None and [j.text for j in kept.queue] == ["second"]
    assert "retry" in sends(effects)[0] and "1 queued prompt waits" in sends(effects)[0]
    new, effects = apply(kept, Prompt("third", "m3"), CTX)
    assert new.state == "working" and new.job is not None and new.job.text == "first"
    assert [j.text for j in new.queue] == ["second", "third"]


def test_an_answer_older_than_the_report_that_closed_its_run_changes_nothing() -> None:
    idle = conv("idle", ended=["m1"])
    new, effects = apply(idle, Delivered("cancel", answer=Answer("cancelling", "m1", "x")), CTX)
    assert new.state == "idle" and effects == []


# --- the table as docs/ARCHITECTURE.md shows it -----------------------------------------


def _cell(row: Any) -> str:
    handler, targets = row
    name = handler.__name__
    name = "reply" if name.startswith("say ") else name
    moves = ", ".join("stay" if t == "same" else t for t in targets)
    return f"`{name}` → {moves}"


def test_the_docs_show_the_table_as_the_code_has_it() -> None:
    from pathlib import Path

    lines = ["| event | " + " | ".join(STATES) + " |", "|---" * (len(STATES) + 1) + "|"]
    for kind in TRANSITIONS["idle"]:
        lines.append(f"| {kind} | " + " | ".join(_cell(TRANSITIONS[s][kind]) for s in STATES) + " |")
    lines += ["", "| event (any state) | handler → moves to |", "|---|---|"]
    lines += [f"| {kind} | {_cell(row)} |" for kind, row in ANY_STATE.items()]
    table = "\n".join(lines)
    docs = (Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md").read_text()
    assert table in docs, "docs/ARCHITECTURE.md must carry this table:\n\n" + table
