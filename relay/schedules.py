"""Scheduled prompts: when each fires next, in the owner's zone, and the table that holds them.

A schedule repeats on some weekdays at a wall-clock time (`every day 09:00`, `every weekday
09:00`, `every monday 09:00`) or fires once (`at 09:00`, `in 10m`). Its next due time is kept in
UTC seconds; the dispatcher's timer fires what is due (relay/dispatcher.py `fire_schedules`):
one inbox event per due time, under a key made of the schedule and that time, in the same
transaction that moves the schedule on. So a due time fires once, whatever crashes around it.

Wall-clock times follow the owner's zone across daylight-saving changes: a time the clock skips
that day (02:30 when it jumps from 02:00 to 03:00) fires an hour later, at 03:30; a time it
passes twice (01:30 when it falls back) fires at the first.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from relay.zones import known

# AUTOINCREMENT: a row's id is never handed out again. Without it SQLite gives the next row the
# highest id plus one, so a one-off that fired (and was deleted) while its prompt still waits in
# the queue would lend its id to the owner's next schedule, which would then be taken for it
# (one prompt per schedule waits at most) and skipped. `store.py` rebuilds an older table.
TABLE = """
CREATE TABLE IF NOT EXISTS schedules (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    phone TEXT NOT NULL,
    number INTEGER NOT NULL,              -- what the owner types: unschedule <number>
    days TEXT NOT NULL DEFAULT '',        -- weekdays it repeats on, Monday 0 ('01234'); '' once
    clock TEXT NOT NULL DEFAULT '',       -- HH:MM in `tz` (every, at); '' for `in`
    tz TEXT NOT NULL,                     -- the owner's zone, an IANA name
    prompt TEXT NOT NULL,
    repo TEXT NOT NULL DEFAULT '',        -- the repository current when it was made
    next_at REAL NOT NULL,                -- its next due time, UTC seconds
    created_at REAL NOT NULL,
    UNIQUE (phone, number)
);
"""
INDEX = "CREATE INDEX IF NOT EXISTS schedules_due ON schedules (next_at);"
SCHEMA = TABLE + INDEX

WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
EVERY_DAY = frozenset(range(7))
WORK_DAYS = frozenset(range(5))
MAX_SCHEDULES = 20  # per owner
MAX_LATE_S = 3600.0  # due while the relay was down: fired at start when less late, else skipped
MAX_DELAY_S = 366 * 86400.0  # `in <N>` at most a year ahead


@dataclass(frozen=True)
class Rule:
    """When a schedule fires: on `days` (Monday 0; empty: once, at the next such time) at
    hour:minute, wall-clock time in the owner's zone."""

    days: frozenset[int]
    hour: int
    minute: int

    @property
    def clock(self) -> str:
        return f"{self.hour:02d}:{self.minute:02d}"


def next_time(rule: Rule, after: float, tz: ZoneInfo) -> float:
    """The first time strictly after `after` (UTC seconds) that `rule` names in zone `tz`."""
    today = datetime.fromtimestamp(after, tz).date()
    days = rule.days or EVERY_DAY
    for offset in range(9):  # a week, and a day each side for zones that skip or repeat one
        day = today + timedelta(days=offset)
        if day.weekday() in days and (at := _wall(day, rule, tz)) > after:
            return at
    raise AssertionError(f"no time for {rule} within nine days")  # unreachable: days is not empty


def _wall(day: date, rule: Rule, tz: ZoneInfo) -> float:
    """`rule`'s time on `day` in UTC seconds. With fold=0 a time the clock skips resolves with
    the offset from before the jump (an hour later on the new clock), and a time the clock
    passes twice resolves to the first pass."""
    return datetime(day.year, day.month, day.day, rule.hour, rule.minute, tzinfo=tz).timestamp()


# --- the table ------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    id: int
    phone: str
    number: int
    days: frozenset[int]
    clock: str
    tz: str
    prompt: str
    repo: str
    next_at: float

    @property
    def repeats(self) -> bool:
        return bool(self.days)

    @property
    def rule(self) -> Rule:
        hour, minute = (int(x) for x in self.clock.split(":"))
        return Rule(self.days, hour, minute)


def from_row(row: sqlite3.Row) -> Schedule:
    return Schedule(
        row["id"],
        row["phone"],
        row["number"],
        frozenset(int(d) for d in row["days"]),
        row["clock"],
        row["tz"],
        row["prompt"],
        row["repo"],
        row["next_at"],
    )


def owned(conn: sqlite3.Connection, phone: str) -> list[Schedule]:
    """The owner's schedules, by number."""
    rows = conn.execute("SELECT * FROM schedules WHERE phone = ? ORDER BY number", (phone,)).fetchall()
    return [from_row(r) for r in rows]


def add(
    conn: sqlite3.Connection,
    phone: str,
    *,
    days: frozenset[int],
    clock: str,
    tz: str,
    prompt: str,
    repo: str,
    next_at: float,
    now: float,
) -> Schedule | None:
    """Record a schedule under the smallest number the owner is not using (so numbers stay
    what `schedules` showed, and stay small); None when the owner has MAX_SCHEDULES."""
    used = {s.number for s in owned(conn, phone)}
    if len(used) >= MAX_SCHEDULES:
        return None
    number = next(n for n in range(1, MAX_SCHEDULES + 2) if n not in used)
    cur = conn.execute(
        "INSERT INTO schedules (phone, number, days, clock, tz, prompt, repo, next_at, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (phone, number, "".join(str(d) for d in sorted(days)), clock, tz, prompt, repo, next_at, now),
    )
    return Schedule(cur.lastrowid or 0, phone, number, days, clock, tz, prompt, repo, next_at)


def remove(conn: sqlite3.Connection, phone: str, number: int | None) -> list[Schedule]:
    """Remove the owner's schedule `number` (None: all of them); returns what went."""
    gone = [s for s in owned(conn, phone) if number is None or s.number == number]
    conn.executemany("DELETE FROM schedules WHERE id = ?", [(s.id,) for s in gone])
    return gone


def rezone(conn: sqlite3.Connection, phone: str, tz: ZoneInfo, now: float) -> None:
    """The owner moved to zone `tz`: repeating schedules keep their wall-clock time in it; a
    one-off keeps the moment it was promised for."""
    for s in owned(conn, phone):
        next_at = next_time(s.rule, now, tz) if s.repeats else s.next_at
        conn.execute("UPDATE schedules SET tz = ?, next_at = ? WHERE id = ?", (str(tz), next_at, s.id))


def due(conn: sqlite3.Connection, now: float) -> list[sqlite3.Row]:
    """The rows due by `now`, as stored (`from_row` reads each: one that cannot be read must not
    keep the others from firing)."""
    rows: list[sqlite3.Row] = conn.execute(
        "SELECT * FROM schedules WHERE next_at <= ? ORDER BY next_at, id", (now,)
    ).fetchall()
    return rows


def move_on(conn: sqlite3.Connection, schedule: Schedule, now: float) -> None:
    """After a due time fired (or was skipped): a repeating schedule's next time, counted from
    now so that a long outage fires once, not once per missed day; a one-off is done."""
    if not schedule.repeats:
        conn.execute("DELETE FROM schedules WHERE id = ?", (schedule.id,))
        return
    next_at = next_time(schedule.rule, max(now, schedule.next_at), known(schedule.tz))
    conn.execute("UPDATE schedules SET next_at = ? WHERE id = ?", (next_at, schedule.id))


# --- words -----------------------------------------------------------------------------


def describe_days(days: frozenset[int]) -> str:
    if not days:
        return "once"
    if days == EVERY_DAY:
        return "every day"
    if days == WORK_DAYS:
        return "every weekday"
    return "every " + ", ".join(WEEKDAYS[d] for d in sorted(days))


def when(at: float, now: float, tz: ZoneInfo) -> str:
    """A due time as the owner reads it: "today 09:00", "tomorrow 09:00", "Wed 26 Nov 09:00"."""
    moment, today = datetime.fromtimestamp(at, tz), datetime.fromtimestamp(now, tz).date()
    if moment.date() == today:
        day = "today"
    elif moment.date() == today + timedelta(days=1):
        day = "tomorrow"
    else:
        day = moment.strftime("%a %d %b").replace(" 0", " ")
    return f"{day} {moment:%H:%M}"


def clock(at: float, tz: ZoneInfo) -> str:
    """A moment's wall-clock time in `tz`, HH:MM."""
    return datetime.fromtimestamp(at, tz).strftime("%H:%M")
