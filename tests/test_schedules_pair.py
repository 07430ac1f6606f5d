"""Schedules in the pair as deployed (`python -m relay`, `python -m vm`, the real Claude Code CLI
against the scripted model): a schedule fires once per due time, never early, also when the
relay is down as it comes due, and one missed by more than an hour is skipped with a message."""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path

import pytest

from fakes.anthropic import Text
from tests.support.pair_harness import Pair, pair_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.anyio
STEP = 60.0


def relay_db(pair: Pair, sql: str, *args: object) -> list[tuple[object, ...]]:
    with sqlite3.connect(pair.relay_env["RELAY_DB"]) as conn:
        return conn.execute(sql, args).fetchall()


def asked(pair: Pair, fragment: str) -> int:
    """How many of the model's requests carried `fragment` in their newest user turn: one per run."""
    return sum(1 for texts in pair.model.prompts_seen() if texts and fragment in texts[-1])


async def test_in_3s_runs_once_and_only_once_also_across_a_relay_restart(tmp_path: Path) -> None:
    async with pair_stack(tmp_path) as pair:
        pair.model.script("say hello", Text("hello from a schedule"))
        pair.model.script("say again", Text("again from a schedule"))
        await pair.start_relay()
        await pair.start_worker()

        written = time.time()
        await pair.text("in 3s say hello")
        await wait_for(lambda: pair.said("Scheduled *1*"), STEP, "the schedule confirmed")
        await wait_for(lambda: pair.said("⏰ say hello"), STEP, "the schedule fired")
        fired = time.time()
        assert written + 3 <= fired <= written + 3 + 5, "within a few seconds of its time, never early"
        await wait_for(lambda: pair.said("hello from a schedule"), STEP, "the scheduled run's answer")

        # Due while the relay is down: it fires once when the relay comes back.
        await pair.text("in 3s say again")
        await wait_for(lambda: len(pair.said("Scheduled *1*")) == 2, STEP, "the second schedule confirmed")
        due = time.time() + 3
        await pair.kill("relay")
        await wait_for(lambda: time.time() > due + 1, 10, "its time to pass with the relay down")
        await pair.start_relay()
        await wait_for(lambda: pair.said("again from a schedule"), STEP, "the late schedule's answer")

        # And a restart after it fired fires nothing again.
        await pair.kill("relay", signal.SIGTERM)
        await pair.start_relay()
        await pair.text("schedules")
        await wait_for(lambda: pair.said("No schedules"), STEP, "the list, empty")
        assert relay_db(pair, "SELECT COUNT(*) FROM inbox WHERE dedupe_key LIKE 'schedule:%'") == [(2,)]
        for fragment in ("⏰ say hello", "hello from a schedule", "⏰ say again", "again from a schedule"):
            assert len(pair.said(fragment)) == 1, fragment
        assert asked(pair, "say hello") == 1 and asked(pair, "say again") == 1


async def test_a_schedule_missed_by_more_than_an_hour_is_skipped_with_a_message(tmp_path: Path) -> None:
    async with pair_stack(tmp_path) as pair:
        await pair.start_relay()
        await pair.text("every day 09:00 daily check")
        await pair.text("in 1h one-off check")
        await wait_for(lambda: pair.said("Scheduled *2*"), STEP, "both confirmed")
        await pair.kill("relay")
        # The relay was down for two hours past both due times.
        relay_db(pair, "UPDATE schedules SET next_at = ?", time.time() - 7200)
        await pair.start_relay()
        skipped = await wait_for(lambda: pair.said("⏰ Skipped schedule"), STEP, "both skipped")
        await wait_for(lambda: len(pair.said("⏰ Skipped schedule")) == 2, STEP, "both skipped")
        assert "more than an hour ago (the relay was not running then)" in skipped[0]
        await pair.text("schedules")
        listing = (await wait_for(lambda: pair.said("Your schedules"), STEP, "the list"))[0]
        assert "1. 09:00 every day: “daily check”" in listing and "one-off" not in listing
        [(next_at,)] = relay_db(pair, "SELECT next_at FROM schedules")
        assert time.time() < float(str(next_at)) <= time.time() + 86400  # moved on to its next 09:00
        assert not pair.said("Waking up") and not pair.model.requests  # nothing ran
