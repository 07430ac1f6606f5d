"""Schedules through the real relay (its webhook, SQLite and timer) with fakes of Twilio and the
worker: what the owner is told, what reaches the worker, and what `unschedule` and `tz` change."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from relay import schedules, store
from tests.support.relay_harness import Stack, relay_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.anyio


async def said(stack: Stack, fragment: str, timeout: float = 10.0) -> str:
    found: list[str] = await wait_for(
        lambda: [b for b in stack.twilio.bodies() if fragment in b], timeout, f"a message with {fragment!r}"
    )
    return found[-1]


async def test_unschedule_stops_one_and_the_other_fires_once(tmp_path: Path) -> None:
    async with relay_stack(tmp_path) as stack:
        await stack.send("in 2s first job")
        first = await said(stack, "Scheduled *1*")
        assert "Scheduled *1*, once: “first job”" in first and "Runs in 2 s, today " in first
        await stack.send("in 2s second job")
        await said(stack, "Scheduled *2*")
        await stack.send("unschedule 1")
        assert "Removed schedule 1: “first job”" in await said(stack, "Removed")
        [command] = await wait_for(lambda: stack.worker.commands(), 10, "the second job's command")
        # Both were due together, the first a moment earlier: had it not gone, it would be here.
        assert command["text"] == "second job" and command["unattended"] is True
        assert command["message_id"].startswith("sched-")
        await said(stack, "⏰ second job")
        assert not [b for b in stack.twilio.bodies() if "first job" in b and b.startswith("⏰ first")]
        await stack.send("schedules")
        assert "No schedules" in await said(stack, "No schedules")
        await stack.send("unschedule 5")
        assert "There is no schedule 5" in await said(stack, "no schedule 5")


async def test_schedules_lists_number_time_and_next_in_the_owners_zone(tmp_path: Path) -> None:
    async with relay_stack(tmp_path, OWNER_TZ="Asia/Tokyo") as stack:
        await stack.send("every weekday 09:00 run the tests")
        first = await said(stack, "Scheduled *1*")
        assert "every weekday" in first and "09:00 (Asia/Tokyo)" in first
        await stack.send("tz")
        assert "Your time zone: Asia/Tokyo" in await said(stack, "Your time zone")
        await stack.send("tz america/new_york")
        assert "now America/New_York" in await said(stack, "now America/New_York")
        await stack.send("at 7:15pm check the deploy")
        await said(stack, "Scheduled *2*")
        await stack.send("schedules")
        listing = (await said(stack, "Your schedules")).splitlines()
        assert listing[0] == "⏰ Your schedules (America/New_York):"
        assert listing[1].startswith("1. 09:00 every weekday: “run the tests”, next ")
        assert listing[2].startswith("2. 19:15 once: “check the deploy”, next ")
        await stack.send("status")
        assert "⏰ 2 schedules; next " in await said(stack, "⏰ 2 schedules")
        await stack.send("tz Mars/Olympus")
        assert "not a time zone" in await said(stack, "not a time zone")


async def test_a_scheduled_runs_changes_wait_for_the_owner_with_no_deadline(tmp_path: Path) -> None:
    async with relay_stack(tmp_path, APPROVAL_TIMEOUT_MS="1000") as stack:
        await stack.send("in 1s tidy the imports")
        [command] = await wait_for(lambda: stack.worker.commands(), 10, "the scheduled command")
        await said(stack, "⏰ tidy the imports")
        await stack.report("progress", run_id=command["message_id"], text="🔧 Editing app.py")
        await stack.report("approval_required", run_id=command["message_id"], files_count=1, diff="+x")
        request = await said(stack, "1 file changed")
        assert "they wait for you; the VM sleeps meanwhile" in request
        # Past the approval window (1 s, and the relay's timer looks twice a second): nothing is
        # rolled back, and the run's progress line was never sent.
        past = time.time() + 2.0
        await wait_for(lambda: time.time() > past, 5, "the approval window to pass")
        await stack.send("status")
        status = await said(stack, "Changes wait for")
        assert "left" not in status.splitlines()[0]
        # Nor "Working on it": "⏰ tidy the imports" said it started, and nobody watches it run.
        quiet = ("No answer within", "Editing app.py", "Working on it")
        assert not [b for b in stack.twilio.bodies() if any(q in b for q in quiet)]
        assert "/reject" not in stack.worker.paths()


async def test_too_many_schedules_are_refused(tmp_path: Path) -> None:
    async with relay_stack(tmp_path) as stack:
        for i in range(21):
            await stack.send(f"every day 0{i % 10}:{10 + i} job {i}")
        assert "the most there can be" in await said(stack, "the most there can be")
        await stack.send("unschedule all")
        assert "Removed 20 schedules" in await said(stack, "Removed 20")


async def test_a_new_schedule_is_never_taken_for_one_that_already_fired(tmp_path: Path) -> None:
    """A one-off is deleted when it fires, while its prompt may still wait in the queue; the
    next schedule must not get its row (SQLite reuses the highest rowid), or it would be taken
    for the one still waiting and skipped."""
    async with relay_stack(tmp_path) as stack:
        await stack.send("fix the login bug")
        await wait_for(lambda: stack.worker.commands(), 10, "the owner's own run")
        await stack.send("in 1s first job")
        assert "Queued (#1)" in await said(stack, "⏰ first job")
        await stack.send("in 1s second job")
        assert "Queued (#2)" in await said(stack, "⏰ second job")
        assert not [b for b in stack.twilio.bodies() if "Skipped" in b]


# The table as the first version of schedules made it (ids without AUTOINCREMENT).
FIRST_TABLE = """
CREATE TABLE schedules (
    id INTEGER PRIMARY KEY, phone TEXT NOT NULL, number INTEGER NOT NULL, days TEXT NOT NULL DEFAULT '',
    clock TEXT NOT NULL DEFAULT '', tz TEXT NOT NULL, prompt TEXT NOT NULL, repo TEXT NOT NULL DEFAULT '',
    next_at REAL NOT NULL, created_at REAL NOT NULL, UNIQUE (phone, number)
);
CREATE INDEX schedules_due ON schedules (next_at);
"""


def test_a_schedules_table_from_before_keeps_its_rows_and_never_hands_out_an_id_again(tmp_path: Path) -> None:
    path = tmp_path / "relay.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(FIRST_TABLE)
    for row, number in ((1, 1), (2, 2)):
        old.execute(
            "INSERT INTO schedules VALUES (?, '+15550001111', ?, '0123456', '09:00', 'UTC', 'run', '', 5e9, 1.0)",
            (row, number),
        )
    old.commit()
    old.close()
    db = store.Database(path)
    try:
        kept = schedules.owned(db.conn, "+15550001111")
        assert [(s.id, s.number, s.clock, s.days) for s in kept] == [(1, 1, "09:00", schedules.EVERY_DAY)] + [
            (2, 2, "09:00", schedules.EVERY_DAY)
        ]
        assert [schedules.from_row(r) for r in schedules.due(db.conn, 6e9)] == kept  # the index is there again
        assert db.conn.execute("SELECT name FROM sqlite_master WHERE name = 'schedules_due'").fetchone()
        schedules.remove(db.conn, "+15550001111", 2)
        added = schedules.add(
            db.conn, "+15550001111", days=frozenset(), clock="", tz="UTC", prompt="x", repo="", next_at=5e9, now=1.0
        )
        assert added is not None and added.id == 3  # not 2, the id of the one just removed
    finally:
        db.close()
    again = store.Database(path)  # a second start finds nothing to do
    again.close()
