"""Files published whole: written, synced, then renamed into place (and the rename synced).

After a crash or a power loss a reader finds the old file or the new one, never an empty or a
half-written one: rename alone does not promise that on ext4 without the data synced first.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def write_durably(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    sync_dir(path.parent)


def sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_aside(path: Path, why: str, what: str = "") -> Path | None:
    """Move an unreadable file out of the way (beside it, renamed), with a log line naming it
    as `what` (a file name may be private: an owner's number); the caller goes on without it.
    Returns where it went, or None if it could not be moved."""
    target = path.with_name(f".bad-{int(time.time())}-{path.name}")
    what = what or path.name
    try:
        os.replace(path, target)
    except OSError:
        logger.exception("could not set aside %s", what)
        return None
    logger.error("set aside %s, which could not be read (%s)", what, why)
    return target
