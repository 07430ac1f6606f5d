"""The relay's image cache: pictures the worker reported, kept where Twilio can fetch them.

A callback that names an image is accepted only once the image is here (fetched from the
worker while it is surely awake), so `GET /images/<name>` never has to reach the worker,
which over Flycast would start its Machine for anyone who asks.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import anyio

from common.protocol import IMAGE_NAME, MAX_IMAGE_BYTES
from relay.worker_client import WorkerClient

# Twilio fetches an image when it sends the message (and on its retries, within hours).
IMAGE_CACHE_TTL_S = 48 * 3600


class ImageCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path | None:
        """The cached file for a well-formed name, or None."""
        path = self.root / name
        return path if IMAGE_NAME.match(name) and path.is_file() else None

    async def fetch(self, name: str, worker: WorkerClient) -> bool | None:
        """Make sure `name` is cached, fetching it from the worker if needed: True when it is,
        None when it never will be (the worker no longer has it, or it is too big for WhatsApp:
        the report goes on without it), else False (try again later)."""
        if self.path(name) is not None:
            return True
        data = await worker.fetch_image(name)
        if data == b"" or (data is not None and len(data) > MAX_IMAGE_BYTES):
            # Gone, or more than WhatsApp takes: the worker will never have it better, so the
            # report goes on without it rather than hold the worker's spool forever.
            return None
        if data is None:
            return False
        # Write under a temporary name and rename, so a reader never sees half a PNG.
        tmp = self.root / f".{name}.{secrets.token_hex(4)}.tmp"
        await anyio.Path(tmp).write_bytes(data)
        os.replace(tmp, self.root / name)
        return True

    def prune(self, now: float, max_age_s: float = IMAGE_CACHE_TTL_S) -> int:
        """Delete cached images (and stray partial writes) older than `max_age_s`; returns how many."""
        removed = 0
        for path in self.root.iterdir():
            try:
                if path.is_file() and now - path.stat().st_mtime > max_age_s:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed
