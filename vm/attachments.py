"""The owner's photos and files for a run: fetched from the relay, checked, put in the checkout.

The relay keeps each file the owner sent and names it in the prompt (common/protocol.py
`Attachment`: an unguessable id, the type, the size and the sha256); before the run the worker
fetches each from `GET {RELAY_CALLBACK_URL}/media/{id}` (bearer WORKER_TOKEN) into a folder of
its own, refuses one whose size or digest is not what the relay said, and then:

- every file goes into ATTACHMENTS_DIR in the checkout, the agent's (0600), under a safe name
  that overwrites nothing; git ignores the folder through the git dir's `info/exclude`, which
  root owns, and vm/workspace.py leaves it out of every snapshot, diff and reject: it is the
  owner's input, not the agent's work, and a follow-up prompt may still need it;
- an image Claude can read (JPEG, PNG, GIF, WebP, as its bytes say, up to 5 MB each and
  MAX_IMAGE_BLOCKS_BYTES together) also goes to Claude as an image block in the same user
  message as the text (vm/agent.py);
- the prompt names every file's path.

Files older than KEEP_S are removed from the folder when the owner goes idle (vm/worker.py
`_settle`), with nothing of the agent's running.
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from common.protocol import MAX_IMAGE_BYTES, Attachment
from vm.lazy_http import LazyHTTP
from vm.workspace import ATTACHMENTS_DIR

logger = logging.getLogger(__name__)

MAX_FILE_BYTES = 16 * 1024 * 1024  # the relay takes no bigger file (WhatsApp's own limit)
# Together, the images of one prompt: their base64 must stay well inside the Messages API's
# 32 MB request. Past it an image is still saved and named, just not shown as a block.
MAX_IMAGE_BLOCKS_BYTES = 15 * 1024 * 1024
KEEP_S = 7 * 86400  # long enough for a week of follow-ups about the same file
ATTEMPTS = 3  # a relay that restarts (a deploy) is back within these: 0.5 s, then 1 s
TIMEOUT_S = 120.0  # one file, 16 MB at most, over the private network


class AttachmentError(RuntimeError):
    """A file of the prompt could not be had; the message is the owner's to read."""


@dataclass(frozen=True)
class Received:
    """One attachment, in the checkout; `image` is its media type when it goes to Claude as an
    image block (sniffed from its bytes), with `data` its bytes."""

    path: Path
    content_type: str
    size: int
    image: str = ""
    data: bytes = b""


class Fetcher:
    """Fetches attachments from the relay into `incoming` (root's own), checked."""

    def __init__(self, http: LazyHTTP, relay_url: str, token: str, incoming: Path) -> None:
        self._http, self._relay, self._token = http, relay_url.rstrip("/"), token
        self.incoming = incoming
        incoming.mkdir(parents=True, exist_ok=True)
        os.chmod(incoming, 0o700)
        for stale in incoming.iterdir():  # a fetch a crash cut short
            stale.unlink(missing_ok=True)

    async def fetch(self, attachment: Attachment) -> Path:
        """The file, verified, in `incoming` (the caller removes it); AttachmentError if not."""
        if attachment.size > MAX_FILE_BYTES:
            raise _failed(attachment, "it is bigger than any file the relay takes")
        why = "no answer"
        for attempt in range(ATTEMPTS):
            if attempt:
                await anyio.sleep(0.5 * 2 ** (attempt - 1))
            try:
                with anyio.fail_after(TIMEOUT_S):
                    return await self._download(attachment)
            except _Again as exc:
                why = str(exc)
            except TimeoutError:
                why = "it took too long"
        raise _failed(attachment, why)

    async def _download(self, attachment: Attachment) -> Path:
        import httpx  # loaded by the time a run starts (vm/lazy_http.py)

        client = await self._http.get()
        target = self.incoming / secrets.token_hex(8)
        digest, size = hashlib.sha256(), 0
        headers = {"Authorization": f"Bearer {self._token}"}
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            async with client.stream("GET", f"{self._relay}/media/{attachment.id}", headers=headers) as response:
                _check(response.status_code, attachment)
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > attachment.size:
                        raise _failed(attachment, "it is bigger than the relay said")
                    digest.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
            if size != attachment.size or digest.hexdigest() != attachment.sha256:
                raise _failed(attachment, "its bytes are not the ones the relay recorded")
        except httpx.HTTPError as exc:
            target.unlink(missing_ok=True)
            raise _Again(type(exc).__name__) from None
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        return target


def _check(status: int, attachment: Attachment) -> None:
    if status in (408, 429) or status >= 500:
        raise _Again(f"the relay answered HTTP {status}")
    if status == 404:
        raise _failed(attachment, "the relay no longer has it")
    if status != 200:
        raise _failed(attachment, f"the relay answered HTTP {status}")


class _Again(Exception):
    """Worth another try."""


def _failed(attachment: Attachment, why: str) -> AttachmentError:
    return AttachmentError(f"could not get the attached {attachment.name or 'file'} from the relay: {why}")


# --- into the checkout ---------------------------------------------------------------------


def place(checkout: Path, source: Path, wanted: str, content_type: str, owner: tuple[int, int] | None) -> Path:
    """Copy `source` into the checkout's ATTACHMENTS_DIR as the agent's, under a safe name that
    no file has yet. The folder is the agent's and no process of it runs now (the worker only
    calls this with the agent quiesced), but whatever it left there is not trusted: nothing is
    opened through a symlink, and nothing is overwritten."""
    folder = _open_folder(checkout, owner)
    try:
        stem, ext = _split(safe_name(wanted, content_type))
        for name in _names(stem, ext):
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=folder)
            except FileExistsError:
                continue
            try:
                # The agent's before a byte is in it: a copy cut short (a full disk, a crash)
                # leaves no file of root's in the agent's folder.
                if owner is not None:
                    os.fchown(fd, *owner)
                os.fchmod(fd, 0o600)
                with os.fdopen(fd, "wb", closefd=False) as out, source.open("rb") as data:
                    shutil.copyfileobj(data, out)
            except BaseException:
                os.unlink(name, dir_fd=folder)
                raise
            finally:
                os.close(fd)
            return checkout / ATTACHMENTS_DIR / name
        raise AttachmentError(f"could not find a free name for {stem}{ext} in {ATTACHMENTS_DIR}")
    finally:
        os.close(folder)


def _names(stem: str, ext: str) -> Iterator[str]:
    """`report.pdf`, `report-2.pdf`, ... and then names no one can have guessed: the folder is
    the agent's, and one that filled every numbered name must not keep the owner's files out."""
    yield f"{stem}{ext}"
    yield from (f"{stem}-{n}{ext}" for n in range(2, 100))
    yield from (f"{stem}-{secrets.token_hex(4)}{ext}" for _ in range(10))


def _open_folder(checkout: Path, owner: tuple[int, int] | None) -> int:
    """ATTACHMENTS_DIR as a real folder of the agent's (0700), opened without following a link;
    a symlink or a file in its place is removed first."""
    top = os.open(checkout, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for _ in range(2):
            try:
                os.mkdir(ATTACHMENTS_DIR, 0o700, dir_fd=top)
            except FileExistsError:
                pass
            try:
                folder = os.open(ATTACHMENTS_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=top)
            except OSError:  # a symlink (ELOOP) or a file (ENOTDIR) where the folder goes
                os.unlink(ATTACHMENTS_DIR, dir_fd=top)
                continue
            if owner is not None:
                os.fchown(folder, *owner)
            os.fchmod(folder, 0o700)
            return folder
        raise AttachmentError(f"could not make the folder {ATTACHMENTS_DIR} in the checkout")
    finally:
        os.close(top)


def expire(checkout: Path, now: float | None = None, keep_s: float = KEEP_S) -> int:
    """Remove the files of ATTACHMENTS_DIR older than `keep_s` (never following a link);
    returns how many went."""
    cutoff, removed = (now or time.time()) - keep_s, 0
    try:
        folder = os.open(checkout / ATTACHMENTS_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return 0  # none yet (or not a folder: `place` deals with that)
    try:
        for entry in os.scandir(folder):
            try:
                st = entry.stat(follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode) and st.st_mtime < cutoff:
                    os.unlink(entry.name, dir_fd=folder)
                    removed += 1
            except OSError:
                continue
    finally:
        os.close(folder)
    return removed


def safe_name(name: str, content_type: str) -> str:
    """A plain file name: no folder, no traversal, not hidden, only `[A-Za-z0-9._-]`, short;
    an extension from the type when it has none."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    stem, ext = _split(base)
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_-")[:60] or "file"
    ext = re.sub(r"[^A-Za-z0-9]", "", ext)[:10]
    if not ext:
        ext = (mimetypes.guess_extension(content_type) or "").lstrip(".")
    return f"{stem}.{ext}" if ext else stem


def _split(name: str) -> tuple[str, str]:
    stem, dot, ext = name.rpartition(".")
    return (stem, f".{ext}") if dot and stem.strip(".") else (name.lstrip("."), "")


SIGNATURES = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def sniff(head: bytes) -> str:
    """The image type Claude reads that the bytes are, or "": a file named image/jpeg that is
    not one would fail the whole request, so it is saved and named, never sent as an image."""
    for magic, kind in SIGNATURES:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return ""


async def receive(
    fetcher: Fetcher, attachments: tuple[Attachment, ...], checkout: Path, owner: tuple[int, int] | None
) -> list[Received]:
    """Every attachment fetched, checked and in the checkout, in the order sent; the first that
    cannot be had fails them all (a prompt without the file it is about would waste the run)."""
    received: list[Received] = []
    shown = 0
    for attachment in attachments:
        source = await fetcher.fetch(attachment)
        try:
            kind = ""
            if attachment.size <= MAX_IMAGE_BYTES and shown + attachment.size <= MAX_IMAGE_BLOCKS_BYTES:
                with source.open("rb") as head:
                    kind = sniff(head.read(16))
            data = await anyio.Path(source).read_bytes() if kind else b""
            shown += len(data)
            path = await anyio.to_thread.run_sync(
                place, checkout, source, attachment.name, attachment.content_type, owner
            )
        except OSError as exc:
            raise AttachmentError(
                f"could not save the attached {attachment.name or 'file'} ({exc.strerror or type(exc).__name__})"
            ) from None
        finally:
            source.unlink(missing_ok=True)
        received.append(Received(path, attachment.content_type, attachment.size, kind, data))
    return received


def record(received: Received) -> dict[str, Any]:
    """Where an attachment is, for the owner's state file: not its bytes."""
    return {"path": str(received.path), "content_type": received.content_type, "size": received.size}


def from_record(data: dict[str, Any]) -> Received:
    """An attachment received before the worker restarted: named again, not shown again. Its
    file is the agent's now (it may have changed it), so its bytes are not sent as an image
    block; Claude can open it by its path."""
    return Received(Path(str(data["path"])), str(data["content_type"]), int(data["size"]))


def prompt_with(text: str, received: list[Received]) -> str:
    """The owner's text, and where each attachment is (Claude sees the images too)."""
    if not received:
        return text
    lines = [
        f"- {r.path} ({r.content_type}, {_size(r.size)}){'; the image is shown with this message' if r.image else ''}"
        for r in received
    ]
    return (
        f"{text}\n\nThe owner attached {'this file' if len(received) == 1 else 'these files'} "
        "(saved in the checkout; git ignores them, so they are never part of your changes):\n" + "\n".join(lines)
    )


def _size(size: int) -> str:
    return f"{size / 1024 / 1024:.1f} MB" if size >= 1024 * 1024 else f"{max(1, round(size / 1024))} KB"
