"""The owner's photos and files on the worker (vm/attachments.py): fetched from the relay and
checked, images to the real Claude Code CLI as image blocks beside the text, every file in a
folder of the checkout that git ignores and no diff, snapshot or reject ever touches."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from common.protocol import Attachment
from fakes.anthropic import Text, write
from fakes.origin import make_origin
from fakes.worker import PNG
from tests.support.waiting import wait_for
from tests.support.worker_harness import WorkerStack, worker_stack
from vm.attachments import Received, place, prompt_with, safe_name, sniff
from vm.workspace import ATTACHMENTS_DIR, Workspace

pytestmark = pytest.mark.anyio
RUN_TIMEOUT = 60.0
PDF = b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"


@pytest.fixture
async def worker(tmp_path: Path) -> AsyncIterator[WorkerStack]:
    async with worker_stack(tmp_path) as stack:
        yield stack


def attach(stack: WorkerStack, data: bytes, content_type: str, name: str, *, sha256: str = "") -> dict[str, Any]:
    """A file the relay keeps (the fake serves it), as a prompt names it."""
    file_id = secrets.token_urlsafe(24)
    stack.relay.media[file_id] = data
    digest = sha256 or hashlib.sha256(data).hexdigest()
    return asdict(Attachment(file_id, content_type, len(data), digest, name))


async def test_a_photo_reaches_the_model_as_an_image_block_beside_its_caption(worker: WorkerStack) -> None:
    worker.anthropic.script("what is on this", Text("A very small picture."))
    await worker.command("what is on this", attachments=[attach(worker, PNG, "image/png", "photo-1.png")])
    answer = (await wait_for(lambda: worker.relay.of_type("answer"), RUN_TIMEOUT, "the answer"))[0]
    assert "A very small picture." in answer["text"] and answer["changes"] is False

    turn = worker.anthropic.user_turns()[0]
    images = [b for b in turn if b.get("type") == "image"]
    assert [i["source"] for i in images] == [
        {"type": "base64", "media_type": "image/png", "data": base64.b64encode(PNG).decode()}
    ]
    text = " ".join(b["text"] for b in turn if b.get("type") == "text")
    saved = worker.checkout() / ATTACHMENTS_DIR / "photo-1.png"
    assert "what is on this" in text and str(saved) in text  # in the same user message
    assert saved.read_bytes() == PNG


async def test_a_pdf_lands_in_the_ignored_folder_and_never_in_the_diff(worker: WorkerStack) -> None:
    checkout = worker.checkout()
    worker.anthropic.script(
        "summarise the report", write(f"{checkout}/summary.md", "# summary\n"), Text("Wrote summary.md.")
    )
    report = attach(worker, PDF, "application/pdf", "../../Quarterly report.pdf")
    await worker.command("summarise the report", attachments=[report])
    await wait_for(lambda: worker.relay.of_type("answer"), RUN_TIMEOUT, "the answer")
    saved = checkout / ATTACHMENTS_DIR / "Quarterly_report.pdf"
    assert saved.read_bytes() == PDF and (saved.stat().st_mode & 0o777) == 0o600
    assert saved.stat().st_uid == saved.parent.stat().st_uid == checkout.stat().st_uid  # the agent's
    prompt = " ".join(b["text"] for b in worker.anthropic.user_turns()[0] if b.get("type") == "text")
    assert str(saved) in prompt and "application/pdf" in prompt
    assert not [b for b in worker.anthropic.user_turns()[0] if b.get("type") == "image"]

    approval = worker.relay.of_type("approval_required")[0]
    assert [f["path"] for f in approval["files"]] == ["summary.md"] and ATTACHMENTS_DIR not in approval["diff"]
    assert approval["uncovered"] == []  # nor is it an ignored path reject cannot bring back
    # Reject takes back the run's work, not the owner's file: a follow-up may still need it.
    assert (await worker.decide("reject")).status_code == 202
    await wait_for(lambda: worker.relay.of_type("rolled_back"), RUN_TIMEOUT, "the rollback")
    assert not (checkout / "summary.md").exists() and saved.read_bytes() == PDF

    # The next file of the same name overwrites nothing.
    await worker.settled()
    await worker.command(
        "summarise the report again",
        attachments=[attach(worker, b"%PDF-2\n", "application/pdf", "Quarterly report.pdf")],
    )
    await wait_for(lambda: len(worker.relay.of_type("answer")) == 2, RUN_TIMEOUT, "the second answer")
    assert (
        saved.read_bytes() == PDF
        and (checkout / ATTACHMENTS_DIR / "Quarterly_report-2.pdf").read_bytes() == b"%PDF-2\n"
    )


async def test_an_attachment_the_relay_no_longer_has_fails_the_run_clearly(worker: WorkerStack) -> None:
    missing = attach(worker, PDF, "application/pdf", "notes.pdf")
    worker.relay.media.clear()
    await worker.command("read my notes", attachments=[missing])
    error = (await wait_for(lambda: worker.relay.of_type("error"), RUN_TIMEOUT, "the error"))[0]
    assert error["text"] == "could not get the attached notes.pdf from the relay: the relay no longer has it"
    assert worker.anthropic.requests == []  # nothing ran
    # No crash: the worker is healthy and takes the next prompt.
    assert (await worker.http.get(f"{worker.url}/health")).status_code == 200
    worker.anthropic.script("plain question", Text("plain answer"))
    await worker.command("plain question")
    await wait_for(lambda: worker.relay.of_type("answer"), RUN_TIMEOUT, "the next answer")


async def test_an_image_whose_bytes_do_not_match_its_digest_is_refused(worker: WorkerStack) -> None:
    tampered = attach(worker, PNG, "image/png", "photo-1.png", sha256=hashlib.sha256(b"another picture").hexdigest())
    await worker.command("what is on this", attachments=[tampered])
    error = (await wait_for(lambda: worker.relay.of_type("error"), RUN_TIMEOUT, "the error"))[0]
    assert "photo-1.png" in error["text"] and "not the ones the relay recorded" in error["text"]
    assert worker.anthropic.requests == [] and not (worker.checkout() / ATTACHMENTS_DIR / "photo-1.png").exists()
    assert list((worker.settings.state_dir / "incoming").iterdir()) == []  # nothing half-kept


# --- the pieces -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "content_type", "expected"),
    [
        pytest.param("report.pdf", "application/pdf", "report.pdf", id="plain"),
        pytest.param("../../etc/passwd", "text/plain", "passwd.txt", id="traversal"),
        pytest.param("..\\..\\boot.ini", "text/plain", "boot.ini", id="windows-traversal"),
        pytest.param(".bashrc", "text/plain", "bashrc.txt", id="hidden"),
        pytest.param("..", "image/png", "file.png", id="dots-only"),
        pytest.param("", "application/pdf", "file.pdf", id="empty"),
        pytest.param("Отчёт 2026.pdf", "application/pdf", "2026.pdf", id="non-ascii"),
        pytest.param("-a b;rm -rf $HOME.csv", "text/csv", "a_b_rm_-rf_HOME.csv", id="shell"),
        pytest.param("x" * 300 + ".txt", "text/plain", "x" * 60 + ".txt", id="long"),
        pytest.param("photo", "image/jpeg", "photo.jpg", id="no-extension"),
    ],
)
def test_safe_names(given: str, content_type: str, expected: str) -> None:
    assert safe_name(given, content_type) == expected


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        pytest.param(PNG[:16], "image/png", id="png"),
        pytest.param(b"\xff\xd8\xff\xe0\x00\x10JFIF", "image/jpeg", id="jpeg"),
        pytest.param(b"GIF89a\x01\x00", "image/gif", id="gif"),
        pytest.param(b"RIFF\x10\x00\x00\x00WEBPVP8 ", "image/webp", id="webp"),
        pytest.param(PDF[:16], "", id="pdf-named-as-an-image"),
        pytest.param(b"", "", id="empty"),
    ],
)
def test_only_real_images_become_image_blocks(head: bytes, kind: str) -> None:
    assert sniff(head) == kind


def test_a_symlink_in_place_of_the_folder_is_never_written_through(tmp_path: Path) -> None:
    checkout, elsewhere = tmp_path / "checkout", tmp_path / "root-owned"
    checkout.mkdir()
    elsewhere.mkdir()
    (checkout / ATTACHMENTS_DIR).symlink_to(elsewhere)
    source = tmp_path / "incoming"
    source.write_bytes(PDF)
    saved = place(checkout, source, "report.pdf", "application/pdf", None)
    assert saved == checkout / ATTACHMENTS_DIR / "report.pdf" and saved.read_bytes() == PDF
    assert list(elsewhere.iterdir()) == [] and not (checkout / ATTACHMENTS_DIR).is_symlink()
    # A symlink planted in place of the file's name is not written through either.
    os.symlink(elsewhere / "target", checkout / ATTACHMENTS_DIR / "notes.txt")
    assert place(checkout, source, "notes.txt", "text/plain", None).name == "notes-2.txt"
    assert not (elsewhere / "target").exists()


def test_the_prompt_names_each_file(tmp_path: Path) -> None:
    assert prompt_with("hello", []) == "hello"
    photo, pdf = tmp_path / "photo-1.jpg", tmp_path / "report.pdf"
    text = prompt_with(
        "compare",
        [Received(photo, "image/jpeg", 2048, "image/jpeg", b"..."), Received(pdf, "application/pdf", 3 << 20)],
    )
    assert text.startswith("compare\n\nThe owner attached these files")
    assert f"- {photo} (image/jpeg, 2 KB); the image is shown with this message" in text
    assert f"- {pdf} (application/pdf, 3.0 MB)" in text


async def test_no_gitignore_of_the_agents_brings_the_folder_into_a_diff_or_a_reject(tmp_path: Path) -> None:
    origin = make_origin(tmp_path / "git", {"README.md": "# demo\n", ".gitignore": ".env\n"})
    workspace = Workspace(tmp_path / "checkout", tmp_path / "repo.git", str(origin))
    await workspace.ensure_clone(tmp_path / "legacy")
    assert f"/{ATTACHMENTS_DIR}/" in (workspace.git_dir / "info" / "exclude").read_text().splitlines()
    folder = workspace.path / ATTACHMENTS_DIR
    folder.mkdir()
    (folder / "report.pdf").write_bytes(PDF)
    (workspace.path / ".env").write_text("SECRET=1\n")
    snap = await workspace.snapshot()
    assert snap.ignored == (".env",) and snap.uncovered == ()  # kept out of the snapshot altogether

    # The run un-ignores the folder (a .gitignore comes before info/exclude) and adds to it.
    (workspace.path / ".gitignore").write_text(f".env\n!/{ATTACHMENTS_DIR}/\n")
    (folder / "made-by-the-run.txt").write_text("x\n")
    changes = await workspace.changes_since(snap)
    assert [f.path for f in changes.files] == [".gitignore"]
    assert await workspace.restore(snap) == []
    assert (workspace.path / ".gitignore").read_text() == ".env\n"
    assert sorted(p.name for p in folder.iterdir()) == ["made-by-the-run.txt", "report.pdf"]  # left alone


def test_a_folder_the_agent_filled_with_every_numbered_name_still_takes_the_file(tmp_path: Path) -> None:
    """The folder is the agent's: one that took `notes.txt` up to `notes-999.txt` (and set their
    times in the future, so they never expire) must not keep the owner's files out for good."""
    folder = tmp_path / "checkout" / ATTACHMENTS_DIR
    folder.mkdir(parents=True)
    for name in ["notes.txt", *(f"notes-{n}.txt" for n in range(2, 1000))]:
        (folder / name).symlink_to(tmp_path / "elsewhere")
    source = tmp_path / "incoming"
    source.write_bytes(PDF)
    saved = place(tmp_path / "checkout", source, "notes.txt", "text/plain", None)
    assert re.fullmatch(r"notes-[0-9a-f]{8}\.txt", saved.name) and saved.read_bytes() == PDF
    assert not (tmp_path / "elsewhere").exists()


def test_a_copy_that_fails_leaves_no_file_behind(tmp_path: Path) -> None:
    """Nothing half-written (and, before it is the agent's, root's) stays in the agent's folder."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    with pytest.raises(FileNotFoundError):
        place(checkout, tmp_path / "gone", "notes.txt", "text/plain", None)
    assert list((checkout / ATTACHMENTS_DIR).iterdir()) == []
