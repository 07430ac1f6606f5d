"""A scripted stand-in for Anthropic's Messages API, for the real Claude Code CLI.

It drives `--demo` (no account needed) and the tests. A script is keyed by a piece of the
owner's prompt. For each request the model finds the latest user message containing a key,
counts the assistant turns since, and streams the next step: text, or a tool call whose input
streams as `input_json_delta` like the real API. The CLI then runs the tool for real, so Write,
Edit and Bash change a real checkout. `{cwd}` in a tool's input becomes the CLI's working
directory, read from the environment block Claude Code sends.

`refuse_credentials` makes it answer every request 401 `authentication_error`, as the API answers
a revoked key or token; `GET /v1/models` (the worker's free check of an API key) answers too.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class ToolUse:
    name: str
    input: dict[str, Any]


Step = Text | ToolUse


def write(path: str, content: str) -> ToolUse:
    return ToolUse("Write", {"file_path": path, "content": content})


def edit(path: str, old: str, new: str) -> ToolUse:
    return ToolUse("Edit", {"file_path": path, "old_string": old, "new_string": new})


def bash(command: str, description: str = "run a command") -> ToolUse:
    return ToolUse("Bash", {"command": command, "description": description})


@dataclass
class FakeAnthropic:
    scripts: dict[str, list[Step]] = field(default_factory=dict)
    default: list[Step] = field(default_factory=list)  # for prompts no script matches
    requests: list[dict[str, Any]] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)  # time.monotonic() as each request came in
    delay_s: float = 0.0
    refuse_credentials: bool = False
    refused: int = 0  # requests answered 401
    model_checks: int = 0  # GET /v1/models
    _ids: int = 0

    def script(self, key: str, *steps: Step) -> None:
        self.scripts[key] = list(steps)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/messages", self._messages, methods=["POST"]),
                Route("/v1/messages/count_tokens", self._count, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )

    def prompts_seen(self) -> list[list[str]]:
        """For each request, the user texts it carried (to check what a session remembers)."""
        return [_user_texts(r["messages"]) for r in self.requests]

    def user_turns(self) -> list[list[dict[str, Any]]]:
        """For each request, the content blocks of its last user message that carries text (the
        prompt, with any images the owner sent; later messages hold tool results)."""
        turns = []
        for request in self.requests:
            prompts = [m for m in request.get("messages", []) if m.get("role") == "user" and _texts(m)]
            content = prompts[-1].get("content") if prompts else []
            turns.append([{"type": "text", "text": content}] if isinstance(content, str) else list(content or []))
        return turns

    def _refusal(self) -> JSONResponse:
        self.refused += 1
        error = {"type": "authentication_error", "message": "invalid x-api-key"}
        return JSONResponse({"type": "error", "error": error}, status_code=401)

    async def _count(self, request: Request) -> JSONResponse:
        if self.refuse_credentials:
            return self._refusal()
        return JSONResponse({"input_tokens": 100})

    async def _models(self, request: Request) -> JSONResponse:
        self.model_checks += 1
        if self.refuse_credentials or not request.headers.get("x-api-key"):
            return self._refusal()
        model = {"type": "model", "id": "claude-sonnet-4-5", "display_name": "Claude Sonnet 4.5"}
        return JSONResponse({"data": [model], "has_more": False, "first_id": model["id"], "last_id": model["id"]})

    async def _messages(self, request: Request) -> StreamingResponse | JSONResponse:
        self.arrived.append(time.monotonic())
        if self.refuse_credentials:
            return self._refusal()
        body = await request.json()
        self.requests.append(body)
        step = _fill_cwd(self._next_step(body.get("messages", [])), body)
        self._ids += 1
        if self.delay_s:
            await anyio.sleep(self.delay_s)
        blocks, stop = _blocks(step, self._ids)
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": f"msg_{self._ids}",
                    "type": "message",
                    "role": "assistant",
                    "model": body.get("model"),
                    "content": blocks,
                    "stop_reason": stop,
                    "usage": {"input_tokens": 100, "output_tokens": 20},
                }
            )
        return StreamingResponse(
            _sse(_events(blocks, stop, body.get("model", "claude"), self._ids)), media_type="text/event-stream"
        )

    def _next_step(self, messages: list[dict[str, Any]]) -> Step:
        for index in range(len(messages) - 1, -1, -1):
            if messages[index].get("role") != "user":
                continue
            texts = " ".join(_texts(messages[index]))
            for key, steps in self.scripts.items():
                if key in texts:
                    done = sum(1 for m in messages[index + 1 :] if m.get("role") == "assistant")
                    return steps[done] if done < len(steps) else Text("Done.")
            if self.default and texts.strip():
                break  # the prompt matches no script: the default answers it, not an older prompt's script
        if self.default:
            last_prompt = max((i for i, m in enumerate(messages) if m.get("role") == "user" and _texts(m)), default=0)
            done = sum(1 for m in messages[last_prompt + 1 :] if m.get("role") == "assistant")
            return self.default[done] if done < len(self.default) else Text("Done.")
        return Text("OK.")


_CWD = re.compile(r"Primary working directory: ([^\s\\]+)")


def _fill_cwd(step: Step, body: dict[str, Any]) -> Step:
    if not isinstance(step, ToolUse) or "{cwd}" not in json.dumps(step.input):
        return step
    # The latest place the CLI said it runs in: a resumed session's history may hold an older
    # one (a checkout that moved).
    places = _CWD.findall(json.dumps(body.get("messages", []))) or _CWD.findall(json.dumps(body))
    cwd = places[-1] if places else "."
    return ToolUse(step.name, json.loads(json.dumps(step.input).replace("{cwd}", cwd)))


def _texts(message: dict[str, Any]) -> list[str]:
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    return [b.get("text", "") for b in content or [] if isinstance(b, dict) and b.get("type") == "text"]


def _user_texts(messages: list[dict[str, Any]]) -> list[str]:
    return [t for m in messages if m.get("role") == "user" for t in _texts(m)]


def _blocks(step: Step, n: int) -> tuple[list[dict[str, Any]], str]:
    if isinstance(step, ToolUse):
        return [{"type": "tool_use", "id": f"toolu_{n:06d}", "name": step.name, "input": step.input}], "tool_use"
    return [{"type": "text", "text": step.text}], "end_turn"


def _events(blocks: list[dict[str, Any]], stop: str, model: str, n: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = [
        {
            "type": "message_start",
            "message": {
                "id": f"msg_{n}",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 100, "output_tokens": 1},
            },
        }
    ]
    for i, block in enumerate(blocks):
        if block["type"] == "text":
            events += [
                {"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}},
                {"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": block["text"]}},
            ]
        else:
            start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
            events += [
                {"type": "content_block_start", "index": i, "content_block": start},
                {
                    "type": "content_block_delta",
                    "index": i,
                    "delta": {"type": "input_json_delta", "partial_json": json.dumps(block["input"])},
                },
            ]
        events.append({"type": "content_block_stop", "index": i})
    events += [
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": None},
            "usage": {"output_tokens": 20},
        },
        {"type": "message_stop"},
    ]
    return events


async def _sse(events: list[dict[str, Any]]) -> AsyncIterator[str]:
    for event in events:
        yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
