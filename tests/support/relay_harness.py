"""The relay under test, wired to loopback fakes of Twilio and the worker."""

from __future__ import annotations

import itertools
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from twilio.request_validator import RequestValidator

from relay.app import create_app
from relay.settings import Settings
from relay.twilio import TwilioSender
from tests.support.fake_twilio import FakeTwilio
from tests.support.fake_worker import FakeWorker
from tests.support.servers import reserve_port, run_server, url_of

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "twilio-auth-token-for-tests"
WORKER_TOKEN = "worker-token-for-tests"
OWNER = "+15550001111"
OWNER2 = "+15550002222"
STRANGER = "+15559990000"
SANDBOX_NUMBER = "+14155238886"
# Deliberately not the address the relay listens on: signatures must be checked against it.
PUBLIC_URL = "https://relay.example.test"

_sids = itertools.count(1)


def new_sid() -> str:
    return f"SM{next(_sids):032x}"


def relay_env(db: Path, twilio_url: str, worker_url: str, **overrides: str) -> dict[str, str]:
    env = {
        "PUBLIC_URL": PUBLIC_URL,
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_WHATSAPP_NUMBER": SANDBOX_NUMBER,
        "TWILIO_API_BASE_URL": twilio_url,
        "ALLOWED_PHONE_NUMBERS": f"{OWNER}, {OWNER2}",
        "CLAUDE_HOST": worker_url,
        "WORKER_TOKEN": WORKER_TOKEN,
        "RELAY_DB": str(db),
        "WAKE_TIMEOUT_MS": "10000",
        "DEPLOYED_SHA": "test-sha",
    }
    env.update(overrides)
    return env


def signed_form(url: str, params: dict[str, str], token: str = AUTH_TOKEN) -> dict[str, str]:
    """Headers for a form post signed the way Twilio signs it, by the twilio SDK itself."""
    return {"X-Twilio-Signature": RequestValidator(token).compute_signature(url, params)}


def message_params(body: str, *, sender: str = OWNER, sid: str | None = None) -> dict[str, str]:
    return {
        "MessageSid": sid or new_sid(),
        "AccountSid": ACCOUNT_SID,
        "From": f"whatsapp:{sender}",
        "To": f"whatsapp:{SANDBOX_NUMBER}",
        "Body": body,
        "NumMedia": "0",
        "ProfileName": "Owner",
    }


@dataclass
class Stack:
    url: str
    settings: Settings
    twilio: FakeTwilio
    worker: FakeWorker
    http: httpx.AsyncClient

    async def send(self, body: str, *, sender: str = OWNER, sid: str | None = None) -> httpx.Response:
        """Deliver a WhatsApp message the way Twilio does: a signed form post."""
        params = message_params(body, sender=sender, sid=sid)
        return await self.post_form(params)

    async def post_form(self, params: dict[str, str], headers: dict[str, str] | None = None) -> httpx.Response:
        if headers is None:
            headers = signed_form(PUBLIC_URL + "/webhook", params)
        return await self.http.post(f"{self.url}/webhook", data=params, headers=headers)

    async def report(self, event_type: str, phone: str = OWNER, **fields: Any) -> httpx.Response:
        response = await self.worker.report(self.url, phone, event_type, **fields)
        assert response.status_code == 200, response.text
        return response


@asynccontextmanager
async def relay_stack(
    tmp: Path,
    *,
    worker_listening: bool = True,
    worker_sock: socket.socket | None = None,
    send_timeout: float = 2.0,
    **env: str,
) -> AsyncIterator[Stack]:
    """Fake Twilio + fake worker + the real relay app under uvicorn, all on loopback."""
    twilio = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN)
    worker = FakeWorker(WORKER_TOKEN)
    worker_sock = worker_sock or reserve_port()
    async with AsyncExitStack() as stack:
        stack.callback(worker_sock.close)
        stack.push_async_callback(worker.aclose)
        twilio_url = await stack.enter_async_context(run_server(twilio.app()))
        if worker_listening:
            await stack.enter_async_context(run_server(worker.app(), worker_sock))
        settings = Settings.from_env(relay_env(tmp / "relay.sqlite3", twilio_url, url_of(worker_sock), **env))
        sender = TwilioSender(
            account_sid=ACCOUNT_SID,
            auth_token=AUTH_TOKEN,
            from_number=SANDBOX_NUMBER,
            base_url=twilio_url,
            media_base_url=f"{PUBLIC_URL}/images",
            timeout=send_timeout,
        )
        relay_url = await stack.enter_async_context(run_server(create_app(settings, sender=sender)))
        http = await stack.enter_async_context(httpx.AsyncClient())
        yield Stack(relay_url, settings, twilio, worker, http)
