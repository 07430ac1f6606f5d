"""`python -m console [--demo]`: textslash on this machine, with a local chat for WhatsApp.

Starts the relay (`python -m relay`) as its own process and the worker (`python -m vm`) on
demand behind a stand-in for Fly's proxy, so the worker sleeps and wakes as it does on Fly.
Without Twilio credentials the relay's messages go to the local chat. `--demo` adds a scripted
model, a local repository and a local GitHub stand-in: the whole loop with no account at all.
`--owners N` (N >= 2) runs per-owner mode: N local owners, each with a Machine of their own made
by the relay through a stand-in of Fly's Machines API (console/fleet.py).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import uvicorn
from dotenv import load_dotenv

from console.chat import Chat
from console.demo import SITE_FILES, demo_model, make_demo_repo
from console.fleet import LocalFleet, owners
from fakes.flyproxy import FlyProxy
from fakes.github import FakeGitHub
from fakes.machines import FakeMachines

ROOT = Path(__file__).resolve().parents[1]
LOCAL_OWNER = "+15550000001"
SANDBOX_NUMBER = "+14155238886"
logger = logging.getLogger("console")


@dataclass(frozen=True)
class Options:
    demo: bool
    host: str
    port: int
    data: Path
    owners: int = 1  # 1: one shared worker, as ever; N >= 2: per-owner mode


def owner_count(value: str) -> int:
    count = int(value)
    if not 1 <= count <= 20:
        raise argparse.ArgumentTypeError("between 1 and 20")
    return count


def parse(argv: list[str]) -> Options:
    parser = argparse.ArgumentParser(prog="python -m console", description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="a scripted model, local repo and GitHub: no account")
    parser.add_argument("--host", default="127.0.0.1", help="where the chat page listens (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="the chat page's port (default 8000)")
    parser.add_argument("--data", type=Path, help="where state and logs go (default var/demo or var/local)")
    parser.add_argument(
        "--owners",
        type=owner_count,
        default=1,
        metavar="N",
        help="N local owners, each with a worker Machine of their own (WORKER_MODE=per-owner); 1: one shared worker",
    )
    args = parser.parse_args(argv)
    data = args.data or ROOT / "var" / ("demo" if args.demo else "local")
    return Options(demo=args.demo, host=args.host, port=args.port, data=data.resolve(), owners=args.owners)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def serve(app: Any, host: str, port: int, uds: str | None = None) -> AsyncIterator[str]:
    # These small apps hold no resources, so no lifespan; Ctrl-C is handled by the console itself.
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=host, port=port, uds=uds, log_level="warning", lifespan="off", timeout_graceful_shutdown=1
        )
    )  # long polls end at once
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]

    async def run_until_told() -> None:
        with anyio.CancelScope(shield=True):  # stops through should_exit, closing its sockets properly
            await server.serve()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_until_told)
        while not server.started:
            if server.should_exit:
                raise SystemExit(f"console: could not listen on {host}:{port}")
            await anyio.sleep(0.01)
        try:
            yield f"http://{host}:{port}"
        finally:
            server.should_exit = True


def spawn(module: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    # Same process group as the console: whatever ends the console's group ends these too (a
    # suspend stops the worker's own process only, so nothing of it is left if the console dies).
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", module], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def stop(*procs: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM them all at once, then wait; SIGKILL what has not gone within 12 s."""
    running = [p for p in procs if p is not None and p.poll() is None]
    for proc in running:
        proc.terminate()
    for proc in running:
        try:
            proc.wait(timeout=12)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def run(opts: Options) -> None:
    os.umask(0o077)  # logs, the relay's database and the worker's files: private to this user
    opts.data.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    real_twilio = not opts.demo and bool(env.get("TWILIO_ACCOUNT_SID") and env.get("TWILIO_AUTH_TOKEN"))
    relay_port, worker_port, proxy_port = free_port(), free_port(), free_port()
    relay_url = f"http://127.0.0.1:{relay_port}"
    sid = env["TWILIO_ACCOUNT_SID"] if real_twilio else "AC" + secrets.token_hex(16)
    token = env["TWILIO_AUTH_TOKEN"] if real_twilio else secrets.token_hex(16)
    owner = (env.get("ALLOWED_PHONE_NUMBERS") or LOCAL_OWNER).split(",")[0].strip()
    local_owners = owners(opts.owners) if opts.owners > 1 else [owner]
    if opts.owners > 1:
        owner = local_owners[0]
    public_url = env.get("PUBLIC_URL", relay_url) if real_twilio else relay_url
    worker_token = secrets.token_urlsafe(24)
    chat_url = f"http://{opts.host}:{opts.port}"

    async with httpx.AsyncClient() as http, anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signal, tg.cancel_scope)
        chat = Chat(
            relay_url=relay_url,
            public_url=public_url,
            account_sid=sid,
            auth_token=token,
            owner=owner,
            bot_number=env.get("TWILIO_WHATSAPP_NUMBER", SANDBOX_NUMBER),
            http=http,
            demo=opts.demo,
            api_url="" if real_twilio else chat_url,  # the relay's TWILIO_API_BASE_URL (below)
            owners=tuple(local_owners),
        )
        worker_env = {
            **env,
            "WORKER_TOKEN": worker_token,
            "RELAY_CALLBACK_URL": relay_url,
            "PORT": str(worker_port),
            "HOST": "127.0.0.1",
            "WORKSPACE_DIR": str(opts.data / "workspace"),
            "IMAGES_DIR": str(opts.data / "images"),
            "ENABLE_TEST_APP": "true",
            "IDLE_TIMEOUT_MS": env.get("IDLE_TIMEOUT_MS", "120000" if opts.demo else "300000"),
        }
        if shutil.which("chromium") and not env.get("CHROMIUM_PATH"):
            worker_env["CHROMIUM_PATH"] = shutil.which("chromium") or ""
        worker_env["AGENT_ISOLATION"] = _isolation(env, opts.data)
        relay_extra: dict[str, str] = {}
        async with _stand_ins(opts, env, worker_env, relay_extra, http) as notes:
            notes.append(ISOLATION_NOTES[worker_env["AGENT_ISOLATION"]])
            proxy = FlyProxy(
                lambda: spawn("vm", worker_env, opts.data / "worker.log"),
                f"http://127.0.0.1:{worker_port}",
                http,
            )
            # The Machines API on the Machine's socket: suspending is stopping the worker's
            # processes, and the proxy resumes them on the next request, as Fly does.
            fly_api = opts.data / "fly-api.sock"
            fly_api.unlink(missing_ok=True)
            worker_env.update(
                {
                    "IDLE_ACTION": env.get("IDLE_ACTION", "suspend"),
                    "FLY_API_SOCKET": str(fly_api),
                    "FLY_APP_NAME": "textslash-vm",
                    "FLY_MACHINE_ID": "local",
                }
            )
            machines = FakeMachines(on_suspend=proxy.suspend, state=proxy.state)
            relay_env = {
                **env,
                "PUBLIC_URL": public_url,
                "TWILIO_ACCOUNT_SID": sid,
                "TWILIO_AUTH_TOKEN": token,
                "TWILIO_WHATSAPP_NUMBER": chat.bot_number,
                "ALLOWED_PHONE_NUMBERS": ",".join(local_owners),
                "CLAUDE_HOST": f"http://127.0.0.1:{proxy_port}",
                "WORKER_TOKEN": worker_token,
                "RELAY_DB": str(opts.data / "relay.sqlite3"),
                "PORT": str(relay_port),
                "HOST": "127.0.0.1",
                **relay_extra,
            }
            if not real_twilio:
                relay_env["TWILIO_API_BASE_URL"] = chat_url
                # The page's "24 h later" closes WhatsApp's window; this template reopens it.
                template = chat.add_template("textslash: {{1}} waiting for you. Reply to see them.")
                relay_env["TWILIO_TEMPLATE_CONTENT_SID"] = template  # (the page is Twilio: only it knows this one)
            fleet: LocalFleet | None = None
            fly_api_port = free_port()
            if opts.owners > 1:
                fleet = LocalFleet(
                    opts.data,
                    worker_env,
                    worker_token,
                    spawn=lambda env, log: spawn("vm", env, log),
                    free_port=free_port,
                    proxy_http=http,
                    serve_socket=lambda fake, path: tg.start_soon(_serve_socket, fake.app(), path),
                )
                fleet.load()
                relay_env.update(fleet.relay_env(f"http://127.0.0.1:{fly_api_port}", f"http://127.0.0.1:{proxy_port}"))
                notes.append(f"owners: {', '.join(local_owners)}, a worker Machine each (WORKER_MODE=per-owner)")
            relay = spawn("relay", relay_env, opts.data / "relay.log")
            try:
                # The page must not take a message the relay cannot receive yet.
                async with contextlib.AsyncExitStack() as stack:
                    if fleet is not None:  # the Machines API first: the relay may call it at once
                        await stack.enter_async_context(serve(fleet.api.app(), "127.0.0.1", fly_api_port))
                        await stack.enter_async_context(serve(fleet.router.app(), "127.0.0.1", proxy_port))
                        tg.start_soon(fleet.router.keep_states)
                    await _wait_for_relay(http, relay_url, relay, opts.data / "relay.log")
                    await stack.enter_async_context(serve(chat.app(), opts.host, opts.port))
                    if fleet is None:
                        await stack.enter_async_context(serve(proxy.app(), "127.0.0.1", proxy_port))
                        await stack.enter_async_context(serve(machines.app(), "127.0.0.1", 0, uds=str(fly_api)))
                    _banner(opts, chat_url, real_twilio, notes)
                    try:
                        await _watch(relay, opts.data / "relay.log")
                    finally:
                        chat.close()
            finally:
                # A second Ctrl-C (or uv forwarding the same SIGTERM) must not cut the cleanup short.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                proxy.resume()  # a suspended worker must run to hear the stop
                workers = [proxy.process]
                if fleet is not None:
                    fleet.router.resume_all()
                    workers = [*fleet.router.processes()]
                    fleet.save()
                stop(*workers, relay)
                tg.cancel_scope.cancel()


@asynccontextmanager
async def _stand_ins(
    opts: Options, env: dict[str, str], worker_env: dict[str, str], relay_env: dict[str, str], http: httpx.AsyncClient
) -> AsyncIterator[list[str]]:
    """In demo mode (or without a repository or GitHub token), local stand-ins for the outside:
    what they need set goes into `worker_env` and `relay_env`."""
    notes: list[str] = []
    async with anyio.create_task_group() as tg:
        servers: list[Any] = []
        if opts.demo:
            model_port = free_port()
            servers.append(serve(demo_model().app(), "127.0.0.1", model_port))
            for key in ("ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN"):
                worker_env.pop(key, None)
            worker_env.update(
                {
                    "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{model_port}",
                    "ANTHROPIC_API_KEY": "demo-key-for-the-scripted-model",
                    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
                    "CLAUDE_CONFIG_DIR": str(opts.data / "claude"),
                }
            )
            notes.append("model: scripted (demo)")
        if opts.demo or not env.get("REPO_URL"):
            origin = make_demo_repo(opts.data / "origin.git")
            worker_env["REPO_URL"] = f"file://{origin}"  # for prompts that name no repository
            if env.get("REPOS"):
                notes.append(f"repository: {origin}")
            else:
                # Two repositories for the owner, so `repos` and `use` can be tried (the relay reads
                # REPOS); `demo` is REPO_URL's, whose pull requests go to the GitHub stand-in.
                site = make_demo_repo(opts.data / "site.git", SITE_FILES)
                relay_env["REPOS"] = f"demo=file://{origin},site=file://{site}"
                notes.append(f"repositories: demo ({origin}), site ({site}; pushed, no pull request)")
        if opts.demo or not env.get("GITHUB_TOKEN"):
            github_port = free_port()
            github = FakeGitHub(token=secrets.token_hex(16), web_url=f"http://127.0.0.1:{github_port}")
            servers.append(serve(github.app(), "127.0.0.1", github_port))
            worker_env.update(
                {
                    "GITHUB_TOKEN": github.token,
                    "GITHUB_API_URL": f"http://127.0.0.1:{github_port}",
                    "GITHUB_REPO": "you/demo-app",
                }
            )
            notes.append(f"pull requests: local GitHub stand-in at http://127.0.0.1:{github_port}")
        if not opts.demo and not (env.get("ANTHROPIC_API_KEY") or env.get("CLAUDE_CODE_OAUTH_TOKEN")):
            notes.append("model: your Claude login (set ANTHROPIC_API_KEY, or use --demo, if you have none)")
        async with contextlib.AsyncExitStack() as stack:
            for server in servers:
                await stack.enter_async_context(server)
            yield notes
        tg.cancel_scope.cancel()


ISOLATION_NOTES = {
    "on": "agent isolation: on (each owner's agent runs as its own user)",
    "off": "agent isolation: OFF - the agent runs as you and can read the worker's secrets (run as root to isolate)",
}


def _isolation(env: dict[str, str], data: Path) -> str:
    """Isolation needs root; unprivileged, the worker would refuse to start, so turn it off."""
    if os.geteuid() != 0 or env.get("AGENT_ISOLATION", "").strip().lower() in ("0", "false", "no", "off"):
        return "off"
    os.chmod(data, data.stat().st_mode | 0o001)  # the agent users must reach their checkouts below it
    return "on"


def _banner(opts: Options, chat_url: str, real_twilio: bool, notes: list[str]) -> None:
    lines = [
        "",
        f"  textslash {'DEMO ' if opts.demo else ''}is running.",
        f"  Open the chat:  {chat_url}",
        "",
        f"  replies: {'Twilio (your real WhatsApp)' if real_twilio else 'the local chat (no Twilio account needed)'}",
        *[f"  {note}" for note in notes],
        f"  logs: {opts.data}/relay.log, {opts.data}/{'machines/*/' if opts.owners > 1 else ''}worker.log",
        "  Ctrl-C stops everything.",
        "",
    ]
    print("\n".join(lines), flush=True)  # noqa: T201 - this is the console program


async def _serve_socket(app: Any, path: Path) -> None:
    """A Machine's own Machines API socket (fakes/machines.py), until the console stops."""
    async with serve(app, "127.0.0.1", 0, uds=str(path)):
        await anyio.sleep_forever()


async def _wait_for_relay(http: httpx.AsyncClient, url: str, relay: subprocess.Popen[bytes], log: Path) -> None:
    with anyio.move_on_after(60):
        while relay.poll() is None:
            try:
                if (await http.get(f"{url}/health", timeout=1.0)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await anyio.sleep(0.05)
    tail = (await anyio.Path(log).read_text(errors="replace")).strip().splitlines()[-5:]
    raise SystemExit("console: the relay did not start:\n  " + "\n  ".join(tail))


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    """Ctrl-C or SIGTERM: unwind normally, so the relay and worker are stopped too."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


async def _watch(relay: subprocess.Popen[bytes], log: Path) -> None:
    await anyio.to_thread.run_sync(relay.wait, abandon_on_cancel=True)
    tail = (await anyio.Path(log).read_text(errors="replace")).strip().splitlines()[-5:]
    raise SystemExit("console: the relay stopped:\n  " + "\n  ".join(tail))


def main(argv: list[str] | None = None) -> int:
    load_dotenv(Path.cwd() / ".env")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        anyio.run(run, parse(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
