"""Photos and files the owner sends, through the real relay (relay/media.py): taken from the
fake Twilio (Basic auth, then its redirect to the fake CDN, without the credentials), kept,
and handed to the worker with the prompt; refused or named in a reply when they cannot be."""

from __future__ import annotations

import hashlib
import os
import signal
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
from starlette.responses import Response
from starlette.routing import Route

from common.protocol import Attachment
from fakes.servers import run_server
from fakes.twilio import FakeTwilio
from fakes.wiring import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    OWNER,
    PUBLIC_URL,
    WORKER_TOKEN,
    message_params,
    relay_env,
    signed_form,
)
from fakes.worker import PNG, FakeWorker
from relay import replies
from relay.conversation import Context, Conversation, apply
from relay.events import CallWorker, Prompt, Unreachable, Word
from relay.media import MAX_IMAGE_BYTES, MediaStore, is_twilio_media, media_list
from tests.support.processes import child, free_port, wait_healthy
from tests.support.relay_harness import Stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.anyio
PDF = b"%PDF-1.4\n%%EOF\n"
BASE = "https://api.twilio.com"


def fetched(stack: Stack, url: str) -> bool:
    return any(url.endswith(path) for path, _ in stack.twilio.media_requests)


async def test_a_photo_is_taken_through_the_redirect_and_goes_with_the_prompt(stack: Stack) -> None:
    url = stack.twilio.add_media(PNG, "image/png")
    await stack.send("", media=[(url, "image/png")])
    command = (await wait_for(stack.worker.commands, what="the command"))[0]
    assert command["text"] == "Look at the attached image."  # no caption: a prompt all the same
    [attachment] = [Attachment(**a) for a in command["attachments"]]
    assert (attachment.content_type, attachment.size, attachment.name) == ("image/png", len(PNG), "photo-1.png")
    assert attachment.sha256 == hashlib.sha256(PNG).hexdigest()
    # Basic auth to Twilio's API; the redirect to the CDN is followed without the credentials.
    assert [auth.startswith("Basic ") for _, auth in stack.twilio.media_requests] == [True]
    assert [auth for _, auth in stack.twilio.cdn_requests] == [""]

    # The worker (and only the worker) gets the file from the relay.
    served = await stack.http.get(
        f"{stack.url}/media/{attachment.id}", headers={"Authorization": f"Bearer {WORKER_TOKEN}"}
    )
    assert served.status_code == 200 and served.content == PNG
    assert (await stack.http.get(f"{stack.url}/media/{attachment.id}")).status_code == 401
    unknown = await stack.http.get(f"{stack.url}/media/{'x' * 32}", headers={"Authorization": f"Bearer {WORKER_TOKEN}"})
    assert unknown.status_code == 404


async def test_a_caption_with_files_is_a_prompt_never_a_command(stack: Stack) -> None:
    report = stack.twilio.add_media(PDF, "application/pdf", filename="Q3 report.pdf")
    await stack.send("approve", media=[(report, "application/pdf")])
    command = (await wait_for(stack.worker.commands, what="the command"))[0]
    assert command["text"] == "approve" and command["attachments"][0]["name"] == "Q3 report.pdf"
    assert "/approve" not in stack.worker.paths()


async def test_voice_notes_are_refused_politely_and_nothing_runs(stack: Stack) -> None:
    url = stack.twilio.add_media(b"OggS", "audio/ogg")
    response = await stack.send("", media=[(url, "audio/ogg; codecs=opus")])
    assert response.status_code == 200
    await wait_for(lambda: replies.VOICE_NOT_UNDERSTOOD in stack.twilio.bodies(OWNER), what="the answer")
    await stack.send("status")  # handled after it: the voice note is behind us, and ran nothing
    await wait_for(lambda: any("Idle" in b for b in stack.twilio.bodies(OWNER)), what="status")
    assert stack.worker.commands() == [] and stack.twilio.media_requests == []


async def test_videos_are_refused_too(stack: Stack) -> None:
    await stack.send("fix what this shows", media=[(stack.twilio.add_media(b"\0", "video/mp4"), "video/mp4")])
    await wait_for(lambda: replies.VIDEO_NOT_UNDERSTOOD in stack.twilio.bodies(OWNER), what="the answer")
    assert stack.worker.commands() == [] and stack.twilio.media_requests == []


async def test_more_than_ten_items_are_refused_with_a_reply(stack: Stack) -> None:
    media = [(stack.twilio.add_media(PNG, "image/png"), "image/png") for _ in range(11)]
    response = await stack.send("look at all of these", media=media)
    assert response.status_code == 200
    await wait_for(lambda: any("11 attachments" in b for b in stack.twilio.bodies(OWNER)), what="the refusal")
    await stack.send("status")
    await wait_for(lambda: any("Idle" in b for b in stack.twilio.bodies(OWNER)), what="status")
    assert stack.worker.commands() == [] and stack.twilio.media_requests == []


async def test_an_item_too_large_is_named_and_the_text_still_runs(stack: Stack) -> None:
    # Sent without a Content-Length, so the relay must cut the stream itself.
    big = stack.twilio.add_media(b"\xff\xd8\xff" + b"\0" * MAX_IMAGE_BYTES, "image/jpeg", chunked=True)
    small = stack.twilio.add_media(PDF, "application/pdf")
    await stack.send("compare these", media=[(big, "image/jpeg"), (small, "application/pdf")])
    command = (await wait_for(stack.worker.commands, what="the command"))[0]
    assert command["text"] == "compare these" and [a["content_type"] for a in command["attachments"]] == [
        "application/pdf"
    ]
    told = [b for b in stack.twilio.bodies(OWNER) if "Not passed on" in b]
    assert told == [replies.media_left_out([(1, "image/jpeg", "over 5 MB")], goes_ahead=True)]
    assert not [p for p in (stack.settings.media_dir).iterdir() if p.name.startswith(".")]  # no partial file


async def test_a_media_url_on_another_host_is_never_fetched(stack: Stack) -> None:
    elsewhere: list[str] = []

    async def record(request: Request) -> Response:
        elsewhere.append(request.url.path)
        return Response(PNG, media_type="image/png")

    app = Starlette(routes=[Route("/{path:path}", record)])
    async with run_server(app) as other:
        path = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/MM1/Media/ME1"
        other_account = stack.twilio.api_url + path.replace(ACCOUNT_SID, "AC" + "f" * 32)
        await stack.send("what is this", media=[(other + path, "image/png"), (other_account, "image/png")])
        command = (await wait_for(stack.worker.commands, what="the text, run"))[0]
    assert command["text"] == "what is this" and "attachments" not in command
    assert elsewhere == [] and stack.twilio.media_requests == []
    told = [b for b in stack.twilio.bodies(OWNER) if "Not passed on" in b]
    assert len(told) == 1 and told[0].count(replies.NOT_FROM_TWILIO) == 2


async def test_an_item_that_cannot_be_fetched_is_named_and_the_text_runs(stack: Stack) -> None:
    gone = stack.twilio.add_media(PNG, "image/png")
    stack.twilio.media.clear()  # Twilio answers 404
    await stack.send("what is on it", media=[(gone, "image/png")])
    command = (await wait_for(stack.worker.commands, what="the command"))[0]
    assert command["text"] == "what is on it"
    assert any("attachment 1 (image/png): could not be fetched (HTTP 404)" in b for b in stack.twilio.bodies(OWNER))


async def test_a_photo_without_caption_that_cannot_be_fetched_runs_nothing(stack: Stack) -> None:
    gone = stack.twilio.add_media(PNG, "image/png")
    stack.twilio.media.clear()
    await stack.send("", media=[(gone, "image/png")])
    await wait_for(lambda: any("Nothing was left to send" in b for b in stack.twilio.bodies(OWNER)), what="reply")
    assert stack.worker.commands() == []


@pytest.mark.parametrize(
    "media",
    [
        pytest.param({"NumMedia": "-1", "MediaUrl0": "x"}, id="negative-count"),
        pytest.param({"NumMedia": "99999999999"}, id="huge-count"),
        pytest.param({"NumMedia": "1"}, id="no-url"),
        pytest.param({"NumMedia": "1", "MediaUrl0": "http://[::1", "MediaContentType0": "\u202e/x"}, id="garbage"),
        pytest.param({"NumMedia": "2", "MediaUrl1": "x" * 30_000, "MediaContentType1": "image/png"}, id="long-url"),
    ],
)
async def test_odd_media_fields_never_fail_the_webhook_or_hold_up_the_owner(
    stack: Stack, media: dict[str, str]
) -> None:
    params = {**message_params("look"), **media}
    assert (await stack.post_form(params)).status_code == 200
    await stack.send("status")  # the owner's lane goes on past it
    await wait_for(lambda: any("VM:" in b for b in stack.twilio.bodies(OWNER)), what="the status")
    assert stack.twilio.media_requests == []


# --- a restart between the webhook and the fetch ---------------------------------------------


@dataclass
class RelayProcess:
    url: str
    twilio: FakeTwilio
    worker: FakeWorker
    env: dict[str, str]
    log: Path


@asynccontextmanager
async def relay_process(tmp: Path) -> AsyncIterator[RelayProcess]:
    """The relay as deployed (`python -m relay`, killable), with fake Twilio and worker."""
    twilio, worker = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN), FakeWorker(WORKER_TOKEN)
    port = free_port()
    async with AsyncExitStack() as stack:
        stack.push_async_callback(worker.aclose)
        twilio.api_url = await stack.enter_async_context(run_server(twilio.app()))
        twilio.cdn_url = await stack.enter_async_context(run_server(twilio.cdn_app()))
        worker_url = await stack.enter_async_context(run_server(worker.app()))
        env = relay_env(tmp / "relay.sqlite3", twilio.api_url, worker_url, PORT=str(port), HOST="127.0.0.1")
        yield RelayProcess(f"http://127.0.0.1:{port}", twilio, worker, env, tmp / "relay.log")


async def test_a_restart_between_the_webhook_and_the_fetch_loses_nothing(tmp_path: Path) -> None:
    async with relay_process(tmp_path) as relay, httpx.AsyncClient() as http:
        relay.twilio.cdn_hold = anyio.Event()  # the download hangs until the relay is dead
        url = relay.twilio.add_media(PNG, "image/png")
        params = message_params("what is this", media=[(url, "image/png")])
        with child("relay", relay.env, relay.log) as proc:
            await wait_healthy(relay.url, proc)
            response = await http.post(
                f"{relay.url}/webhook", data=params, headers=signed_form(PUBLIC_URL + "/webhook", params)
            )
            assert response.status_code == 200  # acknowledged before any fetch
            await wait_for(lambda: relay.twilio.cdn_requests, what="the download to begin")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        assert relay.worker.commands() == []
        relay.twilio.cdn_hold.set()
        with child("relay", relay.env, relay.log) as proc:
            await wait_healthy(relay.url, proc)
            commands = await wait_for(relay.worker.commands, 20, "the prompt after the restart")
        assert len(commands) == 1 and commands[0]["text"] == "what is this"
        assert commands[0]["attachments"][0]["sha256"] == hashlib.sha256(PNG).hexdigest()
        assert len(relay.twilio.cdn_requests) == 2  # taken again from the start


# --- the pieces -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        pytest.param(f"{BASE}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/MM12/Media/ME34", True, id="ours"),
        pytest.param(f"{BASE}/2010-04-01/Accounts/AC{'f' * 32}/Messages/MM12/Media/ME34", False, id="other-account"),
        pytest.param(f"https://evil.test/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/MM1/Media/ME1", False, id="host"),
        pytest.param(
            f"http://api.twilio.com/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/MM1/Media/ME1", False, id="http"
        ),
        pytest.param(
            f"https://api.twilio.com:8443/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/M/Media/M", False, id="port"
        ),
        pytest.param(
            f"https://u:p@api.twilio.com/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/M/Media/M", False, id="userinfo"
        ),
        pytest.param(f"{BASE}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/MM1/Media/../../../Calls", False, id="dots"),
        pytest.param(f"{BASE}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/MM1/Media/ME1?x=1", False, id="query"),
        pytest.param(f"{BASE}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/MM1/Media/ME1%2F", False, id="encoded"),
        pytest.param(f"{BASE}/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json", False, id="not-media"),
        pytest.param("file:///etc/passwd", False, id="file"),
        pytest.param("", False, id="empty"),
        pytest.param("http://[::1", False, id="malformed"),
    ],
)
def test_only_twilio_media_urls_of_our_account_are_fetched(url: str, ok: bool) -> None:
    assert is_twilio_media(url, api_base=BASE, account_sid=ACCOUNT_SID) is ok


def test_the_media_list_the_webhook_records() -> None:
    assert media_list({"NumMedia": "0"}) is None and media_list({}) is None
    form = {"NumMedia": "2", "MediaUrl0": "u0", "MediaContentType0": "Audio/OGG; codecs=opus", "MediaUrl1": "u1"}
    assert media_list(form) == {
        "count": 2,
        "items": [
            {"url": "u0", "content_type": "audio/ogg"},
            {"url": "u1", "content_type": "application/octet-stream"},
        ],
    }
    assert media_list({"NumMedia": "many", "MediaUrl0": "u0"}) == {
        "count": 1,
        "items": [{"url": "u0", "content_type": "application/octet-stream"}],
    }
    assert media_list({"NumMedia": "25"})["count"] == 25  # type: ignore[index]


def test_a_kept_or_queued_prompt_keeps_its_files() -> None:
    ctx = Context(now=1000.0, approval_timeout_s=60)
    photo = Attachment("f" * 32, "image/png", 68, "0" * 64, "photo-1.png")
    conv, effects = apply(Conversation("+15550001111"), Prompt("look", "m1", (photo,)), ctx)
    assert [e.command.attachments for e in effects if isinstance(e, CallWorker)] == [(photo,)]  # type: ignore[union-attr]
    conv, _ = apply(conv, Unreachable("command", "m1", "asleep"), ctx)
    assert conv.kept is not None and conv.kept.attachments == (photo,)
    saved = Conversation.from_json(conv.to_json())  # through the database's JSON
    assert saved.kept is not None and saved.kept.attachments == (photo,)
    again, effects = apply(saved, Word("retry"), ctx)
    assert [e.command.attachments for e in effects if isinstance(e, CallWorker)] == [(photo,)]  # type: ignore[union-attr]
    queued, _ = apply(again, Prompt("and this", "m2", (photo,)), ctx)
    assert Conversation.from_json(queued.to_json()).queue[0].attachments == (photo,)


def test_files_are_pruned_only_once_no_prompt_needs_them(tmp_path: Path) -> None:
    store = MediaStore(tmp_path / "media")
    now = time.time()
    for name in ("a" * 32, "b" * 32, "c" * 32):
        (store.root / name).write_bytes(PNG)
    os.utime(store.root / ("a" * 32), (now - 3 * 86400, now - 3 * 86400))
    os.utime(store.root / ("b" * 32), (now - 3 * 86400, now - 3 * 86400))
    assert store.prune(now, in_use={"b" * 32}) == 1  # old and unneeded; old but queued; new
    assert sorted(p.name for p in store.root.iterdir()) == ["b" * 32, "c" * 32]
