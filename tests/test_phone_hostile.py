"""The owner's phone, fuller (issue 12), attacked: absurd numbers from the worker, odd commands,
the budget against queues, retries and a restart, the repository a kept prompt runs in, stale
buttons. Through the real relay with a fake Twilio and a fake worker, as tests/test_phone_commands.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from common.protocol import VERSION, Answer
from fakes.servers import reserve_port, run_server
from fakes.twilio import Sent
from fakes.wiring import OWNER, WORKER_TOKEN, message_params
from tests.support.relay_harness import Stack, relay_stack
from tests.support.waiting import wait_for
from tests.test_phone_commands import REPOS, reply_to, said, start_run

pytestmark = pytest.mark.anyio
AUTH = {"Authorization": f"Bearer {WORKER_TOKEN}", "Content-Type": "application/json"}


async def post_raw(stack: Stack, path: str, body: str) -> Any:
    """A body as given, JSON's NaN and Infinity included (Python's json reads them)."""
    return await stack.http.post(f"{stack.url}{path}", content=body, headers=AUTH)


def today(usage: str) -> str:
    return next(line for line in usage.splitlines() if line.startswith("*Today:*"))


# --- absurd numbers from the worker ---------------------------------------------------------


async def test_an_absurd_awake_time_is_refused_or_bounded_never_a_500(tmp_path: Path) -> None:
    async with relay_stack(tmp_path, VM_COST_PER_HOUR_USD="1") as stack:
        huge = "1" + "0" * 400  # an integer no float holds
        response = await post_raw(
            stack, "/callback", f'{{"v": 2, "state": "sleeping", "boot": "b", "awake_ms": {huge}}}'
        )
        assert response.status_code == 422, response.text
        # Heard from once (a prompt delivered), asleep, up again: then it says it was up for
        # 300 days, though the relay knew it asleep a moment ago. It cannot have been up longer.
        await start_run(stack)
        await post_raw(stack, "/callback", '{"v": 2, "state": "sleeping", "boot": "b1", "awake_ms": 1000}')
        await stack.worker.announce(stack.url)
        days = 300 * 86_400_000
        sleeping = f'{{"v": 2, "state": "sleeping", "boot": "b2", "awake_ms": {days}}}'
        assert (await post_raw(stack, "/callback", sleeping)).status_code == 200
        usage = await reply_to(stack, "usage", "Usage")
        assert "VM awake 0.0 h" in today(usage), usage


@pytest.mark.parametrize(
    "fields",
    [
        {"cost_usd": float("nan")},
        {"cost_usd": float("inf")},
        {"cost_usd": 1e300},
        {"input_tokens": 2**70},
        {"output_tokens": 2**64, "duration_ms": 2**64},
    ],
    ids=["nan", "infinity", "1e300", "tokens-2^70", "tokens-and-duration-2^64"],
)
async def test_a_run_end_with_absurd_numbers_is_shown_counted_sanely_and_starts_the_next(
    tmp_path: Path, fields: dict[str, Any]
) -> None:
    async with relay_stack(tmp_path, VM_COST_PER_HOUR_USD="0") as stack:
        command = await start_run(stack, "first")
        await reply_to(stack, "second", "Queued")
        end = {
            "v": VERSION,
            "type": "answer",
            "run_id": command["message_id"],
            "seq": 7,
            "text": "THE ANSWER",
            **fields,
        }
        response = await post_raw(stack, f"/callback/{OWNER}", json.dumps(end))
        assert response.status_code == 200, response.text
        stack.worker.states[OWNER] = Answer("idle")  # where the worker is once it reported that
        # The answer is shown and the queued prompt goes to the worker: nothing about the
        # numbers may cost the owner the report's effects.
        await wait_for(lambda: said(stack, "THE ANSWER"), what="the answer")
        await wait_for(lambda: [c for c in stack.worker.commands() if c["text"] == "second"], what="the next prompt")
        assert not said(stack, "inf") and not said(stack, "nan")
        usage = await reply_to(stack, "usage", "Usage")
        assert "1 run," in today(usage)
        # Whatever the run was said to cost, a budget the owner may set lets them go on.
        await stack.report("answer", run_id=stack.worker.commands()[-1]["message_id"], text="second done")
        await wait_for(lambda: said(stack, "second done"), what="the second answer")
        await reply_to(stack, "budget 9999999", "budget is now")
        await start_run(stack, "third")


# --- odd commands -------------------------------------------------------------------------


@pytest.mark.parametrize("amount", ["off", "1e9", "10000000", "-5", "5.555", "0", "$0.00", "five"])
async def test_budget_with_an_amount_it_cannot_take_says_how_and_never_runs_a_prompt(
    tmp_path: Path, amount: str
) -> None:
    # Two words starting with "budget" are the command, as "use" and "model" are: a typo in the
    # amount must not become a prompt that the agent runs (and the month pays for).
    async with relay_stack(tmp_path) as stack:
        refusal = await reply_to(stack, f"budget {amount}", "budget <amount>")
        assert "9,999,999.99" in refusal and "more than $0" in refusal
        assert stack.worker.commands() == []
        assert "$7.50" in await reply_to(stack, "Budget $7.50", "budget is now")


# --- the budget against queues and retries ----------------------------------------------------


async def test_queued_prompts_wait_once_a_run_spends_the_month_and_start_when_it_is_raised(tmp_path: Path) -> None:
    async with relay_stack(tmp_path, MONTHLY_BUDGET_USD="1", VM_COST_PER_HOUR_USD="0") as stack:
        first = await start_run(stack, "first")
        await reply_to(stack, "second", "Queued (#1)")
        await reply_to(stack, "third", "Queued (#2)")
        await stack.report("answer", run_id=first["message_id"], text="first done", cost_usd=1.5)
        held = await wait_for(lambda: said(stack, "waits for a higher budget"), what="the hold")
        assert "“second”" in held[0] and "1 more queued" in held[0] and "*retry*" in held[0]
        assert [c["text"] for c in stack.worker.commands()] == ["first"]  # nothing ran past the ceiling
        assert "Kept for *retry*: “second”" in await reply_to(stack, "status", "VM:")

        # Retry is a prompt too: refused while the month is spent.
        await reply_to(stack, "retry", "This month's budget is spent")
        assert [c["text"] for c in stack.worker.commands()] == ["first"]

        raised = await reply_to(stack, "budget 5", "budget is now")
        assert "*retry*" in raised and "“second”" in raised
        await stack.send("retry")
        second = await wait_for(lambda: [c for c in stack.worker.commands() if c["text"] == "second"], what="second")
        await stack.report("answer", run_id=second[0]["message_id"], text="second done", cost_usd=0.1)
        await wait_for(lambda: [c for c in stack.worker.commands() if c["text"] == "third"], what="third")


async def test_a_prompt_kept_when_the_vm_never_woke_is_not_retried_past_the_budget(tmp_path: Path) -> None:
    sock = reserve_port()
    async with relay_stack(
        tmp_path,
        worker_listening=False,
        worker_sock=sock,
        WAKE_TIMEOUT_MS="800",
        MONTHLY_BUDGET_USD="1",
        VM_COST_PER_HOUR_USD="3600",
    ) as stack:
        await stack.send("expensive")
        await wait_for(lambda: said(stack, "did not wake up"), what="the prompt kept")
        async with run_server(stack.worker.app(), sock):
            # The worker was up a second (a dollar at this price) and went to sleep: spent.
            await stack.worker.announce(stack.url)
            sleeping = '{"v": 2, "state": "sleeping", "boot": "fake-boot", "awake_ms": 1000}'
            assert (await post_raw(stack, "/callback", sleeping)).status_code == 200
            await reply_to(stack, "retry", "This month's budget is spent")
            await stack.send("status")
            await wait_for(lambda: said(stack, "Kept for *retry*"), what="status")
            assert stack.worker.commands() == []


# --- repositories ---------------------------------------------------------------------------


async def test_a_kept_prompt_runs_where_it_was_written_and_its_approval_names_that_repository(tmp_path: Path) -> None:
    sock = reserve_port()
    async with relay_stack(
        tmp_path, worker_listening=False, worker_sock=sock, WAKE_TIMEOUT_MS="800", REPOS=REPOS
    ) as stack:
        await stack.send("fix the header")  # written while on web
        await wait_for(lambda: said(stack, "did not wake up"), what="the prompt kept")
        await reply_to(stack, "use api", "Now on *api*")  # allowed: nothing runs
        async with run_server(stack.worker.app(), sock):
            await stack.send("retry")
            [command] = await wait_for(stack.worker.commands, what="the kept prompt")
            assert command["repo"] == "web"
            await wait_for(lambda: said(stack, "Working on it"), what="working")
            assert "📁 Repository: *web*" in await reply_to(stack, "status", "VM:")
            await stack.report("approval_required", run_id=command["message_id"], files=[{"path": "a.py", "added": 1}])
            approval = await wait_for(lambda: said(stack, "1 file changed"), what="the approval")
            assert "changed in *web*" in approval[0]  # where the changes are, not where the owner is now
            status = await reply_to(stack, "status", "Changes wait")
            assert "📁 Repository: *web*" in status
            await stack.send("reject")
            await wait_for(lambda: "/reject" in stack.worker.paths(), what="reject")
            await stack.report("rolled_back", run_id=command["message_id"])
            await wait_for(lambda: said(stack, "Rolled back"), what="rolled back")
            assert "📁 Repository: *api*" in await reply_to(stack, "status", "Idle")


# --- stale buttons ----------------------------------------------------------------------------


def with_buttons(stack: Stack, word: str) -> list[Sent]:
    return [m for m in stack.twilio.messages if word in m.buttons]


async def tap(stack: Stack, word: str, on: Sent | None, sender: str = OWNER) -> None:
    """A tap on a quick reply, as Twilio posts it: the button's id as ButtonPayload, and the
    message it was on as OriginalRepliedMessageSid."""
    params = {**message_params(word.title(), sender=sender), "ButtonPayload": word, "ButtonText": word.title()}
    if on is not None:
        params["OriginalRepliedMessageSid"] = on.sid
    assert (await stack.post_form(params)).status_code == 200


async def test_an_approve_button_on_an_earlier_approval_approves_nothing(tmp_path: Path) -> None:
    async with relay_stack(tmp_path) as stack:
        first = await start_run(stack, "rename the helper")
        await stack.report("approval_required", run_id=first["message_id"], files=[{"path": "a.py", "added": 1}])
        [old] = await wait_for(lambda: with_buttons(stack, "approve"), what="the first approval's buttons")
        await stack.send("reject")  # typed: the first changes are rolled back
        await wait_for(lambda: "/reject" in stack.worker.paths(), what="reject")
        await stack.report("rolled_back", run_id=first["message_id"])
        await wait_for(lambda: said(stack, "Rolled back"), what="rolled back")

        second = await start_run(stack, "delete the tests")
        await stack.report("approval_required", run_id=second["message_id"], files=[{"path": "t.py", "removed": 90}])
        await wait_for(lambda: len(with_buttons(stack, "approve")) == 2, what="the second approval's buttons")
        # Scrolling up, the owner taps Approve on the first approval: the second changes, which
        # that message never showed, must not be pushed.
        await tap(stack, "approve", old)
        stale = await wait_for(lambda: said(stack, "earlier message"), what="the stale tap's answer")
        assert "*approve*" in stale[0]
        assert "/approve" not in stack.worker.paths()
        # So is a tap on a message the relay never sent (or no longer knows).
        await tap(stack, "approve", Sent("", "", "", [], 0.0, sid="SM" + "0" * 32))
        await wait_for(lambda: len(said(stack, "earlier message")) == 2, what="the unknown message's answer")
        assert "/approve" not in stack.worker.paths()

        # The buttons on the latest approval decide.
        await tap(stack, "approve", with_buttons(stack, "approve")[-1])
        await wait_for(lambda: "/approve" in stack.worker.paths(), what="the approve call")


async def test_a_cancel_button_on_an_earlier_run_stops_nothing(tmp_path: Path) -> None:
    async with relay_stack(tmp_path) as stack:
        first = await start_run(stack, "first")
        [old] = with_buttons(stack, "cancel")
        await reply_to(stack, "second", "Queued")
        await stack.report("answer", run_id=first["message_id"], text="first done")
        await wait_for(lambda: len(with_buttons(stack, "cancel")) == 2, what="the second run's Cancel")
        await reply_to(stack, "third", "Queued")
        await tap(stack, "cancel", old)
        await wait_for(lambda: said(stack, "nothing was stopped"), what="the stale tap's answer")
        assert "/cancel" not in stack.worker.paths() and "Queued: 1" in await reply_to(stack, "status", "VM:")
        await tap(stack, "cancel", with_buttons(stack, "cancel")[-1])
        await wait_for(lambda: "/cancel" in stack.worker.paths(), what="the cancel call")
