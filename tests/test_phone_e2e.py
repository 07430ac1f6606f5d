"""The owner's phone, fuller, through the real relay and worker processes, the real Claude Code
CLI and the scripted model: the model an owner picks reaches the model's requests, a run's cost
is counted, and a spent budget refuses the next prompt."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fakes.anthropic import Text
from tests.support.pair_harness import pair_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.anyio
STEP = 60.0


async def test_model_usage_and_a_spent_budget_end_to_end(tmp_path: Path) -> None:
    async with pair_stack(tmp_path) as pair:
        # One request of the scripted model costs Claude Code's price for its fixed usage: far
        # more than this ceiling, so the first run spends the month.
        pair.relay_env.update(MONTHLY_BUDGET_USD="0.00001", VM_COST_PER_HOUR_USD="0")
        pair.model.script("say hi", Text("Hi there."))
        await pair.start_relay()
        await pair.start_worker()

        await pair.text("model haiku")
        await wait_for(lambda: pair.said("next prompts use *haiku*"), STEP, "the model set")
        await pair.text("say hi")
        await wait_for(lambda: pair.said("Hi there."), STEP, "the answer")
        asked = [r["model"] for r in pair.model.requests if "say hi" in str(r["messages"])]
        assert asked and all("haiku" in model for model in asked)
        await wait_for(lambda: pair.said("Budget reached"), STEP, "the budget notice")

        await pair.text("say hi again")
        refusal = await wait_for(lambda: pair.said("This month's budget is spent"), STEP, "the refusal")
        assert "*budget <amount>*" in refusal[0]
        await pair.text("usage")
        usage = await wait_for(lambda: pair.said("Usage (UTC)"), STEP, "usage")
        today = next(line for line in usage[0].splitlines() if line.startswith("*Today:*"))
        spent = float(re.search(r"\$(\d+\.\d+) model", today).group(1))  # type: ignore[union-attr]
        assert "1 run," in today and spent > 0
        assert len([r for r in pair.model.requests if "say hi again" in str(r["messages"])]) == 0
