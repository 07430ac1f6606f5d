"""The worker's credentials as it last found them (vm/credentials.py), and telling the owners.

The worker checks Claude's and GitHub's credentials when it wakes and sends what it found
(`Credentials`, common/protocol.py) to `POST /credentials`. The relay keeps the latest finding
per service, so `status` shows their health without waking the worker, and when one is rejected
or expires within a week it tells every owner with a conversation (one worker serves them all,
so all of them depend on it), once: the same finding again (the next day's check, a worker that
repeats a callback) says nothing, and an "ok" in between lets the next trouble be told again.
"""

from __future__ import annotations

import logging
import sqlite3

from common.protocol import Credentials
from relay import replies

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS credentials (
    service TEXT PRIMARY KEY,             -- claude | github
    state TEXT NOT NULL,                  -- ok | expiring | rejected
    credential TEXT NOT NULL,             -- ANTHROPIC_API_KEY, CLAUDE_CODE_OAUTH_TOKEN, login, GITHUB_TOKEN
    expires_at REAL,
    detail TEXT NOT NULL DEFAULT '',
    app TEXT NOT NULL DEFAULT '',         -- the worker's Fly app, for the renewal's command
    checked_at REAL NOT NULL,
    told TEXT NOT NULL DEFAULT ''         -- the trouble the owners were told of; '' since an ok
);
"""


def record(conn: sqlite3.Connection, found: Credentials, now: float) -> list[str]:
    """Keep `found` (unless a later check is already kept) and queue the warning for each owner
    who has not had it; synced before the worker is answered. Returns the owners told."""
    from relay import store  # (store makes this module's table: imported here, not at the top)

    conn.execute("PRAGMA synchronous=FULL")
    try:
        with store.transaction(conn):
            row = conn.execute(
                "SELECT checked_at, told FROM credentials WHERE service = ?", (found.service,)
            ).fetchone()
            if row is not None and row["checked_at"] > found.checked_at:
                return []  # an older check, delivered late
            trouble = _trouble(found)
            told = row["told"] if row is not None else ""
            phones: list[str] = []
            if trouble and trouble != told:
                phones = [r["phone"] for r in conn.execute("SELECT phone FROM conversations ORDER BY phone")]
                text = replies.credentials_warning(found, now)
                for phone in phones:
                    store.enqueue_send(conn, phone, text, [], now)
                if not phones:  # nobody to tell yet: the next finding is told to whoever is there then
                    trouble = told
            conn.execute(
                "INSERT OR REPLACE INTO credentials "
                "(service, state, credential, expires_at, detail, app, checked_at, told) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    found.service,
                    found.state,
                    found.credential,
                    found.expires_at,
                    found.detail,
                    found.app,
                    found.checked_at,
                    trouble,
                ),
            )
            return phones
    finally:
        conn.execute("PRAGMA synchronous=NORMAL")


def _trouble(found: Credentials) -> str:
    """What identifies a warning: the same credential, state and expiry day is told once."""
    if found.state == "ok":
        return ""
    day = int(found.expires_at // 86400) if found.expires_at is not None else -1
    return f"{found.state}:{found.credential}:{day}"


def latest(conn: sqlite3.Connection) -> list[Credentials]:
    rows = conn.execute("SELECT * FROM credentials ORDER BY service").fetchall()
    return [
        Credentials(r["service"], r["state"], r["credential"], r["checked_at"], r["expires_at"], r["detail"], r["app"])
        for r in rows
    ]


def status_lines(conn: sqlite3.Connection, now: float) -> list[str]:
    """The credentials' health for `status`: one line per service the worker checked."""
    found = latest(conn)
    if not found:
        return [replies.CREDENTIALS_UNCHECKED]
    return [replies.credentials_line(f, now) for f in found]
