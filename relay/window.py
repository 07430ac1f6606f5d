"""WhatsApp's 24-hour window: holding what cannot go, one template to reopen it, the release.

WhatsApp lets a business send free-form messages for 24 hours after the user's last message.
Later, Twilio refuses them with error 63016: at once (the REST call fails), or, as it usually
goes on WhatsApp, afterwards (the call answers 201 "queued" and the message's status callback
says `failed`/`undelivered` with ErrorCode 63016). Only an approved template (ContentSid and
ContentVariables) may go then. So the relay:

- records when each owner last wrote (a tapped button is a message too), in SQLite;
- holds every message that Twilio refused with 63016, or that would go out more than
  WHATSAPP_WINDOW_MS after the owner's last message. Holding is a status of the outbox row
  (`held`): the row keeps its id, and so its place in the owner's order. After one refusal
  the rest are held without trying, until the owner writes;
- sends the template TWILIO_TEMPLATE_CONTENT_SID once, with what waits in plain words as its
  one variable ("2 results and 1 approval"); the mark that it went is durable, so a restart
  does not send it again. Without a template, the messages simply wait;
- when the owner writes, puts the held rows back in the queue in the same transaction that
  handles the message, before its answer is written: they go first, in order. A reply that
  only answers the template ("ok", "show me", 👍) is answered as `status`, not run as a prompt.

The functions take the connection first, like relay/store.py's, and touch the outbox table
directly (store.py imports this module's schema, so this module cannot import store).
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass

from common.protocol import DECISIONS, TERMINAL
from relay.twilio import OUTSIDE_WINDOW

SCHEMA = """
CREATE TABLE IF NOT EXISTS owner_window (
    phone TEXT PRIMARY KEY,
    last_inbound_at REAL,                 -- the owner's last message: WhatsApp's 24 hours run from here
    refused_at REAL,                      -- Twilio said 63016 since then: hold without trying
    template TEXT NOT NULL DEFAULT '',    -- '' | sent | failed | unset (none configured when it was due)
    template_sid TEXT,                    -- the template message's SID (its status callback may fail it)
    template_at REAL,
    template_error TEXT NOT NULL DEFAULT '',
    template_attempts INTEGER NOT NULL DEFAULT 0,
    template_next_at REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_held ON outbox (phone, id) WHERE status = 'held';
CREATE TABLE IF NOT EXISTS message_status (
    sid TEXT NOT NULL,                    -- a failure Twilio reported for one of our messages
    status TEXT NOT NULL,                 -- failed | undelivered
    error_code INTEGER,
    received_at REAL NOT NULL,
    PRIMARY KEY (sid, status)             -- callbacks are best effort and repeat: once each
);
"""

HELD = "held"
FAILED_STATUSES = frozenset({"failed", "undelivered"})
TEMPLATE_TRIES = 3  # a template send that fails this often (5xx, timeouts) is given up, and `status` says so
KINDS = ("result", "approval", "message")  # what the template's summary counts
# What an owner writes back to the template ("... waiting for you. Reply to see them."): a reply
# that asks for nothing but what waited. Run as a prompt, "ok" would wake the VM and spend a
# Claude Code run on nothing, or queue behind the very approval it released and run once that is
# decided; so a message that released held ones and is one of these is answered as `status`.
# A short list on purpose: anything else the owner writes is a prompt, as always.
ACKNOWLEDGEMENTS = frozenset(
    {
        *("ok", "okay", "k", "kk", "yes", "y", "yeah", "yep", "sure", "go", "go on", "?"),
        *("show", "show me", "show them", "show it", "see", "let me see", "send", "send them", "send it"),
        *("hi", "hello", "hey", "thanks", "thank you", "ty", "what", "what is it", "what's waiting"),
        *("👍", "👌", "🙏", "👀", "✅"),
    }
)
_NOT_WORDS = re.compile(r"[\s.!?,:;\u200d\ufe0f\U0001f3fb-\U0001f3ff]+")  # spacing, punctuation, emoji tones


@dataclass(frozen=True)
class Released:
    """What waited for the owner when they wrote, and what became of the template."""

    counts: dict[str, int]
    template: str  # '' (not sent yet) | sent | failed | unset
    template_at: float | None
    template_error: str


def kind_of(event_type: object) -> str:
    """What the first message an event writes is, for the template's summary: a run's end or a
    decision's outcome is a result, an approval request an approval, anything else a message."""
    if event_type in TERMINAL or event_type in DECISIONS:
        return "result"
    return "approval" if event_type == "approval_required" else "message"


def is_acknowledgement(text: str) -> bool:
    """Whether `text` only answers the template (ACKNOWLEDGEMENTS), however it is cased,
    spaced or punctuated."""
    words = _NOT_WORDS.sub(" ", text.lower()).strip()
    return (words or text.strip()) in ACKNOWLEDGEMENTS


def backfill(conn: sqlite3.Connection) -> None:
    """Owners who wrote before the relay kept `owner_window`: their last message, from the inbox
    (a no-op once every owner has a row)."""
    conn.execute(
        "INSERT OR IGNORE INTO owner_window (phone, last_inbound_at) "
        "SELECT phone, MAX(received_at) FROM inbox WHERE dedupe_key LIKE 'msg:%' GROUP BY phone"
    )


def owner_wrote(conn: sqlite3.Connection, phone: str, inbox_id: int, now: float) -> Released | None:
    """The owner's message `inbox_id` is being handled: the window is open again from when it
    arrived, held messages go back in the queue (their ids keep them first), and the next hold
    may send the template again. Returns what was released, None when nothing was held."""
    row = conn.execute("SELECT received_at FROM inbox WHERE id = ?", (inbox_id,)).fetchone()
    at = row["received_at"] if row is not None else now
    before = _window(conn, phone)
    counts = held_counts(conn, phone)
    # A released row is old: its age for MAX_SEND_AGE_S counts from here (store.Outbound).
    released = conn.execute(
        "UPDATE outbox SET status = 'pending', released_at = ?, next_attempt_at = ?, attempts = 0 "
        "WHERE phone = ? AND status = 'held'",
        (now, now, phone),
    ).rowcount
    conn.execute(
        "INSERT INTO owner_window (phone, last_inbound_at) VALUES (?, ?) ON CONFLICT (phone) DO UPDATE SET "
        "last_inbound_at = max(coalesce(last_inbound_at, 0), excluded.last_inbound_at), refused_at = NULL, "
        "template = '', template_sid = NULL, template_at = NULL, template_error = '', template_attempts = 0, "
        "template_next_at = 0",
        (phone, at),
    )
    if not released:  # (counts may be empty when something was: a message's later part, its buttons)
        return None
    template = before["template"] if before is not None else ""
    return Released(
        counts,
        template,
        before["template_at"] if before is not None else None,
        before["template_error"] if before is not None else "",
    )


def before_send(conn: sqlite3.Connection, phone: str, now: float, window_s: float) -> tuple[float | None, bool]:
    """What the outbox lane needs before a send, in one read: when the owner last wrote (as
    `last_wrote`), and whether a free-form message would go outside the window (`_closed`)."""
    row = _window(conn, phone)
    return (row["last_inbound_at"] if row is not None else None), _closed(row, now, window_s)


def _closed(row: sqlite3.Row | None, now: float, window_s: float) -> bool:
    """Whether a free-form message would go outside WhatsApp's window: Twilio refused one since
    the owner last wrote, or they wrote longer ago than `window_s`. An owner the relay never
    heard from is given the benefit of the doubt: Twilio's answer decides."""
    if row is None:
        return False
    if row["refused_at"] is not None:
        return True
    return row["last_inbound_at"] is not None and now - row["last_inbound_at"] > window_s


def hold(
    conn: sqlite3.Connection,
    outbound_id: int,
    phone: str,
    now: float,
    reason: str,
    *,
    refused: bool,
    template_configured: bool,
) -> None:
    """Keep a message until the owner writes; `refused`: Twilio said 63016, so hold the rest too."""
    conn.execute(
        "UPDATE outbox SET status = 'held', error = ? WHERE id = ? AND status IN ('pending', 'sent')",
        (reason[:300], outbound_id),
    )
    conn.execute("INSERT OR IGNORE INTO owner_window (phone) VALUES (?)", (phone,))
    if refused:
        conn.execute("UPDATE owner_window SET refused_at = coalesce(refused_at, ?) WHERE phone = ?", (now, phone))
    if not template_configured:
        conn.execute("UPDATE owner_window SET template = 'unset' WHERE phone = ? AND template = ''", (phone,))


def last_wrote(conn: sqlite3.Connection, phone: str) -> float | None:
    """When the owner last wrote, as far as the relay has handled their messages."""
    row = _window(conn, phone)
    return row["last_inbound_at"] if row is not None else None


def wrote_since(conn: sqlite3.Connection, phone: str, wrote: float | None) -> bool:
    """Whether the owner's message was handled since `last_wrote` said `wrote`: a send decided
    (closed window) or refused (63016) meanwhile was about the window before it opened again."""
    last = last_wrote(conn, phone)
    return last is not None and last != wrote


def held_counts(conn: sqlite3.Connection, phone: str) -> dict[str, int]:
    """Held messages by kind. A message split into parts, or followed by its buttons, counts once:
    only its first row has a kind."""
    rows = conn.execute(
        "SELECT kind, COUNT(*) AS n FROM outbox WHERE phone = ? AND status = 'held' AND kind != '' GROUP BY kind",
        (phone,),
    ).fetchall()
    return {r["kind"]: r["n"] for r in rows}


def template_due(conn: sqlite3.Connection, phone: str, now: float) -> float | None:
    """Seconds until the template should go to `phone` (0: now), None when none is owed: it went,
    failed for good, or nothing is held. Called only with a template configured; one that was
    not configured when the messages were held is owed once it is."""
    row = _window(conn, phone)
    if row is None or row["template"] not in ("", "unset"):
        return None
    if conn.execute("SELECT 1 FROM outbox WHERE phone = ? AND status = 'held' LIMIT 1", (phone,)).fetchone() is None:
        return None
    return max(0.0, float(row["template_next_at"]) - now)


def template_owed(conn: sqlite3.Connection) -> list[str]:
    """Owners with held messages and no template yet (for start-up: a crash may have come
    between the hold and the template)."""
    rows = conn.execute(
        "SELECT phone FROM owner_window w WHERE template IN ('', 'unset') "
        "AND EXISTS (SELECT 1 FROM outbox o WHERE o.phone = w.phone AND o.status = 'held')"
    ).fetchall()
    return [r["phone"] for r in rows]


def template_sent(conn: sqlite3.Connection, phone: str, sid: str, now: float) -> None:
    """The template went (Twilio took it): not again until the owner writes. Its status callback
    may already have said it failed (they race the REST answer)."""
    conn.execute(
        "UPDATE owner_window SET template = 'sent', template_sid = ?, template_at = ?, template_error = '' "
        "WHERE phone = ?",
        (sid, now, phone),
    )
    known_status(conn, sid, now, template_configured=True)


def template_failed(
    conn: sqlite3.Connection, phone: str, error: str, now: float, *, retryable: bool, backoff_s: float = 2.0
) -> bool:
    """The template send failed; a passing fault is tried again a few times, anything else is
    recorded for `status` and never looped on. Returns whether it will be tried again."""
    row = _window(conn, phone)
    attempts = (row["template_attempts"] if row is not None else 0) + 1
    again = retryable and attempts < TEMPLATE_TRIES
    if again:
        conn.execute(
            "UPDATE owner_window SET template_attempts = ?, template_next_at = ? WHERE phone = ?",
            (attempts, now + backoff_s * 2 ** (attempts - 1), phone),
        )
    else:
        conn.execute(
            "UPDATE owner_window SET template = 'failed', template_attempts = ?, template_at = ?, "
            "template_error = ? WHERE phone = ?",
            (attempts, now, error[:300], phone),
        )
    return again


def status_reported(
    conn: sqlite3.Connection, sid: str, status: str, error_code: int | None, now: float, *, template_configured: bool
) -> str | None:
    """A message's status callback said it failed. Recorded once (callbacks repeat), then applied
    to the message if the relay already knows its SID; a callback that beat the REST answer is
    applied when the SID is recorded (`known_status`). Returns the phone whose outbox lane has
    work (a held message: the template may be due), else None."""
    cur = conn.execute(
        "INSERT OR IGNORE INTO message_status (sid, status, error_code, received_at) VALUES (?, ?, ?, ?)",
        (sid, status, error_code, now),
    )
    if cur.rowcount != 1:
        return None
    return known_status(conn, sid, now, template_configured=template_configured)


def known_status(conn: sqlite3.Connection, sid: str, now: float, *, template_configured: bool) -> str | None:
    """Apply a failure reported for `sid` to what the relay sent under that SID, if both are known."""
    reported = conn.execute(
        "SELECT error_code FROM message_status WHERE sid = ? ORDER BY received_at LIMIT 1", (sid,)
    ).fetchone()
    if reported is None:
        return None
    code = reported["error_code"]
    sent = conn.execute("SELECT id, phone, sent_at FROM outbox WHERE twilio_sid = ? AND status = 'sent'", (sid,))
    row = sent.fetchone()
    if row is not None:
        return _failed_message(conn, row, code, now, template_configured=template_configured)
    conn.execute(
        "UPDATE owner_window SET template = 'failed', template_error = ? WHERE template_sid = ? AND template = 'sent'",
        (f"error {code}" if code else "failed", sid),
    )
    return None


def _failed_message(
    conn: sqlite3.Connection, row: sqlite3.Row, code: int | None, now: float, *, template_configured: bool
) -> str | None:
    phone: str = row["phone"]
    if code != OUTSIDE_WINDOW:
        # Another failure after Twilio took the message (63003, 63024, ...): `status` shows it.
        conn.execute(
            "UPDATE outbox SET status = 'failed', error_code = ?, error = ? WHERE id = ?",
            (code, "failed after Twilio took it (status callback)", row["id"]),
        )
        return None
    window = _window(conn, phone)
    if window is not None and (window["last_inbound_at"] or 0) > (row["sent_at"] or 0):
        # The owner wrote after it was sent: the window is open again, so it goes again now
        # (after whatever went meanwhile: the one case where order gives way to not losing it).
        conn.execute(
            "UPDATE outbox SET status = 'pending', released_at = ?, next_attempt_at = ?, attempts = 0 WHERE id = ?",
            (now, now, row["id"]),
        )
        return phone
    reason = f"error {OUTSIDE_WINDOW}: outside WhatsApp's 24-hour window (status callback)"
    hold(conn, row["id"], phone, now, reason, refused=True, template_configured=template_configured)
    return phone


def _window(conn: sqlite3.Connection, phone: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = conn.execute("SELECT * FROM owner_window WHERE phone = ?", (phone,)).fetchone()
    return row
