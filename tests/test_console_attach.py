"""Attaching a picture in the local chat page (`python -m console --demo`, in a real browser):
the page holds it as Twilio would, the relay takes it through the console's Twilio stand-in
(Basic auth and a redirect), and the worker hands it to the scripted model."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.async_api import expect

from fakes.worker import PNG
from tests.support.console import demo_page
from vm.workspace import ATTACHMENTS_DIR

pytestmark = pytest.mark.anyio
STEP = 60_000  # ms: the demo model takes about a second a step


async def test_a_picture_attached_in_the_chat_reaches_the_agent(tmp_path: Path) -> None:
    picture = tmp_path / "screen.png"
    picture.write_bytes(PNG)
    async with demo_page(tmp_path) as page:
        await expect(page.get_by_label("Attach", exact=True)).to_be_visible()
        await page.get_by_label("File", exact=True).set_input_files(str(picture))
        await expect(page.get_by_text("📎 screen.png")).to_be_visible()
        await page.get_by_label("Send").click()  # no caption: a photo alone is a prompt
        mine = page.locator(".msg.owner img")
        await expect(mine).to_have_count(1)
        await expect(mine).to_have_js_property("complete", True)
        assert await mine.evaluate("img => img.naturalWidth") == 1  # the picture, from the chat's "CDN"
        bot = page.locator(".msg.textslash")
        await expect(bot.filter(has_text=f"running ls -l {ATTACHMENTS_DIR}")).to_have_count(1, timeout=STEP)
        await expect(bot.filter(has_text="Got it")).to_have_count(1, timeout=STEP)
    # Named by the relay (Twilio's media carry no file name).
    saved = list((tmp_path / "data" / "workspace").glob(f"*/{ATTACHMENTS_DIR}/photo-1.png"))
    assert [p.read_bytes() for p in saved] == [PNG]
