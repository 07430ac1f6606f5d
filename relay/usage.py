"""What the owners' runs and the worker's waking hours cost, and each owner's monthly ceiling.

Runs are recorded from the worker's report of each run's end (cost, tokens, duration, once per
run); the worker's hours from its presence (`sleeping` says how long it was up, and a worker
that never said so is counted from its `up` to the last time it was heard from). Days and
months are the owner's, in their time zone (OWNER_TZ, or `tz <zone>`).

One worker serves every owner (WORKER_MODE=shared): its hours are the machine's, shown to each
owner whole and counted whole against each owner's budget. A ceiling errs on the side of the
bill; with one owner, the usual case, it is the bill. With a Machine per owner
(WORKER_MODE=per-owner), each owner's hours are their own Machine's.
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass, replace
from datetime import datetime
from zoneinfo import ZoneInfo

from common.protocol import Report
from relay.zones import UTC

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,              -- a run's end is counted once, however often it is reported
    phone TEXT NOT NULL,
    repo TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    outcome TEXT NOT NULL,                -- answer | cancelled | error
    cost_usd REAL NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    duration_ms INTEGER NOT NULL DEFAULT 0,
    ended_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_owner ON runs (phone, ended_at);
CREATE TABLE IF NOT EXISTS awake (
    id INTEGER PRIMARY KEY,
    worker TEXT NOT NULL DEFAULT '',      -- '': the shared worker; else the owner's own Machine
    boot TEXT NOT NULL,
    seconds REAL NOT NULL,
    ended_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS awake_by_time ON awake (ended_at);
CREATE TABLE IF NOT EXISTS budgets (
    phone TEXT NOT NULL,
    month TEXT NOT NULL,                  -- YYYY-MM, in the owner's zone
    amount_usd REAL,                      -- the owner's `budget <amount>`; NULL: MONTHLY_BUDGET_USD
    warned INTEGER NOT NULL DEFAULT 0,    -- the highest threshold told: 0, 80 or 100 (percent)
    PRIMARY KEY (phone, month)
);
"""
WARN_AT = 0.8


@dataclass(frozen=True)
class Budget:
    """An owner's month against their ceiling."""

    limit_usd: float
    spent_usd: float

    @property
    def share(self) -> float:
        return self.spent_usd / self.limit_usd if self.limit_usd else 0.0


@dataclass(frozen=True)
class Period:
    """What one owner's runs and the worker's hours came to, over a day or a month."""

    runs: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    model_usd: float = 0.0
    awake_hours: float = 0.0
    vm_usd: float = 0.0

    @property
    def total_usd(self) -> float:
        return self.model_usd + self.vm_usd


def month_of(now: float, tz: ZoneInfo = UTC) -> str:
    return datetime.fromtimestamp(now, tz).strftime("%Y-%m")


def _day_start(now: float, tz: ZoneInfo) -> float:
    return datetime.fromtimestamp(now, tz).replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def _month_start(now: float, tz: ZoneInfo) -> float:
    return datetime.fromtimestamp(now, tz).replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()


# --- recording ----------------------------------------------------------------------------

# What one run's end may count for. The worker takes these from Claude Code's result; a number
# past them is a fault (NaN, infinity, an integer SQLite cannot hold), and counting it would
# fail the owner's event or spend their month for good, with no budget high enough to go on.
MAX_RUN_USD = 1_000_000.0
MAX_COUNT = 10**12  # tokens, milliseconds


def sane(report: Report) -> Report:
    """The report with its cost, tokens and duration within what a run can have: a cost that is
    not a number is unknown, and the rest are cut to their limits."""
    cost = report.cost_usd
    if cost is not None:
        cost = min(max(cost, 0.0), MAX_RUN_USD) if math.isfinite(cost) else None
    duration = None if report.duration_ms is None else min(report.duration_ms, MAX_COUNT)
    return replace(
        report,
        cost_usd=cost,
        duration_ms=duration,
        input_tokens=min(report.input_tokens, MAX_COUNT),
        output_tokens=min(report.output_tokens, MAX_COUNT),
    )


def record_run(conn: sqlite3.Connection, phone: str, report: Report, repo: str, model: str, now: float) -> bool:
    """A run's end, once per run; False when it was counted before."""
    report = sane(report)
    cur = conn.execute(
        "INSERT OR IGNORE INTO runs (run_id, phone, repo, model, outcome, cost_usd, input_tokens, output_tokens, "
        "duration_ms, ended_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            report.run_id,
            phone,
            repo,
            model,
            report.type,
            max(report.cost_usd or 0.0, 0.0),
            report.input_tokens,
            report.output_tokens,
            report.duration_ms or 0,
            now,
        ),
    )
    return cur.rowcount == 1


def record_awake(conn: sqlite3.Connection, worker: str, boot: str, seconds: float, now: float) -> None:
    if seconds > 0:
        conn.execute(
            "INSERT INTO awake (worker, boot, seconds, ended_at) VALUES (?, ?, ?, ?)", (worker, boot, seconds, now)
        )


# --- reading ------------------------------------------------------------------------------


def period(
    conn: sqlite3.Connection, phone: str, since: float, now: float, awake_since: float | None, hourly_usd: float
) -> Period:
    """`awake_since`: when the worker, awake now, last said it was up (its hours so far count)."""
    row = conn.execute(
        "SELECT COUNT(*) AS n, COALESCE(SUM(cost_usd), 0) AS usd, COALESCE(SUM(input_tokens), 0) AS tin, "
        "COALESCE(SUM(output_tokens), 0) AS tout FROM runs WHERE phone = ? AND ended_at >= ?",
        (phone, since),
    ).fetchone()
    # The shared worker's hours are every owner's; an owner's own Machine's are theirs alone.
    seconds = conn.execute(
        "SELECT COALESCE(SUM(seconds), 0) FROM awake WHERE ended_at >= ? AND worker IN ('', ?)", (since, phone)
    ).fetchone()[0]
    if awake_since is not None:
        seconds += max(0.0, now - max(awake_since, since))
    hours = seconds / 3600
    return Period(row["n"], row["tin"], row["tout"], row["usd"], hours, hours * hourly_usd)


def this_month(
    conn: sqlite3.Connection,
    phone: str,
    now: float,
    awake_since: float | None,
    hourly_usd: float,
    tz: ZoneInfo = UTC,
) -> Period:
    return period(conn, phone, _month_start(now, tz), now, awake_since, hourly_usd)


def today_and_month(
    conn: sqlite3.Connection,
    phone: str,
    now: float,
    awake_since: float | None,
    hourly_usd: float,
    tz: ZoneInfo = UTC,
) -> tuple[Period, Period]:
    today = period(conn, phone, _day_start(now, tz), now, awake_since, hourly_usd)
    return today, this_month(conn, phone, now, awake_since, hourly_usd, tz)


def limit_for(
    conn: sqlite3.Connection, phone: str, now: float, default: float | None, tz: ZoneInfo = UTC
) -> float | None:
    """This month's ceiling: the owner's `budget <amount>`, else MONTHLY_BUDGET_USD."""
    row = conn.execute(
        "SELECT amount_usd FROM budgets WHERE phone = ? AND month = ?", (phone, month_of(now, tz))
    ).fetchone()
    return row["amount_usd"] if row is not None and row["amount_usd"] is not None else default


def set_limit(conn: sqlite3.Connection, phone: str, amount_usd: float, now: float, tz: ZoneInfo = UTC) -> None:
    """The owner's ceiling for this month; the warnings start over against it."""
    conn.execute(
        "INSERT INTO budgets (phone, month, amount_usd, warned) VALUES (?, ?, ?, 0) "
        "ON CONFLICT (phone, month) DO UPDATE SET amount_usd = excluded.amount_usd, warned = 0",
        (phone, month_of(now, tz), amount_usd),
    )


def threshold_to_tell(conn: sqlite3.Connection, phone: str, budget: Budget, now: float, tz: ZoneInfo = UTC) -> int:
    """80 or 100 when the month's spend just passed that share of the ceiling (each told once a
    month, and again after the owner sets a new budget); 0 when there is nothing new to say."""
    reached = 100 if budget.share >= 1 else 80 if budget.share >= WARN_AT else 0
    month = month_of(now, tz)
    row = conn.execute("SELECT warned FROM budgets WHERE phone = ? AND month = ?", (phone, month)).fetchone()
    told = row["warned"] if row is not None else 0
    if reached <= told:
        return 0
    conn.execute(
        "INSERT INTO budgets (phone, month, warned) VALUES (?, ?, ?) "
        "ON CONFLICT (phone, month) DO UPDATE SET warned = excluded.warned",
        (phone, month, reached),
    )
    return reached
