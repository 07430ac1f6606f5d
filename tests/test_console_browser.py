"""The local chat page in a real browser, against `python -m console --demo`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright.async_api import Page, expect

from tests.support.console import demo_page

pytestmark = pytest.mark.anyio
STEP = 60_000  # ms: the demo model takes about a second a step


async def say(page: Page, text: str) -> None:
    await page.get_by_label("Message").fill(text)
    await page.get_by_label("Send").click()


async def test_the_demo_loop_in_a_browser(tmp_path: Path) -> None:
    async with demo_page(tmp_path) as page:
        await expect(page.get_by_text("DEMO")).to_be_visible()
        await say(page, "add a greeting")
        bot = page.locator(".msg.textslash")
        await expect(bot.filter(has_text="Waking up your VM")).to_have_count(1, timeout=STEP)
        await expect(bot.filter(has_text="running ls")).to_have_count(1, timeout=STEP)
        # The approval with the diff's picture, then a one-line quick reply with its buttons
        # (Twilio takes no line break in a quick reply's body, and the stand-in neither).
        await expect(bot.filter(has_text="files changed")).to_have_count(1, timeout=STEP)
        approval = bot.filter(has_text="Decide on the changes above")
        await expect(approval.get_by_role("button", name="Approve")).to_have_count(1, timeout=STEP)
        await expect(approval.get_by_role("button", name="Reject")).to_have_count(1)
        diff = bot.locator("img")
        await expect(diff).to_have_count(1, timeout=STEP)
        await expect(diff).to_have_js_property("complete", True)
        assert await diff.evaluate("img => img.naturalWidth") > 400  # the PNG really loaded
        await approval.get_by_role("button", name="Approve").click()  # a tap, as Twilio posts it
        link = bot.filter(has_text="Pull request opened").locator("a")
        await expect(link).to_have_count(1, timeout=STEP)
        pr_url = await link.get_attribute("href")
        assert pr_url is not None
        await page.goto(pr_url)
        await expect(page.get_by_role("heading", name="add a greeting #1")).to_be_visible()
        banner = (tmp_path / "console.log").read_text()
        assert f"agent isolation: {'on' if os.geteuid() == 0 else 'OFF'}" in banner
    logs = [tmp_path / "console.log", *(tmp_path / "data").glob("*.log")]
    assert len(logs) == 3 and not [log.name for log in logs if "Traceback" in log.read_text()]


async def test_the_24_hour_window_in_a_browser(tmp_path: Path) -> None:
    # "24 h later" closes WhatsApp's window at the page (which is Twilio for the relay): the
    # approval is refused with 63016 and held, the template says so, and the next message brings it.
    async with demo_page(tmp_path) as page:
        await say(page, "add a greeting")
        bot = page.locator(".msg.textslash")
        await expect(bot.filter(has_text="running ls")).to_have_count(1, timeout=STEP)
        await page.get_by_role("button", name="24 h later").click()  # the model has steps to go
        template = bot.filter(has_text="waiting for you. Reply to see them.")
        await expect(template).to_have_count(1, timeout=STEP)
        await expect(bot.filter(has_text="files changed")).to_have_count(0)
        await say(page, "status")
        await expect(bot.filter(has_text="files changed")).to_have_count(1, timeout=STEP)
        await expect(bot.filter(has_text="waited for you")).to_have_count(1, timeout=STEP)
