"""A photo and a PDF from the owner's phone to Claude, through the pair as deployed: fake Twilio
(its media behind Basic auth and a redirect to its CDN), `python -m relay`, `python -m vm`, the
real Claude Code CLI and the scripted model."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from fakes.anthropic import Text, write
from fakes.origin import git
from fakes.worker import PNG
from tests.support.pair_harness import pair_stack
from tests.support.waiting import wait_for
from vm.workspace import ATTACHMENTS_DIR

pytestmark = pytest.mark.anyio
STEP = 60.0
PDF = b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"


async def test_a_photo_and_a_pdf_reach_claude_and_never_the_diff(tmp_path: Path) -> None:
    async with pair_stack(tmp_path) as pair:
        checkout = pair.checkout
        pair.model.script("make a page like this", write(f"{checkout}/page.html", "<h1>hi</h1>\n"), Text("Made it."))
        photo = pair.twilio.add_media(PNG, "image/png")
        brief = pair.twilio.add_media(PDF, "application/pdf", filename="brief.pdf")
        await pair.start_relay()
        await pair.start_worker()
        await pair.text("make a page like this", media=[(photo, "image/png"), (brief, "application/pdf")])
        approval = await wait_for(lambda: pair.said("page.html +1"), STEP, "the approval request")

        # The photo reached the model as an image block, in the same user message as the caption.
        turn = pair.model.user_turns()[0]
        assert [b["source"]["data"] for b in turn if b.get("type") == "image"] == [base64.b64encode(PNG).decode()]
        text = " ".join(b["text"] for b in turn if b.get("type") == "text")
        assert "make a page like this" in text and f"{ATTACHMENTS_DIR}/brief.pdf" in text
        assert (checkout / ATTACHMENTS_DIR / "brief.pdf").read_bytes() == PDF

        # The PDF is in the checkout for the agent, and in no diff and no pull request.
        assert "1 file changed" in approval[0] and ATTACHMENTS_DIR not in approval[0]
        await pair.text("approve")
        await wait_for(lambda: pair.said("Pull request opened"), STEP, "the pull request")
        branch = pair.github.pulls[0]["head"]
        assert git(pair.origin, "ls-tree", "-r", "--name-only", branch).split() == ["README.md", "app.py", "page.html"]
