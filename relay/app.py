"""The relay's ASGI app: `create_app(settings, ...)` wires routes, storage and background work."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from urllib.parse import parse_qsl

import anyio
import httpx
from starlette.applications import Starlette
from starlette.datastructures import ImmutableMultiDict
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from common.http import Problem, bearer_ok, error, read_body, read_message
from common.machines import MachinesAPI
from common.protocol import decode_credentials, decode_presence, decode_report, encode_report
from relay import store, usage, window
from relay.dispatcher import Dispatcher
from relay.events import BUTTON_WORDS
from relay.fleet import Fleet, FleetError, SharedWorker, Workers, bearer_for
from relay.images import ImageCache
from relay.media import Media, MediaStore, media_list
from relay.settings import E164, Settings, mask_phone
from relay.twilio import TwilioSender, signature_is_valid
from relay.worker_client import WorkerClient

logger = logging.getLogger(__name__)

EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response />'
MAX_WEBHOOK_BYTES = 64 * 1024  # Twilio's form posts are a few KB; anything bigger is not Twilio
MAX_CALLBACK_BYTES = 256 * 1024  # above the protocol's MAX_REPORT_BYTES, so every report fits
STATUS_PATH = "/twilio/status"  # each message's fate (relay/window.py), signed like the webhook
MESSAGE_SID = re.compile(r"^(?:SM|MM)[0-9a-fA-F]{32}$")


@dataclass(frozen=True)
class Services:
    """What the lifespan builds and the routes use."""

    dispatcher: Dispatcher
    images: ImageCache
    media: MediaStore
    workers: Workers


def create_app(
    settings: Settings,
    *,
    sender: TwilioSender | None = None,
    http: httpx.AsyncClient | None = None,
    clock: Callable[[], float] = time.time,
) -> Starlette:
    """Build the relay. Tests pass their own `sender` (pointed at a fake) or `http` client."""
    started = time.monotonic()
    services: Services | None = None

    def live() -> Services:
        assert services is not None, "the lifespan has not started"
        return services

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal services
        db = store.Database(settings.relay_db)
        client = http or httpx.AsyncClient()
        twilio = sender or TwilioSender(
            account_sid=settings.twilio_account_sid,
            auth_token=settings.twilio_auth_token,
            from_number=settings.twilio_whatsapp_number,
            base_url=settings.twilio_api_base_url,
            media_base_url=f"{settings.public_url}/images",
            status_callback=settings.public_url + STATUS_PATH,
        )
        workers = _workers(settings, db, client, clock)
        files = MediaStore(settings.media_dir)
        media = Media(
            files,
            client,
            api_base=settings.twilio_api_base_url,
            account_sid=settings.twilio_account_sid,
            auth_token=settings.twilio_auth_token,
        )
        dispatcher = Dispatcher(settings, db, twilio, workers, clock, media)
        services = Services(dispatcher, ImageCache(settings.images_dir), files, workers)
        try:
            # The sender's aiohttp session lives exactly as long as the lanes that send.
            async with twilio, anyio.create_task_group() as tg:
                await dispatcher.run(tg)
                tg.start_soon(_housekeeping, db, services, settings, clock)
                yield
                # uvicorn has stopped taking requests; give lanes a moment to finish the
                # send or call in hand (all state is in SQLite, so cutting them loses nothing).
                with anyio.move_on_after(5):
                    while dispatcher.busy:  # noqa: ASYNC110 - a bounded drain at shutdown only
                        await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
        finally:
            if http is None:
                await client.aclose()
            db.close()

    def from_a_worker(request: Request) -> bool:
        """The bearer token of some worker: the shared one's, or any owner's own Machine's."""
        if not settings.per_owner:
            return bearer_ok(request, settings.worker_token)
        # Every owner's is compared, so the time taken says nothing about which one matched.
        return sum(bearer_ok(request, bearer_for(settings, p)) for p in settings.allowed_phone_numbers) > 0

    async def health(request: Request) -> JSONResponse:
        return JSONResponse(
            {"status": "ok", "deployed_sha": settings.deployed_sha, "uptime_s": round(time.monotonic() - started, 3)}
        )

    async def signed_form(request: Request) -> ImmutableMultiDict[str, str] | Response:
        """A form Twilio posted, checked against the public URL it was configured with; or the 4xx."""
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
            return error(415, "expected application/x-www-form-urlencoded")
        try:
            form = _parse_form(await read_body(request, MAX_WEBHOOK_BYTES))
        except Problem as exc:
            return error(exc.status, exc.detail)
        except (UnicodeDecodeError, ValueError):
            return error(400, "malformed form body")
        url = settings.public_url + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        signature = request.headers.get("x-twilio-signature")
        if not signature_is_valid(auth_token=settings.twilio_auth_token, url=url, params=form, signature=signature):
            return error(403, "invalid Twilio signature")
        return form

    async def webhook(request: Request) -> Response:
        form = await signed_form(request)
        if isinstance(form, Response):
            return form
        sender, sid, body = form.get("From", ""), form.get("MessageSid", ""), form.get("Body", "")
        phone = sender.removeprefix("whatsapp:")
        if not sid or not E164.match(phone):
            return error(400, "From (an E.164 number) and MessageSid are required")
        if not sender.startswith("whatsapp:"):
            # An SMS (or voice) sender's number is easy to spoof; owners are WhatsApp senders only.
            logger.info("ignored a message from %s: not sent over WhatsApp", mask_phone(phone))
            return _twiml()
        if phone not in settings.allowed_phone_numbers:
            logger.info("ignored a message from %s: not in ALLOWED_PHONE_NUMBERS", mask_phone(phone))
            return _twiml()
        event: dict[str, object] = {"type": "owner", "text": body, "message_id": sid}
        # A tapped quick-reply button (relay/buttons.py) means its word, whatever the body says;
        # Twilio names the message it was on, and so the run it acts on (a stale tap does nothing).
        if (payload := form.get("ButtonPayload", "").strip().lower()) in BUTTON_WORDS:
            event["text"] = payload
            if replied := form.get("OriginalRepliedMessageSid", "").strip():
                event["tapped"] = replied[:64]
        if media := media_list(form):  # taken from Twilio later, in the owner's inbox lane
            event["media"] = media
        if not await live().dispatcher.record(phone, f"msg:{sid}", event):
            logger.info("duplicate MessageSid %s ignored", sid)
        return _twiml()

    async def message_status(request: Request) -> Response:
        """Twilio's status callback for a message the relay sent. Only failures matter here (a
        63016 holds the message: relay/window.py); they are recorded once before Twilio gets its
        answer, and every other status is acknowledged and dropped."""
        form = await signed_form(request)
        if isinstance(form, Response):
            return form
        sid, status = form.get("MessageSid", "").strip(), form.get("MessageStatus", "").strip().lower()
        code = form.get("ErrorCode", "").strip()
        if not MESSAGE_SID.match(sid) or not status:
            return error(400, "MessageSid (SM or MM + 32 hex digits) and MessageStatus are required")
        if code and not (code.isascii() and code.isdigit() and len(code) <= 9):
            return error(400, "ErrorCode must be a number")
        if status in window.FAILED_STATUSES:
            await live().dispatcher.message_status(sid, status, int(code) if code else None)
        return Response(status_code=204)

    async def callback(request: Request) -> Response:
        phone = request.path_params["phone"].removeprefix("whatsapp:")
        if phone not in settings.allowed_phone_numbers:
            # (Looked at before the token: each owner's token differs, and an unknown phone has none.)
            return error(404 if from_a_worker(request) else 401, "unknown phone")
        if not bearer_ok(request, bearer_for(settings, phone)):
            return error(401, "missing or wrong bearer token")
        try:
            report = await read_message(request, MAX_CALLBACK_BYTES, decode_report)
        except Problem as exc:
            return error(exc.status, exc.detail)
        dispatcher = live().dispatcher
        if report.type == "sleeping":  # a worker from before presence (POST /callback)
            await dispatcher.worker_sleeping(owner=phone)
            return JSONResponse({"ok": True})
        kept = []
        worker = await _worker_of(live().workers, phone) if report.images else None
        for name in report.images:
            cached = await live().images.fetch(name, worker) if worker is not None else False
            if cached is False:
                # The worker retries the callback, so the image is fetched while it is awake.
                # (No name in the answer: the worker logs it, and a name is a capability.)
                return error(502, "could not fetch an image from the worker")
            if cached:
                kept.append(name)  # an image the worker no longer has would hold its spool forever
        # Numbers no run can have (NaN, infinity, past SQLite's integers) are cut to what one can.
        report = usage.sane(replace(report, images=tuple(kept)))
        new = await dispatcher.record(
            phone, f"evt:{report.run_id}:{report.seq}", encode_report(report), from_worker=True
        )
        return JSONResponse({"ok": True, "duplicate": not new})

    async def presence(request: Request) -> Response:
        """The worker is up (deliver what waits for it, now) or going to sleep."""
        if not from_a_worker(request):
            return error(401, "missing or wrong bearer token")
        try:
            said = await read_message(request, MAX_CALLBACK_BYTES, decode_presence)
        except Problem as exc:
            return error(exc.status, exc.detail)
        if settings.per_owner and said.owner not in settings.allowed_phone_numbers:
            # Each owner's Machine names its owner; the app's plain-deploy Machine serves no one.
            return error(403 if said.owner else 400, "a per-owner relay takes presence only from an owner's Machine")
        if not bearer_ok(request, bearer_for(settings, said.owner)):
            return error(401, "missing or wrong bearer token")
        dispatcher = live().dispatcher
        if said.state == "up":
            await dispatcher.worker_up(said.boot, said.owner)
        else:
            await dispatcher.worker_sleeping(said.awake_ms / 1000 if said.awake_ms else None, said.boot, said.owner)
        return JSONResponse({"ok": True})

    async def credentials_found(request: Request) -> Response:
        """What the worker found about a credential it depends on (relay/credentials.py). Every
        owner's Machine has the same credentials (the worker app's secrets)."""
        if not from_a_worker(request):
            return error(401, "missing or wrong bearer token")
        try:
            found = await read_message(request, MAX_CALLBACK_BYTES, decode_credentials)
        except Problem as exc:
            return error(exc.status, exc.detail)
        told = await live().dispatcher.credentials_found(found)
        return JSONResponse({"ok": True, "told": told})

    async def image(request: Request) -> Response:
        # Only what a worker callback put in the cache: anyone may ask, so a miss never reaches
        # the worker (over Flycast that request would start its Machine).
        path = live().images.path(request.path_params["name"])
        if path is None:
            return error(404, "no such image")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})

    async def media_file(request: Request) -> Response:
        """A file the owner sent, for the worker (relay/media.py); ids are unguessable and never
        logged, and the route needs the token of the worker that serves the file's owner too."""
        if not from_a_worker(request):
            return error(401, "missing or wrong bearer token")
        file_id = request.path_params["id"]
        path = live().media.path(file_id)
        if settings.per_owner and path is not None:
            # Each owner's Machine gets only its own owner's files.
            owner = await live().dispatcher.db.run(store.media_owner, file_id)
            if owner is None or not bearer_ok(request, bearer_for(settings, owner)):
                path = None  # (as if there were none: a Machine learns nothing of others' files)
        if path is None:
            return error(404, "no such file")
        return FileResponse(path, media_type="application/octet-stream", headers={"Cache-Control": "no-store"})

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/webhook", webhook, methods=["POST"]),
        Route(STATUS_PATH, message_status, methods=["POST"]),
        Route("/callback", presence, methods=["POST"]),
        Route("/callback/{phone}", callback, methods=["POST"]),
        Route("/credentials", credentials_found, methods=["POST"]),
        Route("/images/{name}", image, methods=["GET"]),
        Route("/media/{id}", media_file, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.router.redirect_slashes = False  # a path either is a route or is a 404; never a redirect
    return app


def _parse_form(body: bytes) -> ImmutableMultiDict[str, str]:
    # Twilio posts plain urlencoded forms; parsing them here avoids a multipart dependency.
    text = body.decode("utf-8")
    return ImmutableMultiDict(parse_qsl(text, keep_blank_values=True, errors="strict"))


async def _housekeeping(db: store.Database, services: Services, settings: Settings, clock: Callable[[], float]) -> None:
    """Hourly: cached images past their 48 hours, the owner's files no prompt needs any more
    (48 hours on), and finished rows past RETENTION_DAYS."""
    while True:
        removed = await anyio.to_thread.run_sync(services.images.prune, clock())
        if removed:
            logger.info("pruned %d cached images", removed)
        in_use = await db.run(store.media_in_use)
        removed = await anyio.to_thread.run_sync(services.media.prune, clock(), in_use)
        if removed:
            logger.info("pruned %d of the owners' files", removed)
        rows, batch = 0, -1
        while batch != 0:
            batch = await db.run(store.prune, clock() - settings.retention_s)
            rows += batch
        if rows:
            logger.info("pruned %d finished rows older than %.0f days", rows, settings.retention_s / 86400)
        await anyio.sleep(3600)


def _twiml() -> Response:
    return Response(EMPTY_TWIML, media_type="text/xml")


def _workers(settings: Settings, db: store.Database, http: httpx.AsyncClient, clock: Callable[[], float]) -> Workers:
    """The one shared worker, or each owner's own Machine (WORKER_MODE, relay/fleet.py)."""
    if settings.fleet is None:
        return SharedWorker(
            WorkerClient(
                http, base_url=settings.claude_host, token=settings.worker_token, poll_interval=settings.wake_poll_s
            )
        )
    api = MachinesAPI(http, settings.fleet.api_base_url, settings.fleet.api_token, settings.fleet.app)
    return Fleet(settings, settings.fleet, api, db, http, clock)


async def _worker_of(workers: Workers, phone: str) -> WorkerClient | None:
    """The worker that serves `phone` (its Machine, found again if the relay's records lost it:
    it just called); None if it cannot be found now."""
    key = workers.key_of(phone)
    try:
        return await workers.known(key) or await workers.make(key)
    except FleetError:
        return None
