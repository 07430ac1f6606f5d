"""Claude Code through `claude-agent-sdk`, on a checkout, with progress.

Each owner's CLI (`ClaudeSDKClient`) is kept open between prompts (`LiveAgent`): a follow-up is
a new query on the same client and session, and reaches the model without starting a CLI. The
worker keeps it stopped between prompts (vm/sandbox.py says why that is safe) and replaces it,
resuming the session by id, when it is gone; the session itself lives in CLAUDE_CONFIG_DIR, so
a worker that exited resumes the same conversation too. The SDK is imported lazily so that the
worker answers /health before it has loaded.
"""

from __future__ import annotations

import base64
import logging
import os
import posixpath
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

from vm.reaper import MARKER_VAR

logger = logging.getLogger(__name__)
# Claude Code's session ids are UUIDs; root names a file after one (`Sandbox.has_session`) and
# passes it back to `--resume`, so only a plain name is taken from the CLI's output.
SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")  # never an option: no leading -

SYSTEM_APPEND = (
    "You are driven from a phone over WhatsApp. Work autonomously: do not ask questions, make "
    "reasonable choices and say what you chose. Keep your final answer short enough for a phone. "
    "Your changes are shown to the owner as a diff for approval, so do not commit or push them. "
    "Use the screenshot tool to look at web pages you build (it also sends the picture to the owner)."
)
CREDENTIAL_VARS = ("ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_BASE_URL", "CLAUDE_CONFIG_DIR", "HOME")
# Tools that would wait for a person at a terminal; nobody is there.
DISALLOWED = ["AskUserQuestion", "EnterPlanMode", "ExitPlanMode"]
# What a result counts as input: the prompt's tokens, and those written to and read from the cache.
INPUT_TOKENS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
INTERRUPT_S = 3.0  # how long `cancel` lets the CLI end its turn before the CLI itself is ended
# Claude Code retries a 401 like any API error, for about three minutes, and says so on each
# retry (a system message `api_retry`, with `error_status` and `error`: measured with the CLI
# this SDK bundles). This many in a turn end it: the second, not the first, because Claude
# Code's own login renews its token on a 401 and tries again, and that retry should get through.
AUTH_REFUSALS = 2


@dataclass(frozen=True)
class RunResult:
    text: str
    is_error: bool
    cost_usd: float | None  # this run's: the CLI reports its whole life's, counted since its start
    duration_ms: int
    session_id: str | None
    input_tokens: int = 0  # with the cache's reads and writes
    output_tokens: int = 0
    stop: str = ""  # "budget": the run stopped at its budget_usd


Progress = Callable[[str], None]
ToolServers = Callable[[], dict[str, Any]]
Image = tuple[str, bytes]  # media type (image/png...) and the bytes


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
    """Opens Claude Code clients; `env` holds model credentials and the config dir."""

    def __init__(self, env: Mapping[str, str], *, progress_interval_s: float = 3.0, max_turns: int = 200) -> None:
        self._env = dict(env)
        self._interval = progress_interval_s
        self._max_turns = max_turns

    def credentials_env(self) -> dict[str, str]:
        """The variables the CLI finds its model credentials in (the worker's own environment,
        under what this Agent adds), for the credentials check (vm/credentials.py)."""
        merged = {**os.environ, **self._env}
        return {k: merged[k] for k in CREDENTIAL_VARS if merged.get(k)}

    def open(
        self,
        *,
        cwd: Path,
        session_id: str | None,
        marker: str,
        tool_servers: dict[str, Any],
        locate: Callable[[], int | None],
        cli_path: str | None = None,
        env: Mapping[str, str] | None = None,
        model: str = "",
        budget_usd: float | None = None,
    ) -> LiveAgent:
        """A client for one owner, on their session; `serve` it in a task, then `ask`. `cli_path`
        and `env` come from the sandbox: the launcher that starts the CLI as the owner's agent
        user, and that user's HOME and folders; `locate` finds the CLI's pid once it runs.
        `model` ("" = Claude Code's default) and `budget_usd` hold for the CLI's whole life:
        Claude Code counts the budget over every query a CLI takes (measured), so a client with
        a budget takes one run only."""
        from claude_agent_sdk import ClaudeAgentOptions, PermissionResultAllow

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
            model=model or None,
            max_budget_usd=budget_usd,
        )
        return LiveAgent(options, session_id, cwd, locate, self._interval, model=model, budget_usd=budget_usd)


class ModelRefused(RuntimeError):
    """The model's API refused the worker's credentials (401): the turn ends now, with this as
    the reason, instead of after the CLI's retries. `detail`: what the API said (HTTP 401, ...)."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"Claude refused the worker's credentials ({detail})")
        self.detail = detail


def auth_refusal(data: Mapping[str, Any]) -> str:
    """What an `api_retry` report says when the API refused the credentials; "" otherwise."""
    status, error = data.get("error_status"), data.get("error")
    if status != 401 and error != "authentication_failed":
        return ""
    return f"HTTP {status}, {error}" if isinstance(error, str) and error else f"HTTP {status}"


class AgentGone(RuntimeError):
    """The client ended before the CLI answered anything of the prompt: a new one may take it."""


@dataclass(eq=False)
class _Turn:
    prompt: str
    on_progress: Progress
    on_session: Callable[[str], None]
    images: Sequence[Image] = ()
    done: anyio.Event = field(default_factory=anyio.Event)
    interrupt: anyio.Event = field(default_factory=anyio.Event)
    heard: bool = False  # the CLI answered something of this prompt
    result: RunResult | None = None
    error: Exception | None = None


class LiveAgent:
    """One owner's Claude Code CLI, open between prompts.

    The SDK binds a client to the task that connected it, so `serve` (a task of the worker's)
    holds the client and takes each prompt from `ask` through a channel. A client that failed a
    turn takes no other: it closes, and the worker opens a new one on the same session.
    """

    def __init__(
        self,
        options: Any,
        session_id: str | None,
        cwd: Path,
        locate: Callable[[], int | None],
        interval_s: float,
        *,
        model: str = "",
        budget_usd: float | None = None,
    ) -> None:
        self.session_id = session_id
        self.model, self.budget_usd = model, budget_usd
        self.pid: int | None = None  # the CLI's, once connected
        self.closed = False
        self._spent = 0.0  # the CLI's cost so far, as its last result said
        self._interrupted: RunResult | None = None  # the result of a turn cancelled, not yet taken
        self._options, self._cwd, self._locate, self._interval = options, cwd, locate, interval_s
        self._send, self._inbox = anyio.create_memory_object_stream[_Turn](1)
        self._scope = anyio.CancelScope()
        self._turn: _Turn | None = None

    @property
    def cwd(self) -> Path:
        """The checkout the CLI works in."""
        return self._cwd

    @property
    def idle(self) -> bool:
        """Open, and between prompts."""
        return not self.closed and self._turn is None

    def close(self) -> None:
        self._close_channel()
        self._scope.cancel()

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect, then answer prompts until closed. Fails (to `TaskGroup.start`) only while
        connecting; after that, every failure ends up in the turn it belongs to."""
        from claude_agent_sdk import ClaudeSDKClient

        started = False
        try:
            with self._scope:
                async with ClaudeSDKClient(self._options) as client:
                    self.pid = self._locate()
                    started = True
                    task_status.started()
                    async for turn in self._inbox:
                        self._turn = turn
                        await self._take(client, turn)
                        self._turn = None
                        if self.closed:  # the turn failed
                            break
        except Exception as exc:
            if not started:
                raise
            logger.warning("Claude Code's client ended: %s", _reason(exc))
        finally:
            self._close_channel()
            self._inbox.close()
            if (current := self._turn) is not None and not current.done.is_set():
                current.error = current.error or AgentGone("the agent's client closed")
                current.done.set()

    def _close_channel(self) -> None:
        """No turn more: the client is closing (its CLI may take the SDK's 10 s grace to end, and
        must not be kept meanwhile). A turn still in the channel is failed, never left waiting."""
        self.closed = True
        self._send.close()
        while True:
            try:
                waiting = self._inbox.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            waiting.error = AgentGone("the agent's client closed")
            waiting.done.set()

    async def ask(
        self,
        prompt: str,
        *,
        on_progress: Progress,
        on_session: Callable[[str], None],
        images: Sequence[Image] = (),
    ) -> RunResult:
        """One prompt, as a new query on this client, with `images` (the owner's photos) as
        image blocks in the same user message. Cancelled, it interrupts the turn and waits up
        to INTERRUPT_S for the CLI to end it; after that the client is closed."""
        turn = _Turn(prompt, on_progress, on_session, images)
        if self.closed:
            raise AgentGone("the agent's client is closed")
        try:
            self._send.send_nowait(turn)
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise AgentGone("the agent's client is closed or busy") from None
        try:
            await turn.done.wait()
        except anyio.get_cancelled_exc_class():
            turn.interrupt.set()
            with anyio.CancelScope(shield=True), anyio.move_on_after(INTERRUPT_S):
                await turn.done.wait()
            if not turn.done.is_set():
                self.close()
            # The turn's result says what it cost before the interrupt (and moved the CLI's
            # running total past it): kept for `interrupted`, or the cost would be lost.
            self._interrupted = turn.result
            raise
        if turn.error is not None:
            if not turn.heard and not isinstance(turn.error, AgentGone):
                raise AgentGone(_reason(turn.error)) from turn.error
            raise turn.error
        assert turn.result is not None
        return turn.result

    def interrupted(self) -> RunResult | None:
        """The result of the last turn that `ask` was cancelled out of, once: its cost and
        tokens are the cancelled run's. None when the CLI ended before it said."""
        result, self._interrupted = self._interrupted, None
        return result

    async def _take(self, client: Any, turn: _Turn) -> None:
        from claude_agent_sdk import AssistantMessage, ResultMessage, SystemMessage, TextBlock, ToolUseBlock

        throttle = ProgressThrottle(turn.on_progress, self._interval)
        texts: list[str] = []
        result: Any = None
        refusals = 0
        started = time.monotonic()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_flush_loop, throttle)
                await client.query(_with_images(turn.prompt, turn.images) if turn.images else turn.prompt)
                tg.start_soon(_interrupt_when_asked, client, turn)  # an interrupt before the query is lost
                async for message in client.receive_response():
                    turn.heard = True
                    if isinstance(message, AssistantMessage):
                        for block in message.content:
                            if isinstance(block, ToolUseBlock):
                                throttle.note(describe_tool(block.name, block.input, self._cwd))
                            elif isinstance(block, TextBlock) and block.text.strip():
                                texts.append(block.text.strip())
                    elif isinstance(message, SystemMessage) and message.subtype == "api_retry":
                        if refused := auth_refusal(message.data):
                            refusals += 1
                            if refusals >= AUTH_REFUSALS:
                                raise ModelRefused(refused)
                    elif isinstance(message, SystemMessage) and message.subtype == "init":
                        # Known from the start, so even a cancelled run can be resumed.
                        if (sid := message.data.get("session_id")) and SESSION_ID.fullmatch(str(sid)):
                            self.session_id = str(sid)
                            turn.on_session(self.session_id)
                    elif isinstance(message, ResultMessage):
                        result = message
                        sid = message.session_id
                        if sid and sid != self.session_id and SESSION_ID.fullmatch(sid):
                            self.session_id = message.session_id
                            turn.on_session(self.session_id)
                tg.cancel_scope.cancel()
        except Exception as exc:
            turn.error = _single(exc)
            self._close_channel()  # before the turn ends: a client that failed one is never kept
        else:
            turn.result = self._result(result, texts, started)
        finally:
            turn.done.set()

    def _result(self, result: Any, texts: list[str], started: float) -> RunResult:
        if result is None:
            elapsed = int((time.monotonic() - started) * 1000)
            return RunResult("The agent stopped without a result.", True, None, elapsed, self.session_id)
        cost = None
        if result.total_cost_usd is not None:  # the CLI's total so far: this run's is the rise
            cost, self._spent = max(0.0, result.total_cost_usd - self._spent), result.total_cost_usd
        usage = result.usage or {}
        tokens_in = sum(_count(usage, key) for key in INPUT_TOKENS)
        return RunResult(
            text=(result.result or (texts[-1] if texts else "")).strip(),
            is_error=bool(result.is_error),
            cost_usd=cost,
            duration_ms=int(result.duration_ms),
            session_id=self.session_id,
            input_tokens=tokens_in,
            output_tokens=_count(usage, "output_tokens"),
            stop="budget" if result.subtype == "error_max_budget_usd" else "",
        )


def _count(usage: Mapping[str, Any], key: str) -> int:
    value = usage.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


async def _with_images(text: str, images: Sequence[Image]) -> AsyncIterator[dict[str, Any]]:
    """One user message of stream-json, as the SDK's `query` takes an iterable of them: the
    images first, then the text (the Messages API reads images best before the words about
    them). `query` fills in the session id, as it does for a plain prompt."""
    content: list[dict[str, Any]] = [
        {"type": "image", "source": {"type": "base64", "media_type": kind, "data": base64.b64encode(data).decode()}}
        for kind, data in images
    ]
    content.append({"type": "text", "text": text})
    yield {"type": "user", "message": {"role": "user", "content": content}, "parent_tool_use_id": None}


async def _flush_loop(throttle: ProgressThrottle) -> None:
    while True:
        await anyio.sleep(0.25)
        throttle.flush_due()


async def _interrupt_when_asked(client: Any, turn: _Turn) -> None:
    await turn.interrupt.wait()
    await client.interrupt()


def _single(exc: Exception) -> Exception:
    """The one error inside a task group's group, so the owner reads what went wrong."""
    while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1 and isinstance(exc.exceptions[0], Exception):
        exc = exc.exceptions[0]
    return exc


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"
