"""What the worker does for each owner: runs, approval, cancel, screenshots, recovery.

State changes happen on the event loop between awaits, so each is atomic; every one is saved
to the owner's state file before anything about it is reported. Every task spawned for an
owner is supervised: if it fails, that owner's run moves to a state they can leave (with
the changes still offered where there are some) and is reported; nothing else is touched.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskGroup

from common.protocol import Answer, Attachment, Report, RunPrompt, TakeScreenshot
from common.visible import clip_path, visible
from vm import attachments, resume
from vm.agent import Agent, AgentGone, Image, LiveAgent, ModelRefused, RunResult
from vm.browser import BrowserPool, ScreenshotError
from vm.callbacks import CallbackSender
from vm.credentials import CredentialCheck, refused_by_origin
from vm.diff_image import phone_excerpt, render_diff
from vm.github import GitHub, GitHubError
from vm.images import ImageStore
from vm.reaper import stopped_child
from vm.repos import adopt_legacy, keep_origin
from vm.runs import IllegalRunTransition, OwnerState, OwnerStore
from vm.sandbox import AgentSpace, Sandbox, SandboxError
from vm.settings import Settings
from vm.tools import tool_servers
from vm.workspace import Changes, FileChange, GitError, Snapshot, Workspace

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Reply:
    """What a route answers: 202 (accepted), 200 (nothing to do) or 409 (not now, and why),
    always with where the owner's run stands (common/protocol.py Answer)."""

    status: int
    answer: Answer


@dataclass
class Worker:
    settings: Settings
    callbacks: CallbackSender
    agent: Agent
    browser: BrowserPool
    images: ImageStore
    github: GitHub | None
    sandbox: Sandbox
    boot_id: str = field(default_factory=lambda: secrets.token_hex(4))
    credentials: CredentialCheck | None = None  # checked again at once after a 401 (vm/credentials.py)
    _owners: dict[str, OwnerState] = field(default_factory=dict)
    _scopes: dict[str, anyio.CancelScope] = field(default_factory=dict)
    _spaces: dict[str, AgentSpace] = field(default_factory=dict)
    _agents: dict[str, LiveAgent] = field(default_factory=dict)  # each owner's CLI, kept between prompts
    _settling: dict[str, anyio.Event] = field(default_factory=dict)  # set once the owner's baseline is taken
    _tg: TaskGroup | None = None
    _side_tasks: int = 0
    _stopping: bool = False
    _store: OwnerStore = field(init=False)
    _write_failure: str = ""  # why the last state or spool write failed; "" once one succeeds
    _last_seq: dict[str, int] = field(default_factory=dict)  # per owner: the last report spooled
    _booted_ns: int = field(default_factory=time.time_ns)
    _fetcher: attachments.Fetcher = field(init=False)

    def __post_init__(self) -> None:
        self._store = OwnerStore(self.settings.state_dir / "owners")
        self._owners = {o.phone: o for o in self._store.all()}
        self._fetcher = attachments.Fetcher(
            self.callbacks.http,
            self.settings.relay_callback_url,
            self.settings.worker_token,
            self.settings.state_dir / "incoming",
        )

    # --- lifecycle --------------------------------------------------------------------

    async def start(self, tg: TaskGroup) -> None:
        self._tg = tg
        for owner in list(self._owners.values()):
            await self._supervised(owner.phone, self._recover, owner)

    @property
    def busy(self) -> bool:
        return any(o.busy for o in self._owners.values()) or self._side_tasks > 0 or self.callbacks.busy

    @property
    def phones(self) -> list[str]:
        return list(self._owners)

    async def shutdown(self) -> None:
        """End every run's processes and every kept CLI; the owners' state stays on disk for
        the next boot to report."""
        self._stopping = True
        for scope in self._scopes.values():
            scope.cancel()
        for phone in {*self._scopes, *self._agents}:
            await self._reap(phone, self._owner(phone))

    def _owner(self, phone: str) -> OwnerState:
        return self._owners.setdefault(phone, OwnerState(phone=phone))

    @property
    def problems(self) -> list[str]:
        """Why the worker cannot serve right now (for /health); empty when it can."""
        return [self._write_failure] if self._write_failure else []

    def _save(self, owner: OwnerState) -> None:
        self._written(self._store.save, owner)

    def _report(self, phone: str, report: Report) -> None:
        self._last_seq[phone] = self._written(self.callbacks.report, phone, report)

    def _written(self, write: Callable[..., T], *args: Any) -> T:
        try:
            result = write(*args)
        except OSError as exc:  # a full or failing disk: /health says so until a write works again
            self._write_failure = f"cannot write to the volume ({exc.strerror or type(exc).__name__})"
            raise
        self._write_failure = ""
        return result

    def _answer(self, owner: OwnerState, status: int, detail: str = "") -> Reply:
        run = owner.run_id if owner.state != "idle" else ""
        # Everything reported before this boot is older than anything this process says.
        seq = max(self._last_seq.get(owner.phone, 0), self._booted_ns)
        pending = self.callbacks.pending_for(owner.phone)
        return Reply(status, Answer(owner.state, run, owner.prompt[:200] if run else "", detail, seq, pending))

    def workspace(self, owner: OwnerState) -> Workspace:
        """The checkout of the owner's current repository (the worker's own REPO_URL when the
        run named none)."""
        return self._workspace_of(owner.phone, owner.repo, owner.repo_url if owner.repo else self.settings.repo_url)

    def _workspace_of(self, phone: str, repo: str, url: str) -> Workspace:
        return Workspace(
            self.sandbox.checkout(phone, repo),
            self.sandbox.git_dir(phone, repo),
            url,
            github_token=self.settings.token_for(url),
            push_timeout_s=self.settings.push_timeout_s,
            clone_timeout_s=self.settings.clone_timeout_s,
        )

    def _spawn(self, phone: str, fn: Callable[..., Any], *args: Any) -> None:
        assert self._tg is not None, "worker not started"
        self._tg.start_soon(self._supervised, phone, fn, *args)

    async def _supervised(self, phone: str, fn: Callable[..., Any], *args: Any) -> None:
        """Run one owner's task. A failure stays with that owner: it is logged, their run moves
        to a state they can leave, and they are told; the task group never sees it."""
        try:
            await fn(*args)
        except Exception as exc:
            logger.exception("%s failed", getattr(fn, "__name__", "a task"))
            try:
                self._rescue(self._owner(phone), exc)
            except Exception:  # the disk that failed the task may fail this too: the log has it
                logger.exception("could not record the failure of %s", getattr(fn, "__name__", "a task"))

    def _rescue(self, owner: OwnerState, exc: Exception) -> None:
        reason = f"the VM hit an unexpected error ({type(exc).__name__})"
        if owner.state in ("running", "cancelling"):
            # What the run wrote is still in the checkout: offered for a decision when a snapshot
            # can bring it back, so reject restores and nothing is silently kept.
            held = bool(owner.snapshot)
            owner.fire("finished_with_changes" if held else "finished")
            self._save(owner)
            self._report(owner.phone, Report("error", owner.run_id, text=reason, changes=held))
        elif owner.state in ("pushing", "rolling_back"):
            failed = "approve_failed" if owner.state == "pushing" else "reject_failed"
            owner.fire("push_failed" if owner.state == "pushing" else "rollback_failed")
            self._save(owner)
            self._report(owner.phone, Report(failed, owner.run_id, text=reason))

    # --- routes -----------------------------------------------------------------------

    def command(self, command: RunPrompt) -> Reply:
        owner = self._owner(command.phone)
        if command.message_id in owner.seen:
            return self._answer(owner, 200, "already received")
        try:
            owner.fire("start")
        except IllegalRunTransition as exc:
            return self._answer(owner, 409, str(exc))
        owner.remember(command.message_id)
        if (command.repo, command.repo_url) != (owner.repo, owner.repo_url):
            # Another repository (the relay refuses a switch while anything is pending, and so
            # does `start`): the baseline was the last one's checkout, and so is the kept CLI
            # (`_kept_agent` ends it); its session stays for when the owner comes back to it.
            owner.repo, owner.repo_url, owner.baseline = command.repo, command.repo_url, None
        if command.new_session:
            owner.session_id = None  # the session of this repository
        owner.run_id, owner.prompt = command.message_id, command.text
        owner.model, owner.budget_usd = command.model, command.budget_usd
        owner.unattended = command.unattended
        owner.attachments, owner.received = [asdict(a) for a in command.attachments], []
        owner.resumed = False
        owner.shown_tree, owner.branch, owner.commit = "", "", ""
        # The baseline becomes the run's snapshot, saved with the run (one write on a follow-up's
        # path); one still being taken is picked up by `_begin`.
        owner.snapshot = owner.baseline if command.phone not in self._settling else None
        owner.baseline = None
        self._save(owner)
        self._spawn(command.phone, self._run, command.phone, command.attachments)
        return self._answer(owner, 202)

    def screenshot(self, command: TakeScreenshot) -> Reply:
        owner = self._owner(command.phone)
        if command.message_id not in owner.seen:
            owner.remember(command.message_id)
            self._save(owner)
            self._spawn(command.phone, self._screenshot_for_owner, command.phone, command.message_id, command.url)
        return self._answer(owner, 202)

    def status(self, phone: str) -> Reply:
        return self._answer(self._owner(phone), 200)

    async def cancel(self, phone: str) -> Reply:
        owner = self._owner(phone)
        if owner.state not in ("running", "cancelling"):
            return self._answer(owner, 200, "nothing is running")
        owner.fire("cancel")
        self._save(owner)
        if scope := self._scopes.get(phone):
            scope.cancel()  # the run interrupts its turn, then ends every process of it (`_run`)
        else:
            await self._reap(phone, owner)
        return self._answer(owner, 202)

    def approve(self, phone: str) -> Reply:
        owner = self._owner(phone)
        try:
            owner.fire("approve")
        except IllegalRunTransition as exc:
            return self._answer(owner, 409, str(exc))
        if not owner.branch:
            owner.branch = f"textslash/{_short_id(owner.run_id)}"
        self._save(owner)
        self._spawn(phone, self._push, phone)
        return self._answer(owner, 202)

    def reject(self, phone: str) -> Reply:
        owner = self._owner(phone)
        try:
            owner.fire("reject")
        except IllegalRunTransition as exc:
            return self._answer(owner, 409, str(exc))
        self._save(owner)
        self._spawn(phone, self._roll_back, phone)
        return self._answer(owner, 202)

    # --- a run ------------------------------------------------------------------------

    def _marker(self, phone: str) -> str:
        """What every process of the owner's agent from this boot carries (vm/reaper.py)."""
        return f"{self.boot_id}:{phone.lstrip('+')}:"

    async def _reap(self, phone: str, owner: OwnerState, *, keep_agent: bool = False) -> None:
        """End every process of the owner's agent. With `keep_agent`, the CLI (between prompts
        now) is kept for the next prompt, stopped; if it cannot be kept, it ends too."""
        keep = self._keepable(phone) if keep_agent else None
        if keep is None:
            self._drop_agent(phone)  # first: a stopped CLI would sit out SIGTERM's grace period
        try:
            await self.sandbox.reap(self._spaces.get(phone), self._marker(phone), keep)
        except SandboxError:  # the next prepare tries again, and refuses to go on if it fails
            logger.exception("could not end every process of run %s", owner.run_id)
        if keep is not None and not stopped_child(keep):
            self._drop_agent(phone)

    def _keepable(self, phone: str) -> int | None:
        """The pid of the owner's CLI if it may be kept stopped between prompts; an agent that
        may not (mid-turn, failed, or WARM_AGENT=off) is ended here."""
        agent = self._agents.get(phone)
        # A CLI with a budget took its one run (Claude Code counts the budget over its life).
        if agent is not None and agent.idle and agent.pid is not None and self.settings.warm_agent:
            if agent.budget_usd is None:
                return agent.pid
        self._drop_agent(phone)
        return None

    def _kept_agent(self, owner: OwnerState) -> LiveAgent | None:
        """The owner's kept CLI, if it can take their next prompt: still there, stopped, on their
        session in the checkout of their repository (after `new`, or for another repository, it
        is not), with the model and budget the prompt asks for. One that cannot is ended."""
        agent = self._agents.get(owner.phone)
        pid = self._keepable(owner.phone)
        if (
            agent is None
            or pid is None
            or not self._on_repository(agent, owner)
            or (agent.model, agent.budget_usd) != (owner.model, owner.budget_usd)
            or not stopped_child(pid)
        ):
            self._drop_agent(owner.phone)
            return None
        return agent

    def _on_repository(self, agent: LiveAgent, owner: OwnerState) -> bool:
        return agent.session_id == owner.session_id and agent.cwd == self.sandbox.checkout(owner.phone, owner.repo)

    def _drop_agent(self, phone: str) -> None:
        if (agent := self._agents.pop(phone, None)) is not None:
            if agent.pid is not None:
                self.sandbox.end(agent.pid)
            agent.close()

    async def _run(self, phone: str, files: tuple[Attachment, ...] = (), resumed: bool = False) -> None:
        """One run, from the snapshot to its end reported. `resumed`: the run was cut short by a
        crash and goes on at boot (`_continue`), from the snapshot it started with."""
        owner = self._owner(phone)
        run_id = owner.run_id
        result: RunResult | None = None
        failure = ""
        scope = self._scopes[phone] = anyio.CancelScope()
        if owner.state == "cancelling":  # cancelled before this task began
            scope.cancel()
        started = time.monotonic()
        try:
            with scope:
                await self._begin(phone, owner, self.workspace(owner))
                prompt, images = await self._prompt(phone, owner, files, resumed=resumed)
                result = await self._ask(phone, owner, prompt, images)
        except (GitError, SandboxError, attachments.AttachmentError) as exc:
            failure = str(exc)
        except ModelRefused as exc:  # a plain line for the owner, not the CLI's retries or a trace
            failure = f"{exc}, so the run stopped. Send *status* to see which credential and how to renew it."
            self._check_credentials(model_refused=exc.detail)
        except Exception as exc:  # the agent's CLI died, the SDK failed...: tell the owner, keep going
            logger.exception("run %s failed", run_id)
            failure = f"{type(exc).__name__}: {str(exc)[:200]}"
        finally:
            self._scopes.pop(phone, None)
            if result is None and (agent := self._agents.get(phone)) is not None:
                result = agent.interrupted()  # a cancelled run cost what its turn said
            with anyio.CancelScope(shield=True):  # nothing the run started outlives it
                await self._reap(phone, owner, keep_agent=True)
        if self._stopping:
            return  # shutting down: the state file still says "running", and the next boot reports it
        if owner.state == "cancelling":
            outcome, text = "cancelled", ""
        elif failure or result is None or result.is_error:
            outcome, text = "error", failure or (result.text if result else "the agent stopped")
        else:
            outcome, text = "answer", result.text
        duration = result.duration_ms if result else int((time.monotonic() - started) * 1000)
        end = Report(outcome, run_id, text=text, duration_ms=duration)
        if result is not None:
            end = replace(
                end,
                cost_usd=result.cost_usd,
                input_tokens=result.input_tokens,
                output_tokens=result.output_tokens,
                stop=result.stop,
            )
        await self._finish(owner, end)
        await self._settle(owner)

    async def _begin(self, phone: str, owner: OwnerState, workspace: Workspace) -> None:
        """The owner's folders, and the snapshot the run's diff and reject start from. Both were
        made ready when the owner last went idle (`_settle`), and nothing of the agent's has run
        since (its kept CLI is stopped): then a follow-up goes straight to the CLI. A snapshot
        being taken as the prompt came is waited for; one taken then is saved (the run's state
        file must hold it before the agent runs)."""
        taken = owner.snapshot is not None  # at the command, and saved with it
        if (settling := self._settling.get(phone)) is not None:
            await settling.wait()
        if owner.snapshot is None:  # a baseline taken after the command came is as good
            owner.snapshot = owner.baseline
        owner.baseline = None
        if owner.snapshot is None or self._kept_agent(owner) is None:
            await self._prepare(owner, workspace)
        if owner.snapshot is None:
            owner.snapshot = (await workspace.snapshot()).to_json()
        if not taken:
            self._save(owner)

    async def _prompt(
        self, phone: str, owner: OwnerState, files: tuple[Attachment, ...], *, resumed: bool
    ) -> tuple[str, list[Image]]:
        """What Claude is asked, and the owner's images to show with it. The files go into the
        checkout first, and where they went is saved: a run continued after a crash names the
        same files (and fetches them again only if it never had them)."""
        if resumed and owner.received:
            received = [attachments.from_record(r) for r in owner.received]
        else:
            if resumed:
                files = tuple(Attachment(**a) for a in owner.attachments)
            received = await self._receive(phone, files)
            if received:
                owner.received = [attachments.record(r) for r in received]
                self._save(owner)
        asked = attachments.prompt_with(owner.prompt, received)
        if resumed:
            asked = resume.restate(asked, attached=bool(received))
        return asked, [(r.image, r.data) for r in received if r.image]

    async def _receive(self, phone: str, files: tuple[Attachment, ...]) -> list[attachments.Received]:
        """The prompt's photos and files, from the relay into the checkout (vm/attachments.py),
        while nothing of the agent's runs: its folders are set up by `_begin`, its kept CLI is
        stopped."""
        if not files:
            return []
        space = self._spaces.get(phone)
        if space is None:  # `_begin` prepares it before any run: this would be a bug
            raise attachments.AttachmentError("the agent's folders are not set up")
        owner = (space.uid, space.gid) if self.sandbox.isolated else None
        return await attachments.receive(self._fetcher, files, space.checkout, owner)

    async def _ask(self, phone: str, owner: OwnerState, prompt: str, images: list[Image]) -> RunResult:
        """The prompt, as a new query on the owner's kept CLI, continued from where it was
        stopped; else (none kept, or it ended before it heard the prompt) on a new CLI that
        resumes the owner's session by id. The owner's images go with it as image blocks."""
        run_id = owner.run_id

        def progress(text: str) -> None:
            self._report(phone, Report("progress", run_id, text=text))

        def session(session_id: str) -> None:
            if session_id == owner.session_id:
                return
            owner.session_id = session_id
            # On disk at once: a run cut short by a crash is continued in this session.
            try:
                self._save(owner)
            except OSError:  # saved with the run's end; until then a crash starts a new session
                logger.warning("could not save the session of run %s", run_id)

        agent = self._kept_agent(owner)
        if agent is not None and agent.pid is not None and self.sandbox.resume(agent.pid):
            try:
                return await agent.ask(prompt, on_progress=progress, on_session=session, images=images)
            except AgentGone as exc:
                logger.warning("the kept agent of run %s could not take the prompt (%s); starting another", run_id, exc)
        self._drop_agent(phone)
        agent = await self._open_agent(phone, owner)
        return await agent.ask(prompt, on_progress=progress, on_session=session, images=images)

    async def _open_agent(self, phone: str, owner: OwnerState) -> LiveAgent:
        space = self._spaces[phone]  # prepared for this run's repository (`_begin`)
        if owner.session_id and not self.sandbox.has_session(space, owner.session_id):
            logger.warning("session of run %s was never saved; starting a new one", owner.run_id)
            owner.session_id = None
        cli_path, env = self.sandbox.launch(space)
        marker = self._marker(phone) + secrets.token_hex(4)
        agent = self._agents[phone] = self.agent.open(
            cwd=space.checkout,
            session_id=owner.session_id,
            marker=marker,
            locate=lambda: self.sandbox.cli_of(space, marker),
            cli_path=cli_path,
            env=env,
            model=owner.model,
            budget_usd=owner.budget_usd,
            # Bound to whichever run is going when Claude takes a screenshot: the client outlives runs.
            tool_servers=tool_servers(lambda url: self._capture(phone, self._owner(phone).run_id, url)),
        )
        assert self._tg is not None, "worker not started"
        try:
            await self._tg.start(agent.serve)
        except BaseException:
            self._drop_agent(phone)
            raise
        return agent

    async def _prepare(self, owner: OwnerState, workspace: Workspace) -> AgentSpace:
        """The owner's agent user and folders, the git dir and checkout of their repository,
        all owned as they should be, and no process of the agent's running but its kept CLI
        (of this repository), stopped."""
        phone, repo = owner.phone, owner.repo  # (the workspace's, whatever comes meanwhile)
        if (agent := self._agents.get(phone)) is not None and not self._on_repository(agent, owner):
            self._drop_agent(phone)  # its working directory is another checkout, maybe one about to move
        keep = self._keepable(phone)
        space = self._spaces[phone] = await self.sandbox.prepare(phone, keep, repo)
        if keep is not None and not stopped_child(keep):
            self._drop_agent(phone)
        if repo:
            await self._adopt_legacy(owner, repo, space, workspace)
        if await workspace.ensure_clone(self.settings.state_dir / "legacy-git"):
            await self.sandbox.share_git_dir(space)
            await self.sandbox.hand_over(space)
            workspace.mark_handed_over()
        if repo:
            await keep_origin(workspace, repo)
        self.sandbox.own(space, workspace.path / ".git")
        return space

    async def _adopt_legacy(self, owner: OwnerState, repo: str, space: AgentSpace, named: Workspace) -> None:
        """The owner's checkout from before REPOS becomes the named repository's, if it was
        cloned from it (vm/repos.py), and Claude's session there comes along."""
        legacy = self._workspace_of(owner.phone, "", self.settings.repo_url)
        if not await adopt_legacy(legacy, named):
            return
        with anyio.CancelScope(shield=True):  # a cancel now would leave the session behind
            moved = await anyio.to_thread.run_sync(self.sandbox.move_sessions, space, legacy.path)
        if moved and "" in owner.sessions and repo not in owner.sessions:
            owner.sessions[repo] = owner.sessions.pop("")
        self._save(owner)
        logger.info("moved an owner's checkout from before REPOS to the one of %s", repo)

    async def _settle(self, owner: OwnerState) -> None:
        """The owner is idle again and nothing of their agent runs (its kept CLI is stopped): take
        the next run's snapshot now, so the next prompt need not wait for git. It stays true
        until an agent process runs again, which only that next run lets happen."""
        phone = owner.phone
        if owner.state != "idle" or self._stopping or phone in self._settling:
            return
        settled = self._settling[phone] = anyio.Event()
        self._side_tasks += 1
        repository = (owner.repo, owner.repo_url)
        try:
            workspace = self.workspace(owner)
            if not workspace.cloned:
                # The run could not clone (origin failed it just now): trying again here would
                # hold the VM awake up to CLONE_TIMEOUT_MS for nothing. The next run clones.
                return
            space = await self._prepare(owner, workspace)
            # Off the next prompt's path, with nothing of the agent's running: old attachments go.
            if removed := await anyio.to_thread.run_sync(attachments.expire, space.checkout):
                logger.info("removed %d attachments older than %d days", removed, attachments.KEEP_S // 86400)
            baseline = (await workspace.snapshot()).to_json()
            if (owner.repo, owner.repo_url) == repository:  # else a prompt for another one came meanwhile
                owner.baseline = baseline
                self._save(owner)
        except Exception:  # the next run takes its own snapshot, as it would without one
            logger.exception("could not take the next run's snapshot")
        finally:
            self._side_tasks -= 1
            del self._settling[phone]
            settled.set()

    async def _finish(self, owner: OwnerState, end: Report) -> None:
        """The run's end. The approval request goes first: by the time the owner reads the
        answer that ends the run (and may `approve`), the diff it asks about is already there."""
        changes = await self._changes(owner)
        approval = await self._approval_request(owner, changes) if changes else None
        owner.fire("finished_with_changes" if changes else "finished")
        owner.shown_tree = changes.tree if changes else ""  # approve commits exactly this tree
        self._save(owner)  # the pending approval is on disk before anyone hears of it
        if approval is not None:
            self._report(owner.phone, approval)
        self._report(owner.phone, replace(end, changes=bool(changes)))

    async def _changes(self, owner: OwnerState) -> Changes:
        """What the run changed. If that cannot be read, the changes are still held for a
        decision (never silently kept for a later diff): nothing is shown, so approve refuses
        and says why, and reject restores the snapshot."""
        if not owner.snapshot:
            return Changes((), "")
        try:
            return await self.workspace(owner).changes_since(Snapshot.from_json(owner.snapshot))
        except Exception as exc:
            logger.exception("could not diff the checkout of run %s", owner.run_id)
            reason = str(exc) if isinstance(exc, GitError) else type(exc).__name__
            return Changes((FileChange(f"(the changes could not be read: {reason}; reply reject)", 0, 0, True),), "")

    async def _approval_request(self, owner: OwnerState, changes: Changes) -> Report:
        images: tuple[str, ...] = ()
        try:
            picture = await render_diff(self.browser, changes)
            images = (self.images.save(picture),) if picture is not None else ()
        except Exception:  # no picture is no reason to hold back the diff itself
            logger.exception("could not render the diff image")
        # However big the change, the report stays small: the relay shows at most a few dozen
        # names, and the protocol cuts a report to what the relay always accepts.
        return Report(
            "approval_required",
            owner.run_id,
            diff=phone_excerpt(changes),
            images=images,
            files=tuple(
                (clip_path(visible(f.path), 300), f.added, f.removed, f.binary) for f in changes.files[:REPORTED_FILES]
            ),
            files_count=changes.file_count,
            uncovered=tuple(clip_path(visible(p), 300) for p in self._uncovered(owner)[:MAX_LEFT_OUT]),
        )

    @staticmethod
    def _uncovered(owner: OwnerState) -> tuple[str, ...]:
        return Snapshot.from_json(owner.snapshot).uncovered if owner.snapshot else ()

    # --- approve and reject -----------------------------------------------------------

    async def _push(self, phone: str) -> None:
        """Commit the tree the owner was shown (not whatever the checkout holds now), push it,
        open the pull request, and tell the owner about anything written after the diff."""
        owner = self._owner(phone)
        workspace = self.workspace(owner)  # the run's repository, which the state file records
        try:
            await self._prepare(owner, workspace)
            if not owner.shown_tree:
                raise GitError("no record of what you were shown; send reject, then the prompt again")
            if not owner.commit:
                head = Snapshot.from_json(owner.snapshot).head if owner.snapshot else ""
                owner.commit = await workspace.commit_tree(owner.shown_tree, head, _commit_message(owner.prompt))
                self._save(owner)  # a retry pushes the same commit
            await workspace.push(owner.commit, owner.branch)
            url = ""
            # On GitHub, a pull request on the repository pushed to; elsewhere the pushed branch
            # is all there is (`pr_opened` without a URL).
            if self.github is not None and (repo := self.settings.pull_request_repo(workspace.repo_url)):
                url = await self.github.open_pull_request(
                    repo=repo,
                    head=owner.branch,
                    base=await workspace.default_branch(),
                    title=_title(owner.prompt),
                    body=f"Made by Claude Code through textslash, approved from the owner's phone.\n\n"
                    f"Prompt:\n\n> {owner.prompt}",
                )
            await workspace.check_out_commit(owner.commit, owner.branch)
            left_out = await workspace.paths_differing(owner.shown_tree)
        except Exception as exc:  # the changes stay, and the owner can try again
            text = str(exc) if isinstance(exc, GitError | GitHubError | SandboxError) else type(exc).__name__
            if refused_by_origin(exc):
                self._check_credentials()
            if not isinstance(exc, GitError | GitHubError):
                logger.exception("approve of run %s failed", owner.run_id)
            owner.fire("push_failed")
            self._save(owner)
            self._report(phone, Report("approve_failed", owner.run_id, text=text))
            return
        branch = owner.branch
        owner.fire("pushed")
        owner.snapshot, owner.shown_tree, owner.branch, owner.commit = None, "", "", ""
        self._save(owner)
        self._report(
            phone,
            Report(
                "pr_opened",
                owner.run_id,
                url=url,
                text=branch,
                left_out=tuple(clip_path(visible(p), 300) for p in left_out[:MAX_LEFT_OUT]),
                left_out_count=len(left_out),
            ),
        )
        await self._settle(owner)

    async def _roll_back(self, phone: str) -> None:
        owner = self._owner(phone)
        workspace = self.workspace(owner)
        stuck: list[str] = []
        try:
            space = await self._prepare(owner, workspace)  # no process of the agent's races the restore
            if owner.snapshot:
                stuck = await workspace.restore(Snapshot.from_json(owner.snapshot))
                await self.sandbox.hand_over(space)  # restored files are root's
        except Exception as exc:
            text = str(exc) if isinstance(exc, GitError | SandboxError) else type(exc).__name__
            if not isinstance(exc, GitError):
                logger.exception("reject of run %s failed", owner.run_id)
            owner.fire("rollback_failed")
            self._save(owner)
            self._report(phone, Report("reject_failed", owner.run_id, text=text))
            return
        owner.fire("rolled_back")
        owner.snapshot, owner.shown_tree = None, ""
        self._save(owner)
        # `left_out`: what the run left that could not be removed, even with its permissions fixed.
        self._report(
            phone,
            Report(
                "rolled_back",
                owner.run_id,
                left_out=tuple(clip_path(visible(p), 300) for p in stuck[:MAX_LEFT_OUT]),
                left_out_count=len(stuck),
            ),
        )
        await self._settle(owner)

    # --- credentials ------------------------------------------------------------------

    def _check_credentials(self, *, model_refused: str = "") -> None:
        """A 401 just now: check the credentials at once (the owners hear which one, and how to
        renew it), beside whatever the owner's task does next."""
        if self.credentials is None or self._tg is None or self._stopping:
            return
        self._side_tasks += 1  # the finding is spooled before the worker may sleep

        async def check(credentials: CredentialCheck) -> None:
            try:
                await credentials.check(model_refused=model_refused)
            finally:
                self._side_tasks -= 1

        self._tg.start_soon(check, self.credentials)

    # --- screenshots ------------------------------------------------------------------

    async def _capture(self, phone: str, run_id: str, url: str) -> bytes:
        png = await self.browser.screenshot_url(url)
        name = self.images.save(png)
        self._report(phone, Report("notice", f"{run_id}:shot:{name[:8]}", text=f"📸 {url}", images=(name,)))
        return png

    async def _screenshot_for_owner(self, phone: str, message_id: str, url: str) -> None:
        self._side_tasks += 1
        try:
            await self._capture(phone, message_id, url)
        except ScreenshotError as exc:
            self._report(phone, Report("notice", message_id, text=f"📸 Could not capture {url}: {exc}"))
        except Exception:
            logger.exception("screenshot of %s failed", url)
            self._report(phone, Report("notice", message_id, text=f"📸 Could not capture {url}."))
        finally:
            self._side_tasks -= 1

    # --- after a restart --------------------------------------------------------------

    async def _recover(self, owner: OwnerState) -> None:
        """Continue or report what a previous process left unfinished; pending approvals simply
        stay. A run cut short (still `running`: its end was never reported, and the owner did not
        cancel it) is continued once (vm/resume.py); a cancel under way, or a run cut short again,
        is reported as failed with its changes offered for a decision."""
        if owner.state == "running" and not owner.resumed:
            self._continue(owner)
        elif owner.state in ("running", "cancelling"):
            text = resume.FAILED_AGAIN if owner.state == "running" else resume.FAILED
            await self._finish(owner, Report("error", owner.run_id, text=text))
        elif owner.state == "pushing":
            owner.fire("push_failed")
            self._save(owner)
            self._report(owner.phone, Report("approve_failed", owner.run_id, text="the VM restarted while pushing"))
        elif owner.state == "rolling_back":
            owner.fire("rollback_failed")
            self._save(owner)
            self._report(owner.phone, Report("reject_failed", owner.run_id, text="the VM restarted while rolling back"))
        if owner.state == "awaiting_approval" and not owner.shown_tree:
            await self._show_again(owner)

    def _continue(self, owner: OwnerState) -> None:
        """Continue a run cut short, in its session, from the snapshot it started with (so the
        diff shows everything it changed, before and after). That it was continued is on disk
        before anything else, so a crash from here on is reported, not continued again."""
        owner.resumed = True
        self._save(owner)
        logger.info("continuing run %s, cut short by a restart", owner.run_id)
        self._report(owner.phone, Report("progress", owner.run_id, text=resume.NOTICE))
        self._spawn(owner.phone, self._run, owner.phone, (), True)

    async def _show_again(self, owner: OwnerState) -> None:
        """A change shown by a version that kept no record of the shown tree (before isolation):
        show it again, so that approve commits what the owner sees now."""
        try:
            await self._prepare(owner, self.workspace(owner))
        except (GitError, SandboxError):
            logger.exception("could not set up the checkout of run %s", owner.run_id)
            return  # reject stays possible; approve says why it cannot
        changes = await self._changes(owner)
        owner.shown_tree = changes.tree
        self._save(owner)
        if changes:
            self._report(owner.phone, await self._approval_request(owner, changes))


MAX_LEFT_OUT = 20  # paths named in the message; the count says how many in all
REPORTED_FILES = 100  # an approval report names this many changed files, and counts them all


def _short_id(run_id: str) -> str:
    return hashlib.sha256(run_id.encode()).hexdigest()[:8]


def _title(prompt: str) -> str:
    line = " ".join(prompt.split())
    return line if len(line) <= 72 else line[:71] + "…"


def _commit_message(prompt: str) -> str:
    return f"{_title(prompt)}\n\nMade by Claude Code through textslash.\n\nPrompt: {prompt}"
