"""All relay state in one SQLite file: inbox, conversations, outbox, worker calls.

Functions here are synchronous and take the connection first; `Database.run` executes them.
Every write that matters commits before anyone acts on it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import anyio
import anyio.lowlevel

from relay import credentials, schedules, usage, window
from relay.conversation import Conversation

SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    id INTEGER PRIMARY KEY,
    phone TEXT NOT NULL,
    dedupe_key TEXT NOT NULL UNIQUE,      -- msg:<MessageSid>, evt:<run_id>:<seq>, call:<id>:<status>, expire:, stall:
    event TEXT NOT NULL,                  -- JSON
    received_at REAL NOT NULL,
    handled_at REAL
);
CREATE INDEX IF NOT EXISTS inbox_pending ON inbox (phone, id) WHERE handled_at IS NULL;
CREATE TABLE IF NOT EXISTS conversations (
    phone TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    data TEXT NOT NULL,                   -- JSON of the Conversation
    approval_deadline REAL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    phone TEXT NOT NULL,
    body TEXT NOT NULL,
    media TEXT NOT NULL DEFAULT '[]',     -- JSON list of image names
    buttons TEXT NOT NULL DEFAULT '',     -- quick replies it carries: decide | cancel (relay/buttons.py)
    run_id TEXT NOT NULL DEFAULT '',      -- the run its buttons act on (a tap names the message)
    status TEXT NOT NULL DEFAULT 'pending',  -- pending | sent | failed | held (relay/window.py)
    kind TEXT NOT NULL DEFAULT 'message', -- result | approval | message; '' for a message's later parts
    released_at REAL,                     -- held, then put back in the queue when the owner wrote
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    sent_at REAL,
    twilio_sid TEXT,
    error_code INTEGER,
    error TEXT
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (phone, id) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS outbox_by_sid ON outbox (twilio_sid) WHERE twilio_sid IS NOT NULL;
CREATE TABLE IF NOT EXISTS worker_calls (
    id INTEGER PRIMARY KEY,
    phone TEXT NOT NULL,
    route TEXT NOT NULL,                  -- command | screenshot | approve | reject | cancel | status
    payload TEXT NOT NULL,                -- the command as common/protocol.py encodes it
    mode TEXT NOT NULL DEFAULT 'wake',    -- wake | if_awake | probe (relay/events.py CallWorker)
    status TEXT NOT NULL DEFAULT 'pending',  -- pending | delivered | failed | dropped
    created_at REAL NOT NULL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS worker_calls_pending ON worker_calls (id) WHERE status = 'pending';
CREATE TABLE IF NOT EXISTS machines (      -- each owner's own Machine (WORKER_MODE=per-owner: relay/fleet.py)
    phone TEXT PRIMARY KEY,               -- the owner; their Machine carries it as metadata too
    machine_id TEXT NOT NULL,
    volume_id TEXT NOT NULL,
    region TEXT NOT NULL,
    image TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    worker TEXT PRIMARY KEY,              -- '': the one shared worker; else the owner's number (per-owner)
    awake INTEGER,
    last_seen_at REAL,
    slept_at REAL,
    up_at REAL,                           -- since when it is awake (its hours count from here)
    boot TEXT                             -- the worker process that said `up`
);
"""

P = ParamSpec("P")
T = TypeVar("T")


class Database:
    """One SQLite connection, used by one thread at a time."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        # WAL keeps readers off the writer's back. NORMAL survives any crash of the process and
        # keeps a consistent prefix after a power loss; what arrives from outside (a webhook, a
        # callback) is committed with FULL by `record_durably` before it is acknowledged, and
        # that sync carries every earlier commit with it. Everything else is derived from those
        # rows and is simply derived again if a power loss took it.
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA busy_timeout=5000")
        self.conn.executescript(SCHEMA + usage.SCHEMA + schedules.SCHEMA + credentials.SCHEMA + window.SCHEMA)
        _migrate(self.conn)
        window.backfill(self.conn)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(conn, *args)` right here, on the event loop, then let others run.

        Measured on this project's machines: a NORMAL commit takes ~15 µs and a FULL one
        ~0.3 ms, while handing each to a thread cost more than the work and queued every lane
        behind one thread (29 ms p50 for a webhook's commit under load). Running inline also
        makes each call atomic with respect to the other lanes, with one connection.
        """
        result = fn(self.conn, *args)
        await anyio.lowlevel.checkpoint()
        return result

    def close(self) -> None:
        self.conn.close()


# Columns added after a database was first made (CREATE TABLE IF NOT EXISTS skips them).
ADDED_COLUMNS = (
    ("worker_calls", "mode", "TEXT NOT NULL DEFAULT 'wake'"),
    ("outbox", "buttons", "TEXT NOT NULL DEFAULT ''"),
    ("outbox", "run_id", "TEXT NOT NULL DEFAULT ''"),
    ("worker_state", "up_at", "REAL"),  # (then moved to `workers`: _workers_by_key)
    ("worker_state", "boot", "TEXT"),
    ("outbox", "kind", "TEXT NOT NULL DEFAULT 'message'"),
    ("outbox", "released_at", "REAL"),
    ("awake", "worker", "TEXT NOT NULL DEFAULT ''"),
)


def _migrate(conn: sqlite3.Connection) -> None:
    for table, column, kind in ADDED_COLUMNS:
        columns = {row["name"] for row in conn.execute(f"PRAGMA table_info({table})")}
        if columns and column not in columns:  # (no columns: a table this database never had)
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    _autoincrement_schedules(conn)
    _workers_by_key(conn)


def _workers_by_key(conn: sqlite3.Connection) -> None:
    """The one row of `worker_state`, from before each owner could have their own worker
    (WORKER_MODE=per-owner), becomes the shared worker's row of `workers`."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'worker_state'").fetchone() is None:
        return
    with transaction(conn):
        conn.execute(
            "INSERT OR IGNORE INTO workers (worker, awake, last_seen_at, slept_at, up_at, boot) "
            "SELECT '', awake, last_seen_at, slept_at, up_at, boot FROM worker_state WHERE id = 1"
        )
        conn.execute("DROP TABLE worker_state")


def _autoincrement_schedules(conn: sqlite3.Connection) -> None:
    """A schedules table from before its ids were AUTOINCREMENT (relay/schedules.py says why):
    rebuilt, every row and id kept, in one transaction."""
    row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'schedules'").fetchone()
    if row is None or "AUTOINCREMENT" in row["sql"].upper():
        return
    with transaction(conn):
        conn.execute("ALTER TABLE schedules RENAME TO schedules_before")
        conn.execute(schedules.TABLE)
        conn.execute("INSERT INTO schedules SELECT * FROM schedules_before")
        conn.execute("DROP TABLE schedules_before")  # and its index, made again next
        conn.execute(schedules.INDEX)


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


# --- inbox ------------------------------------------------------------------------------


def insert_inbox(conn: sqlite3.Connection, phone: str, dedupe_key: str, event: dict[str, Any], now: float) -> bool:
    """Record an event once; False when the same key was recorded before (a redelivery)."""
    cur = conn.execute(
        "INSERT OR IGNORE INTO inbox (phone, dedupe_key, event, received_at) VALUES (?, ?, ?, ?)",
        (phone, dedupe_key, json.dumps(event), now),
    )
    return cur.rowcount == 1


def record_durably(
    conn: sqlite3.Connection,
    phone: str,
    dedupe_key: str,
    event: dict[str, Any],
    now: float,
    *,
    worker: str | None = None,
) -> bool:
    """Record an event from outside, synced to disk before the caller acknowledges it; `worker`:
    the worker it came from (which is awake, then)."""
    conn.execute("PRAGMA synchronous=FULL")
    try:
        with transaction(conn):
            if worker is not None:
                worker_seen(conn, worker, now)
            return insert_inbox(conn, phone, dedupe_key, event, now)
    finally:
        conn.execute("PRAGMA synchronous=NORMAL")


def next_inbox(conn: sqlite3.Connection, phone: str) -> tuple[int, dict[str, Any]] | None:
    row = conn.execute(
        "SELECT id, event FROM inbox WHERE phone = ? AND handled_at IS NULL ORDER BY id LIMIT 1", (phone,)
    ).fetchone()
    return (row["id"], json.loads(row["event"])) if row else None


def mark_handled(conn: sqlite3.Connection, inbox_id: int, now: float) -> None:
    conn.execute("UPDATE inbox SET handled_at = ? WHERE id = ?", (now, inbox_id))


def update_inbox_event(conn: sqlite3.Connection, inbox_id: int, event: dict[str, Any]) -> None:
    """An event completed before it is handled (an owner's message, with the files it carries)."""
    conn.execute("UPDATE inbox SET event = ? WHERE id = ?", (json.dumps(event), inbox_id))


# --- conversations ----------------------------------------------------------------------


def load_conversation(conn: sqlite3.Connection, phone: str) -> Conversation:
    row = conn.execute("SELECT data FROM conversations WHERE phone = ?", (phone,)).fetchone()
    return Conversation.from_json(json.loads(row["data"])) if row else Conversation(phone=phone)


def save_conversation(conn: sqlite3.Connection, conv: Conversation, now: float) -> None:
    conn.execute(
        "INSERT INTO conversations (phone, state, data, approval_deadline, updated_at) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (phone) DO UPDATE SET state = excluded.state, data = excluded.data, "
        "approval_deadline = excluded.approval_deadline, updated_at = excluded.updated_at",
        (conv.phone, conv.state, json.dumps(conv.to_json()), conv.approval_deadline, now),
    )


def stalled_runs(conn: sqlite3.Connection, now: float) -> list[tuple[str, float]]:
    """Conversations whose run has been silent past its check time (see conversation._watch)."""
    rows = conn.execute(
        "SELECT phone, json_extract(data, '$.check_at') AS check_at FROM conversations "
        "WHERE state IN ('working', 'applying') AND check_at <= ?",
        (now,),
    ).fetchall()
    return [(r["phone"], r["check_at"]) for r in rows]


def expired_approvals(conn: sqlite3.Connection, now: float) -> list[tuple[str, float]]:
    rows = conn.execute(
        "SELECT phone, approval_deadline FROM conversations WHERE approval_deadline <= ?", (now,)
    ).fetchall()
    return [(r["phone"], r["approval_deadline"]) for r in rows]


# --- outbox -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outbound:
    id: int
    phone: str
    body: str
    media: list[str]
    attempts: int
    created_at: float  # when it was queued: written, or released after a hold (relay/window.py)
    next_attempt_at: float
    buttons: str = ""


def enqueue_send(
    conn: sqlite3.Connection,
    phone: str,
    body: str,
    media: list[str],
    now: float,
    buttons: str = "",
    run: str = "",
    kind: str = "message",
) -> None:
    """`kind`: what the message is, counted by the 24-hour window's template (relay/window.py);
    "" for a message's later parts and its buttons, so each message counts once."""
    conn.execute(
        "INSERT INTO outbox (phone, body, media, created_at, next_attempt_at, buttons, run_id, kind) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (phone, body, json.dumps(media), now, now, buttons, run, kind),
    )


def run_of_buttons(conn: sqlite3.Connection, phone: str, twilio_sid: str) -> str:
    """The run the buttons of the owner's message `twilio_sid` act on; "" for a message the relay
    does not know (never its own, pruned, or sent without a run)."""
    row = conn.execute(
        "SELECT run_id FROM outbox WHERE twilio_sid = ? AND phone = ? AND buttons != ''", (twilio_sid, phone)
    ).fetchone()
    return str(row["run_id"]) if row is not None else ""


def next_outbound(conn: sqlite3.Connection, phone: str) -> Outbound | None:
    row = conn.execute(
        "SELECT * FROM outbox WHERE phone = ? AND status = 'pending' ORDER BY id LIMIT 1", (phone,)
    ).fetchone()
    if row is None:
        return None
    return Outbound(
        id=row["id"],
        phone=row["phone"],
        body=row["body"],
        media=json.loads(row["media"]),
        attempts=row["attempts"],
        created_at=row["released_at"] or row["created_at"],  # a released row is not given up for its age
        next_attempt_at=row["next_attempt_at"],
        buttons=row["buttons"],
    )


def last_sent_at(conn: sqlite3.Connection, phone: str) -> float | None:
    row = conn.execute("SELECT MAX(sent_at) AS t FROM outbox WHERE phone = ? AND status = 'sent'", (phone,)).fetchone()
    return row["t"] if row else None


def mark_sent(conn: sqlite3.Connection, outbound_id: int, sid: str, now: float) -> None:
    conn.execute("UPDATE outbox SET status = 'sent', twilio_sid = ?, sent_at = ? WHERE id = ?", (sid, now, outbound_id))


def mark_retry(conn: sqlite3.Connection, outbound_id: int, next_at: float, error: str) -> None:
    conn.execute(
        "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, error = ? WHERE id = ?",
        (next_at, error, outbound_id),
    )


def mark_failed(conn: sqlite3.Connection, outbound_id: int, code: int | None, error: str, now: float) -> None:
    conn.execute(
        "UPDATE outbox SET status = 'failed', attempts = attempts + 1, error_code = ?, error = ?, sent_at = ? "
        "WHERE id = ?",
        (code, error, now, outbound_id),
    )


def recent_failures(conn: sqlite3.Connection, phone: str, limit: int = 3) -> list[sqlite3.Row]:
    return conn.execute(
        "SELECT error_code, error, sent_at FROM outbox WHERE phone = ? AND status = 'failed' ORDER BY id DESC LIMIT ?",
        (phone, limit),
    ).fetchall()


# --- worker calls -----------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerCall:
    id: int
    phone: str
    route: str
    payload: dict[str, Any]
    mode: str = "wake"


def enqueue_worker_call(
    conn: sqlite3.Connection, phone: str, route: str, payload: dict[str, Any], now: float, mode: str = "wake"
) -> None:
    conn.execute(
        "INSERT INTO worker_calls (phone, route, payload, created_at, mode) VALUES (?, ?, ?, ?, ?)",
        (phone, route, json.dumps(payload), now, mode),
    )


def pending_worker_calls(conn: sqlite3.Connection, phone: str = "") -> list[WorkerCall]:
    """In order; only `phone`'s when given (each owner's own worker), else every owner's."""
    rows = conn.execute(
        "SELECT * FROM worker_calls WHERE status = 'pending' AND (? = '' OR phone = ?) ORDER BY id", (phone, phone)
    ).fetchall()
    return [WorkerCall(r["id"], r["phone"], r["route"], json.loads(r["payload"]), r["mode"]) for r in rows]


def finish_worker_call(conn: sqlite3.Connection, call_id: int, status: str, error: str = "") -> bool:
    """Move a pending call to its final status; False when it was dropped meanwhile."""
    cur = conn.execute(
        "UPDATE worker_calls SET status = ?, error = ? WHERE id = ? AND status = 'pending'", (status, error, call_id)
    )
    return cur.rowcount == 1


def is_pending(conn: sqlite3.Connection, call_id: int) -> bool:
    row = conn.execute("SELECT status FROM worker_calls WHERE id = ?", (call_id,)).fetchone()
    return row is not None and row["status"] == "pending"


def drop_command(conn: sqlite3.Connection, phone: str, message_id: str) -> None:
    conn.execute(
        "UPDATE worker_calls SET status = 'dropped' WHERE phone = ? AND route = 'command' AND status = 'pending' "
        "AND json_extract(payload, '$.message_id') = ?",
        (phone, message_id),
    )


# --- what the relay knows of each worker -------------------------------------------------
# `worker`: '' for the one worker every owner shares, or the owner's number when each owner has
# their own Machine (relay/fleet.py).


def worker_seen(conn: sqlite3.Connection, worker: str, now: float) -> None:
    """Heard from the worker: it is awake, and its hours count from now if it was not before."""
    conn.execute(
        "INSERT INTO workers (worker, awake, last_seen_at, up_at) VALUES (?, 1, ?, ?) "
        "ON CONFLICT (worker) DO UPDATE SET last_seen_at = excluded.last_seen_at, "
        "up_at = CASE WHEN awake = 1 AND up_at IS NOT NULL THEN up_at ELSE excluded.up_at END, awake = 1",
        (worker, now, now),
    )


def worker_announced(conn: sqlite3.Connection, worker: str, boot: str, now: float) -> None:
    """The worker said `up`. A different process than the one awake before means that one ended
    without saying goodnight (killed, out of memory): its hours are counted to when it was last
    heard from."""
    row = worker_state(conn, worker)
    if row is not None and row["awake"] == 1 and row["up_at"] is not None and row["boot"] not in (None, boot):
        seconds = (row["last_seen_at"] or row["up_at"]) - row["up_at"]
        usage.record_awake(conn, worker, row["boot"], seconds, now)
        conn.execute("UPDATE workers SET up_at = NULL WHERE worker = ?", (worker,))
    worker_seen(conn, worker, now)
    conn.execute("UPDATE workers SET boot = ? WHERE worker = ?", (boot, worker))


def worker_slept(
    conn: sqlite3.Connection, worker: str, now: float, awake_s: float | None = None, boot: str = ""
) -> None:
    """The worker is going to sleep; `awake_s` is how long it says it was up (a worker from
    before it said so is counted from its `up`)."""
    row = worker_state(conn, worker)
    if row is not None and row["awake"] == 1:
        since = row["up_at"]
        seconds = awake_s if awake_s else (now - since if since is not None else 0.0)
        if row["slept_at"] is not None:  # it was asleep then: it cannot have been up for longer
            seconds = min(seconds, now - row["slept_at"])
        usage.record_awake(conn, worker, boot or row["boot"] or "", seconds, now)
    conn.execute(
        "INSERT INTO workers (worker, awake, slept_at) VALUES (?, 0, ?) "
        "ON CONFLICT (worker) DO UPDATE SET awake = 0, slept_at = excluded.slept_at, up_at = NULL",
        (worker, now),
    )


def worker_state(conn: sqlite3.Connection, worker: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = conn.execute("SELECT * FROM workers WHERE worker = ?", (worker,)).fetchone()
    return row


def phones_with_work(conn: sqlite3.Connection) -> tuple[list[str], list[str]]:
    """Phones with unhandled inbox events, and phones with unsent messages (for start-up)."""
    inbox = [r[0] for r in conn.execute("SELECT DISTINCT phone FROM inbox WHERE handled_at IS NULL")]
    outbox = [r[0] for r in conn.execute("SELECT DISTINCT phone FROM outbox WHERE status = 'pending'")]
    return inbox, outbox


# --- housekeeping -----------------------------------------------------------------------


def media_owner(conn: sqlite3.Connection, file_id: str) -> str | None:
    """Whose message brought the file `file_id` (relay/media.py), if any still says."""
    rows = conn.execute(
        "SELECT phone, event FROM inbox WHERE event LIKE '%\"attachments\"%' AND instr(event, ?) > 0", (file_id,)
    )
    for row in rows:
        if any(a.get("id") == file_id for a in json.loads(row["event"]).get("attachments", [])):
            return str(row["phone"])
    return None


def media_in_use(conn: sqlite3.Connection) -> set[str]:
    """The ids of the owner's files a prompt still needs: one not yet handled, queued, kept for
    `retry`, or the current run's (handed to the worker, which fetches it before the run)."""
    found: set[str] = set()
    for row in conn.execute("SELECT event FROM inbox WHERE handled_at IS NULL AND event LIKE '%\"attachments\"%'"):
        found.update(a["id"] for a in json.loads(row["event"]).get("attachments", []))
    for row in conn.execute("SELECT data FROM conversations"):  # one row per owner
        data = json.loads(row["data"])
        for job in [data.get("job"), data.get("kept"), *data.get("queue", [])]:
            found.update(a["id"] for a in (job or {}).get("attachments", []))
    return found


# What is finished and older than the retention: handled events, sent or failed messages,
# calls that reached an end, reported failures. Pending work, and messages held for the owner
# to write (relay/window.py), are never touched, whatever their age.
PRUNABLE = (
    "DELETE FROM inbox WHERE id IN (SELECT id FROM inbox WHERE handled_at < ? LIMIT ?)",
    "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE status NOT IN ('pending', 'held') "
    "AND coalesce(sent_at, created_at) < ? LIMIT ?)",
    "DELETE FROM message_status WHERE rowid IN (SELECT rowid FROM message_status WHERE received_at < ? LIMIT ?)",
    "DELETE FROM worker_calls WHERE id IN (SELECT id FROM worker_calls WHERE status != 'pending' "
    "AND created_at < ? LIMIT ?)",
)


def prune(conn: sqlite3.Connection, before: float, limit: int = 2000) -> int:
    """Delete up to `limit` finished rows per table older than `before`; returns how many went.

    Small batches: this runs on the event loop (see `Database.run`), between webhooks.
    """
    with transaction(conn):
        return sum(conn.execute(sql, (before, limit)).rowcount for sql in PRUNABLE)
