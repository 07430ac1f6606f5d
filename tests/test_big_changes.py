"""A change of thousands of files still makes one short approval message, quickly."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fakes.anthropic import Text, bash
from tests.support.pair_harness import pair_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.anyio


async def test_two_thousand_changed_files_make_one_short_approval(tmp_path: Path) -> None:
    async with pair_stack(tmp_path) as pair:
        pair.model.script(
            "generate fixtures",
            bash(
                'mkdir -p fixtures && for i in $(seq 2000); do echo "case $i" > fixtures/case$i.txt; done', "generate"
            ),
            Text("Generated 2000 fixtures."),
        )
        await pair.start_relay()
        await pair.start_worker()
        started = time.monotonic()
        await pair.text("generate fixtures")
        approval = await wait_for(lambda: pair.said("📝 2000 files changed:"), 60, "approval")
        assert time.monotonic() - started < 60
        body = approval[0]  # one message, its buttons on a quick reply after it
        listed = body.count("\n• ") - 1
        assert f"… and {2000 - listed} more" in body
        assert len(body) <= 1600 and 10 <= listed <= 30
        assert len([m for m in pair.twilio.messages if "files changed" in m.body]) == 1
