"""Credentials that warn before they fail (vm/credentials.py, relay/credentials.py): the worker
checks Claude's and GitHub's credentials when it wakes, the owner hears once when one is rejected
or expires within a week, a run that meets a model 401 ends at once with a plain message, and
`status` shows their health."""

from __future__ import annotations

import calendar
import json
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from common.protocol import Credentials, decode_credentials, encode_credentials
from fakes.anthropic import FakeAnthropic, write
from fakes.github import FakeGitHub
from fakes.relay import FakeRelay
from fakes.servers import run_server
from fakes.wiring import ANTHROPIC_KEY, GITHUB_TOKEN, OWNER, OWNER2, WORKER_TOKEN
from relay import replies
from tests.support.pair_harness import pair_stack
from tests.support.relay_harness import relay_stack
from tests.support.waiting import wait_for
from tests.support.worker_harness import worker_stack
from vm.callbacks import CallbackSender
from vm.credentials import DAY_S, CredentialCheck, ModelCredentials, parse_github_expiry
from vm.lazy_http import LazyHTTP

pytestmark = pytest.mark.anyio


def github_time(at: float) -> str:
    """A moment as GitHub writes it in `github-authentication-token-expiration`."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


# --- the expiry header ------------------------------------------------------------------


def test_github_expiry_header_is_read_in_githubs_format() -> None:
    assert parse_github_expiry("2026-12-01 10:00:00 UTC") == calendar.timegm((2026, 12, 1, 10, 0, 0))
    assert parse_github_expiry("2026-12-01 10:00:00 -0800") == calendar.timegm((2026, 12, 1, 18, 0, 0))


@pytest.mark.parametrize("value", ["", "never", "2026-13-01 10:00:00 UTC", "1 Dec 2026", "2026-12-01", None])
def test_malformed_expiry_headers_are_ignored(value: str | None) -> None:
    assert parse_github_expiry(value) is None


# --- the check itself, against the fakes (a clock we move) --------------------------------


@dataclass
class Checking:
    tmp: Path
    relay: FakeRelay
    github: FakeGitHub
    anthropic: FakeAnthropic
    github_url: str
    anthropic_url: str
    callbacks: CallbackSender
    http: LazyHTTP
    now: list[float]

    def check(
        self,
        *,
        key: str = ANTHROPIC_KEY,
        token: str = GITHUB_TOKEN,
        app: str = "textslash-vm",
        github_url: str = "",
        anthropic_url: str = "",
        timeout_s: float = 10.0,
    ) -> CredentialCheck:
        """A check as a worker boots with it: a new one per process, the state on the volume."""
        return CredentialCheck(
            self.tmp / "state" / "credentials.json",
            ModelCredentials("ANTHROPIC_API_KEY", key, anthropic_url or self.anthropic_url),
            token,
            github_url or self.github_url,
            self.http,
            self.callbacks,
            app=app,
            clock=lambda: self.now[0],
            timeout_s=timeout_s,
        )

    async def delivered(self) -> list[Credentials]:
        await wait_for(lambda: self.callbacks.pending == 0, what="the findings to reach the relay")
        return list(self.relay.credentials)


@asynccontextmanager
async def checking(tmp: Path) -> AsyncIterator[Checking]:
    relay, github, anthropic = FakeRelay(WORKER_TOKEN), FakeGitHub(GITHUB_TOKEN), FakeAnthropic()
    async with AsyncExitStack() as stack:
        relay_url = await stack.enter_async_context(run_server(relay.app()))
        github_url = await stack.enter_async_context(run_server(github.app()))
        anthropic_url = await stack.enter_async_context(run_server(anthropic.app()))
        client = await stack.enter_async_context(httpx.AsyncClient())
        http = LazyHTTP(client)
        callbacks = CallbackSender(tmp / "state" / "outbox", relay_url, WORKER_TOKEN, http)
        async with anyio.create_task_group() as tg:
            tg.start_soon(callbacks.run)
            try:
                yield Checking(tmp, relay, github, anthropic, github_url, anthropic_url, callbacks, http, [time.time()])
            finally:
                tg.cancel_scope.cancel()


async def test_a_check_is_made_at_most_once_a_day_across_boots(tmp_path: Path) -> None:
    async with checking(tmp_path) as c:
        await c.check().on_wake()
        assert (c.github.user_requests, c.anthropic.model_checks) == (1, 1)
        found = await c.delivered()
        assert [(f.service, f.state) for f in found] == [("claude", "ok"), ("github", "ok")]

        c.now[0] += DAY_S - 60  # the next boot, the same day: the file on the volume says checked
        await c.check().on_wake()
        assert (c.github.user_requests, c.anthropic.model_checks) == (1, 1)

        c.now[0] += 120  # a day since the last check
        await c.check().on_wake()
        assert (c.github.user_requests, c.anthropic.model_checks) == (2, 2)

        await c.check(token="ghp_a_renewed_token").on_wake()  # `fly secrets set` restarts the worker
        assert c.github.user_requests == 3, "renewed credentials are checked at once"
        state = (tmp_path / "state" / "credentials.json").read_text()
        assert GITHUB_TOKEN not in state and ANTHROPIC_KEY not in state and "renewed" not in state


async def test_the_same_finding_is_sent_once_per_wake(tmp_path: Path) -> None:
    async with checking(tmp_path) as c:
        c.github.revoked = True
        check = c.check()
        await check.check()
        await check.check()  # a second 401 in the same wake: checked, not said again
        assert c.github.user_requests == 2
        found = await c.delivered()
        assert [(f.service, f.state) for f in found] == [("claude", "ok"), ("github", "rejected")]

        check.new_wake()  # a resume: a new wake may say it again
        await check.check()
        found = await c.delivered()
        assert [(f.service, f.state) for f in found].count(("github", "rejected")) == 2


async def test_a_malformed_expiry_header_is_ignored_without_a_crash(tmp_path: Path) -> None:
    async with checking(tmp_path) as c:
        c.github.expiration = "sometime next week"
        await c.check().check()
        github = [f for f in await c.delivered() if f.service == "github"]
        assert [(f.state, f.expires_at) for f in github] == [("ok", None)]


@pytest.mark.parametrize(
    ("revoked", "expiration", "app"),
    [
        (True, "", "textslash; rm -rf ~"),  # FLY_APP_NAME that is no Fly app's name
        (False, "2999-01-01 00:00:00 UTC", "textslash-vm"),  # an expiry no credential has
        (False, "1999-01-01 00:00:00 UTC", "textslash-vm"),
    ],
)
async def test_a_finding_reaches_the_relay_whatever_the_app_name_or_expiry_header(
    tmp_path: Path, revoked: bool, expiration: str, app: str
) -> None:
    """The relay refuses for good (4xx, dropped from the spool) a finding whose app is no Fly
    app's name or whose expiry is no date a credential has: the worker sends what it knows for
    sure instead, so a refused token is still told."""
    async with checking(tmp_path) as c:
        c.github.revoked, c.github.expiration = revoked, expiration
        await c.check(app=app).check()
        await wait_for(lambda: c.callbacks.pending == 0, what="the findings to reach the relay")
        github = [f for f in c.relay.credentials if f.service == "github"]
        expected = "rejected" if revoked or expiration.startswith("1999") else "ok"
        assert [(f.state, f.expires_at) for f in github] == [(expected, None)]
        assert {f.app for f in c.relay.credentials} == {"" if ";" in app else app}


def trickling() -> Starlette:
    """A service that answers at once, then sends its body a byte at a time, for ever: each
    read comes within any per-read timeout."""

    async def slowly(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for _ in range(600):
                yield b" "
                await anyio.sleep(0.1)

        return StreamingResponse(body(), media_type="application/json")

    return Starlette(routes=[Route("/user", slowly), Route("/v1/models", slowly)])


async def test_a_service_that_trickles_its_answer_holds_the_check_no_longer_than_its_timeout(tmp_path: Path) -> None:
    async with checking(tmp_path) as c, run_server(trickling()) as slow:
        check = c.check(github_url=slow, anthropic_url=slow, timeout_s=1.0)
        started = time.monotonic()
        with anyio.fail_after(8):
            await check.check()
        assert time.monotonic() - started < 4
        # A status is all the check needs: the answer's body is never waited for.
        assert json.loads((tmp_path / "state" / "credentials.json").read_text())["checked_at"]


def failing() -> Starlette:
    """A service that is down: every answer is 503."""

    async def down(request: Request) -> JSONResponse:
        return JSONResponse({"message": "unavailable"}, status_code=503)

    return Starlette(routes=[Route("/user", down), Route("/v1/models", down)])


async def test_a_check_that_could_not_judge_is_made_again_at_the_next_wake(tmp_path: Path) -> None:
    """A service that did not answer judged nothing: the next wake asks again rather than a day
    later (a token revoked meanwhile would go unnoticed for that day)."""
    async with checking(tmp_path) as c, run_server(failing()) as down:
        await c.check(github_url=down).on_wake()
        assert (c.github.user_requests, c.anthropic.model_checks) == (0, 1)
        c.now[0] += 60
        await c.check().on_wake()  # the next wake, GitHub back
        assert c.github.user_requests == 1
        c.now[0] += 60
        await c.check().on_wake()  # checked now: not again the same day
        assert (c.github.user_requests, c.anthropic.model_checks) == (1, 2)


# --- the worker: boot, runs, approve --------------------------------------------------


async def test_a_github_token_refused_at_boot_gives_one_warning(tmp_path: Path) -> None:
    github = FakeGitHub(GITHUB_TOKEN, revoked=True)
    async with worker_stack(tmp_path, github=github) as stack:
        found = await wait_for(
            lambda: [f for f in stack.relay.credentials if f.service == "github"], what="the GitHub finding"
        )
        await stack.settled()
        assert [(f.state, f.credential, f.detail) for f in found] == [("rejected", "GITHUB_TOKEN", "HTTP 401")]
        assert [f.state for f in stack.relay.credentials if f.service == "claude"] == ["ok"]


async def test_a_github_token_expiring_in_three_days_gives_one_warning(tmp_path: Path) -> None:
    expires = float(int(time.time()) + 3 * 86400)
    github = FakeGitHub(GITHUB_TOKEN, expiration=github_time(expires))
    async with worker_stack(tmp_path, github=github) as stack:
        found = await wait_for(
            lambda: [f for f in stack.relay.credentials if f.service == "github"], what="the GitHub finding"
        )
        await stack.settled()
        assert [(f.state, f.expires_at) for f in found] == [("expiring", expires)]


async def test_a_model_401_ends_the_run_at_once_with_a_plain_message(tmp_path: Path) -> None:
    anthropic = FakeAnthropic(refuse_credentials=True)
    async with worker_stack(tmp_path, anthropic=anthropic) as stack:
        await wait_for(lambda: stack.relay.credentials, what="the boot's check")
        started = time.monotonic()
        first = await stack.command("add a greeting")
        await wait_for(lambda: stack.relay.of_type("error"), timeout=60, what="the run's end")
        took = time.monotonic() - started
        error = stack.relay.of_type("error")[0]
        assert error["run_id"] == first
        assert error["text"].startswith("Claude refused the worker's credentials (HTTP 401, authentication_failed)")
        assert "Traceback" not in error["text"] and len(error["text"]) < 300
        assert took < 30, f"the run took {took:.1f} s to end: the CLI's own retries were waited out"
        assert anthropic.refused <= 4  # ended on the second refusal, not after the CLI's ten

        # A second run meets it too: checked again at once, and not said again in this wake.
        await stack.settled()
        await stack.command("try again")
        await wait_for(lambda: len(stack.relay.of_type("error")) == 2, timeout=60, what="the second run's end")
        await stack.settled()
        claude = [(f.state, f.credential) for f in stack.relay.credentials if f.service == "claude"]
        assert claude == [("rejected", "ANTHROPIC_API_KEY")]


async def test_a_github_401_on_approve_checks_the_token_at_once(tmp_path: Path) -> None:
    async with worker_stack(tmp_path) as stack:
        stack.anthropic.script("make notes", write("{cwd}/NOTES.md", "notes\n"))
        await wait_for(lambda: len(stack.relay.credentials) == 2, what="the boot's check")
        await stack.command("make notes")
        await wait_for(lambda: stack.relay.of_type("answer"), timeout=60, what="the run's end")
        stack.github.revoked = True
        assert (await stack.decide("approve")).status_code == 202
        await wait_for(lambda: stack.relay.of_type("approve_failed"), timeout=60, what="approve to fail")
        found = await wait_for(
            lambda: [f for f in stack.relay.credentials if f.service == "github" and f.state == "rejected"],
            what="the check after the 401",
        )
        assert len(found) == 1


# --- the relay: who is told, and `status` -----------------------------------------------


def finding(service: str, state: str, *, expires_at: float | None = None, checked_at: float = 0) -> dict[str, object]:
    credential = "GITHUB_TOKEN" if service == "github" else "CLAUDE_CODE_OAUTH_TOKEN"
    found = Credentials(
        service,  # type: ignore[arg-type]
        state,  # type: ignore[arg-type]
        credential,
        checked_at or time.time(),
        expires_at,
        "HTTP 401" if state == "rejected" else "",
        "textslash-vm",
    )
    return encode_credentials(found)


async def test_the_relay_tells_every_owner_once_and_status_shows_health(tmp_path: Path) -> None:
    headers = {"Authorization": f"Bearer {WORKER_TOKEN}"}
    async with relay_stack(tmp_path) as stack:
        for owner in (OWNER, OWNER2):
            assert (await stack.send("status", sender=owner)).status_code == 200
        await wait_for(lambda: len(stack.twilio.bodies(OWNER2)) == 1, what="both statuses")
        assert "not checked yet" in stack.twilio.bodies(OWNER)[0]

        url = f"{stack.url}/credentials"
        assert (await stack.http.post(url, json=finding("github", "rejected"), headers=headers)).status_code == 200
        # The worker repeats a callback, and the next day's check finds the same: said once.
        assert (await stack.http.post(url, json=finding("github", "rejected"), headers=headers)).json()["told"] == 0
        for owner in (OWNER, OWNER2):

            def warnings(to: str = owner) -> list[str]:
                return [b for b in stack.twilio.bodies(to) if "refused the VM" in b]

            warning = await wait_for(warnings, what="the warning")
            assert len(warning) == 1
            assert "GitHub refused the VM's token (GITHUB_TOKEN) (HTTP 401)" in warning[0]
            assert "github.com/settings/tokens" in warning[0]
            assert "`fly secrets set GITHUB_TOKEN=<token> -a textslash-vm`" in warning[0]

        expires = time.time() + 3 * 86400 + 60
        assert (
            await stack.http.post(url, json=finding("claude", "expiring", expires_at=expires), headers=headers)
        ).json()["told"] == 2
        warning = await wait_for(lambda: [b for b in stack.twilio.bodies(OWNER) if "for Claude expires" in b])
        assert "in 4 days" in warning[0] or "in 3 days" in warning[0]
        assert "claude setup-token" in warning[0] and "CLAUDE_CODE_OAUTH_TOKEN=<token> -a textslash-vm" in warning[0]

        count = len(stack.twilio.bodies(OWNER))
        assert (await stack.send("status")).status_code == 200
        status = await wait_for(lambda: stack.twilio.bodies(OWNER)[count:], what="status")
        assert "🔑 Claude: the token (CLAUDE_CODE_OAUTH_TOKEN) expires on" in status[0]
        assert "🔑 GitHub: the token (GITHUB_TOKEN) was refused (HTTP 401)" in status[0]


async def test_the_relay_refuses_malformed_findings(tmp_path: Path) -> None:
    headers = {"Authorization": f"Bearer {WORKER_TOKEN}"}
    async with relay_stack(tmp_path) as stack:
        url = f"{stack.url}/credentials"
        assert (await stack.http.post(url, json=finding("github", "ok"))).status_code == 401
        for bad in (
            {**finding("github", "ok"), "service": "gitlab"},
            {**finding("github", "ok"), "state": "fine"},
            {**finding("github", "ok"), "credential": "sk-ant-secret"},
            {**finding("github", "ok"), "expires_at": 1e300},
            {**finding("github", "ok"), "app": "-a other; rm"},
            ["not", "an", "object"],
        ):
            response = await stack.http.post(url, json=bad, headers=headers)
            assert response.status_code == 422, bad
        with pytest.raises(ValueError):
            decode_credentials(json.loads('{"v": 3, "service": "github"}'))


def test_a_warning_names_the_service_what_is_wrong_and_how_to_renew() -> None:
    now = 1_800_000_000.0
    key = Credentials("claude", "rejected", "ANTHROPIC_API_KEY", now, None, "HTTP 401", "")
    text = replies.credentials_warning(key, now)
    assert text.startswith("🔑 Claude refused the VM's API key (ANTHROPIC_API_KEY) (HTTP 401)")
    assert "fly secrets set ANTHROPIC_API_KEY=<key> -a <worker app>" in text


# --- the pair, as deployed: the three -------------------------------------------


async def test_pair_a_revoked_github_token_reaches_the_owner_once(tmp_path: Path) -> None:
    async with pair_stack(tmp_path) as pair:
        await pair.start_relay()
        await pair.text("status")
        await wait_for(lambda: pair.said("not checked yet"), what="status")
        pair.github.revoked = True
        await pair.start_worker()
        await wait_for(lambda: pair.said("GitHub refused the VM's token"), timeout=30, what="the warning")
        await pair.text("status")
        status = await wait_for(lambda: pair.said("🔑 GitHub: the token (GITHUB_TOKEN) was refused"), timeout=30)
        assert "🔑 Claude: the API key (ANTHROPIC_API_KEY) works" in status[0]
        assert len(pair.said("GitHub refused the VM's token")) == 1


async def test_pair_a_github_token_three_days_from_expiry_reaches_the_owner_once(tmp_path: Path) -> None:
    async with pair_stack(tmp_path) as pair:
        await pair.start_relay()
        await pair.text("status")
        await wait_for(lambda: pair.said("not checked yet"), what="status")
        pair.github.expiration = github_time(time.time() + 3 * 86400 - 60)
        await pair.start_worker()
        warning = await wait_for(lambda: pair.said("for GitHub expires on"), timeout=30, what="the warning")
        assert ", in 3 days." in warning[0] and "github.com/settings/tokens" in warning[0]
        await pair.kill("worker")
        await pair.start_worker()  # the same day: not checked, nor said, again
        await pair.text("status")
        await wait_for(lambda: pair.said("🔑 GitHub: the token (GITHUB_TOKEN) expires on"), timeout=30)
        assert pair.github.user_requests == 1
        assert len(pair.said("for GitHub expires on")) == 1


async def test_pair_a_model_401_says_so_plainly_within_a_minute(tmp_path: Path) -> None:
    async with pair_stack(tmp_path) as pair:
        await pair.start_relay()
        await pair.start_worker()
        await wait_for(lambda: pair.model.model_checks and pair.github.user_requests, timeout=30, what="the check")
        pair.model.refuse_credentials = True  # revoked while the worker runs
        started = time.monotonic()
        await pair.text("add a greeting to app.py")
        failed = await wait_for(lambda: pair.said("❌ The run failed"), timeout=60, what="the run's end")
        assert time.monotonic() - started < 60
        assert "Claude refused the worker's credentials (HTTP 401, authentication_failed)" in failed[0]
        assert "Traceback" not in failed[0] and len(failed[0]) < 400
        warning = await wait_for(lambda: pair.said("Claude refused the VM's API key"), timeout=30)
        assert "fly secrets set ANTHROPIC_API_KEY=<key>" in warning[0]
        assert len(warning) == 1
