"""The relay under test, wired to loopback fakes of Twilio and the worker."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from fakes.servers import reserve_port, run_server, url_of
from fakes.twilio import FakeTwilio
from fakes.wiring import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    OWNER,
    PUBLIC_URL,
    SANDBOX_NUMBER,
    WORKER_TOKEN,
    message_params,
    relay_env,
    signed_form,
)
from fakes.worker import FakeWorker
from relay.app import STATUS_PATH, create_app
from relay.settings import Settings
from relay.twilio import TwilioSender

# The body DEPLOY.md suggests for the template TWILIO_TEMPLATE_CONTENT_SID names.
WINDOW_TEMPLATE = "textslash: {{1}} waiting for you. Reply to see them."


@dataclass
class Stack:
    url: str
    settings: Settings
    twilio: FakeTwilio
    worker: FakeWorker
    http: httpx.AsyncClient

    async def send(
        self, body: str, *, sender: str = OWNER, sid: str | None = None, media: Sequence[tuple[str, str]] = ()
    ) -> httpx.Response:
        """Deliver a WhatsApp message the way Twilio does: a signed form post. `media`: the
        (URL, content type) of each photo or file it carries (`FakeTwilio.add_media`)."""
        params = message_params(body, sender=sender, sid=sid, media=media)
        self.twilio.open_window(sender)  # the owner wrote: WhatsApp's 24 hours start again
        return await self.post_form(params)

    async def post_form(self, params: dict[str, str], headers: dict[str, str] | None = None) -> httpx.Response:
        if headers is None:
            headers = signed_form(PUBLIC_URL + "/webhook", params)
        return await self.http.post(f"{self.url}/webhook", data=params, headers=headers)

    async def report(self, event_type: str, phone: str = OWNER, **fields: Any) -> httpx.Response:
        response = await self.worker.report(self.url, phone, event_type, **fields)
        assert response.status_code == 200, response.text
        return response


def twilio_sender(twilio_url: str, *, timeout: float = 10.0) -> TwilioSender:
    """The relay's sender, pointed at a fake Twilio; open it with `async with`."""
    return TwilioSender(
        account_sid=ACCOUNT_SID,
        auth_token=AUTH_TOKEN,
        from_number=SANDBOX_NUMBER,
        base_url=twilio_url,
        media_base_url=f"{PUBLIC_URL}/images",
        timeout=timeout,
        status_callback=PUBLIC_URL + STATUS_PATH,
    )


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
        twilio_url = twilio.api_url = await stack.enter_async_context(run_server(twilio.app()))
        twilio.cdn_url = await stack.enter_async_context(run_server(twilio.cdn_app()))
        if worker_listening:
            await stack.enter_async_context(run_server(worker.app(), worker_sock))
        settings = Settings.from_env(relay_env(tmp / "relay.sqlite3", twilio_url, url_of(worker_sock), **env))
        sender = twilio_sender(twilio_url, timeout=send_timeout)
        if settings.template_content_sid:  # approved in the fake, as it must be at Twilio
            twilio.add_template(WINDOW_TEMPLATE, settings.template_content_sid)
        relay_url = await stack.enter_async_context(run_server(create_app(settings, sender=sender)))
        twilio.status_target = relay_url
        http = await stack.enter_async_context(httpx.AsyncClient())
        yield Stack(relay_url, settings, twilio, worker, http)
