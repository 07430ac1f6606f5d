"""An owner's conversation through the real relay: prompts, worker reports, approval, queueing."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.protocol import MAX_IMAGE_BYTES, VERSION
from fakes.wiring import OWNER, OWNER2, PUBLIC_URL, WORKER_TOKEN
from fakes.worker import PNG
from tests.support.relay_harness import Stack, relay_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.anyio

IMAGE = "diffimage0123456789abcdef.png"


async def start_run(stack: Stack, text: str = "add a login page") -> str:
    await stack.send(text)
    commands = await wait_for(stack.worker.commands, what="command")
    await wait_for(lambda: "🤖 Working on it..." in stack.twilio.bodies(OWNER), what="working message")
    return str(commands[-1]["message_id"])


async def test_progress_answer_approval_and_pr(stack: Stack) -> None:
    run_id = await start_run(stack)
    stack.worker.images[IMAGE] = PNG
    await stack.report("progress", run_id=run_id, text="✏️ editing app.py")
    await stack.report("answer", run_id=run_id, text="Added /login.", cost_usd=0.0123, duration_ms=4200, changes=True)
    await stack.report(
        "approval_required",
        run_id=run_id,
        files=[{"path": "app.py", "added": 3, "removed": 1}],
        diff="+def login():\n+    pass",
        images=[IMAGE],
    )
    [buttons] = await wait_for(
        lambda: [m for m in stack.twilio.messages if "approve" in m.buttons], what="approval with buttons"
    )
    bodies = stack.twilio.bodies(OWNER)
    assert "✏️ editing app.py" in bodies
    assert any("Added /login." in b and "4.2 s" in b and "$0.0123" in b for b in bodies)
    # The approval says what to type, with the diff's picture; Approve and Reject follow on a
    # one-line quick reply (its body is a Content variable, which may hold no line break).
    approval = stack.twilio.messages[stack.twilio.messages.index(buttons) - 1]
    assert "app.py +3 −1" in approval.body and "approve" in approval.body
    assert approval.media == [f"{PUBLIC_URL}/images/{IMAGE}"]
    assert buttons.buttons == ["approve", "reject"] and buttons.content_sid.startswith("HX")
    # The relay cached the image, so Twilio can fetch it even after the worker sleeps.
    stack.worker.images.clear()
    image = await stack.http.get(f"{stack.url}/images/{IMAGE}")
    assert image.status_code == 200 and image.content == PNG and image.headers["content-type"] == "image/png"

    await stack.send("Approve")
    await wait_for(lambda: "/approve" in stack.worker.paths(), what="approve call")
    assert stack.worker.calls[-1].body == {"v": VERSION, "phone": OWNER}
    await stack.report("pr_opened", run_id=run_id, url="https://github.com/o/r/pull/7")
    await wait_for(lambda: any("pull/7" in b for b in stack.twilio.bodies(OWNER)), what="PR link")


async def test_reject_rolls_back(stack: Stack) -> None:
    run_id = await start_run(stack)
    await stack.report("answer", run_id=run_id, text="done", changes=True)
    await stack.send("  REJECT ")
    await wait_for(lambda: "/reject" in stack.worker.paths())
    await stack.report("rolled_back", run_id=run_id)
    await wait_for(lambda: any("Rolled back" in b for b in stack.twilio.bodies(OWNER)))


async def test_prompt_while_working_is_queued_and_runs_next(stack: Stack) -> None:
    run_id = await start_run(stack, "first")
    await stack.send("second")
    await stack.send("third")
    await wait_for(lambda: any("Queued (#2)" in b for b in stack.twilio.bodies(OWNER)), what="queue place")
    assert len(stack.worker.commands()) == 1
    await stack.report("answer", run_id=run_id, text="first done")
    await wait_for(lambda: len(stack.worker.commands()) == 2, what="second command")
    assert stack.worker.commands()[1]["text"] == "second"


async def test_cancel_goes_through_at_once_and_clears_the_queue(stack: Stack) -> None:
    run_id = await start_run(stack)
    await stack.send("then this")
    await stack.send("cancel")
    await wait_for(lambda: "/cancel" in stack.worker.paths(), what="cancel call")
    await wait_for(lambda: any("Dropped 1 queued prompt" in b for b in stack.twilio.bodies(OWNER)))
    await stack.report("cancelled", run_id=run_id)
    await wait_for(lambda: any("Run cancelled" in b for b in stack.twilio.bodies(OWNER)))
    await stack.send("status")
    await wait_for(lambda: any("Idle" in b for b in stack.twilio.bodies(OWNER)), what="idle status")
    assert len(stack.worker.commands()) == 1


async def test_status_says_what_runs_what_waits_and_the_vm(stack: Stack) -> None:
    await start_run(stack, "make it faster")
    await stack.send("and add tests")
    await stack.send("status")
    status = await wait_for(lambda: [b for b in stack.twilio.bodies(OWNER) if "VM:" in b], what="status")
    assert "Working" in status[0] and "make it faster" in status[0]
    assert "Queued: 1" in status[0] and "and add tests" in status[0]
    assert "awake" in status[0]


async def test_screenshot_goes_to_the_worker_and_the_image_comes_back(stack: Stack) -> None:
    await stack.send("screenshot localhost:8000/app")
    calls = await wait_for(lambda: [c.body for c in stack.worker.calls if c.path == "/screenshot"])
    assert calls[0]["url"] == "http://localhost:8000/app" and not stack.worker.commands()
    stack.worker.images[IMAGE] = PNG
    await stack.report("notice", run_id="shot-1", text="📸 http://localhost:8000/app", images=[IMAGE])
    sent = await wait_for(lambda: [m for m in stack.twilio.messages if m.media])
    assert sent[0].media == [f"{PUBLIC_URL}/images/{IMAGE}"]


async def test_new_starts_a_fresh_session_on_the_next_prompt(stack: Stack) -> None:
    await stack.send("new")
    await wait_for(lambda: any("fresh" in b for b in stack.twilio.bodies(OWNER)))
    await stack.send("hello")
    commands = await wait_for(stack.worker.commands)
    assert commands[0].get("new_session") is True


async def test_help_lists_the_commands(stack: Stack) -> None:
    await stack.send("HELP")
    body = (await wait_for(lambda: stack.twilio.bodies(OWNER)))[0]
    for word in ("approve", "reject", "cancel", "status", "new", "screenshot"):
        assert word in body


async def test_owners_have_separate_conversations(stack: Stack) -> None:
    await start_run(stack, "owner one")
    await stack.send("owner two", sender=OWNER2)
    await wait_for(lambda: len(stack.worker.commands()) == 2, what="both commands")
    assert {c["phone"] for c in stack.worker.commands()} == {OWNER, OWNER2}


async def test_approval_window_expires_into_a_reject(tmp_path: Path) -> None:
    async with relay_stack(tmp_path, APPROVAL_TIMEOUT_MS="300") as stack:
        run_id = await start_run(stack)
        await stack.report("answer", run_id=run_id, text="done", changes=True)
        await wait_for(lambda: "/reject" in stack.worker.paths(), what="automatic reject")
        # The notice goes through the outbox, independently of the call to the worker.
        await wait_for(lambda: any("No answer within" in b for b in stack.twilio.bodies(OWNER)), what="notice")


async def test_worker_refusing_a_call_is_told_to_the_owner(stack: Stack) -> None:
    stack.worker.answer_status = 409
    await stack.send("approve")  # idle: the worker says it holds nothing either
    await wait_for(lambda: stack.twilio.bodies(OWNER), what="the answer to approve")
    await stack.send("do something")
    await wait_for(lambda: any("scripted refusal" in b for b in stack.twilio.bodies(OWNER)), what="refusal")
    assert stack.twilio.bodies(OWNER)[0] == "Nothing is waiting for approval."


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        pytest.param({}, 401, id="no-token"),
        pytest.param({"Authorization": "Bearer wrong-token"}, 401, id="wrong-token"),
        pytest.param({"Authorization": f"Basic {WORKER_TOKEN}"}, 401, id="wrong-scheme"),
    ],
)
async def test_callback_needs_the_worker_token(stack: Stack, headers: dict[str, str], status: int) -> None:
    body = {"type": "progress", "run_id": "r", "seq": 1, "text": "hi"}
    response = await stack.http.post(f"{stack.url}/callback/{OWNER}", json=body, headers=headers)
    assert response.status_code == status


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"[]", id="array"),
        pytest.param(b'{"type": "explode", "run_id": "r", "seq": 1}', id="unknown-type"),
        pytest.param(b'{"type": "progress", "seq": 1}', id="no-run-id"),
        pytest.param(b'{"type": "progress", "run_id": "r", "seq": -1}', id="negative-seq"),
        pytest.param(b'{"type": "answer", "run_id": "r", "seq": 1, "cost_usd": "free"}', id="bad-cost"),
        pytest.param(b'{"type": "notice", "run_id": "r", "seq": 1, "images": ["../../etc/passwd"]}', id="image-escape"),
    ],
)
async def test_malformed_callbacks_get_a_422(stack: Stack, body: bytes) -> None:
    headers = {"Authorization": f"Bearer {WORKER_TOKEN}", "content-type": "application/json"}
    response = await stack.http.post(f"{stack.url}/callback/{OWNER}", content=body, headers=headers)
    assert response.status_code == 422


async def test_a_callback_that_is_not_json_gets_a_400(stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {WORKER_TOKEN}", "content-type": "application/json"}
    response = await stack.http.post(f"{stack.url}/callback/{OWNER}", content=b"not json", headers=headers)
    assert response.status_code == 400 and response.json() == {"detail": "body must be JSON"}


async def test_repeated_callback_is_shown_once(stack: Stack) -> None:
    run_id = await start_run(stack)
    body = {"type": "progress", "run_id": run_id, "seq": 5, "text": "▶️ running pytest"}
    headers = {"Authorization": f"Bearer {WORKER_TOKEN}"}
    for _ in range(3):
        assert (await stack.http.post(f"{stack.url}/callback/{OWNER}", json=body, headers=headers)).status_code == 200
    await stack.send("status")
    await wait_for(lambda: any("VM:" in b for b in stack.twilio.bodies(OWNER)))
    assert stack.twilio.bodies(OWNER).count("▶️ running pytest") == 1


@pytest.mark.parametrize(
    "name",
    [
        "..%2F..%2Fetc%2Fpasswd",
        "%2e%2e%2frelay.sqlite3",
        "relay.sqlite3",
        "short.png",
        "/etc/passwd",
        "..",
        "%2e%2e",
        "a" * 20 + ".png/..",
        "a" * 20 + ".PNG",
    ],
)
async def test_image_route_reaches_nothing_outside_the_cache(stack: Stack, name: str) -> None:
    response = await stack.http.get(f"{stack.url}/images/{name}")
    assert response.status_code == 404


def test_cached_images_are_pruned_after_two_days(tmp_path: Path) -> None:
    import os
    import time

    from relay.images import ImageCache

    old, fresh = tmp_path / ("o" * 20 + ".png"), tmp_path / ("f" * 20 + ".png")
    old.write_bytes(PNG)
    fresh.write_bytes(PNG)
    three_days_ago = time.time() - 3 * 24 * 3600
    os.utime(old, (three_days_ago, three_days_ago))
    assert ImageCache(tmp_path).prune(time.time()) == 1
    assert not old.exists() and fresh.exists()


def test_finished_rows_are_pruned_after_the_retention_and_pending_work_never(tmp_path: Path) -> None:
    from relay import store

    db = store.Database(tmp_path / "relay.sqlite3")
    day, now = 86400.0, 100 * 86400.0
    old, recent = now - 31 * day, now - 29 * day
    for i, at in enumerate((old, old, recent)):
        store.insert_inbox(db.conn, OWNER, f"msg:{i}", {"type": "owner"}, at)
    store.insert_inbox(db.conn, OWNER, "msg:pending", {"type": "owner"}, old)  # never handled
    for row_id, at in ((1, old), (2, old), (3, recent)):
        store.mark_handled(db.conn, row_id, at)
    store.enqueue_send(db.conn, OWNER, "sent long ago", [], old)
    store.enqueue_send(db.conn, OWNER, "still to send", [], old)
    store.mark_sent(db.conn, 1, "SM1", old)
    store.enqueue_worker_call(db.conn, OWNER, "command", {"message_id": "a"}, old)
    store.enqueue_worker_call(db.conn, OWNER, "command", {"message_id": "b"}, old)
    store.finish_worker_call(db.conn, 1, "delivered")

    assert store.prune(db.conn, now - 30 * day, limit=1) == 3  # batches: one row per table at most
    assert store.prune(db.conn, now - 30 * day) == 1
    assert store.prune(db.conn, now - 30 * day) == 0
    keys = [r["dedupe_key"] for r in db.conn.execute("SELECT dedupe_key FROM inbox ORDER BY id")]
    assert keys == ["msg:2", "msg:pending"]
    assert [r["body"] for r in db.conn.execute("SELECT body FROM outbox")] == ["still to send"]
    assert [r["status"] for r in db.conn.execute("SELECT status FROM worker_calls")] == ["pending"]
    db.close()


def test_an_approval_of_many_long_names_is_one_message_that_keeps_their_ends() -> None:
    from common.protocol import Report
    from relay.replies import approval_request

    files = tuple((f"{'deep/' * 60}file{i}.py", 3, 1, False) for i in range(40))
    event = Report("approval_required", "run-1", files=files, files_count=2000, diff="@@ -1 +1 @@\n" * 200)
    text = approval_request(event, 1800)
    assert len(text) <= 1600 and text.startswith("📝 2000 files changed:")
    assert "file0.py +3 −1" in text and "more" in text and "deep/deep/" in text
    listed = [line for line in text.splitlines() if line.startswith("• ") and "more" not in line]
    assert all(line.endswith("+3 −1") and "…" in line for line in listed)
    assert f"… and {2000 - len(listed)} more" in text and "Reply *approve*" in text


def test_an_approval_names_what_reject_cannot_bring_back() -> None:
    from common.protocol import decode_report
    from relay.replies import approval_request

    event = decode_report(
        {
            "type": "approval_required",
            "run_id": "r",
            "seq": 1,
            "files_count": 1,
            "files": [{"path": "a.py", "added": 1, "removed": 0}],
            "uncovered": ["node_modules/", ".venv/"],
        }
    )
    text = approval_request(event, 1800)
    assert "⚠️ Reject cannot bring back node_modules/, .venv/" in text and len(text) <= 1600
    assert "⚠️" not in approval_request(event.__class__("approval_required", "r", files=event.files), 1800)


async def test_an_image_too_big_for_whatsapp_is_left_out_and_the_report_still_goes_through(tmp_path: Path) -> None:
    async with relay_stack(tmp_path) as stack:
        stack.worker.images[IMAGE] = PNG + b"\0" * (MAX_IMAGE_BYTES + 1)
        response = await stack.report("notice", run_id="r1", text="a huge picture", images=[IMAGE])
        assert response.json() == {"ok": True, "duplicate": False}  # taken, not a 502 retried forever
        await wait_for(lambda: "a huge picture" in stack.twilio.bodies(OWNER), what="the notice")
        sent = next(m for m in stack.twilio.messages if m.body == "a huge picture")
        assert sent.media == []
