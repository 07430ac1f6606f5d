"""`python -m vm`: read the settings, serve the worker, exit 0 when idle so the Machine stops."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import uvicorn
from dotenv import load_dotenv

from common.config import configure_logging
from common.serve import Listening, Server, serve
from vm.app import create_app
from vm.sandbox import scrub_environment
from vm.settings import ConfigError, Settings

logger = logging.getLogger("vm")
NEEDS_ROOT = (
    "vm: AGENT_ISOLATION is on, and starting each owner's agent as its own user needs root (the worker "
    "image runs as root for this). On a developer machine, set AGENT_ISOLATION=off to run the agent "
    "as your own user, which can then read the worker's secrets."
)
UNISOLATED = (
    "AGENT_ISOLATION=off: THE AGENT RUNS AS THIS WORKER'S OWN USER. It can read the worker's secrets "
    "(WORKER_TOKEN, GITHUB_TOKEN) and every owner's files, and push around the approval. Use this only "
    "on your own machine, never for a deployment."
)

# Fly's secrets are the app's: every owner's Machine gets the worker app's WORKER_TOKEN.
RELAY_TOKEN_HERE = (
    "This Machine serves one owner (OWNER_PHONE) but holds the relay's own WORKER_TOKEN, from which "
    "every owner's token derives: a subverted worker here could speak for any owner. Give the worker "
    "app a WORKER_TOKEN of its own: fly secrets set WORKER_TOKEN=<new random value> -a %s"
)


def main() -> int:
    load_dotenv(Path.cwd() / ".env")
    configure_logging(os.environ.get("LOG_LEVEL", "INFO"))
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        print(f"vm: configuration error: {exc}", file=sys.stderr)  # noqa: T201 - before logging matters
        return 2
    if settings.agent_isolation and os.geteuid() != 0:
        print(NEEDS_ROOT, file=sys.stderr)  # noqa: T201 - as above
        return 2
    if not settings.agent_isolation:
        logger.warning(UNISOLATED)
    if settings.relay_token_here:
        logger.warning(RELAY_TOKEN_HERE, settings.fly_app_name or "<worker app>")
    # The settings hold what the worker needs; nothing it starts may inherit the rest.
    scrub_environment(os.environ)
    os.umask(0o077)  # what the worker writes is its own unless it says otherwise (vm/sandbox.py)
    server: uvicorn.Server | None = None

    def stop_when_idle() -> None:
        assert server is not None
        server.should_exit = True  # a normal shutdown: uvicorn returns and we exit 0

    listening = Listening()
    app = create_app(settings, on_idle=stop_when_idle, listening=listening)
    # SIGTERM: uvicorn finishes requests (3 s at most), then the lifespan ends every run's
    # processes (6 s at most) with their state kept on disk: inside Fly's 10 s.
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=3,
        proxy_headers=False,
        # The worker's image has no httptools (only the relay's needs the speed); named, so the
        # tests, whose environment has it, run the worker on the parser it is deployed with.
        http="h11",
    )
    server = Server(config, listening)
    return serve(server)


if __name__ == "__main__":
    sys.exit(main())
