"""`python -m console --demo` with a real Chromium on its chat page, for the browser tests."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from playwright.async_api import Page, async_playwright

from fakes.wiring import CHROMIUM, open_for_agents
from tests.support.processes import child, free_port, wait_exit, wait_healthy


@asynccontextmanager
async def demo_page(tmp_path: Path) -> AsyncIterator[Page]:
    """The demo console (state under tmp_path/data, its log tmp_path/console.log) and a phone-sized
    page on its chat. On the way out the browser closes, and the console gets Ctrl-C, as in a
    terminal (its whole process group), and must exit 0."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"CHROMIUM_PATH": CHROMIUM, "HOME": str(tmp_path / "home")}
    if os.geteuid() == 0:
        open_for_agents(tmp_path)  # the agent users must reach the demo's checkouts
    data = str(tmp_path / "data")
    with child("console", env, tmp_path / "console.log", "--demo", "--port", str(port), "--data", data) as proc:
        await wait_healthy(url, proc, path="/api/info")  # the chat page has no /health
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=CHROMIUM, args=["--disable-background-networking", "--disable-component-update"]
            )
            try:
                page = await browser.new_page(viewport={"width": 420, "height": 860})
                await page.goto(url)
                yield page
            finally:
                await browser.close()
        os.killpg(proc.pid, signal.SIGINT)
        assert await wait_exit(proc, 15) == 0
