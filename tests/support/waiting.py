"""Wait on conditions with a deadline, never with a bare sleep."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` s."""
    try:
        with anyio.fail_after(timeout):
            while not (result := predicate()):
                await anyio.sleep(0.01)
            return result
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None
