"""One long-lived headless Chromium, driven by Playwright, started on first use.

Playwright is imported lazily: the worker answers /health long before anyone needs a
browser, and a worker that never takes a screenshot never pays for one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
from anyio.abc import TaskGroup

if TYPE_CHECKING:
    from playwright.async_api import Browser, Playwright

logger = logging.getLogger(__name__)

# Without these Chromium keeps dialling Google's services, which a closed network refuses.
CHROMIUM_ARGS = [
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-gpu",
    "--disable-quic",
]


class ScreenshotError(RuntimeError):
    pass


URL_VIEWPORT = (1280, 800)


class BrowserPool:
    """One Chromium; each URL screenshot gets a fresh context, prepared before it is asked for.

    Measured here, a new context and page cost ~200 ms, more than loading and capturing a
    simple page; so after each screenshot the next one's context is made in the background.
    """

    def __init__(self, executable_path: str = "") -> None:
        self._executable = executable_path or None
        self._playwright: Playwright | None = None
        self._browser: Browser | None = None
        self._lock = anyio.Lock()
        self._spare: tuple[Any, Any] | None = None  # (context, page) for the next URL screenshot
        self._tg: TaskGroup | None = None
        self._preparing: anyio.Event | None = None

    def start(self, tg: TaskGroup) -> None:
        """Give the pool a task group for its background preparation (the worker's lifespan)."""
        self._tg = tg

    async def _get(self) -> Browser:
        async with self._lock:
            if self._browser is None or not self._browser.is_connected():
                from playwright.async_api import async_playwright

                if self._playwright is None:
                    self._playwright = await async_playwright().start()
                self._browser = await self._playwright.chromium.launch(
                    executable_path=self._executable, args=CHROMIUM_ARGS, headless=True
                )
            return self._browser

    async def screenshot_url(self, url: str, *, full_page: bool = False, timeout_s: float = 20.0) -> bytes:
        check_web_url(url)
        if self._preparing is not None:
            await self._preparing.wait()  # the spare is nearly ready: cheaper than making another
        context, page = self._spare or await self._new_page(*URL_VIEWPORT)
        self._spare = None
        try:
            return await _goto_and_shoot(page, url, full_page, timeout_s)
        finally:
            await context.close()
            if self._tg is not None:
                self._tg.start_soon(self._prepare_spare)

    async def _prepare_spare(self) -> None:
        if self._spare is not None or self._preparing is not None:
            return
        self._preparing = anyio.Event()
        try:
            self._spare = await self._new_page(*URL_VIEWPORT)
        finally:
            self._preparing.set()
            self._preparing = None

    async def _new_page(self, width: int, height: int, scale: float = 1.0) -> tuple[Any, Any]:
        browser = await self._get()
        context = await browser.new_context(viewport={"width": width, "height": height}, device_scale_factor=scale)
        return context, await context.new_page()

    async def screenshot_html(self, html: str, *, width: int, scale: float = 2.0) -> bytes:
        async def shoot(page: Any) -> bytes:
            await page.set_content(html, wait_until="load")
            data: bytes = await page.screenshot(full_page=True, type="png")
            return data

        return await self._with_page(width, 100, shoot, scale=scale)

    async def _with_page(self, width: int, height: int, action: Any, scale: float = 1.0) -> bytes:
        # A fresh context per picture: no cookies or storage leak from one to the next.
        context, page = await self._new_page(width, height, scale)
        try:
            result: bytes = await action(page)
            return result
        finally:
            await context.close()

    async def close(self) -> None:
        self._spare = None
        if self._browser is not None:
            await self._browser.close()
            self._browser = None
        if self._playwright is not None:
            await self._playwright.stop()
            self._playwright = None


def check_web_url(url: str) -> None:
    """Only web pages: a `file://`, `chrome://` or `data:` URL would show the worker's own files
    (the worker, not the agent, runs the browser) or Chromium's internals to whoever asked."""
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ScreenshotError("only http:// and https:// pages can be captured")


async def _goto_and_shoot(page: Any, url: str, full_page: bool, timeout_s: float) -> bytes:
    from playwright.async_api import Error as PlaywrightError

    try:
        await page.goto(url, wait_until="load", timeout=timeout_s * 1000)
        data: bytes = await page.screenshot(full_page=full_page, type="png", timeout=timeout_s * 1000)
        return data
    except PlaywrightError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ScreenshotError(first_line[:200]) from None
