"""PNG files with unguessable names in IMAGES_DIR: saving, serving safely, expiring."""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path

# The same shape the relay accepts: 22 url-safe characters of randomness and ".png".
NAME = re.compile(r"^[A-Za-z0-9_-]{16,64}\.png$")


class ImageStore:
    def __init__(self, root: Path, ttl_s: float) -> None:
        self.root = root
        self.ttl_s = ttl_s
        root.mkdir(parents=True, exist_ok=True)

    def new_path(self) -> Path:
        return self.root / f"{secrets.token_urlsafe(16)}.png"

    def save(self, data: bytes) -> str:
        path = self.new_path()
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return path.name

    def resolve(self, name: str) -> Path | None:
        """The file for `name`, or None for anything that is not a plain image of ours.

        The name must match NAME (no separators, dots only in ".png"), and the file must be a
        regular file directly inside the folder: a symlink placed there is refused too.
        """
        if not NAME.match(name):
            return None
        path = self.root / name
        try:
            if path.is_symlink() or not path.is_file() or path.resolve().parent != self.root.resolve():
                return None
        except OSError:
            return None
        return path

    def expire(self, now: float | None = None) -> int:
        """Delete images older than the TTL; returns how many went."""
        cutoff = (now or time.time()) - self.ttl_s
        removed = 0
        for path in self.root.glob("*.png"):
            try:
                if path.lstat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed
