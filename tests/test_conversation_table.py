"""The owner's conversation table, walked without I/O."""

from __future__ import annotations

from typing import Any

import pytest

from relay import replies
from relay.conversation import STATES, TRANSITIONS, Context, Conversation, IllegalTransition, Job, apply
from relay.events import (
    ApprovalExpired,
    CallWorker,
    Delivered,
    DropCommand,
    Prompt,
    ReportStatus,
    Screenshot,
    Send,
    Unreachable,
    Word,
    WorkerEvent,
    parse_owner_text,
)

CTX = Context(now=1000.0, approval_timeout_s=60.0)
PHONE = "+15550001111"


def conv(state: str = "idle", **kw: Any) -> Conversation:
    c = Conversation(phone=PHONE, state=state, **kw)  # type: ignore[arg-type]
    if state == "working" and c.job is None:
        c.job = Job("m1", "first", started_at=990.0, delivered=True)
    if state == "awaiting_approval":
        c.approval_deadline = 1060.0
    return c


def sends(effects: list[Any]) -> list[str]:
    return [e.text for e in effects if isinstance(e, Send)]


ALL_EVENTS: list[Any] = [
    Prompt("hi", "m9"), Screenshot("http://x", "m8"), *[Word(w) for w in ("approve", "reject", "cancel", "status",
                                                                         "help", "new", "retry")],
    *[WorkerEvent(t, "m1") for t in ("progress", "answer", "cancelled", "error", "approval_required", "pr_opened",
                                     "approve_failed", "reject_failed", "rolled_back", "notice",
                                     "sleeping")],
    Delivered("command", "m1"), Unreachable("command", "m1"), Unreachable("approve", refused=True),
    ApprovalExpired(1060.0),
]


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("event", ALL_EVENTS, ids=lambda e: getattr(e, "type", None) or e.kind)
def test_every_pair_has_an_answer(state: str, event: Any) -> None:
    new, effects = apply(conv(state), event, CTX)
    assert new.state in STATES
    assert all(isinstance(e, Send | CallWorker | DropCommand | ReportStatus) for e in effects)


def test_a_missing_pair_raises_the_named_error() -> None:
    with pytest.raises(IllegalTransition, match="'nonsense' in state 'idle'"):
        apply(conv(), Word("nonsense"), CTX)


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("  APPROVE ", Word("approve"), id="approve-any-case"),
    pytest.param("Cancel!", Word("cancel"), id="cancel-punctuated"),
    pytest.param("status", Word("status"), id="status"),
    pytest.param("screenshot example.com", Screenshot("http://example.com", "s"), id="screenshot-bare-host"),
    pytest.param("Screenshot https://a.b/c?d=1", Screenshot("https://a.b/c?d=1", "s"), id="screenshot-url"),
    pytest.param("approve the plan and build it", Prompt("approve the plan and build it", "s"), id="prompt-with-word"),
    pytest.param(" fix the bug ", Prompt("fix the bug", "s"), id="prompt-trimmed"),
])
def test_owner_words(text: str, expected: Any) -> None:
    assert parse_owner_text(text, "s") == expected


def test_prompt_when_idle_starts_work() -> None:
    new, effects = apply(conv(), Prompt("build", "m2"), CTX)
    assert new.state == "working" and new.job is not None and new.job.started_at == CTX.now
    assert effects == [CallWorker("command", {"phone": PHONE, "text": "build", "message_id": "m2"})]


def test_prompt_while_working_is_queued_with_its_place() -> None:
    new, effects = apply(conv("working"), Prompt("next", "m2"), CTX)
    assert [j.text for j in new.queue] == ["next"]
    assert sends(effects) == [replies.queued(1, "working")]


def test_answer_without_changes_starts_the_next_queued_prompt() -> None:
    c = conv("working", queue=[Job("m2", "next")])
    new, effects = apply(c, WorkerEvent("answer", "m1", text="ok"), CTX)
    assert new.state == "working" and new.job is not None and new.job.message_id == "m2"
    assert any(isinstance(e, CallWorker) and e.payload["text"] == "next" for e in effects)


def test_answer_with_changes_opens_the_approval_window() -> None:
    new, _ = apply(conv("working"), WorkerEvent("answer", "m1", changes=True), CTX)
    assert new.state == "awaiting_approval" and new.approval_deadline == CTX.now + 60


def test_approve_asks_the_worker_and_waits() -> None:
    new, effects = apply(conv("awaiting_approval"), Word("approve"), CTX)
    assert new.state == "applying" and new.approval_deadline is None
    assert CallWorker("approve", {"phone": PHONE}) in effects


def test_failed_push_keeps_the_changes_waiting() -> None:
    new, effects = apply(conv("applying"), WorkerEvent("approve_failed", "m1", text="push refused"), CTX)
    assert new.state == "awaiting_approval" and "push refused" in sends(effects)[0]


def test_cancel_of_an_undelivered_command_withdraws_it() -> None:
    c = conv("working", job=Job("m1", "x", delivered=False), queue=[Job("m2", "y")])
    new, effects = apply(c, Word("cancel"), CTX)
    assert new.state == "idle" and new.queue == []
    assert DropCommand("m1") in effects and not any(isinstance(e, CallWorker) for e in effects)


def test_withdrawn_command_that_arrived_anyway_is_cancelled() -> None:
    _, effects = apply(conv("idle"), Delivered("command", "m1"), CTX)
    assert effects == [CallWorker("cancel", {"phone": PHONE})]


def test_unreachable_keeps_the_prompt_for_retry() -> None:
    c = conv("working", job=Job("m1", "x", delivered=False))
    new, _ = apply(c, Unreachable("command", "m1", "timeout"), CTX)
    assert new.state == "idle" and new.kept is not None and new.kept.message_id == "m1"
    again, effects = apply(new, Word("retry"), CTX)
    assert again.state == "working" and effects[-1] == CallWorker(
        "command", {"phone": PHONE, "text": "x", "message_id": "m1"})


def test_stale_approval_expiry_is_ignored() -> None:
    c = conv("awaiting_approval")
    new, effects = apply(c, ApprovalExpired(deadline=999.0), CTX)
    assert new.state == "awaiting_approval" and effects == []
    expired, effects = apply(c, ApprovalExpired(deadline=1060.0), CTX)
    assert expired.state == "applying" and CallWorker("reject", {"phone": PHONE}) in effects


def test_new_marks_the_next_command_only() -> None:
    new, _ = apply(conv(), Word("new"), CTX)
    started, effects = apply(new, Prompt("hi", "m3"), CTX)
    assert effects[0].payload["new_session"] is True  # type: ignore[union-attr]
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
