"""The relay's ASGI app: `create_app(settings, ...)` wires routes, storage and background work."""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import anyio
import httpx
from starlette.applications import Starlette
from starlette.datastructures import ImmutableMultiDict
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from relay import store
from relay.dispatcher import Dispatcher
from relay.events import IMAGE_NAME, BadEvent, worker_event_from_json, worker_event_to_json
from relay.settings import E164, Settings, mask_phone
from relay.twilio import TwilioSender, signature_is_valid
from relay.worker_client import WorkerClient

logger = logging.getLogger(__name__)

EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response />'
MAX_WEBHOOK_BYTES = 64 * 1024  # Twilio's form posts are a few KB; anything bigger is not Twilio
MAX_CALLBACK_BYTES = 256 * 1024
MAX_IMAGE_BYTES = 5 * 1024 * 1024  # WhatsApp's own limit for an image
# Twilio fetches an image when it sends the message (and on its retries, within hours).
IMAGE_CACHE_TTL_S = 48 * 3600


class BodyTooLarge(Exception):
    pass


def create_app(settings: Settings, *, sender: TwilioSender | None = None, http: httpx.AsyncClient | None = None,
               clock: Callable[[], float] = time.time) -> Starlette:
    """Build the relay. Tests pass their own `sender` (pointed at a fake) or `http` client."""
    started = time.monotonic()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        db = store.Database(settings.relay_db)
        settings.images_dir.mkdir(parents=True, exist_ok=True)
        client = http or httpx.AsyncClient()
        twilio = sender or TwilioSender(
            account_sid=settings.twilio_account_sid, auth_token=settings.twilio_auth_token,
            from_number=settings.twilio_whatsapp_number, base_url=settings.twilio_api_base_url,
            media_base_url=f"{settings.public_url}/images",
        )
        worker = WorkerClient(client, base_url=settings.claude_host, token=settings.worker_token)
        dispatcher = Dispatcher(settings, db, twilio, worker, clock)
        app.state.dispatcher, app.state.worker = dispatcher, worker
        try:
            async with anyio.create_task_group() as tg:
                await dispatcher.run(tg)
                tg.start_soon(_housekeeping, db, settings, clock)
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

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "deployed_sha": settings.deployed_sha,
                             "uptime_s": round(time.monotonic() - started, 3)})

    async def webhook(request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
            return _error(415, "expected application/x-www-form-urlencoded")
        try:
            form = _parse_form(await _read_body(request, MAX_WEBHOOK_BYTES))
        except BodyTooLarge:
            return _error(413, "body too large")
        except (UnicodeDecodeError, ValueError):
            return _error(400, "malformed form body")
        except ClientDisconnect:
            return _error(400, "client disconnected")
        url = settings.public_url + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        signature = request.headers.get("x-twilio-signature")
        if not signature_is_valid(auth_token=settings.twilio_auth_token, url=url, params=form, signature=signature):
            return _error(403, "invalid Twilio signature")
        sender, sid, body = form.get("From", ""), form.get("MessageSid", ""), form.get("Body", "")
        phone = sender.removeprefix("whatsapp:")
        if not sid or not E164.match(phone):
            return _error(400, "From (an E.164 number) and MessageSid are required")
        if not sender.startswith("whatsapp:"):
            # An SMS (or voice) sender's number is easy to spoof; owners are WhatsApp senders only.
            logger.info("ignored a message from %s: not sent over WhatsApp", mask_phone(phone))
            return _twiml()
        if phone not in settings.allowed_phone_numbers:
            logger.info("ignored a message from %s: not in ALLOWED_PHONE_NUMBERS", mask_phone(phone))
            return _twiml()
        event = {"type": "owner", "text": body, "message_id": sid}
        if not await request.app.state.dispatcher.record(phone, f"msg:{sid}", event):
            logger.info("duplicate MessageSid %s ignored", sid)
        return _twiml()

    async def callback(request: Request) -> Response:
        if not _bearer_ok(request, settings.worker_token):
            return _error(401, "missing or wrong bearer token")
        phone = request.path_params["phone"].removeprefix("whatsapp:")
        if phone not in settings.allowed_phone_numbers:
            return _error(404, "unknown phone")
        try:
            data = _json(await _read_body(request, MAX_CALLBACK_BYTES))
            event, seq = worker_event_from_json(data)
        except BodyTooLarge:
            return _error(413, "body too large")
        except (BadEvent, ValueError, UnicodeDecodeError) as exc:
            return _error(422, str(exc))
        except ClientDisconnect:
            return _error(400, "client disconnected")
        dispatcher: Dispatcher = request.app.state.dispatcher
        if event.type == "sleeping":
            await dispatcher.db.run(store.worker_slept, clock())
            return JSONResponse({"ok": True})
        for name in event.images:
            if not await _cache_image(request.app.state.worker, settings.images_dir, name):
                # The worker retries the callback, so the image is fetched while it is awake.
                # (No name in the answer: the worker logs it, and a name is a capability.)
                return _error(502, "could not fetch an image from the worker")
        new = await dispatcher.record(phone, f"evt:{event.run_id}:{seq}", {**worker_event_to_json(event), "seq": seq},
                                      from_worker=True)
        return JSONResponse({"ok": True, "duplicate": not new})

    async def image(request: Request) -> Response:
        # Only what a worker callback put in the cache: anyone may ask, so a miss never reaches
        # the worker (over Flycast that request would start its Machine).
        name = request.path_params["name"]
        path = settings.images_dir / name
        if not IMAGE_NAME.match(name) or not path.is_file():
            return _error(404, "no such image")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/webhook", webhook, methods=["POST"]),
        Route("/callback/{phone}", callback, methods=["POST"]),
        Route("/images/{name}", image, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.router.redirect_slashes = False  # a path either is a route or is a 404; never a redirect
    return app


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_form(body: bytes) -> ImmutableMultiDict[str, str]:
    # Twilio posts plain urlencoded forms; parsing them here avoids a multipart dependency.
    text = body.decode("utf-8")
    return ImmutableMultiDict(parse_qsl(text, keep_blank_values=True, errors="strict"))


def _json(body: bytes) -> Any:
    return json.loads(body.decode("utf-8"))


def _bearer_ok(request: Request, token: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), token.encode())


async def _cache_image(worker: WorkerClient, images_dir: Path, name: str) -> bool:
    """Make sure `name` is in the relay's cache, fetching it from the worker if needed."""
    path = images_dir / name
    if path.is_file():
        return True
    data = await worker.fetch_image(name)
    if data is None or len(data) > MAX_IMAGE_BYTES:
        return False
    # Write under a temporary name and rename, so a reader never sees half a PNG.
    tmp = images_dir / f".{name}.{secrets.token_hex(4)}.tmp"
    await anyio.Path(tmp).write_bytes(data)
    os.replace(tmp, path)
    return True


def prune_images(images_dir: Path, now: float, max_age_s: float = IMAGE_CACHE_TTL_S) -> int:
    """Delete cached images (and stray partial writes) older than `max_age_s`; returns how many."""
    removed = 0
    for path in images_dir.iterdir():
        try:
            if path.is_file() and now - path.stat().st_mtime > max_age_s:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    return removed


async def _housekeeping(db: store.Database, settings: Settings, clock: Callable[[], float]) -> None:
    """Hourly: cached images past their 48 hours, and finished rows past RETENTION_DAYS."""
    while True:
        removed = await anyio.to_thread.run_sync(prune_images, settings.images_dir, clock())
        if removed:
            logger.info("pruned %d cached images", removed)
        rows, batch = 0, -1
        while batch != 0:
            batch = await db.run(store.prune, clock() - settings.retention_s)
            rows += batch
        if rows:
            logger.info("pruned %d finished rows older than %.0f days", rows, settings.retention_s / 86400)
        await anyio.sleep(3600)


def _twiml() -> Response:
    return Response(EMPTY_TWIML, media_type="text/xml")


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)
