"""Scheduled prompts, the pure parts: the owner's words for them, and when each fires next
(across daylight-saving changes), and the conversation's handling of one that fires."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.protocol import Answer, Report, RunPrompt
from relay.conversation import Context, Conversation, Job, apply
from relay.events import (
    AddSchedule,
    CallWorker,
    Delivered,
    Fired,
    NewSchedule,
    Prompt,
    RemoveSchedule,
    Send,
    SetZone,
    Unreachable,
    Unschedule,
    Word,
    parse_owner_text,
)
from relay.schedules import EVERY_DAY, WORK_DAYS, Rule, next_time
from relay.usage import Budget
from relay.zones import zone

NY, BERLIN, UTC = ZoneInfo("America/New_York"), ZoneInfo("Europe/Berlin"), ZoneInfo("UTC")
PHONE = "+15550001111"
CTX = Context(now=1_000_000.0, approval_timeout_s=60.0)


def at(tz: ZoneInfo, year: int, month: int, day: int, hour: int, minute: int) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=tz).timestamp()


def local(ts: float, tz: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(ts, tz)


# --- the owner's words ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("every day 09:00 run the tests", NewSchedule("run the tests", EVERY_DAY, (9, 0))),
        ("Every weekday 9am run the tests", NewSchedule("run the tests", WORK_DAYS, (9, 0))),
        ("every weekdays at 7:05 pm check", NewSchedule("check", WORK_DAYS, (19, 5))),
        ("every monday 18:30 weekly report", NewSchedule("weekly report", frozenset({0}), (18, 30))),
        ("every Sundays 00:00 tidy", NewSchedule("tidy", frozenset({6}), (0, 0))),
        ("every fri 12pm lunch", NewSchedule("lunch", frozenset({4}), (12, 0))),
        ("every day 12am midnight", NewSchedule("midnight", EVERY_DAY, (0, 0))),
        ("at 14:30 deploy", NewSchedule("deploy", frozenset(), (14, 30))),
        ("AT 9pm deploy\nand tell me", NewSchedule("deploy\nand tell me", frozenset(), (21, 0))),
        ("in 3s say hi", NewSchedule("say hi", delay_s=3.0)),
        ("in 10m check", NewSchedule("check", delay_s=600.0)),
        ("in 2 hours check", NewSchedule("check", delay_s=7200.0)),
        ("in 1d check", NewSchedule("check", delay_s=86400.0)),
        ("unschedule 2", Unschedule(2)),
        ("unschedule #3", Unschedule(3)),
        ("Unschedule all", Unschedule(None)),
        ("tz Europe/Paris", SetZone("Europe/Paris")),
        ("schedules", Word("schedules")),
        ("tz", Word("tz")),
    ],
)
def test_schedule_words(text: str, expected: Any) -> None:
    assert parse_owner_text(text, "m") == expected


@pytest.mark.parametrize(
    "text",
    [
        "at 5 places in app.py, fix the typo",
        "in app.py, rename foo",
        "in 2023 we moved the API",
        "every function needs a docstring",
        "every day counts",
        "at noon, remind me",
        "unschedule the cron job in deploy.yml",
    ],
)
def test_prose_stays_a_prompt(text: str) -> None:
    assert parse_owner_text(text, "m") == Prompt(text, "m")


@pytest.mark.parametrize(
    ("text", "needs"),
    [
        ("every day 9 run the tests", "a time like"),
        ("every day 25:00 run", "a time like"),
        ("every monday 13pm run", "a time like"),
        ("every day 09:00", "a prompt after the time"),
        ("at 9:00", "a prompt after the time"),
        ("in 10m", "a prompt after the delay"),
        ("in 0s run", "a delay from 1 s to a year"),
        ("in 400d run", "a delay from 1 s to a year"),
        ("in 1h " + "x" * 20_001, "a prompt of at most 20,000 characters"),
        ("every day 09:00 " + "x" * 20_001, "a prompt of at most 20,000 characters"),
    ],
)
def test_a_malformed_schedule_is_explained_and_nothing_runs(text: str, needs: str) -> None:
    event = parse_owner_text(text, "m")
    assert isinstance(event, NewSchedule) and needs in event.problem
    new, effects = apply(Conversation(PHONE), event, CTX)
    assert new.state == "idle" and len(effects) == 1
    assert isinstance(effects[0], Send) and needs in effects[0].text


@pytest.mark.parametrize(
    "text",
    [
        # Letters that match ASCII ones only when case is ignored the Unicode way (long s, dotless
        # i, the Kelvin sign): once they broke the lookup of the unit (a KeyError, so the owner
        # heard nothing) or of the weekday (a one-off instead of a weekly schedule).
        "in 5\u017f hello",
        "in 5 \u017fecs hello",
        "every \u017funday 9am tidy",
        "every fr\u0131day 9am tidy",
        "every weekday\u017f 9:00 tidy",
    ],
)
def test_look_alike_letters_are_not_schedule_words(text: str) -> None:
    event = parse_owner_text(text, "m")
    assert event == Prompt(text, "m")


@pytest.mark.parametrize("text", ["unschedule -1", "unschedule foo", "Unschedule 1234567", "unschedule"])
def test_an_unschedule_without_a_number_is_explained_and_nothing_runs(text: str) -> None:
    # Once these went to Claude Code as prompts (a run, for a mistyped command).
    event = parse_owner_text(text, "m")
    assert isinstance(event, Unschedule) and event.problem and event.number is None
    new, effects = apply(Conversation(PHONE), event, CTX)
    assert new.state == "idle" and len(effects) == 1
    assert isinstance(effects[0], Send) and "*unschedule <n>*" in effects[0].text
    assert not any(isinstance(e, RemoveSchedule) for e in effects)


def test_zones_are_looked_up_by_name_only() -> None:
    assert str(zone("europe/paris")) == "Europe/Paris"
    assert str(zone("utc")) == "UTC"
    for bad in ("../../etc/passwd", "/etc/localtime", "Mars/Olympus", "", "Europe/../Europe/Paris"):
        assert zone(bad) is None


# --- when a schedule fires next ---------------------------------------------------------


def test_every_day_keeps_its_wall_clock_time_across_the_spring_change() -> None:
    rule = Rule(EVERY_DAY, 9, 0)
    before = next_time(rule, at(BERLIN, 2026, 3, 28, 10, 0), BERLIN)  # Sunday 29 March: clocks go 02:00 -> 03:00
    after = next_time(rule, before, BERLIN)
    assert local(before, BERLIN).replace(tzinfo=None) == datetime(2026, 3, 29, 9, 0)
    assert local(after, BERLIN).replace(tzinfo=None) == datetime(2026, 3, 30, 9, 0)
    assert before - at(UTC, 2026, 3, 29, 7, 0) == 0  # CEST, UTC+2
    assert after - before == 24 * 3600


def test_a_time_the_clock_skips_fires_an_hour_later_that_day_only() -> None:
    rule = Rule(EVERY_DAY, 2, 30)  # New York, Sunday 8 March 2026: 02:00 -> 03:00
    first = next_time(rule, at(NY, 2026, 3, 7, 12, 0), NY)
    assert local(first, NY).replace(tzinfo=None) == datetime(2026, 3, 8, 3, 30)
    second = next_time(rule, first, NY)
    assert local(second, NY).replace(tzinfo=None) == datetime(2026, 3, 9, 2, 30)


def test_a_time_the_clock_passes_twice_fires_once() -> None:
    rule = Rule(EVERY_DAY, 1, 30)  # New York, Sunday 1 November 2026: 02:00 -> 01:00
    first = next_time(rule, at(NY, 2026, 10, 31, 12, 0), NY)
    assert first == at(UTC, 2026, 11, 1, 5, 30)  # the first 01:30, still EDT
    second = next_time(rule, first, NY)
    assert local(second, NY).replace(tzinfo=None) == datetime(2026, 11, 2, 1, 30)
    assert second - first == 25 * 3600


def test_weekdays_skip_the_weekend_and_a_named_day_waits_for_it() -> None:
    friday_noon = at(UTC, 2026, 11, 27, 12, 0)
    assert local(next_time(Rule(WORK_DAYS, 9, 0), friday_noon, UTC), UTC).day == 30  # Monday
    assert local(next_time(Rule(frozenset({2}), 9, 0), friday_noon, UTC), UTC).day == 2  # Wednesday 2 Dec


def test_at_is_today_when_still_ahead_and_tomorrow_when_past() -> None:
    now = at(UTC, 2026, 11, 24, 10, 0)
    assert next_time(Rule(frozenset(), 10, 30), now, UTC) == at(UTC, 2026, 11, 24, 10, 30)
    assert next_time(Rule(frozenset(), 10, 0), now, UTC) == at(UTC, 2026, 11, 25, 10, 0)  # never now: strictly after


@settings(max_examples=300, deadline=None)
@given(
    after=st.floats(min_value=1.6e9, max_value=2.2e9),
    days=st.frozensets(st.integers(0, 6), min_size=0, max_size=7),
    hour=st.integers(0, 23),
    minute=st.integers(0, 59),
    name=st.sampled_from(["UTC", "America/New_York", "Europe/Berlin", "Australia/Lord_Howe", "Asia/Kathmandu"]),
)
def test_next_time_is_never_early_and_within_the_week(
    after: float, days: frozenset[int], hour: int, minute: int, name: str
) -> None:
    tz = ZoneInfo(name)
    found = next_time(Rule(days, hour, minute), after, tz)
    assert after < found <= after + 8 * 86400
    moment = local(found, tz)
    assert moment.weekday() in (days or EVERY_DAY)
    # The wall-clock time asked for, or that time moved past a jump of the clock (at most 1 h).
    asked = moment.replace(hour=hour, minute=minute, tzinfo=None)
    assert timedelta(0) <= moment.replace(tzinfo=None) - asked <= timedelta(hours=1)


# --- the conversation, when one fires ------------------------------------------------------


def fired(**kw: Any) -> Fired:
    return Fired(**{"schedule": 7, "number": 1, "text": "run the tests", "message_id": "sched-7-1", **kw})


def test_a_fired_schedule_starts_an_unattended_run_said_with_a_clock() -> None:
    new, effects = apply(Conversation(PHONE), fired(), CTX)
    assert new.state == "working" and new.unattended and new.job is not None and new.job.schedule == 7
    assert effects == [
        Send("⏰ run the tests"),
        CallWorker(RunPrompt(PHONE, "run the tests", "sched-7-1", unattended=True)),
    ]


def test_a_scheduled_runs_changes_wait_with_no_deadline_and_its_progress_is_quiet() -> None:
    working, _ = apply(Conversation(PHONE), fired(), CTX)
    working.job.delivered = True  # type: ignore[union-attr]
    quiet, effects = apply(working, Report("progress", "sched-7-1", text="editing"), CTX)
    assert effects == []
    waiting, effects = apply(quiet, Report("approval_required", "sched-7-1", files_count=1), CTX)
    assert waiting.state == "awaiting_approval" and waiting.approval_deadline is None
    assert "the VM sleeps meanwhile" in effects[0].text  # type: ignore[union-attr]
    # The owner's own next run has a deadline again.
    done, _ = apply(waiting, Report("rolled_back", "sched-7-1"), CTX)
    again, _ = apply(done, Prompt("fix it", "m2"), CTX)
    assert not again.unattended


def test_a_fire_while_busy_queues_and_a_second_fire_of_the_same_schedule_is_skipped() -> None:
    busy = Conversation(PHONE, state="working", job=Job("m1", "x", delivered=True), run="m1")
    queued, effects = apply(busy, fired(), CTX)
    assert [j.message_id for j in queued.queue] == ["sched-7-1"]
    assert effects[0].text.startswith("⏰ run the tests\n📥 Queued (#1)")  # type: ignore[union-attr]
    again, effects = apply(queued, fired(message_id="sched-7-2"), CTX)
    assert len(again.queue) == 1 and "has not started yet" in effects[0].text  # type: ignore[union-attr]


def test_a_late_fire_is_skipped_with_a_message_and_a_spent_budget_skips_too() -> None:
    new, effects = apply(Conversation(PHONE), fired(late=True, due=CTX.now - 7200), CTX)
    assert new.state == "idle" and "Skipped schedule 1" in effects[0].text  # type: ignore[union-attr]
    spent = Context(now=CTX.now, approval_timeout_s=60.0, budget=Budget(1.0, 1.5))
    new, effects = apply(Conversation(PHONE), fired(), spent)
    assert new.state == "idle" and "Skipped" in effects[0].text  # type: ignore[union-attr]


def test_a_schedule_command_records_the_current_repository_and_zone() -> None:
    conv = Conversation(PHONE, tz="Europe/Paris")
    event = parse_owner_text("every day 09:00 run the tests", "m")
    _, effects = apply(conv, event, CTX)
    assert effects == [AddSchedule(event, "", "Europe/Paris")]  # type: ignore[arg-type]
    _, effects = apply(Conversation(PHONE), SetZone("Mars/Base"), CTX)
    assert "not a time zone" in effects[0].text  # type: ignore[union-attr]


def test_usage_counts_the_owners_days_and_months() -> None:
    from relay import usage

    tokyo = ZoneInfo("Asia/Tokyo")
    evening = at(UTC, 2026, 11, 30, 20, 0)  # already 1 December, 05:00, in Tokyo
    assert usage.month_of(evening) == "2026-11" and usage.month_of(evening, tokyo) == "2026-12"
    assert usage._day_start(evening, tokyo) == at(tokyo, 2026, 12, 1, 0, 0)
    assert usage._month_start(evening, UTC) == at(UTC, 2026, 11, 1, 0, 0)


def unattended_waiting() -> Conversation:
    working, _ = apply(Conversation(PHONE), fired(), CTX)
    working.job.delivered = True  # type: ignore[union-attr]
    waiting, _ = apply(working, Report("approval_required", "sched-7-1", files_count=1), CTX)
    assert waiting.state == "awaiting_approval" and waiting.unattended
    return waiting


def test_a_worker_asleep_still_holds_a_scheduled_runs_changes() -> None:
    """The worker sleeps while a scheduled run's changes wait: its goodnight no longer means it
    holds nothing. A call that found it asleep (a stall check made while the run was going, say)
    must not let the changes go, nor tell the owner the run is gone."""
    waiting = unattended_waiting()
    after, effects = apply(waiting, Unreachable("status", reason="asleep", asleep=True), CTX)
    assert after.state == "awaiting_approval" and after.run == "sched-7-1" and effects == []


def test_changes_of_a_scheduled_run_heard_of_from_an_answer_promise_no_window() -> None:
    working, _ = apply(Conversation(PHONE), fired(), CTX)
    working.job.delivered = True  # type: ignore[union-attr]
    # A status answer says the changes wait before the approval request itself arrives.
    answer = Answer("awaiting_approval", "sched-7-1", "run the tests", seq=5)
    waiting, effects = apply(working, Delivered("status", answer=answer), CTX)
    assert waiting.state == "awaiting_approval" and waiting.approval_deadline is None
    [told] = effects
    assert isinstance(told, Send) and "within" not in told.text and "wait for you" in told.text


def test_an_unattended_run_says_nothing_more_when_it_reaches_the_worker() -> None:
    working, _ = apply(Conversation(PHONE), fired(), CTX)
    new, effects = apply(working, Delivered("command", "sched-7-1"), CTX)
    assert new.job is not None and new.job.delivered and effects == []  # no "Working on it"


def test_a_kept_scheduled_prompt_retried_by_the_owner_runs_attended() -> None:
    kept = Conversation(PHONE, kept=Job("sched-7-1", "run the tests", schedule=7))
    new, effects = apply(kept, Word("retry"), CTX)
    assert new.state == "working" and not new.unattended
    assert CallWorker(RunPrompt(PHONE, "run the tests", "sched-7-1")) in effects


def test_a_schedule_that_cannot_be_read_is_removed_and_the_others_still_fire(tmp_path: Path) -> None:
    from relay import store
    from relay.dispatcher import fire_schedules

    db = store.Database(tmp_path / "relay.sqlite3")
    try:
        conn = db.conn
        for number, days in ((1, "0x"), (2, "")):  # the first's weekdays are corrupt
            conn.execute(
                "INSERT INTO schedules (phone, number, days, clock, tz, prompt, next_at, created_at) "
                "VALUES (?, ?, ?, '09:00', 'UTC', ?, ?, ?)",
                (PHONE, number, days, f"job {number}", CTX.now - 5, CTX.now - 60),
            )
        assert fire_schedules(conn, CTX.now) == [PHONE, PHONE]
        assert conn.execute("SELECT COUNT(*) FROM schedules").fetchone()[0] == 0  # one removed, one fired
        [event] = [json.loads(r[0]) for r in conn.execute("SELECT event FROM inbox")]
        assert event["type"] == "fired" and event["text"] == "job 2"
        [body] = [r[0] for r in conn.execute("SELECT body FROM outbox")]
        assert "Schedule 1, “job 1”, could not be read and was removed" in body
    finally:
        db.close()
