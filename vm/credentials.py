"""The credentials the worker depends on, checked before they fail: Claude's and GitHub's.

Unattended runs die on a 401 nobody sees, so on each wake (at most once a day, and at once
after a 401, or when the credentials themselves changed) the worker asks each service whether
it still takes them, and how long they last:

- **Claude.** An API key (`ANTHROPIC_API_KEY`) is asked `GET /v1/models` on the Messages API's
  base, which costs nothing: 200 is accepted, 401 rejected. A long-lived OAuth token
  (`CLAUDE_CODE_OAUTH_TOKEN`, from `claude setup-token`) has no documented free request that
  checks it (sending one to `/v1/models` is not documented to work, and a wrong "rejected" every
  day would teach the owner to ignore the warning), and no recorded expiry: it lasts a year, so
  the worker counts a year from the day it first saw the token, and its rejection shows on the
  first run that meets it (the run ends within seconds, below). Claude Code's own login keeps its
  expiry in `CLAUDE_CONFIG_DIR/.credentials.json` (`claudeAiOauth.expiresAt`, ms); one with a
  refresh token is renewed by Claude Code itself.
- **GitHub.** `GET /user` with the token: 401 is rejected; otherwise the header
  `github-authentication-token-expiration` (`2026-12-01 10:00:00 UTC`) says when it expires.

Each finding goes to the relay durably (spooled with the reports: `Credentials` in
common/protocol.py); the relay keeps the latest per service for `status` and tells the owners
when one is rejected or expires within WARN_S. The same finding is sent once per wake (a resume
is a wake: `new_wake`). The check runs in the worker, as root, with the secrets it holds: no
agent sees it, and no secret goes into a log, an error or the report.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from common.files import write_durably
from common.protocol import Credentials, ProtocolError, decode_credentials, encode_credentials
from vm.github import api_headers
from vm.lazy_http import LazyHTTP

if TYPE_CHECKING:
    from vm.callbacks import CallbackSender

logger = logging.getLogger(__name__)

DAY_S = 86_400.0
WARN_S = 7 * DAY_S  # an expiry this close is told to the owner
SETUP_TOKEN_LIFE_S = 365 * DAY_S  # `claude setup-token` makes a token for a year
TIMEOUT_S = 10.0  # per request, all of it: a check never holds anything up for long
ANTHROPIC_API = "https://api.anthropic.com"
GITHUB_EXPIRY = "github-authentication-token-expiration"


@dataclass(frozen=True)
class ModelCredentials:
    """Which of Claude Code's credentials the worker's CLI uses, as the CLI picks it: an API key
    first, then a long-lived OAuth token, then its own login (kept in its config folder)."""

    kind: str  # ANTHROPIC_API_KEY, CLAUDE_CODE_OAUTH_TOKEN, login, or "" (none the worker can see)
    secret: str = field(repr=False, default="")
    base_url: str = ANTHROPIC_API
    login_file: Path | None = None


def model_credentials(env: Mapping[str, str], config_dir: str) -> ModelCredentials:
    base = (env.get("ANTHROPIC_BASE_URL") or ANTHROPIC_API).strip().rstrip("/")
    if key := env.get("ANTHROPIC_API_KEY", "").strip():
        return ModelCredentials("ANTHROPIC_API_KEY", key, base)
    if token := env.get("CLAUDE_CODE_OAUTH_TOKEN", "").strip():
        return ModelCredentials("CLAUDE_CODE_OAUTH_TOKEN", token, base)
    folder = config_dir or env.get("CLAUDE_CONFIG_DIR", "") or str(Path(env.get("HOME", "/root")) / ".claude")
    login = Path(folder) / ".credentials.json"
    return ModelCredentials("login", "", base, login) if login.is_file() else ModelCredentials("")


def parse_github_expiry(value: str | None) -> float | None:
    """GitHub's `github-authentication-token-expiration` (`2026-12-01 10:00:00 UTC`, or with a
    numeric offset) as seconds since the epoch; None for a missing or malformed header, which is
    ignored (the token's acceptance is still known from the status)."""
    if not value:
        return None
    text = value.strip()
    for form in ("%Y-%m-%d %H:%M:%S UTC", "%Y-%m-%d %H:%M:%S %z", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            parsed = time.strptime(text, form)
        except ValueError:
            continue
        offset = (parsed.tm_gmtoff or 0) if form.endswith("%z") else 0
        return float(calendar.timegm(parsed)) - offset
    return None


def refused_by_origin(exc: BaseException) -> bool:
    """Whether approve failed because GitHub refused the token: its API's 401, or git's push
    refused for its credentials."""
    from vm.github import GitHubError
    from vm.workspace import GitError

    if isinstance(exc, GitHubError):
        return exc.status == 401
    text = str(exc) if isinstance(exc, GitError) else ""
    return any(sign in text for sign in ("Authentication failed", "returned error: 401", "Invalid username or token"))


def _fingerprint(kind: str, secret: str) -> str:
    """Tells one secret from another across boots without keeping it (a digest of a random
    token reveals nothing of it)."""
    return hashlib.sha256(f"{kind}\0{secret}".encode()).hexdigest()[:16] if kind else ""


@dataclass
class CredentialCheck:
    """Checks the worker's credentials and spools what it found for the relay."""

    state_file: Path
    model: ModelCredentials
    github_token: str = field(repr=False)
    github_api_url: str
    http: LazyHTTP
    callbacks: CallbackSender
    app: str = ""  # FLY_APP_NAME, for the renewal's `fly secrets set` line
    clock: Callable[[], float] = time.time
    timeout_s: float = TIMEOUT_S
    _said: set[tuple[str, str, str, int]] = field(default_factory=set)  # this wake's findings sent
    _lock: anyio.Lock = field(default_factory=anyio.Lock)
    _missed: bool = False  # a service this check asked judged nothing (no answer, or not 200/401)

    def new_wake(self) -> None:
        """A resume is a wake: what was said before the suspend may be said again."""
        self._said.clear()

    async def on_wake(self) -> None:
        """Check, if the last check is a day old or the credentials changed since."""
        if self._due():
            await self.check()

    async def check(self, *, model_refused: str = "") -> None:
        """Ask each service now. `model_refused`: what a run just met (the model answered 401),
        which is all there is to know about Claude's credentials. Never raises."""
        async with self._lock:
            try:
                await self._check(model_refused)
            except Exception:
                logger.exception("the credentials check failed")

    async def _check(self, model_refused: str) -> None:
        memory = self._memory()
        now = self.clock()
        self._missed = False
        found = [await self._claude(memory, now, model_refused)]
        if self.github_token:
            found.append(await self._github(now))
        if not self._missed:  # else the next wake asks again, and the last full check stands
            memory["checked_at"] = now
            memory["fingerprints"] = self._fingerprints()
        write_durably(self.state_file, json.dumps(memory).encode())
        for finding in found:
            if finding is not None:
                self._tell(finding)

    def _tell(self, finding: Credentials) -> None:
        finding = _acceptable(finding)
        day = int(finding.expires_at // DAY_S) if finding.expires_at is not None else -1
        key = (finding.service, finding.state, finding.credential, day)
        level = logging.WARNING if finding.state != "ok" else logging.INFO
        logger.log(
            level, "credentials: %s (%s) %s %s", finding.service, finding.credential, finding.state, finding.detail
        )
        if key in self._said:
            return
        self._said.add(key)
        self.callbacks.tell("credentials", f"credentials-{finding.service}", encode_credentials(finding))

    # --- Claude -------------------------------------------------------------------------

    async def _claude(self, memory: dict[str, Any], now: float, refused: str) -> Credentials | None:
        model = self.model
        if not model.kind:
            return None  # another provider's (Bedrock, a gateway): nothing of ours to check
        if refused:
            return self._found("claude", "rejected", model.kind, now, detail=refused)
        if model.kind == "ANTHROPIC_API_KEY":
            return await self._api_key(now)
        if model.kind == "CLAUDE_CODE_OAUTH_TOKEN":
            first_seen = memory.setdefault("first_seen", {}).setdefault(self._fingerprints()["claude"], now)
            expires = float(first_seen) + SETUP_TOKEN_LIFE_S
            return self._expiring("claude", model.kind, now, expires, detail="a year after this worker first saw it")
        return self._login(now)

    async def _api_key(self, now: float) -> Credentials | None:
        headers = {"x-api-key": self.model.secret, "anthropic-version": "2023-06-01"}
        answer = await self._ask(f"{self.model.base_url}/v1/models?limit=1", headers, "Anthropic about the API key")
        if answer is None:
            return self._not_judged()
        status, _ = answer
        if status == 401:
            return self._found("claude", "rejected", self.model.kind, now, detail="HTTP 401")
        if status == 200:
            return self._found("claude", "ok", self.model.kind, now)
        logger.warning("Anthropic answered HTTP %s about the API key; not judged", status)
        return self._not_judged()

    def _login(self, now: float) -> Credentials | None:
        assert self.model.login_file is not None
        try:
            oauth = json.loads(self.model.login_file.read_text()).get("claudeAiOauth") or {}
            expires_ms = oauth.get("expiresAt")
        except (OSError, ValueError, AttributeError) as exc:
            logger.warning("could not read Claude Code's login (%s)", type(exc).__name__)
            return None
        if oauth.get("refreshToken"):
            return self._found("claude", "ok", "login", now, detail="Claude Code renews it")
        if isinstance(expires_ms, bool) or not isinstance(expires_ms, int | float):
            return None
        return self._expiring("claude", "login", now, expires_ms / 1000)

    # --- GitHub -------------------------------------------------------------------------

    async def _github(self, now: float) -> Credentials | None:
        answer = await self._ask(
            f"{self.github_api_url}/user", api_headers(self.github_token), "GitHub about the token"
        )
        if answer is None:
            return self._not_judged()
        status, answered = answer
        if status == 401:
            return self._found("github", "rejected", "GITHUB_TOKEN", now, detail="HTTP 401")
        if status != 200:
            logger.warning("GitHub answered HTTP %s about the token; not judged", status)
            return self._not_judged()
        header = answered.get(GITHUB_EXPIRY)
        expires = parse_github_expiry(header)
        if header and expires is None:
            logger.warning("GitHub's %s header is malformed; ignored", GITHUB_EXPIRY)
        if expires is None:
            return self._found("github", "ok", "GITHUB_TOKEN", now)
        return self._expiring("github", "GITHUB_TOKEN", now, expires)

    # --- shared -------------------------------------------------------------------------

    def _not_judged(self) -> Credentials | None:
        """A service that did not say (no finding): this check does not count as one (`_due`)."""
        self._missed = True
        return None

    async def _ask(self, url: str, headers: dict[str, str], what: str) -> tuple[int, Mapping[str, str]] | None:
        """The status and headers of a GET, which is all a check needs: the body is never read
        (a 10 MB answer costs nothing), and the whole request is held to `timeout_s`, not each
        read (a service that trickles its answer would hold the check, and keep the worker
        awake, for ever). None if no answer came in time."""
        import httpx  # on first use, not at boot (see vm/lazy_http.py)

        client = await self.http.get()
        try:
            with anyio.fail_after(self.timeout_s):
                async with client.stream("GET", url, headers=headers, timeout=self.timeout_s) as response:
                    return response.status_code, response.headers
        except (httpx.HTTPError, TimeoutError) as exc:
            logger.warning("could not ask %s (%s)", what, type(exc).__name__)
            return None

    def _expiring(self, service: str, credential: str, now: float, expires: float, detail: str = "") -> Credentials:
        if expires <= now:
            return self._found(service, "rejected", credential, now, expires, detail or "expired")
        state = "expiring" if expires - now <= WARN_S else "ok"
        return self._found(service, state, credential, now, expires, detail)

    def _found(
        self, service: str, state: str, credential: str, now: float, expires: float | None = None, detail: str = ""
    ) -> Credentials:
        return Credentials(service, state, credential, now, expires, detail, self.app)  # type: ignore[arg-type]

    def _fingerprints(self) -> dict[str, str]:
        return {
            "claude": _fingerprint(self.model.kind, self.model.secret),
            "github": _fingerprint("GITHUB_TOKEN" if self.github_token else "", self.github_token),
        }

    def _memory(self) -> dict[str, Any]:
        try:
            memory = json.loads(self.state_file.read_bytes())
        except (OSError, ValueError):
            return {}
        return memory if isinstance(memory, dict) else {}

    def _due(self) -> bool:
        memory = self._memory()
        checked = memory.get("checked_at")
        if not isinstance(checked, int | float) or memory.get("fingerprints") != self._fingerprints():
            return True  # never checked, or the secrets were renewed (a `fly secrets set` restarts the worker)
        return not 0 <= self.clock() - checked < DAY_S


def _acceptable(finding: Credentials) -> Credentials:
    """The finding as the relay takes it. The relay refuses for good (a 4xx the spool drops) an
    app that is no Fly app's name (FLY_APP_NAME is only used for the renewal line) and an expiry
    that is no date a credential has (a header or a login file from elsewhere): those are left
    out, and what the service said still goes, so a refused token is never kept quiet."""
    for candidate in (
        finding,
        replace(finding, app=""),
        replace(finding, expires_at=None),
        replace(finding, app="", expires_at=None),
    ):
        try:
            decode_credentials(encode_credentials(candidate))
        except ProtocolError:
            continue
        if candidate is not finding:
            logger.warning("credentials: left out what the relay would refuse (the app's name or the expiry)")
        return candidate
    return finding  # nothing of ours makes it acceptable: sent as it is, and the relay's log says why
