"""Photos and files the owner sends: taken from Twilio, kept beside the database, handed on.

The webhook only records the media list Twilio names with the message (`media_list`), so it
stays fast and never fails on media. The owner's inbox lane takes the files before that message
is handled (relay/dispatcher.py), so a crash in between takes them again and loses nothing:

- a message with a voice note or a video, or with more than MAX_ITEMS items, is refused with a
  reply and nothing runs (`refusal`);
- each other item is fetched from Twilio's API with Basic auth, only from Twilio's own host under
  our account (`is_twilio_media`: anything else is named in a reply and never requested), and
  its redirect followed without the credentials to the file on Twilio's CDN; streamed to disk
  with a cap (MAX_IMAGE_BYTES per image, MAX_FILE_BYTES per other file), synced, and named by
  an unguessable id;
- what could not be taken is named in a reply and the text still runs (`Taken.left_out`).

The worker fetches each file from `GET /media/{id}` (bearer WORKER_TOKEN) before the run and
checks its size and digest; `MediaStore.prune` removes files once no prompt needs them.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import mimetypes
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import anyio
import httpx

from common.files import sync_dir
from common.protocol import ATTACHMENT_ID, MAX_ATTACHMENTS, Attachment
from relay import replies
from relay.events import Prompt

logger = logging.getLogger(__name__)
mimetypes.init()  # reads the system's type tables now, at start-up, not on the event loop later

MAX_ITEMS = MAX_ATTACHMENTS  # WhatsApp's own limit per message is 10 too
MAX_IMAGE_BYTES = 5 * 1024 * 1024  # what Claude (and WhatsApp) take per image
MAX_FILE_BYTES = 16 * 1024 * 1024  # WhatsApp's limit for any other media
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})  # what Claude reads
# Kept after the last prompt that names a file is gone (run, dropped or cancelled): by then the
# worker has its own copy. The same 48 hours the image cache keeps what goes out.
MEDIA_KEEP_S = 48 * 3600
ITEM_DEADLINE_S = 120.0  # one item, redirects and all: 16 MB even on a slow link
TIMEOUT = httpx.Timeout(30.0, connect=10.0)
ATTEMPTS = 3  # a 5xx, a 429 or a broken connection is tried again, 1 s then 2 s later
MAX_REDIRECTS = 3
MEDIA_PATH = r"/2010-04-01/Accounts/{sid}/Messages/[A-Za-z0-9]{{1,64}}/Media/[A-Za-z0-9]{{1,64}}"


# --- what the webhook records -------------------------------------------------------------


def media_list(form: Mapping[str, str]) -> dict[str, Any] | None:
    """The media Twilio named with a message (`NumMedia`, `MediaUrl{N}`, `MediaContentType{N}`),
    as the inbox event records it; None for a message without any. Never raises: whatever is
    odd about it is dealt with (and told) by the inbox lane."""
    raw = form.get("NumMedia", "0").strip()
    present = sum(1 for key in form if re.fullmatch(r"MediaUrl\d{1,3}", key))
    count = int(raw) if raw.isdigit() and len(raw) < 6 else present
    if count <= 0:
        return None
    items = [
        {"url": form.get(f"MediaUrl{n}", ""), "content_type": _media_type(form.get(f"MediaContentType{n}", ""))}
        for n in range(min(count, MAX_ITEMS))
    ]
    return {"count": count, "items": items}


def _media_type(value: str) -> str:
    """`audio/ogg; codecs=opus` -> `audio/ogg`; anything that is not a media type -> octet-stream."""
    kind = value.split(";", 1)[0].strip().lower()
    return kind if re.fullmatch(r"[a-z0-9.+-]{1,40}/[a-z0-9.+-]{1,59}", kind) else "application/octet-stream"


def is_twilio_media(url: str, *, api_base: str, account_sid: str) -> bool:
    """Only a media URL on Twilio's API host (TWILIO_API_BASE_URL), under our own account, is
    ever requested: the credentials go with it, and any other URL could be a way to make the
    relay fetch whatever someone names."""
    try:
        parts, base = urlsplit(url), urlsplit(api_base)
    except ValueError:
        return False
    return (
        (parts.scheme, parts.netloc) == (base.scheme, base.netloc)
        and not (parts.query or parts.fragment or parts.username or parts.password)
        and re.fullmatch(MEDIA_PATH.format(sid=re.escape(account_sid)), parts.path) is not None
    )


def refusal(media: Mapping[str, Any]) -> str | None:
    """Why the whole message is refused (nothing runs), or None. Voice notes and videos carry
    what the owner meant, which no prompt can stand in for; too many items are a mistake to
    correct before anything is spent."""
    kinds = [str(item.get("content_type", "")) for item in media.get("items", [])]
    if any(kind.startswith("audio/") for kind in kinds):
        return replies.VOICE_NOT_UNDERSTOOD
    if any(kind.startswith("video/") for kind in kinds):
        return replies.VIDEO_NOT_UNDERSTOOD
    if int(media.get("count", 0)) > MAX_ITEMS:
        return replies.too_many_attachments(int(media["count"]), MAX_ITEMS)
    return None


def prompt_of(data: Mapping[str, Any]) -> Prompt:
    """An owner's message with files taken: always a prompt (a caption is never read as a command:
    the files were sent for the agent), its text the caption or, without one, a request to look."""
    attachments = tuple(Attachment(**a) for a in data["attachments"])
    images = sum(1 for a in attachments if a.content_type in IMAGE_TYPES)
    text = str(data.get("text", "")).strip() or replies.look_at(images, len(attachments) - images)
    return Prompt(text=text, message_id=str(data["message_id"]), attachments=attachments)


# --- taking the files -------------------------------------------------------------------------


@dataclass(frozen=True)
class LeftOut:
    number: int  # 1-based, as the owner counts them
    content_type: str
    reason: str


@dataclass(frozen=True)
class Taken:
    """What became of a message's media: the files kept, and the items named in a reply."""

    attachments: tuple[Attachment, ...] = ()
    left_out: tuple[LeftOut, ...] = ()
    refused: str = ""  # the reply when nothing runs at all

    def record(self) -> dict[str, Any]:
        """The inbox event's addition: the files, with their ids, for the prompt."""
        return {"attachments": [asdict(a) for a in self.attachments]}


class _Refused(Exception):
    """An item that will not come, whatever we try (the reason is the owner's to read)."""


class _Retry(Exception):
    """A failure worth another try (Twilio busy, a broken connection)."""


class Media:
    """Fetches an owner's media from Twilio into the store."""

    def __init__(
        self, store: MediaStore, http: httpx.AsyncClient, *, api_base: str, account_sid: str, auth_token: str
    ) -> None:
        self.store, self._http = store, http
        self._base, self._sid = api_base.rstrip("/"), account_sid
        self._basic = "Basic " + base64.b64encode(f"{account_sid}:{auth_token}".encode()).decode()

    async def take(self, media: Mapping[str, Any]) -> Taken:
        """Refused as a whole, or each item fetched (side by side) or named as left out."""
        if reason := refusal(media):
            return Taken(refused=reason)
        items = list(media.get("items", []))
        results: list[Attachment | LeftOut] = [LeftOut(n, "", "") for n in range(1, len(items) + 1)]

        async def one(index: int, item: Mapping[str, Any]) -> None:
            results[index] = await self._item(index + 1, str(item.get("url", "")), str(item.get("content_type", "")))

        async with anyio.create_task_group() as tg:
            for index, item in enumerate(items):
                tg.start_soon(one, index, item)
        return Taken(
            attachments=tuple(r for r in results if isinstance(r, Attachment)),
            left_out=tuple(r for r in results if isinstance(r, LeftOut)),
        )

    async def _item(self, number: int, url: str, content_type: str) -> Attachment | LeftOut:
        if not is_twilio_media(url, api_base=self._base, account_sid=self._sid):
            logger.warning("media item %d is not a Twilio media URL of this account: not fetched", number)
            return LeftOut(number, content_type, replies.NOT_FROM_TWILIO)
        cap = MAX_IMAGE_BYTES if content_type in IMAGE_TYPES else MAX_FILE_BYTES
        why = "no answer"
        for attempt in range(ATTEMPTS):
            if attempt:
                await anyio.sleep(2 ** (attempt - 1))
            try:
                with anyio.fail_after(ITEM_DEADLINE_S):
                    return await self._download(url, content_type, cap, number)
            except _Refused as exc:
                return LeftOut(number, content_type, str(exc))
            except (_Retry, httpx.HTTPError, TimeoutError) as exc:
                why = str(exc) if isinstance(exc, _Retry) else type(exc).__name__
            except OSError as exc:  # the relay's own disk: no second try makes it better now
                logger.error("could not store media item %d (%s)", number, exc.strerror or type(exc).__name__)
                return LeftOut(number, content_type, replies.NOT_STORED)
            except Exception as exc:  # never a poison message that holds up the owner's lane
                logger.exception("media item %d failed", number)
                return LeftOut(number, content_type, replies.not_fetched(type(exc).__name__))
        logger.warning("media item %d could not be fetched: %s", number, why)
        return LeftOut(number, content_type, replies.not_fetched(why))

    async def _download(self, url: str, content_type: str, cap: int, number: int) -> Attachment:
        """Twilio's API answers with a redirect to the file: the credentials go to Twilio's own
        host only, never along the redirect (httpx would strip them too; here it is explicit)."""
        for _ in range(MAX_REDIRECTS + 1):
            ours = _origin(url) == _origin(self._base)
            request = self._http.build_request(
                "GET", url, headers={"Authorization": self._basic} if ours else {}, timeout=TIMEOUT
            )
            response = await self._http.send(request, stream=True, follow_redirects=False)
            try:
                if response.is_redirect and "location" in response.headers:
                    url = urljoin(url, response.headers["location"])
                    if urlsplit(url).scheme not in ("http", "https"):
                        raise _Refused(replies.not_fetched("a redirect to a non-HTTP address"))
                    continue
                _check_status(response.status_code)
                if int(response.headers.get("content-length") or 0) > cap:
                    raise _Refused(replies.over_limit(cap))
                size, digest, file_id = await self.store.write(response.aiter_bytes(), cap)
            finally:
                await response.aclose()
            name = _name(number, content_type, response.headers.get("content-disposition", ""))
            return Attachment(file_id, content_type, size, digest, name)
        raise _Refused(replies.not_fetched("too many redirects"))


def _check_status(status: int) -> None:
    if status == 200:
        return
    if status in (408, 429) or status >= 500:
        raise _Retry(f"HTTP {status}")
    raise _Refused(replies.not_fetched(f"HTTP {status}"))


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


EXTENSIONS = {"image/jpeg": ".jpg", "text/plain": ".txt", "application/octet-stream": ".bin"}


def _name(number: int, content_type: str, disposition: str) -> str:
    """A file name for the worker to save it under: the one the file came with, if any, else
    photo-N / file-N with the type's extension. (The worker makes it safe before using it.)"""
    if disposition:
        header = Message()
        header["content-disposition"] = disposition
        given = os.path.basename((header.get_filename() or "").replace("\\", "/"))[-100:]
        given = re.sub(r"[^\w. -]", "_", given)  # readable, and nothing the protocol would refuse
        if given.strip(". _"):
            return given
    ext = EXTENSIONS.get(content_type) or mimetypes.guess_extension(content_type) or ".bin"
    return f"{'photo' if content_type in IMAGE_TYPES else 'file'}-{number}{ext}"


# --- the files, kept --------------------------------------------------------------------------


class MediaStore:
    """The owner's files, beside RELAY_DB, each named by an unguessable id (the only name the
    worker gets; the route that serves them needs WORKER_TOKEN too)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)

    def path(self, file_id: str) -> Path | None:
        path = self.root / file_id
        return path if ATTACHMENT_ID.match(file_id) and path.is_file() and not path.is_symlink() else None

    async def write(self, chunks: Any, cap: int) -> tuple[int, str, str]:
        """Stream `chunks` into a new file, refusing (and removing) it past `cap` bytes; synced
        before it is published, so a recorded attachment always has its file."""
        file_id = secrets.token_urlsafe(24)
        partial = self.root / f".{file_id}.part"
        digest, size = hashlib.sha256(), 0
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > cap:
                    raise _Refused(replies.over_limit(cap))
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            await anyio.to_thread.run_sync(os.fsync, fd)
        except BaseException:
            os.close(fd)
            partial.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(partial, self.root / file_id)
        sync_dir(self.root)
        return size, digest.hexdigest(), file_id

    def prune(self, now: float, in_use: Iterable[str], keep_s: float = MEDIA_KEEP_S) -> int:
        """Delete files (and stray partial writes) older than `keep_s` that no waiting prompt
        names; returns how many went. A file in use is kept whatever its age."""
        keep, removed = set(in_use), 0
        for path in self.root.iterdir():
            try:
                if path.name not in keep and now - path.lstat().st_mtime > keep_s:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed
