"""The worker's run lifecycle for one owner, as a transition table, persisted as JSON.

The owner's state file lives under WORKSPACE_DIR (on the volume), and is written before any
event about it is reported: a worker that restarts still knows what waits for approval.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.files import set_aside, write_durably
from common.protocol import REPO_NAME, RunState

TRANSITIONS: dict[str, dict[str, str]] = {
    "idle": {"start": "running"},
    "running": {"cancel": "cancelling", "finished": "idle", "finished_with_changes": "awaiting_approval"},
    "cancelling": {"cancel": "cancelling", "finished": "idle", "finished_with_changes": "awaiting_approval"},
    "awaiting_approval": {"approve": "pushing", "reject": "rolling_back"},
    "pushing": {"pushed": "idle", "push_failed": "awaiting_approval"},
    "rolling_back": {"rolled_back": "idle", "rollback_failed": "awaiting_approval"},
}
# What the owner is told when a call does not fit the state (HTTP 409 with this detail).
REFUSALS = {
    ("running", "start"): "a run is already going; cancel it or wait",
    ("cancelling", "start"): "the last run is still stopping; try again in a moment",
    ("awaiting_approval", "start"): "changes are waiting: approve or reject them first",
    ("pushing", "start"): "the approved changes are still being pushed",
    ("rolling_back", "start"): "the changes are still being rolled back",
}
SEEN_KEPT = 500  # message ids remembered for deduplication


class IllegalRunTransition(RuntimeError):
    def __init__(self, state: str, event: str) -> None:
        detail = REFUSALS.get((state, event)) or (
            "nothing is waiting for approval" if event in ("approve", "reject") else f"cannot {event} while {state}"
        )
        super().__init__(detail)
        self.state, self.event = state, event


@dataclass
class OwnerState:
    phone: str
    state: RunState = "idle"
    # The repository of the current run, or of the last one while idle; the snapshot, the
    # baseline and any pending approval are in its checkout. "": the worker's own REPO_URL (a
    # prompt that names no repository, and every run from before REPOS).
    repo: str = ""
    repo_url: str = ""  # as the prompt named it ("" with repo "")
    sessions: dict[str, str] = field(default_factory=dict)  # Claude's session in each repository
    run_id: str = ""
    prompt: str = ""
    snapshot: dict[str, Any] | None = None
    # While idle: the next run's snapshot, taken when the owner last went idle. Nothing of the
    # agent's has run since (its kept CLI is stopped), so it still describes the checkout.
    baseline: dict[str, Any] | None = None
    shown_tree: str = ""  # the working tree the owner was shown, which approve commits
    branch: str = ""
    commit: str = ""  # the commit approve made of shown_tree (a retry pushes the same one)
    seen: list[str] = field(default_factory=list)
    model: str = ""  # the run's model ("" = Claude Code's default), as the relay asked
    budget_usd: float | None = None  # the run's budget (RUN_BUDGET_USD)
    unattended: bool = False  # a schedule fired the run: its changes may wait with the worker asleep
    # The run's attachments as the relay named them (common/protocol.py Attachment), and once
    # they are in the checkout, where (vm/attachments.py Received, without the bytes): a run
    # continued after a crash names the same files, or fetches them again if it never had them.
    attachments: list[dict[str, Any]] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    # The run was cut short once and continued at boot (vm/resume.py): cut short again, it is
    # reported as failed. Saved before it is continued, so a crash in between counts too.
    resumed: bool = False

    @property
    def session_id(self) -> str | None:
        """Claude's session in the current repository."""
        return self.sessions.get(self.repo)

    @session_id.setter
    def session_id(self, value: str | None) -> None:
        if value:
            self.sessions[self.repo] = value
        else:
            self.sessions.pop(self.repo, None)

    def fire(self, event: str) -> None:
        target = TRANSITIONS[self.state].get(event)
        if target is None:
            raise IllegalRunTransition(self.state, event)
        self.state = target  # type: ignore[assignment]

    def remember(self, message_id: str) -> bool:
        """False if this message id was seen before (a redelivered /command)."""
        if message_id in self.seen:
            return False
        self.seen = [*self.seen[-(SEEN_KEPT - 1) :], message_id]
        return True

    @property
    def busy(self) -> bool:
        """Anything the idle timer must wait for: a run, or changes that wait for the owner's
        decision, unless a schedule made them. Nobody watched that run, and the owner may answer
        hours later: the changes wait on the volume, and `approve` wakes the worker."""
        return self.state != "idle" and not (self.state == "awaiting_approval" and self.unattended)


class OwnerStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, phone: str) -> Path:
        return self.root / f"{phone.lstrip('+')}.json"

    def save(self, owner: OwnerState) -> None:
        write_durably(self._path(owner.phone), json.dumps(asdict(owner)).encode())

    def all(self) -> list[OwnerState]:
        """Every owner on disk. A file that cannot be read is set aside (that owner starts
        idle; their checkout is untouched) rather than keeping the worker from starting."""
        owners = []
        for path in sorted(self.root.glob("*.json")):
            try:
                owner = _owner_from(json.loads(path.read_bytes()))
                if owner.state not in TRANSITIONS or self._path(owner.phone) != path:
                    raise ValueError(f"unexpected state {owner.state!r} or phone")
            except (OSError, ValueError, TypeError) as exc:
                set_aside(path, type(exc).__name__, "an owner's state file")
                continue
            owners.append(owner)
        return owners


def _owner_from(data: Any) -> OwnerState:
    """An owner's state as saved. Files from before REPOS name no repository and hold one
    `session_id`: the session of the worker's own repository."""
    if not isinstance(data, dict):
        raise ValueError("not an object")
    legacy_session = data.pop("session_id", None)
    owner = OwnerState(**data)
    sessions = owner.sessions
    if not isinstance(sessions, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in sessions.items()
    ):
        raise ValueError("unexpected sessions")
    for records in (owner.attachments, owner.received):
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError("unexpected attachments")
    if owner.repo and not REPO_NAME.match(owner.repo):  # it names folders
        raise ValueError(f"unexpected repository name {owner.repo!r}")
    if legacy_session and "" not in sessions:
        sessions[""] = str(legacy_session)
    return owner
