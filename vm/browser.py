"""One long-lived headless Chromium, driven by Playwright, started on first use.

Playwright is imported lazily: the worker answers /health long before anyone needs a
browser, and a worker that never takes a screenshot never pays for one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from playwright.async_api import Browser, Playwright

logger = logging.getLogger(__name__)

# Without these Chromium keeps dialling Google's services, which a closed network refuses.
CHROMIUM_ARGS = ["--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-gpu", "--disable-quic"]


class ScreenshotError(RuntimeError):
    pass


class BrowserPool:
    def __init__(self, executable_path: str = "") -> None:
        self._executable = executable_path or None
        self._playwright: Playwright | None = None
        self._browser: Browser | None = None
        self._lock = anyio.Lock()

    async def _get(self) -> Browser:
        async with self._lock:
            if self._browser is None or not self._browser.is_connected():
                from playwright.async_api import async_playwright

                if self._playwright is None:
                    self._playwright = await async_playwright().start()
                self._browser = await self._playwright.chromium.launch(
                    executable_path=self._executable, args=CHROMIUM_ARGS, headless=True)
            return self._browser

    async def screenshot_url(self, url: str, *, width: int = 1280, height: int = 800, full_page: bool = False,
                             timeout_s: float = 20.0) -> bytes:
        return await self._with_page(width, height, lambda page: _goto_and_shoot(page, url, full_page, timeout_s))

    async def screenshot_html(self, html: str, *, width: int, scale: float = 2.0) -> bytes:
        async def shoot(page: Any) -> bytes:
            await page.set_content(html, wait_until="load")
            data: bytes = await page.screenshot(full_page=True, type="png")
            return data
        return await self._with_page(width, 100, shoot, scale=scale)

    async def _with_page(self, width: int, height: int, action: Any, scale: float = 1.0) -> bytes:
        browser = await self._get()
        # A fresh context per picture: no cookies or storage leak from one to the next.
        context = await browser.new_context(viewport={"width": width, "height": height}, device_scale_factor=scale)
        try:
            page = await context.new_page()
            result: bytes = await action(page)
            return result
        finally:
            await context.close()

    async def close(self) -> None:
        if self._browser is not None:
            await self._browser.close()
            self._browser = None
        if self._playwright is not None:
            await self._playwright.stop()
            self._playwright = None


async def _goto_and_shoot(page: Any, url: str, full_page: bool, timeout_s: float) -> bytes:
    from playwright.async_api import Error as PlaywrightError

    try:
        await page.goto(url, wait_until="load", timeout=timeout_s * 1000)
        data: bytes = await page.screenshot(full_page=full_page, type="png", timeout=timeout_s * 1000)
        return data
    except PlaywrightError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ScreenshotError(first_line[:200]) from None
