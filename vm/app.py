"""The worker's ASGI app: `create_app(settings, ...)` wires routes, the agent and background work."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from common.http import Problem, bearer_ok, error, read_message
from common.protocol import (
    OwnerCall,
    RunPrompt,
    TakeScreenshot,
    decode_command,
    encode_answer,
)
from common.serve import Listening
from vm.agent import Agent
from vm.browser import BrowserPool
from vm.callbacks import CallbackSender
from vm.credentials import CredentialCheck, model_credentials
from vm.github import GitHub
from vm.idle import IdleWatch
from vm.images import ImageStore
from vm.lazy_http import LazyHTTP
from vm.presence import Announcer
from vm.sandbox import Sandbox, agent_may_inherit
from vm.settings import Settings
from vm.supervisor import Supervisor
from vm.suspend import Machine, ResumeWatch
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


@dataclass(frozen=True)
class Services:
    """What the lifespan builds and the routes use."""

    worker: Worker
    watch: IdleWatch
    images: ImageStore
    supervisor: Supervisor
    resume: ResumeWatch


def create_app(
    settings: Settings,
    *,
    agent: Agent | None = None,
    http: httpx.AsyncClient | None = None,
    on_idle: Callable[[], Awaitable[None] | None] | None = None,
    listening: Listening | None = None,
) -> Starlette:
    """Build the worker. `on_idle` is called once when the idle timer fires (the CLI stops uvicorn);
    the worker tells the relay it is up once `listening` is set (at once without one)."""
    started = time.monotonic()
    # `python -m vm` drops every variable the agent may not inherit before this runs; blanking
    # any that are still there keeps an app made some other way (a test) just as safe.
    env = {name: "" for name in os.environ if not agent_may_inherit(name)}
    services: Services | None = None

    def live() -> Services:
        assert services is not None, "the lifespan has not started"
        return services

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal services
        client = LazyHTTP(http)
        callbacks = CallbackSender(
            settings.state_dir / "outbox", settings.relay_callback_url, settings.worker_token, client
        )
        # Each pull request names its repository (Settings.pull_request_repo).
        github = (
            GitHub(client, api_url=settings.github_api_url, token=settings.github_token)
            if settings.github_token
            else None
        )
        browser = BrowserPool(settings.chromium_path)
        images = ImageStore(settings.images_dir, settings.image_ttl_s)
        sandbox = Sandbox(
            workspace_dir=settings.workspace_dir,
            state_dir=settings.state_dir,
            claude_config_dir=settings.claude_config_dir,
            isolated=settings.agent_isolation,
            uid_base=settings.agent_uid_base,
        )
        await sandbox.start(settings.state_dir, settings.images_dir)
        model = agent or Agent(env)
        credentials = CredentialCheck(
            settings.state_dir / "credentials.json",
            model_credentials(model.credentials_env(), settings.claude_config_dir),
            settings.github_token,
            settings.github_api_url,
            client,
            callbacks,
            app=settings.fly_app_name,
        )
        worker = Worker(settings, callbacks, model, browser, images, github, sandbox, credentials=credentials)
        announcer = Announcer(settings.relay_callback_url, settings.worker_token, owner=settings.owner_phone)

        async def announce_then_build() -> None:
            """Say "up" first: it is what the relay waits for, and making the HTTP client (an
            import and a CA bundle, on a thread) would hold the GIL while it goes out."""
            if listening is not None:
                await listening.wait()
            await announcer.up()
            await client.build()
            await credentials.on_wake()  # at most once a day (vm/credentials.py)

        async def idle() -> bool:
            """Sleep: suspended (True once resumed) or, failing that, exiting (False)."""
            try:
                await announcer.say("sleeping")
            except Exception:  # refusing calls from here on, the worker must exit, whatever failed
                logger.exception("could not tell the relay about going to sleep")
            if settings.idle_action == "suspend" and await _suspend(machine):
                if await resume.wait():
                    tg.start_soon(after_resume)
                    return True
                logger.warning("Fly agreed to suspend this Machine, yet it still runs: exiting instead")
            if on_idle is not None:
                result = on_idle()
                if result is not None:
                    await result
            return False

        async def after_resume() -> None:
            await client.renew()  # connections made before the snapshot cannot be trusted
            await announcer.up()
            credentials.new_wake()  # a resume is a wake
            await credentials.on_wake()

        watch = IdleWatch(settings.idle_timeout_s, busy=lambda: worker.busy, on_idle=idle)
        machine = Machine(settings.fly_api_socket, settings.fly_app_name, settings.fly_machine_id)
        resume = ResumeWatch(machine)
        supervisor = Supervisor()
        services = Services(worker, watch, images, supervisor, resume)
        try:
            async with anyio.create_task_group() as tg:
                # Each loop outlives its failures (vm/supervisor.py): one bad spool file or one
                # full disk must not leave a worker that answers /health and does nothing else.
                tg.start_soon(announce_then_build)
                tg.start_soon(supervisor.keep, "the callback sender", callbacks.run)
                tg.start_soon(supervisor.keep, "the idle timer", watch.run)
                tg.start_soon(supervisor.keep, "image expiry", lambda: _expire_images(images))
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
        """200 while the worker can serve; 503 while it goes to sleep or something keeps failing,
        so Fly's checks and the relay see a worker that would not do what it is asked."""
        running = live()
        problems = [*running.worker.problems, *running.supervisor.problems]
        if running.watch.closing and not await running.resume.confirm():
            problems.append("going to sleep")
        body: dict[str, object] = {
            "status": "failing" if problems else "ok",
            "deployed_sha": settings.deployed_sha,
            "uptime_s": round(time.monotonic() - started, 3),
            "busy": running.worker.busy,
        }
        if problems:
            body["problems"] = problems
        return JSONResponse(body, status_code=503 if problems else 200)

    Endpoint = Callable[[Request], Awaitable[Response]]

    def authed(route: str, handler: Callable[..., Awaitable[Reply] | Reply]) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            if not bearer_ok(request, settings.worker_token):
                return error(401, "missing or wrong bearer token")
            running = live()
            running.watch.touch()
            try:
                command = await read_message(request, MAX_BODY, lambda data: decode_command(route, data))
                if settings.owner_phone and command.phone != settings.owner_phone:
                    # A worker serving one owner holds that owner's volume only: another's work
                    # has no place here, and running it would be running it on the wrong Machine.
                    return error(403, "this worker serves one owner (OWNER_PHONE); the command is for another")
                if running.watch.closing and not await running.resume.confirm():
                    # Decided to sleep: refuse, so nothing is accepted and then dropped by the exit.
                    # (Suspended and resumed, as Fly confirms, it serves the request instead.)
                    return error(503, "the VM is going to sleep; wake it again")
                result = handler(command)
                reply = await result if not isinstance(result, Reply) else result
            except Problem as exc:
                return error(exc.status, exc.detail)
            except OSError as exc:  # the state could not be written: nothing was accepted
                logger.exception("%s could not be recorded", route)
                return error(503, f"the VM cannot write its state ({exc.strerror or type(exc).__name__})")
            # Instead of uvicorn's access log, which would also print image names (capabilities).
            logger.info("%s %s -> %d", request.method, request.url.path, reply.status)
            return JSONResponse(encode_answer(reply.answer), status_code=reply.status)

        return endpoint

    def run(command: RunPrompt) -> Reply:
        return live().worker.command(command)

    def screenshot(command: TakeScreenshot) -> Reply:
        return live().worker.screenshot(command)

    def owner_call(command: OwnerCall) -> Awaitable[Reply] | Reply:
        worker = live().worker
        calls: dict[str, Callable[[str], Awaitable[Reply] | Reply]] = {
            "approve": worker.approve,
            "reject": worker.reject,
            "cancel": worker.cancel,
            "status": worker.status,
        }
        return calls[command.route](command.phone)

    async def image(request: Request) -> Response:
        if not bearer_ok(request, settings.worker_token):
            return error(401, "missing or wrong bearer token")
        path = live().images.resolve(request.path_params["name"])
        if path is None:
            return error(404, "no such image")
        return FileResponse(path, media_type="image/png")

    async def test_app(request: Request) -> Response:
        return HTMLResponse(TEST_APP)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/command", authed("command", run), methods=["POST"]),
        Route("/screenshot", authed("screenshot", screenshot), methods=["POST"]),
        *[
            Route(f"/{name}", authed(name, owner_call), methods=["POST"])
            for name in ("approve", "reject", "cancel", "status")
        ],
        Route("/images/{name:path}", image, methods=["GET"]),
    ]
    if settings.enable_test_app:
        routes.append(Route("/test-app", test_app, methods=["GET"]))
    app = Starlette(routes=routes, lifespan=lifespan)
    app.router.redirect_slashes = False  # a path either is a route or is a 404; never a redirect
    return app


async def _suspend(machine: Machine) -> bool:
    try:
        return await machine.suspend()
    except Exception:  # whatever went wrong, exiting is the way to sleep that is left
        logger.exception("could not suspend this Machine")
        return False


async def _expire_images(images: ImageStore) -> None:
    while True:
        removed = await anyio.to_thread.run_sync(images.expire)
        if removed:
            logger.info("deleted %d expired images", removed)
        await anyio.sleep(600)
