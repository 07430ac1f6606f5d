"""The owner's phone, fuller (issue 12), through the real relay with a fake Twilio (its Messages
and Content APIs) and a fake worker: buttons, repositories, the model, usage and the budget."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from common.protocol import VERSION, Presence, encode_presence
from fakes.servers import run_server
from fakes.twilio import FakeTwilio
from fakes.wiring import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    OWNER,
    OWNER2,
    WORKER_TOKEN,
    message_params,
)
from relay.buttons import content_name
from tests.support.relay_harness import Stack, relay_stack, twilio_sender
from tests.support.waiting import wait_for

pytestmark = pytest.mark.anyio

REPOS = "web=https://github.com/you/web.git, api=ssh://git@example.com/you/api.git"


async def start_run(stack: Stack, text: str = "add a login page") -> dict[str, Any]:
    count = len(stack.worker.commands())
    await stack.send(text)
    commands = await wait_for(lambda: stack.worker.commands()[count:], what="command")
    await wait_for(lambda: stack.twilio.bodies(OWNER).count("🤖 Working on it...") > count, what="working")
    command: dict[str, Any] = commands[-1]
    return command


def said(stack: Stack, fragment: str) -> list[str]:
    return [b for b in stack.twilio.bodies(OWNER) if fragment in b]


async def reply_to(stack: Stack, text: str, fragment: str) -> str:
    await stack.send(text)
    found = await wait_for(lambda: said(stack, fragment), what=f"a reply with {fragment!r} to {text!r}")
    return str(found[-1])


# --- buttons ----------------------------------------------------------------------------


async def test_a_tapped_button_approves_and_messages_carry_their_buttons(tmp_path: Path) -> None:
    async with relay_stack(tmp_path) as stack:
        command = await start_run(stack)
        working = [m for m in stack.twilio.messages if m.body == "🤖 Working on it..."]
        assert working[0].buttons == ["cancel"] and working[0].content_sid
        await stack.report("approval_required", run_id=command["message_id"], files=[{"path": "a.py", "added": 1}])
        approval = await wait_for(lambda: [m for m in stack.twilio.messages if "approve" in m.buttons])
        assert approval[0].buttons == ["approve", "reject"] and "*approve*" in approval[0].body

        # A tap is a message whose ButtonPayload is the button's id, whatever its body says.
        tap = {**message_params("👍 looks good"), "ButtonPayload": "approve", "ButtonText": "Approve"}
        assert (await stack.post_form(tap)).status_code == 200
        await wait_for(lambda: "/approve" in stack.worker.paths(), what="the approve call")
        assert not any(c["text"] == "👍 looks good" for c in stack.worker.commands())
        # Two kinds of buttons, each made once through the Content API, however many messages.
        names = sorted(c["friendly_name"] for c in stack.twilio.contents.values())
        assert names == [content_name("cancel"), content_name("decide")]


async def test_an_unknown_button_payload_is_just_its_body(tmp_path: Path) -> None:
    async with relay_stack(tmp_path) as stack:
        await stack.post_form({**message_params("status"), "ButtonPayload": "rm -rf"})
        await wait_for(lambda: said(stack, "Idle"), what="the status answer")
        assert stack.worker.commands() == []


async def test_buttons_fall_back_to_plain_text_and_say_why_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="relay.buttons")
    async with relay_stack(tmp_path) as stack:
        stack.twilio.content_down = True  # the Content API fails: no buttons can be made
        await start_run(stack, "first")
        await stack.report("answer", run_id=stack.worker.commands()[-1]["message_id"], text="ok")
        await wait_for(lambda: said(stack, "ok"), what="the answer")
        await start_run(stack, "second")
        plain = [m for m in stack.twilio.messages if m.body == "🤖 Working on it..."]
        assert len(plain) == 2 and all(not m.content_sid and not m.buttons for m in plain)
        assert len([r for r in caplog.records if "plain text instead of buttons" in r.message]) == 1


async def test_a_message_twilio_refuses_with_buttons_goes_out_as_text(tmp_path: Path) -> None:
    async with relay_stack(tmp_path) as stack:
        stack.twilio.refuse_content_sends = True  # say, the resource was deleted behind our back
        await start_run(stack)
        working = [m for m in stack.twilio.messages if m.body == "🤖 Working on it..."]
        assert len(working) == 1 and not working[0].content_sid


async def test_buttons_off_sends_plain_text(tmp_path: Path) -> None:
    async with relay_stack(tmp_path, BUTTONS="off") as stack:
        command = await start_run(stack)
        await stack.report("approval_required", run_id=command["message_id"], files=[{"path": "a.py", "added": 1}])
        await wait_for(lambda: said(stack, "a.py +1"), what="the approval")
        assert stack.twilio.contents == {} and all(not m.buttons for m in stack.twilio.messages)


async def test_the_buttons_are_found_again_by_name_after_a_restart(tmp_path: Path) -> None:
    twilio = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN)
    async with run_server(twilio.app()) as url:
        for _ in range(2):  # two relay processes' worth of senders, one after the other
            async with twilio_sender(url) as sender:
                assert (await sender.send(OWNER, "Reply *approve* or *reject*.", [], "decide")).ok
    assert len(twilio.contents) == 1
    assert [m.buttons for m in twilio.messages] == [["approve", "reject"], ["approve", "reject"]]


async def test_an_approval_of_many_lines_is_followed_by_a_one_line_quick_reply(tmp_path: Path) -> None:
    # Twilio refuses a Content variable with a line break in it (error 21656; the fake does too),
    # and a quick reply's body is one: the approval goes out as it always did, and its buttons on
    # a one-line quick reply just after it.
    async with relay_stack(tmp_path) as stack:
        command = await start_run(stack)
        files = [{"path": f"src/module_{i:03d}/a_rather_long_file_name.py", "added": i} for i in range(80)]
        await stack.report(
            "approval_required", run_id=command["message_id"], files=files, files_count=80, diff="+x\n" * 500
        )
        [buttons] = await wait_for(lambda: [m for m in stack.twilio.messages if "approve" in m.buttons])
        approval = stack.twilio.messages[stack.twilio.messages.index(buttons) - 1]
        assert approval.body.startswith("📝 80 files changed") and "… and" in approval.body
        assert len(approval.body) <= 1600 and "*approve*" in approval.body and not approval.content_sid
        assert "\n" not in buttons.body and "*approve*" in buttons.body and buttons.content_sid


# --- repositories -----------------------------------------------------------------------


async def test_repos_lists_them_and_use_switches_where_prompts_go(tmp_path: Path) -> None:
    async with relay_stack(tmp_path, REPOS=REPOS) as stack:
        listing = await reply_to(stack, "repos", "Your repositories")
        assert "👉 *web*" in listing and "▫️ *api*" in listing
        command = await start_run(stack, "fix the header")
        assert (command["repo"], command["repo_url"]) == ("web", "https://github.com/you/web.git")

        # Not while a run goes in web: the owner is told why, and stays on web.
        refusal = await reply_to(stack, "use api", "Not switching")
        assert "run is going in *web*" in refusal
        await stack.report("approval_required", run_id=command["message_id"], files=[{"path": "a.py", "added": 1}])
        approval = await wait_for(lambda: said(stack, "changed in *web*"), what="the approval naming web")
        assert "*approve*" in approval[0]
        assert "*approve* or *reject*" in (await reply_to(stack, "use api", "changes in *web* wait"))
        status = await reply_to(stack, "status", "Repository")
        assert "📁 Repository: *web*" in status

        await stack.send("reject")
        await wait_for(lambda: "/reject" in stack.worker.paths(), what="reject")
        await stack.report("rolled_back", run_id=command["message_id"])
        await wait_for(lambda: said(stack, "Rolled back"), what="rolled back")
        assert "Now on *api*" in await reply_to(stack, "use API", "Now on")
        second = await start_run(stack, "add an endpoint")
        assert (second["repo"], second["repo_url"]) == ("api", "ssh://git@example.com/you/api.git")
        await reply_to(stack, "use nope", "No repository called")
        # Another owner has their own current repository.
        await stack.send("hello", sender=OWNER2)
        other = await wait_for(lambda: [c for c in stack.worker.commands() if c["phone"] == OWNER2])
        assert other[0]["repo"] == "web"


async def test_without_repos_commands_name_none_and_use_says_how_to_add_some(tmp_path: Path) -> None:
    async with relay_stack(tmp_path) as stack:
        command = await start_run(stack)
        assert "repo" not in command and command["v"] == VERSION
        assert "REPOS" in await reply_to(stack, "use api", "one repository")
        # Longer messages starting with the command words are prompts.
        await stack.report("answer", run_id=command["message_id"], text="done")
        await wait_for(lambda: said(stack, "done"), what="the answer")
        second = await start_run(stack, "use the new API in app.py")
        assert second["text"] == "use the new API in app.py"


# --- the model --------------------------------------------------------------------------


async def test_model_shows_sets_and_goes_with_every_run(tmp_path: Path) -> None:
    async with relay_stack(tmp_path, CLAUDE_MODEL="sonnet") as stack:
        shown = await reply_to(stack, "model", "Model:")
        assert "*sonnet*" in shown and "haiku" in shown
        assert "*haiku*" in await reply_to(stack, "Model HAIKU", "next prompts use")
        command = await start_run(stack)
        assert command["model"] == "haiku"
        assert "🧠 Model: haiku" in await reply_to(stack, "status", "VM:")
        await reply_to(stack, "model ../../etc", "not a model name")
        await stack.report("answer", run_id=command["message_id"], text="done")
        await wait_for(lambda: said(stack, "done"), what="the answer")
        assert "default model (sonnet)" in await reply_to(stack, "model default", "default model")
        assert (await start_run(stack, "again"))["model"] == "sonnet"


# --- usage and the budget -----------------------------------------------------------------


async def run_costing(stack: Stack, usd: float, text: str) -> None:
    command = await start_run(stack, text)
    await stack.report(
        "answer",
        run_id=command["message_id"],
        text=f"answer to {text}",
        cost_usd=usd,
        input_tokens=12_000,
        output_tokens=800,
        duration_ms=1000,
    )
    await wait_for(lambda: said(stack, f"answer to {text}"), what="the answer")


async def test_usage_adds_up_runs_and_the_vms_hours(tmp_path: Path) -> None:
    async with relay_stack(tmp_path, VM_COST_PER_HOUR_USD="0.5") as stack:
        await run_costing(stack, 0.25, "one")
        await run_costing(stack, 0.5, "two")
        # The worker says how long it was up when it goes to sleep: two hours here.
        sleeping = encode_presence(Presence("sleeping", "boot-1", awake_ms=2 * 3600 * 1000))
        response = await stack.http.post(
            f"{stack.url}/callback", json=sleeping, headers={"Authorization": f"Bearer {WORKER_TOKEN}"}
        )
        assert response.status_code == 200
        text = await reply_to(stack, "usage", "Usage")
        today = next(line for line in text.splitlines() if line.startswith("*Today:*"))
        assert "2 runs" in today and "24.0k tokens in" in today and "1.6k out" in today and "$0.75 model" in today
        assert "VM awake 2.0 h ≈ $1.00" in today and "total $1.75" in today
        # A report repeated by the worker counts once.
        await stack.report("answer", run_id=stack.worker.commands()[0]["message_id"], text="again", cost_usd=0.25)
        again = await reply_to(stack, "usage", "Usage")
        assert again.count("2 runs") == 2  # today and this month


async def test_a_spent_budget_refuses_new_prompts_until_it_is_raised(tmp_path: Path) -> None:
    async with relay_stack(tmp_path, MONTHLY_BUDGET_USD="1", VM_COST_PER_HOUR_USD="0") as stack:
        await run_costing(stack, 0.85, "first")
        warning = await wait_for(lambda: said(stack, "85% of this month's budget"), what="the 80% warning")
        assert "budget <amount>" in warning[0]
        await run_costing(stack, 0.3, "second")
        await wait_for(lambda: said(stack, "Budget reached"), what="the 100% notice")
        commands = len(stack.worker.commands())

        refusal = await reply_to(stack, "third", "This month's budget is spent")
        assert "$1.15 of $1.00" in refusal and "*budget <amount>*" in refusal
        assert len(stack.worker.commands()) == commands  # nothing ran

        assert "$5.00" in await reply_to(stack, "budget $5", "budget is now")
        await start_run(stack, "fourth")
        # The other owner's month is their own.
        await stack.send("hello", sender=OWNER2)
        await wait_for(lambda: [c for c in stack.worker.commands() if c["phone"] == OWNER2], what="owner 2's run")


async def test_the_run_budget_goes_with_the_command_and_its_stop_is_said(tmp_path: Path) -> None:
    async with relay_stack(tmp_path, RUN_BUDGET_USD="0.50") as stack:
        command = await start_run(stack)
        assert command["budget_usd"] == 0.5
        await stack.report("error", run_id=command["message_id"], stop="budget", cost_usd=0.51, duration_ms=9000)
        stopped = await wait_for(lambda: said(stack, "stopped at its budget"), what="the budget stop")
        assert "$0.5100" in stopped[0]
