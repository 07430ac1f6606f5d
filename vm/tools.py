"""The tools textslash gives Claude on top of Claude Code's own: a screenshot of a URL."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import Any

from vm.browser import ScreenshotError

Capture = Callable[[str], Awaitable[bytes]]


def tool_servers(capture: Capture) -> dict[str, Any]:
    """An in-process MCP server (from the SDK) whose `screenshot` tool calls `capture`."""
    from claude_agent_sdk import create_sdk_mcp_server, tool

    @tool(
        "screenshot",
        "Take a screenshot of a web page, for example the app you are building on localhost, "
        "and send the picture to the owner's phone. Returns the picture.",
        {"url": str},
    )
    async def screenshot(args: dict[str, Any]) -> dict[str, Any]:
        url = str(args.get("url", ""))
        try:
            png = await capture(url)
        except ScreenshotError as exc:
            return {"content": [{"type": "text", "text": f"Could not capture {url}: {exc}"}], "is_error": True}
        return {
            "content": [
                {"type": "text", "text": f"Screenshot of {url}; the owner has been sent the picture."},
                {"type": "image", "data": base64.b64encode(png).decode(), "mimeType": "image/png"},
            ]
        }

    return {"textslash": create_sdk_mcp_server("textslash", tools=[screenshot])}
