"""The worker's ASGI app: `create_app(settings, ...)` wires routes, the agent and background work."""

from __future__ import annotations

import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from common.config import E164
from vm.agent import Agent
from vm.browser import BrowserPool
from vm.callbacks import CallbackSender
from vm.github import GitHub
from vm.idle import IdleWatch
from vm.images import ImageStore
from vm.lazy_http import LazyHTTP
from vm.runs import IllegalRunTransition
from vm.sandbox import Sandbox, agent_may_inherit
from vm.settings import Settings
from vm.worker import Reply, Worker

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
TEST_APP = """<!doctype html><html><head><meta charset="utf-8"><title>textslash test app</title>
<style>body{font-family:sans-serif;margin:0;background:#f6f8fa;color:#1f2328}
header{background:#1f6feb;color:#fff;padding:16px 32px;font-size:22px;font-weight:bold}
main{max-width:720px;margin:32px auto;background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:24px}
li{padding:8px 0;border-bottom:1px solid #eaeef2;list-style:none}.done{color:#57606a;text-decoration:line-through}
</style></head><body><header>Hello from your VM</header><main><h2>Today</h2><ul>
<li class="done">Text a prompt from the phone</li><li class="done">Watch the agent work</li>
<li>Approve the pull request</li></ul><p>textslash took this screenshot with Playwright.</p></main></body></html>"""


class BadRequest(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def create_app(settings: Settings, *, agent: Agent | None = None, http: httpx.AsyncClient | None = None,
               on_idle: Callable[[], Awaitable[None] | None] | None = None) -> Starlette:
    """Build the worker. `on_idle` is called once when the idle timer fires (the CLI stops uvicorn)."""
    started = time.monotonic()
    # `python -m vm` drops every variable the agent may not inherit before this runs; blanking
    # any that are still there keeps an app made some other way (a test) just as safe.
    env = {name: "" for name in os.environ if not agent_may_inherit(name)}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client = LazyHTTP(http)
        callbacks = CallbackSender(settings.state_dir / "outbox", settings.relay_callback_url, settings.worker_token,
                                   client)
        github = None
        if settings.github_token and settings.github_repo:
            github = GitHub(client, api_url=settings.github_api_url, token=settings.github_token,
                            repo=settings.github_repo)
        browser = BrowserPool(settings.chromium_path)
        images = ImageStore(settings.images_dir, settings.image_ttl_s)
        sandbox = Sandbox(workspace_dir=settings.workspace_dir, state_dir=settings.state_dir,
                          claude_config_dir=settings.claude_config_dir, isolated=settings.agent_isolation)
        await sandbox.start(settings.state_dir, settings.images_dir)
        worker = Worker(settings, callbacks, agent or Agent(env), browser, images, github, sandbox)

        async def idle() -> None:
            await _say_goodnight(client, settings, worker.phones)
            if on_idle is not None:
                result = on_idle()
                if result is not None:
                    await result

        watch = IdleWatch(settings.idle_timeout_s, busy=lambda: worker.busy, on_idle=idle)
        app.state.worker, app.state.watch, app.state.images = worker, watch, images
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.build)
                tg.start_soon(callbacks.run)
                tg.start_soon(watch.run)
                tg.start_soon(_expire_images, images)
                browser.start(tg)
                await worker.start(tg)
                yield
                with anyio.move_on_after(6, shield=True):
                    await worker.shutdown()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await browser.close()
                await client.aclose()

    async def health(request: Request) -> JSONResponse:
        worker: Worker = request.app.state.worker
        return JSONResponse({"status": "ok", "deployed_sha": settings.deployed_sha,
                             "uptime_s": round(time.monotonic() - started, 3), "busy": worker.busy})

    def authed(handler: Callable[[Request, dict[str, Any]], Awaitable[Reply] | Reply]) -> Any:
        async def endpoint(request: Request) -> Response:
            if not _bearer_ok(request, settings.worker_token):
                return _error(401, "missing or wrong bearer token")
            request.app.state.watch.touch()
            try:
                body = await _json_body(request)
                result = handler(request, body)
                reply = await result if not isinstance(result, Reply) else result
            except BadRequest as exc:
                return _error(exc.status, exc.detail)
            except IllegalRunTransition as exc:
                return _error(409, str(exc))
            # Instead of uvicorn's access log, which would also print image names (capabilities).
            logger.info("%s %s -> %d", request.method, request.url.path, reply.status)
            return JSONResponse(reply.body, status_code=reply.status)
        return endpoint

    def command(request: Request, body: dict[str, Any]) -> Reply:
        phone, text, message_id = _phone(body), body.get("text"), body.get("message_id")
        if not isinstance(text, str) or not text.strip():
            raise BadRequest(422, "text must be a non-empty string")
        if not isinstance(message_id, str) or not 0 < len(message_id) <= 100:
            raise BadRequest(422, "message_id must be a non-empty string")
        worker: Worker = request.app.state.worker
        return worker.command(phone, text, message_id, new_session=body.get("new_session") is True)

    def approve(request: Request, body: dict[str, Any]) -> Reply:
        return request.app.state.worker.approve(_phone(body))  # type: ignore[no-any-return]

    def reject(request: Request, body: dict[str, Any]) -> Reply:
        return request.app.state.worker.reject(_phone(body))  # type: ignore[no-any-return]

    async def cancel(request: Request, body: dict[str, Any]) -> Reply:
        return await request.app.state.worker.cancel(_phone(body))  # type: ignore[no-any-return]

    async def image(request: Request) -> Response:
        if not _bearer_ok(request, settings.worker_token):
            return _error(401, "missing or wrong bearer token")
        path = request.app.state.images.resolve(request.path_params["name"])
        if path is None:
            return _error(404, "no such image")
        return FileResponse(path, media_type="image/png")

    async def test_app(request: Request) -> Response:
        return HTMLResponse(TEST_APP)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/command", authed(command), methods=["POST"]),
        Route("/approve", authed(approve), methods=["POST"]),
        Route("/reject", authed(reject), methods=["POST"]),
        Route("/cancel", authed(cancel), methods=["POST"]),
        Route("/images/{name:path}", image, methods=["GET"]),
    ]
    if settings.enable_test_app:
        routes.append(Route("/test-app", test_app, methods=["GET"]))
    app = Starlette(routes=routes, lifespan=lifespan)
    app.router.redirect_slashes = False  # a path either is a route or is a 404; never a redirect
    return app


async def _json_body(request: Request) -> dict[str, Any]:
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise BadRequest(413, "body too large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadRequest(400, "client disconnected") from None
    try:
        data = json.loads(b"".join(chunks).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BadRequest(400, "body must be JSON") from None
    if not isinstance(data, dict):
        raise BadRequest(422, "body must be a JSON object")
    return data


def _phone(body: dict[str, Any]) -> str:
    phone = body.get("phone")
    if not isinstance(phone, str) or not E164.match(phone):
        raise BadRequest(422, "phone must be an E.164 number like +15551234567")
    return phone


def _bearer_ok(request: Request, token: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), token.encode())


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


async def _expire_images(images: ImageStore) -> None:
    while True:
        removed = await anyio.to_thread.run_sync(images.expire)
        if removed:
            logger.info("deleted %d expired images", removed)
        await anyio.sleep(600)


async def _say_goodnight(lazy: LazyHTTP, settings: Settings, phones: list[str]) -> None:
    """Tell the relay the worker is going to sleep, so `status` can say so without waking it.

    Best effort and never spooled: a stale "sleeping" delivered after the next boot would lie.
    """
    import httpx

    client = await lazy.get()
    headers = {"Authorization": f"Bearer {settings.worker_token}"}
    for phone in phones[:1]:  # the relay keeps one state for the worker: one owner's route is enough
        event = {"type": "sleeping", "run_id": "idle", "seq": time.time_ns()}
        try:
            await client.post(f"{settings.relay_callback_url}/callback/{phone}", json=event, headers=headers,
                              timeout=2.0)
        except httpx.HTTPError:
            logger.info("could not tell the relay about going to sleep")
