"""Races between the worker's answers and its reports, found by attacking issue 10: each asserts the right outcome."""

from __future__ import annotations

import json
from typing import Any

import pytest

from common.protocol import Answer, ProtocolError, Report, RunPrompt, decode_report
from relay.conversation import Context, Conversation, Job, apply
from relay.events import CallWorker, Delivered, Prompt, Send, Stalled, Unreachable, Word

CTX = Context(now=1000.0, approval_timeout_s=60.0)
P = "+15550001111"


def run(c: Conversation, *events: Any) -> tuple[Conversation, list[list[Any]]]:
    out: list[list[Any]] = []
    for e in events:
        c, eff = apply(c, e, CTX)
        out.append(eff)
    return c, out


def texts(effs: list[Any]) -> list[str]:
    return [e.text for e in effs if isinstance(e, Send)]


def test_approve_answer_after_approve_failed() -> None:
    c = Conversation(P, state="awaiting_approval", run="X", approval_deadline=1060.0)
    # owner approves; the push fails at once: the report lands before the 202's answer is recorded
    c, _ = run(
        c,
        Word("approve"),
        Report("approve_failed", "X", text="push refused", seq=5),
        Delivered("approve", answer=Answer("pushing", "X", "p")),
    )
    assert c.state == "awaiting_approval", c.state  # worker holds changes awaiting approval
    c, (eff,) = run(c, Word("approve"))
    assert any(isinstance(e, CallWorker) for e in eff), texts(eff)


def test_cancel_answer_after_approval_and_cancelled() -> None:
    job = Job("X", "p", started_at=990.0, delivered=True)
    c = Conversation(P, state="working", job=job, run="X")
    c, outs = run(
        c,
        Word("cancel"),
        Report("approval_required", "X", seq=1),
        Report("cancelled", "X", changes=True, seq=2),
        Delivered("cancel", answer=Answer("cancelling", "X", "p")),
    )
    assert c.state == "awaiting_approval", (c.state, texts(outs[-1]))


def test_status_probe_answer_after_approval_required() -> None:
    job = Job("X", "p", started_at=990.0, delivered=True)
    c = Conversation(P, state="working", job=job, run="X", check_at=1000.0)
    from relay.events import Stalled

    c, outs = run(
        c,
        Stalled(1000.0),
        Report("approval_required", "X", seq=1),
        Delivered("status", answer=Answer("running", "X", "p")),
    )
    assert c.state == "awaiting_approval", (c.state, texts(outs[-1]))


def test_pr_opened_before_adopting_approve_answer_while_idle() -> None:
    # fresh relay database: idle; the worker holds changes of X. approve goes if_awake,
    # the push is quick and pr_opened arrives before the 202's answer is recorded.
    c = Conversation(P)
    c, outs = run(
        c,
        Word("approve"),
        Report("pr_opened", "X", url="https://gh/pr/1", seq=9),
        Delivered("approve", answer=Answer("pushing", "X", "p")),
    )
    assert any("https://gh/pr/1" in t for o in outs for t in texts(o)), [texts(o) for o in outs]
    assert c.state == "idle", c.state


def test_late_command_answer_after_run_end() -> None:
    job = Job("X", "p", started_at=990.0, delivered=False)
    c = Conversation(P, state="working", job=job, run="X")
    c, outs = run(
        c,
        Report("error", "X", text="clone failed", seq=1),
        Delivered("command", "X", answer=Answer("running", "X", "p")),
    )
    assert not any(isinstance(e, CallWorker) for e in outs[-1]), outs[-1]


def test_old_applying_conversation_shows_pr() -> None:
    old: dict[str, Any] = {
        "phone": P,
        "state": "applying",
        "job": None,
        "queue": [],
        "approval_deadline": None,
        "kept": None,
        "fresh_session": False,
        "applying": "approve",
    }
    c = Conversation.from_json(old)
    c, outs = run(c, Report("pr_opened", "X", url="https://gh/pr/1", seq=9))
    assert c.state == "idle" and texts(outs[-1]), (c.state, outs)


def test_a_report_stays_within_what_the_relay_takes_whatever_its_characters() -> None:
    from common.protocol import MAX_REPORT_BYTES, encode_report, report_bytes

    ugly = '\x01\\"😀' * 75  # six, two, two and four bytes each once encoded
    report = Report(
        "approval_required",
        "X",
        text=ugly * 80,
        diff=ugly * 200,
        files=tuple((ugly, 1, 1, False) for _ in range(100)),
        uncovered=(ugly,) * 50,
    )
    data = encode_report(report)
    assert len(report_bytes(data)) <= MAX_REPORT_BYTES and data["files_count"] == 100


def test_a_phone_with_a_trailing_newline_is_refused() -> None:
    import pytest

    from common.protocol import ProtocolError, decode_command

    with pytest.raises(ProtocolError):
        decode_command("status", {"phone": "+15551234567\n"})


def commands(outs: list[list[Any]]) -> list[RunPrompt]:
    return [e.command for effs in outs for e in effs if isinstance(e, CallWorker) and isinstance(e.command, RunPrompt)]


def shown(outs: list[list[Any]]) -> list[str]:
    return [t for effs in outs for t in texts(effs)]


def test_an_idle_answer_with_reports_still_coming_does_not_lose_the_runs_answer() -> None:
    # Run X is silent; Y waits behind it. The stall probe reaches the worker just after X ended:
    # X's answer is spooled, not yet delivered, and the worker says so (pending=1).
    job = Job("X", "refactor", started_at=900.0, delivered=True)
    c = Conversation(P, state="working", job=job, run="X", queue=[Job("Y", "then this")], check_at=1000.0, heard_seq=5)
    c, outs = run(c, Stalled(1000.0), Delivered("status", answer=Answer("idle", seq=9, pending=1)))
    assert c.state == "working" and c.run == "X" and shown(outs) == []  # not "the run is gone"
    c, more = run(c, Report("answer", "X", text="THE ANSWER TO X", seq=9))
    assert any("THE ANSWER TO X" in t for t in shown(more))
    assert [cmd.message_id for cmd in commands(more)] == ["Y"]  # and then the queue moves on


def test_a_repeated_approve_refused_while_its_pull_request_report_is_coming_keeps_the_link() -> None:
    # The relay died after /approve reached the worker; the restarted relay sends it again and
    # gets 409 idle, with the pr_opened report still in the worker's spool.
    c = Conversation(P, state="awaiting_approval", run="X", approval_deadline=1060.0, heard_seq=10)
    c, outs = run(c, Prompt("and then this", "Y"), Word("approve"))
    refused = Unreachable(
        "approve", reason="nothing is waiting for approval", refused=True, answer=Answer("idle", seq=20, pending=1)
    )
    c, more = run(c, refused, Report("pr_opened", "X", url="https://github.example/pull/7", text="textslash/x", seq=20))
    assert not any("said no" in t for t in shown(more)), shown(more)
    assert any("pull/7" in t for t in shown(more)), shown(more)
    assert [cmd.message_id for cmd in commands(more)] == ["Y"]


def test_new_still_applies_to_a_prompt_sent_again_with_retry() -> None:
    c, outs = run(
        Conversation(P),
        Word("new"),
        Prompt("start over: forget everything", "A"),
        Unreachable("command", "A", reason="no answer within 60 s"),  # the VM never woke
        Word("retry"),
    )
    sent = commands(outs)
    assert [cmd.message_id for cmd in sent] == ["A", "A"]
    assert sent[0].new_session and sent[1].new_session


def test_new_still_applies_to_a_prompt_queued_behind_changes_the_relay_did_not_know_of() -> None:
    c, outs = run(
        Conversation(P),
        Word("new"),
        Prompt("fresh start", "A"),
        Unreachable(
            "command", "A", reason="changes are waiting", refused=True, answer=Answer("awaiting_approval", "W", "old")
        ),
        Word("reject"),
        Delivered("reject", answer=Answer("rolling_back", "W", "old", seq=3)),
        Report("rolled_back", "W", seq=4),
    )
    sent = commands(outs)
    assert [cmd.message_id for cmd in sent] == ["A", "A"]
    assert sent[1].new_session


@pytest.mark.parametrize(
    "body",
    [
        # JSON takes Infinity, which no count can be.
        '{"v":1,"type":"approval_required","run_id":"r","seq":1,"files":[{"path":"a","added":Infinity,"removed":0}]}',
        # A lone surrogate escape decodes, and no text can hold it.
        '{"v":1,"type":"answer","run_id":"r","seq":2,"text":"\\ud800"}',
        '{"v":1,"type":"answer","run_id":"\\udfff","seq":2}',
        '{"v":1,"type":"rolled_back","run_id":"r","seq":2,"left_out":["\\ud800"]}',
    ],
)
def test_a_report_no_text_or_count_can_hold_is_a_protocol_error(body: str) -> None:
    with pytest.raises(ProtocolError):
        decode_report(json.loads(body))
