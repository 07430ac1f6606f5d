"""One agent run: Claude Code through `claude-agent-sdk`, on a checkout, with progress.

Each run starts its own CLI (`ClaudeSDKClient`) and resumes the owner's session by id, so a
run survives nothing it should not: cancel can end the whole run without leaving a half-dead
client, and a worker that slept resumes the same conversation from CLAUDE_CONFIG_DIR.
The SDK is imported lazily so that the worker answers /health before it has loaded.
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from vm.reaper import MARKER_VAR

logger = logging.getLogger(__name__)

SYSTEM_APPEND = (
    "You are driven from a phone over WhatsApp. Work autonomously: do not ask questions, make "
    "reasonable choices and say what you chose. Keep your final answer short enough for a phone. "
    "Your changes are shown to the owner as a diff for approval, so do not commit or push them. "
    "Use the screenshot tool to look at web pages you build (it also sends the picture to the owner)."
)
# Tools that would wait for a person at a terminal; nobody is there.
DISALLOWED = ["AskUserQuestion", "EnterPlanMode", "ExitPlanMode"]


@dataclass(frozen=True)
class RunResult:
    text: str
    is_error: bool
    cost_usd: float | None
    duration_ms: int
    session_id: str | None


Progress = Callable[[str], None]
ToolServers = Callable[[], dict[str, Any]]


def describe_tool(name: str, args: Mapping[str, Any], cwd: Path) -> str:
    """A few words a person wants on a phone for one tool call."""

    def rel(key: str) -> str:
        raw = str(args.get(key) or "")
        try:
            return str(Path(raw).relative_to(cwd)) if raw.startswith("/") else raw
        except ValueError:
            return posixpath.basename(raw)

    if name in ("Write", "Edit", "MultiEdit", "NotebookEdit"):
        return f"✏️ editing {rel('file_path') or rel('notebook_path')}"
    if name == "Read":
        return f"📖 reading {rel('file_path')}"
    if name == "Bash":
        command = " ".join(str(args.get("command", "")).split())
        return f"▶️ running {_clip(command, 48)}"
    if name in ("Grep", "Glob"):
        return f"🔎 searching {_clip(str(args.get('pattern', '')), 40)}".rstrip()
    if name in ("WebFetch", "WebSearch"):
        return f"🌐 looking up {_clip(str(args.get('url') or args.get('query') or ''), 48)}".rstrip()
    if name in ("Task", "Agent"):
        return f"🧩 {_clip(str(args.get('description', 'delegating')), 48)}"
    if name == "TodoWrite":
        return "📝 planning"
    if name.endswith("__screenshot"):
        return f"📸 screenshot of {_clip(str(args.get('url', '')), 48)}"
    return f"🔧 {name}"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ProgressThrottle:
    """At most one message per `interval_s`; in between only the latest step is kept."""

    def __init__(self, send: Progress, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._send, self._interval, self._clock = send, interval_s, clock
        self._last = float("-inf")
        self._pending: str | None = None
        self._skipped = 0

    def note(self, text: str) -> None:
        if self._clock() - self._last >= self._interval:
            self._emit(text)
        else:
            self._pending = text
            self._skipped += 1

    def flush_due(self) -> None:
        if self._pending is not None and self._clock() - self._last >= self._interval:
            self._emit(self._pending)

    def _emit(self, text: str) -> None:
        more = self._skipped - 1 if self._pending is not None and self._skipped > 1 else 0
        self._send(text + (f" (+{more} more steps)" if more > 0 else ""))
        self._last, self._pending, self._skipped = self._clock(), None, 0


class Agent:
    """Runs prompts through Claude Code; `env` holds model credentials and the config dir."""

    def __init__(self, env: Mapping[str, str], *, progress_interval_s: float = 3.0, max_turns: int = 200) -> None:
        self._env = dict(env)
        self._interval = progress_interval_s
        self._max_turns = max_turns

    async def run(
        self,
        *,
        cwd: Path,
        prompt: str,
        session_id: str | None,
        marker: str,
        on_progress: Progress,
        on_session: Callable[[str], None],
        tool_servers: dict[str, Any],
        cli_path: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> RunResult:
        """One prompt on the owner's session. `cli_path` and `env` come from the sandbox: the
        launcher that starts the CLI as the owner's agent user, and that user's HOME and folders."""
        from claude_agent_sdk import (
            AssistantMessage,
            ClaudeAgentOptions,
            ClaudeSDKClient,
            PermissionResultAllow,
            ResultMessage,
            SystemMessage,
            TextBlock,
            ToolUseBlock,
        )

        async def allow(name: str, args: dict[str, Any], context: Any) -> PermissionResultAllow:
            # The agent's own OS user is the sandbox and the diff approval is the gate; Claude
            # Code refuses bypass mode as root (and off isolation we may be root), so every tool
            # is allowed here instead.
            return PermissionResultAllow()

        options = ClaudeAgentOptions(
            cwd=str(cwd),
            resume=session_id,
            can_use_tool=allow,
            mcp_servers=tool_servers,
            disallowed_tools=DISALLOWED,
            max_turns=self._max_turns,
            system_prompt={"type": "preset", "preset": "claude_code", "append": SYSTEM_APPEND},
            env={**self._env, **(env or {}), MARKER_VAR: marker},
            cli_path=cli_path,
        )
        throttle = ProgressThrottle(on_progress, self._interval)
        texts: list[str] = []
        result: Any = None
        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_flush_loop, throttle)
            async with ClaudeSDKClient(options) as client:
                await client.query(prompt)
                async for message in client.receive_response():
                    if isinstance(message, AssistantMessage):
                        for block in message.content:
                            if isinstance(block, ToolUseBlock):
                                throttle.note(describe_tool(block.name, block.input, cwd))
                            elif isinstance(block, TextBlock) and block.text.strip():
                                texts.append(block.text.strip())
                    elif isinstance(message, SystemMessage) and message.subtype == "init":
                        # Known from the start, so even a cancelled run can be resumed.
                        if sid := message.data.get("session_id"):
                            on_session(str(sid))
                    elif isinstance(message, ResultMessage):
                        result = message
            tg.cancel_scope.cancel()
        if result is None:
            return RunResult(
                "The agent stopped without a result.", True, None, int((time.monotonic() - started) * 1000), session_id
            )
        text = (result.result or (texts[-1] if texts else "")).strip()
        return RunResult(
            text=text,
            is_error=bool(result.is_error),
            cost_usd=result.total_cost_usd,
            duration_ms=int(result.duration_ms),
            session_id=result.session_id or session_id,
        )


async def _flush_loop(throttle: ProgressThrottle) -> None:
    while True:
        await anyio.sleep(0.25)
        throttle.flush_due()


RunFn = Callable[..., Awaitable[RunResult]]
