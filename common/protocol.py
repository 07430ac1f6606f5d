"""The one protocol between the relay and the worker, imported by both halves and the fakes.

Five kinds of message, each a JSON object carrying `v` (VERSION):
- a **command** the relay sends (`POST /<route>` on the worker, bearer WORKER_TOKEN);
- the worker's **answer** to it: the HTTP status and the owner's run state as the worker
  knows it, which the relay adopts (the worker is the source of truth for a run);
- a **report** the worker sends about a run (`POST /callback/<phone>` on the relay), spooled
  on the worker until the relay takes it;
- the worker's **presence** (`POST /callback` on the relay): it is up (sent at once on boot and
  on resume, so the relay stops waiting for it) or going to sleep. Never spooled: a stale one
  delivered later would lie.
- the worker's word on a **credential** it depends on (`POST /credentials` on the relay): Claude's
  or GitHub's, accepted, expiring or rejected. Spooled like a report.

Every encoder here makes a message the matching decoder accepts, and a report never grows
past MAX_REPORT_BYTES, which the relay always accepts.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar, Literal, get_args

from common.config import E164, repo_url_problem

# 2: a prompt names its repository, model, run budget and attachments; a run's end carries its
# tokens; `sleeping` says how long the worker was awake. Version 1 messages are still read.
# 3: a prompt may be `unattended` (a schedule fired it: its approval lets the worker sleep).
# 3: the worker's `Credentials` report (`POST /credentials` on the relay): the health of a
#    credential it depends on (Claude's, GitHub's). A relay without the route refuses it (404),
#    and the worker drops it: nothing else depends on it.
VERSION = 3


class ProtocolError(ValueError):
    """A message that is not well formed; a route answers 422 with this text."""


def _check_version(data: dict[str, Any], newer: str = "relay") -> None:
    """`newer`: the half to deploy when the other one speaks a newer version (the half that
    decodes this kind of message)."""
    # Spool files written before the protocol had a number carry none: they are version 1.
    version = data.get("v", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ProtocolError("v must be a positive integer")
    if version > VERSION:
        raise ProtocolError(
            f"protocol version {version} is newer than this side's ({VERSION}); deploy the {newer} first"
        )


def _string(data: dict[str, Any], key: str, limit: int, *, required: bool = False) -> str:
    value = data.get(key, "")
    if not isinstance(value, str):
        raise ProtocolError(f"{key} must be a string")
    _unicode(value, key)
    if required and not value.strip():
        raise ProtocolError(f"{key} must be a non-empty string")
    return value[:limit]


def _unicode(value: str, key: str) -> None:
    """JSON may carry a lone surrogate ("\\ud800"): no text can hold it, so it is refused here
    rather than failing later, when the message is written out again."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(f"{key} is not valid Unicode") from None


def _phone(data: dict[str, Any]) -> str:
    phone = data.get("phone")
    if not isinstance(phone, str) or not E164.fullmatch(phone):
        raise ProtocolError("phone must be an E.164 number like +15551234567")
    return phone


def _message_id(data: dict[str, Any]) -> str:
    message_id = data.get("message_id")
    if not isinstance(message_id, str) or not 0 < len(message_id) <= 100:
        raise ProtocolError("message_id must be a non-empty string of at most 100 characters")
    _unicode(message_id, "message_id")
    return message_id


# --- commands: relay -> worker ----------------------------------------------------------

MAX_PROMPT = 20_000
MAX_ATTACHMENTS = 10
MAX_REPO_URL = 2_000
# A repository's name in REPOS, and in the worker's paths. \Z, not $: "app\n" is no name.
REPO_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}\Z")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\[\]-]{0,99}\Z")  # an alias or a full model id


@dataclass(frozen=True)
class Attachment:
    """A file the owner sent with a prompt, kept by the relay; the worker fetches it from
    `GET /media/{id}` on the relay (bearer WORKER_TOKEN) and checks its size and digest."""

    id: str  # unguessable, [A-Za-z0-9_-]
    content_type: str  # as Twilio said, e.g. image/jpeg, application/pdf
    size: int
    sha256: str  # hex
    name: str = ""  # a file name for documents (images go to Claude as image blocks)


@dataclass(frozen=True)
class RunPrompt:
    """Start a run of the agent on the owner's checkout of `repo` (cloned from `repo_url`;
    both empty: the worker's own REPO_URL, as before version 2)."""

    route: ClassVar[str] = "command"
    phone: str
    text: str
    message_id: str
    new_session: bool = False
    repo: str = ""
    repo_url: str = ""
    model: str = ""  # "" = Claude Code's default
    budget_usd: float | None = None  # the run stops when its cost reaches this (RUN_BUDGET_USD)
    attachments: tuple[Attachment, ...] = ()
    # Fired by a schedule, with nobody watching: the changes it leaves wait for the owner with
    # the worker asleep (docs/ARCHITECTURE.md, "Schedules").
    unattended: bool = False


@dataclass(frozen=True)
class TakeScreenshot:
    """A picture of a page, reported as a notice; touches no run."""

    route: ClassVar[str] = "screenshot"
    phone: str
    url: str
    message_id: str


OwnerRoute = Literal["approve", "reject", "cancel", "status"]
OWNER_ROUTES: tuple[str, ...] = get_args(OwnerRoute)


@dataclass(frozen=True)
class OwnerCall:
    """approve, reject, cancel, or status (where do things stand?), for one owner."""

    route: OwnerRoute
    phone: str


Command = RunPrompt | TakeScreenshot | OwnerCall
ROUTES: tuple[str, ...] = ("command", "screenshot", *OWNER_ROUTES)


def encode_command(command: Command) -> dict[str, Any]:
    data: dict[str, Any] = {"v": VERSION, "phone": command.phone}
    if isinstance(command, RunPrompt):
        data.update(text=command.text, message_id=command.message_id)
        if command.new_session:
            data["new_session"] = True
        if command.repo:
            data.update(repo=command.repo, repo_url=command.repo_url)
        if command.model:
            data["model"] = command.model
        if command.budget_usd is not None:
            data["budget_usd"] = command.budget_usd
        if command.attachments:
            data["attachments"] = [asdict(a) for a in command.attachments]
        if command.unattended:
            data["unattended"] = True
    elif isinstance(command, TakeScreenshot):
        data.update(url=command.url, message_id=command.message_id)
    return data


def decode_command(route: str, data: Any) -> Command:
    if not isinstance(data, dict):
        raise ProtocolError("body must be a JSON object")
    _check_version(data, newer="worker")
    phone = _phone(data)
    if route == "command":
        return _decode_prompt(phone, data)
    if route == "screenshot":
        return TakeScreenshot(phone, _string(data, "url", 2_000, required=True), _message_id(data))
    if route in OWNER_ROUTES:
        return OwnerCall(route, phone)  # type: ignore[arg-type]
    raise ProtocolError(f"unknown route {route!r}")


def _decode_prompt(phone: str, data: dict[str, Any]) -> RunPrompt:
    text = _string(data, "text", MAX_PROMPT)
    attachments = _attachments(data)
    if not text.strip() and not attachments:
        raise ProtocolError("text must be a non-empty string (or the prompt must carry attachments)")
    # Read past their limits, so that an over-long one is refused rather than cut to another.
    repo, repo_url = _string(data, "repo", 100), _string(data, "repo_url", MAX_REPO_URL + 1)
    if repo and not REPO_NAME.match(repo):
        raise ProtocolError("repo must be a name like my-app (a-z, 0-9, _ and -)")
    if bool(repo) != bool(repo_url):
        raise ProtocolError("repo and repo_url go together")
    if len(repo_url) > MAX_REPO_URL:
        raise ProtocolError(f"repo_url is too long (at most {MAX_REPO_URL} characters)")
    if repo_url and (problem := repo_url_problem(repo_url)):
        raise ProtocolError(f"repo_url {problem}")
    model = _string(data, "model", 100)
    if model and not MODEL_NAME.match(model):
        raise ProtocolError("model must be an alias (opus, sonnet, haiku) or a model id")
    budget = _number(data, "budget_usd") if "budget_usd" in data else None
    if budget is not None and budget <= 0:
        raise ProtocolError("budget_usd must be positive")
    return RunPrompt(
        phone,
        text,
        _message_id(data),
        new_session=data.get("new_session") is True,
        repo=repo,
        repo_url=repo_url,
        model=model,
        budget_usd=budget,
        attachments=attachments,
        unattended=data.get("unattended") is True,
    )


ATTACHMENT_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


def _attachments(data: dict[str, Any]) -> tuple[Attachment, ...]:
    try:
        items = _list(data, "attachments")
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
    if len(items) > MAX_ATTACHMENTS:
        raise ProtocolError(f"at most {MAX_ATTACHMENTS} attachments")
    found = []
    for item in items:
        if not isinstance(item, dict):
            raise ProtocolError("an attachment must be an object")
        try:
            attachment = Attachment(
                id=_string(item, "id", 64),
                content_type=_string(item, "content_type", 100).lower(),
                size=_integer(item, "size"),
                sha256=_string(item, "sha256", 64).lower(),
                name=_string(item, "name", 200),
            )
        except ValueError as exc:
            raise ProtocolError(f"malformed attachment: {exc}") from None
        if not ATTACHMENT_ID.match(attachment.id) or not re.fullmatch(r"[0-9a-f]{64}", attachment.sha256):
            raise ProtocolError("an attachment needs an id like <random> and a sha256 in hex")
        if not re.fullmatch(r"[a-z0-9.+-]+/[a-z0-9.+-]+", attachment.content_type):
            raise ProtocolError("an attachment's content_type must be a media type like image/png")
        found.append(attachment)
    return tuple(found)


def message_id_of(command: Command) -> str:
    return "" if isinstance(command, OwnerCall) else command.message_id


# --- answers: the worker's reply to a command -------------------------------------------

RunState = Literal["idle", "running", "cancelling", "awaiting_approval", "pushing", "rolling_back"]
RUN_STATES: tuple[str, ...] = get_args(RunState)


@dataclass(frozen=True)
class Answer:
    """Where the owner's run stands on the worker after the command, whatever its status.

    `run_id` names the run the state belongs to ("" when idle); `prompt` is that run's prompt
    (cut short), so a relay that lost track can say what runs or waits.
    """

    state: RunState
    run_id: str = ""
    prompt: str = ""
    detail: str = ""
    # The `seq` of the last report the worker had spooled for the owner when it answered: an
    # answer older than a report the relay already handled is stale, whatever order they came in.
    seq: int = 0
    # How many of the owner's reports the worker still holds unsent: while any is on its way, an
    # "idle" answer means the run ended and its news is coming, not that the run was lost.
    pending: int = 0


def encode_answer(answer: Answer) -> dict[str, Any]:
    data = {
        "v": VERSION,
        "state": answer.state,
        "run_id": answer.run_id,
        "prompt": answer.prompt[:200],
        "seq": answer.seq,
        "pending": answer.pending,
    }
    if answer.detail:
        data["detail"] = answer.detail
    return data


def decode_answer(data: Any) -> Answer | None:
    """The answer in a response body; None when the body is not one (a proxy's 503, an old worker)."""
    if not isinstance(data, dict) or data.get("state") not in RUN_STATES:
        return None
    try:
        _check_version(data)
        return Answer(
            data["state"],
            _string(data, "run_id", 100),
            _string(data, "prompt", 200),
            _string(data, "detail", 300),
            _integer(data, "seq"),
            _integer(data, "pending"),
        )
    except (ProtocolError, ValueError, OverflowError):
        return None


# --- reports: worker -> relay -----------------------------------------------------------

TERMINAL = frozenset({"answer", "cancelled", "error"})  # the run's end, as the worker saw it
DECISIONS = frozenset({"pr_opened", "rolled_back", "approve_failed", "reject_failed"})
# "sleeping" as a report (to one owner's route) is how workers before presence said goodnight.
REPORT_TYPES = TERMINAL | DECISIONS | {"progress", "approval_required", "notice", "sleeping"}
IMAGE_NAME = re.compile(r"^[A-Za-z0-9_-]{16,64}\.png$")
MAX_IMAGE_BYTES = 5 * 1024 * 1024  # WhatsApp's own limit for an image: the worker makes none bigger

MAX_TEXT = 20_000
MAX_DIFF = 50_000
MAX_FILES = 100  # of an approval's files, the ones reported; `files_count` counts them all
MAX_PATHS = 50  # of `uncovered` and `left_out`
MAX_PATH = 300
MAX_REPORT_BYTES = 200 * 1024  # what `encode_report` never exceeds; the relay takes 256 KiB


@dataclass(frozen=True)
class Report:
    """A fact the worker reports about a run; the relay decides the wording on the phone."""

    type: str
    run_id: str
    text: str = ""
    changes: bool = False
    cost_usd: float | None = None
    duration_ms: int | None = None
    url: str = ""
    files: tuple[tuple[str, int, int, bool], ...] = ()  # path, added, removed, binary (content not shown)
    diff: str = ""
    images: tuple[str, ...] = ()
    files_count: int = 0  # approval_required: how many files changed (`files` may list fewer)
    uncovered: tuple[str, ...] = ()  # approval_required: ignored paths reject cannot bring back
    left_out: tuple[str, ...] = ()  # pr_opened: paths written after the diff, not committed
    left_out_count: int = 0
    input_tokens: int = 0  # answer, cancelled, error: what the run used, from the SDK's result
    output_tokens: int = 0
    stop: str = ""  # answer, cancelled, error: "budget" when the run stopped at its budget_usd
    seq: int = field(default=0, compare=False)  # unique per report; the relay dedupes on run_id + seq


def encode_report(report: Report) -> dict[str, Any]:
    """A report as JSON, cut to the protocol's limits so the relay always accepts it."""
    report = _clip(report)
    data = _report_dict(report)
    # Each limit alone keeps a report small, but characters outside ASCII may take four bytes
    # each: if the whole is still too big, the diff excerpt goes first, then the text.
    for key in ("diff", "text"):
        over = len(report_bytes(data)) - MAX_REPORT_BYTES
        if over > 0 and key in data:
            data[key] = data[key][: max(0, len(data[key]) - over)]
    # Escapes can swell even the path lists (a control character takes six bytes): drop names
    # from their ends until it fits; the counts still say how many there were.
    for key in ("left_out", "uncovered", "files"):
        while data[key] and len(report_bytes(data)) > MAX_REPORT_BYTES:
            data[key] = data[key][: len(data[key]) // 2]
    return data


def report_bytes(data: dict[str, Any]) -> bytes:
    """The body a report travels as (and the size the relay counts)."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def _clip(report: Report) -> Report:
    return replace(
        report,
        text=report.text[:MAX_TEXT],
        diff=report.diff[:MAX_DIFF],
        url=report.url[:2_000],
        files=tuple((p[:MAX_PATH], a, r, b) for p, a, r, b in report.files[:MAX_FILES]),
        files_count=max(report.files_count, len(report.files)),
        uncovered=tuple(p[:MAX_PATH] for p in report.uncovered[:MAX_PATHS]),
        left_out=tuple(p[:MAX_PATH] for p in report.left_out[:MAX_PATHS]),
        left_out_count=max(report.left_out_count, len(report.left_out)),
    )


def _report_dict(report: Report) -> dict[str, Any]:
    data: dict[str, Any] = {"v": VERSION}
    for f in fields(report):
        value = getattr(report, f.name)
        if value in ("", (), None, 0) and f.name not in ("type", "run_id", "seq", "changes"):
            continue
        data[f.name] = value
    data["files"] = [{"path": p, "added": a, "removed": r, "binary": b} for p, a, r, b in report.files]
    data["images"], data["uncovered"], data["left_out"] = (
        list(report.images),
        list(report.uncovered),
        list(report.left_out),
    )
    return data


def decode_report(data: Any) -> Report:
    """Validate a report; anything malformed raises ProtocolError (the relay answers 422)."""
    if not isinstance(data, dict):
        raise ProtocolError("body must be a JSON object")
    _check_version(data)
    kind = data.get("type")
    if kind not in REPORT_TYPES:
        raise ProtocolError(f"unknown report type {kind!r}")
    run_id, seq = data.get("run_id"), data.get("seq")
    if not isinstance(run_id, str) or not 0 < len(run_id) <= 100:
        raise ProtocolError("run_id must be a non-empty string")
    _unicode(run_id, "run_id")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ProtocolError("seq must be a non-negative integer")
    try:
        report = Report(
            type=kind,
            run_id=run_id,
            seq=seq,
            text=_string(data, "text", MAX_TEXT),
            changes=data.get("changes", False) is True,
            cost_usd=_number(data, "cost_usd"),
            duration_ms=None if data.get("duration_ms") is None else _integer(data, "duration_ms"),
            url=_string(data, "url", 2_000),
            files=tuple(
                (_path(f["path"]), _integer(f, "added"), _integer(f, "removed"), f.get("binary") is True)
                for f in _list(data, "files")[:MAX_FILES]
            ),
            diff=_string(data, "diff", MAX_DIFF),
            images=tuple(_list(data, "images")),
            files_count=_integer(data, "files_count"),
            uncovered=tuple(_path(p) for p in _list(data, "uncovered")[:MAX_PATHS]),
            left_out=tuple(_path(p) for p in _list(data, "left_out")[:MAX_PATHS]),
            left_out_count=_integer(data, "left_out_count"),
            input_tokens=_integer(data, "input_tokens"),
            output_tokens=_integer(data, "output_tokens"),
            stop=_string(data, "stop", 20),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed field: {exc}") from None
    if not all(isinstance(name, str) and IMAGE_NAME.match(name) for name in report.images):
        raise ProtocolError("images must be names like <random>.png")
    return report


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key) or []
    if not isinstance(value, list):
        raise ValueError(f"{key} must be a list")
    return value


def _path(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("a path must be a string")
    _unicode(value, "a path")
    return value[:MAX_PATH]


def _integer(data: dict[str, Any], key: str) -> int:
    value = data.get(key) or 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be a non-negative integer")
    return value


def _number(data: dict[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number")
    return float(value)


# --- presence -------------------------------------------------------------------------

PresenceState = Literal["up", "sleeping"]
MAX_AWAKE_MS = 366 * 86_400_000
PRESENCE_STATES: tuple[PresenceState, ...] = get_args(PresenceState)


@dataclass(frozen=True)
class Presence:
    """The worker itself, not a run: `up` (ready to serve now) or `sleeping` (about to stop or
    suspend). `boot` names the process, so the relay can tell a restart from a resume."""

    state: PresenceState
    boot: str
    awake_ms: int = 0  # sleeping: how long the worker was up since it booted or resumed
    owner: str = ""  # the one owner this worker serves (WORKER_MODE=per-owner); "": every owner

    def __post_init__(self) -> None:
        if self.state not in PRESENCE_STATES:
            raise ProtocolError(f"state must be one of {', '.join(PRESENCE_STATES)}")


def encode_presence(presence: Presence) -> dict[str, Any]:
    data: dict[str, Any] = {"v": VERSION, "state": presence.state, "boot": presence.boot}
    if presence.awake_ms:
        data["awake_ms"] = presence.awake_ms
    if presence.owner:
        data["owner"] = presence.owner
    return data


def decode_presence(data: Any) -> Presence:
    if not isinstance(data, dict):
        raise ProtocolError("body must be a JSON object")
    _check_version(data)
    state = data.get("state")
    if state not in PRESENCE_STATES:
        raise ProtocolError(f"state must be one of {', '.join(PRESENCE_STATES)}")
    try:
        awake_ms = _integer(data, "awake_ms")
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
    if awake_ms > MAX_AWAKE_MS:  # no float holds some integers JSON may carry
        raise ProtocolError(f"awake_ms must be at most {MAX_AWAKE_MS} (a year)")
    owner = data.get("owner", "")
    if owner != "" and not (isinstance(owner, str) and E164.fullmatch(owner)):
        raise ProtocolError("owner must be an E.164 number")
    return Presence(state, _string(data, "boot", 100), awake_ms, owner)


# --- credentials ----------------------------------------------------------------------

CredentialService = Literal["claude", "github"]
CredentialState = Literal["ok", "expiring", "rejected"]
CREDENTIAL_SERVICES: tuple[str, ...] = get_args(CredentialService)
CREDENTIAL_STATES: tuple[str, ...] = get_args(CredentialState)
# Which secret it is, so the relay can say how to renew it: a variable of the worker's, or
# `login` (Claude Code's own sign-in, kept in CLAUDE_CONFIG_DIR/.credentials.json).
CREDENTIAL_NAMES = ("ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN", "login", "GITHUB_TOKEN")
APP_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")  # a Fly app's name


@dataclass(frozen=True)
class Credentials:
    """What the worker found about one credential it depends on (vm/credentials.py): never the
    secret itself, only which one it is, whether the service takes it, and when it expires."""

    service: CredentialService
    state: CredentialState
    credential: str  # one of CREDENTIAL_NAMES
    checked_at: float  # seconds since the epoch
    expires_at: float | None = None  # seconds since the epoch, where known
    detail: str = ""  # what the service said ("HTTP 401"), short and free of secrets
    app: str = ""  # the worker's Fly app (FLY_APP_NAME), for the `fly secrets set` line


def encode_credentials(found: Credentials) -> dict[str, Any]:
    data: dict[str, Any] = {"v": VERSION, **asdict(found)}
    data["detail"] = found.detail[:200]
    return data


def decode_credentials(data: Any) -> Credentials:
    if not isinstance(data, dict):
        raise ProtocolError("body must be a JSON object")
    _check_version(data)
    service, state, credential = data.get("service"), data.get("state"), data.get("credential")
    if service not in CREDENTIAL_SERVICES:
        raise ProtocolError(f"service must be one of {', '.join(CREDENTIAL_SERVICES)}")
    if state not in CREDENTIAL_STATES:
        raise ProtocolError(f"state must be one of {', '.join(CREDENTIAL_STATES)}")
    if credential not in CREDENTIAL_NAMES:
        raise ProtocolError(f"credential must be one of {', '.join(CREDENTIAL_NAMES)}")
    try:
        checked_at = _number(data, "checked_at")
        expires_at = _number(data, "expires_at")
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
    for name, value in (("checked_at", checked_at), ("expires_at", expires_at)):
        # Between 2000 and 2200: anything else is no date a credential has (and no float trouble).
        if value is not None and not 946_684_800 <= value <= 7_258_118_400:
            raise ProtocolError(f"{name} must be a date (seconds since the epoch)")
    if checked_at is None:
        raise ProtocolError("checked_at is required")
    app = _string(data, "app", 63)
    if app and not APP_NAME.match(app):
        raise ProtocolError("app must be a Fly app's name")
    return Credentials(
        service,
        state,
        credential,
        checked_at,
        expires_at,
        _string(data, "detail", 200),
        app,
    )
