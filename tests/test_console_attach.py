"""Attaching a picture in the local chat page (`python -m console --demo`, in a real browser):
the page holds it as Twilio would, the relay takes it through the console's Twilio stand-in
(Basic auth and a redirect), and the worker hands it to the scripted model."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from playwright.async_api import async_playwright, expect

from fakes.wiring import CHROMIUM, open_for_agents
from fakes.worker import PNG
from tests.support.processes import child, free_port, wait_exit, wait_healthy
from vm.workspace import ATTACHMENTS_DIR

pytestmark = pytest.mark.anyio
STEP = 60_000  # ms: the demo model takes about a second a step


async def test_a_picture_attached_in_the_chat_reaches_the_agent(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = tmp_path / "data"
    picture = tmp_path / "screen.png"
    picture.write_bytes(PNG)
    if os.geteuid() == 0:
        open_for_agents(tmp_path)  # the agent users must reach the demo's checkouts
    env = {"CHROMIUM_PATH": CHROMIUM, "HOME": str(tmp_path / "home")}
    with child("console", env, tmp_path / "console.log", "--demo", "--port", str(port), "--data", str(data)) as proc:
        await wait_healthy(url, proc, path="/api/info")
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=CHROMIUM, args=["--disable-background-networking", "--disable-component-update"]
            )
            try:
                page = await browser.new_page(viewport={"width": 420, "height": 860})
                await page.goto(url)
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
            finally:
                await browser.close()
        # Named by the relay (Twilio's media carry no file name).
        saved = list((data / "workspace").glob(f"*/{ATTACHMENTS_DIR}/photo-1.png"))
        assert [p.read_bytes() for p in saved] == [PNG]
        os.killpg(proc.pid, signal.SIGINT)
        assert await wait_exit(proc, 15) == 0
