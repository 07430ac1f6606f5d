"""The worker's configuration, read once from the environment and validated."""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common.config import E164, ConfigError, EnvReader
from common.owners import owner_token
from vm.sandbox import AGENT_UID_BASE
from vm.workspace import CLONE_TIMEOUT_S, PUSH_TIMEOUT_S

__all__ = ["ConfigError", "Settings", "github_repo_from_url", "is_github_https"]

_GITHUB_URL = re.compile(
    r"^(?:https://github\.com/|git@github\.com:|ssh://git@github\.com/)([\w.-]+/[\w.-]+?)(?:\.git)?/?$"
)


def github_repo_from_url(url: str) -> str:
    """`owner/name` for a GitHub clone URL, or "" for anything else."""
    match = _GITHUB_URL.match(url.strip())
    if match is None or any(part in (".", "..") for part in match.group(1).split("/")):
        return ""
    return match.group(1)


def is_github_https(url: str) -> bool:
    """An https clone URL of a repository on github.com: the only kind a prompt may name that
    gets the GitHub token."""
    return url.startswith("https://github.com/") and bool(github_repo_from_url(url))


@dataclass(frozen=True)
class Settings:
    # The bearer token of every call between this worker and the relay, both ways: WORKER_TOKEN,
    # or OWNER_TOKEN on a worker that serves one owner (WORKER_MODE=per-owner on the relay).
    worker_token: str = field(repr=False)
    relay_callback_url: str
    owner_phone: str = ""  # the one owner this worker serves (OWNER_PHONE); "": every owner
    # Beside OWNER_PHONE, the WORKER_TOKEN this Machine got (the app's secrets reach every
    # Machine) is the relay's own, from which every owner's token derives: it must not be here.
    relay_token_here: bool = False
    repo_url: str = ""  # the worker's own repository, for prompts that name none ("": none)
    workspace_dir: Path = Path("/tmp/workspace")
    github_token: str = field(default="", repr=False)
    github_api_url: str = "https://api.github.com"
    github_repo: str = ""
    images_dir: Path = Path("/tmp/images")
    image_ttl_s: float = 24 * 3600.0
    idle_timeout_s: float = 1800.0
    idle_action: str = "exit"  # or "suspend": ask Fly to suspend this Machine (vm/suspend.py)
    fly_api_socket: Path = Path("/.fly/api")
    fly_app_name: str = ""
    fly_machine_id: str = ""
    push_timeout_s: float = PUSH_TIMEOUT_S  # approve's push to origin
    clone_timeout_s: float = CLONE_TIMEOUT_S  # the clone of REPO_URL before an owner's first run
    chromium_path: str = ""
    enable_test_app: bool = False
    claude_config_dir: str = ""
    agent_isolation: bool = True
    # Where new owners' agent uids start. On Fly each Machine is its own host; several workers on
    # one host (`./scripts/dev --owners N`) each need their own range, or one would end the
    # other's agents as its own.
    agent_uid_base: int = AGENT_UID_BASE
    warm_agent: bool = True  # keep each owner's Claude Code CLI (stopped) between prompts
    deployed_sha: str = "dev"
    port: int = 3001
    host: str = "0.0.0.0"

    @property
    def state_dir(self) -> Path:
        """Pending approvals, sessions and unsent callbacks: on the volume, beside the checkouts."""
        return self.workspace_dir / ".textslash"

    def token_for(self, url: str) -> str:
        """The GitHub token for git's calls to `url`: the worker's own REPO_URL gets it (its
        operator chose that host), and so does an https URL on github.com; any other URL a
        prompt names gets none, so the relay cannot have the token sent to a host of its choice."""
        return self.github_token if url and (url == self.repo_url or is_github_https(url)) else ""

    def pull_request_repo(self, url: str) -> str:
        """owner/name to open pull requests on for changes pushed to `url`, or "" for none.
        GITHUB_REPO belongs to REPO_URL; any other repository's comes from its GitHub URL."""
        if not url:
            return ""
        return self.github_repo if url == self.repo_url else github_repo_from_url(url)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        reader = EnvReader(env)
        # Optional: with REPOS on the relay, every prompt names its repository.
        repo_url = reader.repo_url("REPO_URL")
        github_repo = env.get("GITHUB_REPO", "").strip() or github_repo_from_url(repo_url)
        if github_repo and not re.fullmatch(r"[\w.-]+/[\w.-]+", github_repo):
            raise ConfigError("GITHUB_REPO is malformed: expected owner/name")
        owner_phone = _owner_phone(env)
        return cls(
            # One owner's Machine holds only its own token (common/owners.py): with it, it can
            # neither speak for another owner to the relay nor be given another owner's work.
            worker_token=reader.secret("OWNER_TOKEN" if owner_phone else "WORKER_TOKEN"),
            relay_callback_url=reader.url("RELAY_CALLBACK_URL").rstrip("/"),
            owner_phone=owner_phone,
            relay_token_here=_relay_token_here(env, owner_phone),
            repo_url=repo_url,
            workspace_dir=Path(env.get("WORKSPACE_DIR") or "/tmp/workspace"),
            github_token=env.get("GITHUB_TOKEN", "").strip(),
            github_api_url=reader.url("GITHUB_API_URL", "https://api.github.com").rstrip("/"),
            github_repo=github_repo,
            images_dir=Path(env.get("IMAGES_DIR") or "/tmp/images"),
            image_ttl_s=reader.integer("IMAGE_TTL_HOURS", 24, minimum=1) * 3600.0,
            idle_timeout_s=reader.millis("IDLE_TIMEOUT_MS", 1_800_000),
            idle_action=_idle_action(env),
            fly_api_socket=Path(env.get("FLY_API_SOCKET") or "/.fly/api"),
            # Set by Fly on every Machine.
            fly_app_name=env.get("FLY_APP_NAME", "").strip(),
            fly_machine_id=env.get("FLY_MACHINE_ID", "").strip(),
            push_timeout_s=reader.millis("PUSH_TIMEOUT_MS", int(PUSH_TIMEOUT_S * 1000)),
            clone_timeout_s=reader.millis("CLONE_TIMEOUT_MS", int(CLONE_TIMEOUT_S * 1000)),
            chromium_path=env.get("CHROMIUM_PATH", "").strip(),
            enable_test_app=reader.flag("ENABLE_TEST_APP"),
            claude_config_dir=env.get("CLAUDE_CONFIG_DIR", "").strip(),
            agent_isolation=reader.flag("AGENT_ISOLATION", True),
            agent_uid_base=reader.integer("AGENT_UID_BASE", AGENT_UID_BASE, minimum=AGENT_UID_BASE, maximum=2**31 - 2),
            warm_agent=reader.flag("WARM_AGENT", True),
            deployed_sha=env.get("DEPLOYED_SHA") or "dev",
            port=reader.integer("PORT", 3001, minimum=1, maximum=65535),
            host=env.get("HOST") or "0.0.0.0",
        )


def _relay_token_here(env: Mapping[str, str], owner_phone: str) -> bool:
    """WORKER_TOKEN on an owner's Machine is ignored (OWNER_TOKEN is its token); the worker app
    keeps one of its own for its plain-deploy Machine. Only the relay's is a danger: it is the
    one OWNER_TOKEN derives from (common/owners.py)."""
    app_token = env.get("WORKER_TOKEN", "").strip()
    if not owner_phone or not app_token:
        return False
    return hmac.compare_digest(owner_token(app_token, owner_phone), env.get("OWNER_TOKEN", "").strip())


def _owner_phone(env: Mapping[str, str]) -> str:
    phone = env.get("OWNER_PHONE", "").strip()
    if phone and not E164.fullmatch(phone):
        raise ConfigError("OWNER_PHONE is malformed: expected an E.164 number such as +15551234567")
    return phone


def _idle_action(env: Mapping[str, str]) -> str:
    action = (env.get("IDLE_ACTION") or "exit").strip().lower()
    if action not in ("exit", "suspend"):
        raise ConfigError(f"IDLE_ACTION is malformed: expected exit or suspend, got {action!r}")
    return action
