from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.relay_harness import Stack, relay_stack


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with relay_stack(tmp_path) as running:
        yield running
