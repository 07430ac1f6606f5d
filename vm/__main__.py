"""`python -m vm`: read the settings, serve the worker, exit 0 when idle so the Machine stops."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import uvicorn
from dotenv import load_dotenv

from common.config import configure_logging
from vm.app import create_app
from vm.settings import ConfigError, Settings


def main() -> int:
    load_dotenv(Path.cwd() / ".env")
    configure_logging(os.environ.get("LOG_LEVEL", "INFO"))
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        print(f"vm: configuration error: {exc}", file=sys.stderr)  # noqa: T201 - before logging matters
        return 2
    server: uvicorn.Server | None = None

    def stop_when_idle() -> None:
        assert server is not None
        server.should_exit = True  # a normal shutdown: uvicorn returns and we exit 0

    app = create_app(settings, on_idle=stop_when_idle)
    # SIGTERM: uvicorn finishes requests (3 s at most), then the lifespan ends every run's
    # processes (6 s at most) with their state kept on disk: inside Fly's 10 s.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                            timeout_graceful_shutdown=3, proxy_headers=False)
    server = uvicorn.Server(config)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
