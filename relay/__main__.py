"""`python -m relay`: read the settings, then serve the relay with uvicorn."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import uvicorn
from dotenv import load_dotenv

from common.config import configure_logging
from common.serve import serve
from relay.app import create_app
from relay.settings import ConfigError, Settings


def main() -> int:
    # A local .env in the working directory; on Fly the variables come from secrets and fly.toml.
    load_dotenv(Path.cwd() / ".env")
    configure_logging(os.environ.get("LOG_LEVEL", "INFO"))
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        print(f"relay: configuration error: {exc}", file=sys.stderr)  # noqa: T201 - before logging matters
        return 2
    app = create_app(settings)
    # SIGTERM: uvicorn stops accepting, finishes requests in flight, then runs the lifespan's
    # shutdown; 4 s + the lifespan's 5 s stays inside the 10 s Fly allows. No access log: the
    # dispatcher logs each event with the number masked.
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=4,
        proxy_headers=False,
        # httptools, not uvicorn's pure-Python h11: measured, ~30% less CPU per webhook route
        # (docs/BENCHMARKS.md). Named, so an image without it fails at start, not silently slower.
        http="httptools",
    )
    return serve(uvicorn.Server(config))


if __name__ == "__main__":
    sys.exit(main())
