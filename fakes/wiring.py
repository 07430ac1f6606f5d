"""How the fakes and the real processes are wired together on loopback: the credentials the
fakes accept, the owners, and the environment each real process is started with.

Tests, benchmarks and the pair harness all start the relay and the worker from these, so a
benchmark measures the same setup the tests check.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from twilio.request_validator import RequestValidator

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "twilio-auth-token-for-tests"
WORKER_TOKEN = "worker-token-for-tests"
OWNER = "+15550001111"
OWNER2 = "+15550002222"
STRANGER = "+15559990000"
SANDBOX_NUMBER = "+14155238886"
# Deliberately not the address the relay listens on: signatures must be checked against it.
PUBLIC_URL = "https://relay.example.test"

_sids = itertools.count(1)


def new_sid() -> str:
    return f"SM{next(_sids):032x}"


def relay_env(db: Path, twilio_url: str, worker_url: str, **overrides: str) -> dict[str, str]:
    env = {
        "PUBLIC_URL": PUBLIC_URL,
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_WHATSAPP_NUMBER": SANDBOX_NUMBER,
        "TWILIO_API_BASE_URL": twilio_url,
        "ALLOWED_PHONE_NUMBERS": f"{OWNER}, {OWNER2}",
        "CLAUDE_HOST": worker_url,
        "WORKER_TOKEN": WORKER_TOKEN,
        "RELAY_DB": str(db),
        "WAKE_TIMEOUT_MS": "10000",
        "DEPLOYED_SHA": "test-sha",
    }
    env.update(overrides)
    return env


def signed_form(url: str, params: dict[str, str], token: str = AUTH_TOKEN) -> dict[str, str]:
    """Headers for a form post signed the way Twilio signs it, by the twilio SDK itself."""
    return {"X-Twilio-Signature": RequestValidator(token).compute_signature(url, params)}


def message_params(
    body: str, *, sender: str = OWNER, sid: str | None = None, media: Sequence[tuple[str, str]] = ()
) -> dict[str, str]:
    """A webhook's form; `media`: (MediaUrl, MediaContentType) of each photo or file, as Twilio names them."""
    params = {
        "MessageSid": sid or new_sid(),
        "AccountSid": ACCOUNT_SID,
        "From": f"whatsapp:{sender}",
        "To": f"whatsapp:{SANDBOX_NUMBER}",
        "Body": body,
        "NumMedia": str(len(media)),
        "ProfileName": "Owner",
    }
    for n, (url, content_type) in enumerate(media):
        params[f"MediaUrl{n}"], params[f"MediaContentType{n}"] = url, content_type
    return params


GITHUB_TOKEN = "ghs_test_token_for_the_fake"
ANTHROPIC_KEY = "sk-ant-test-key-for-the-fake"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FILES = {"README.md": "# demo\n", "app.py": "def greet():\n    return 'hi'\n"}
_ids = itertools.count(1)


def new_message_id() -> str:
    return f"SMw{next(_ids):031d}"


def model_env(anthropic_url: str, tmp: Path) -> dict[str, str]:
    """What the CLI needs to talk to the fake model, and nothing of the developer's own setup."""
    return {
        "ANTHROPIC_BASE_URL": anthropic_url,
        "ANTHROPIC_API_KEY": ANTHROPIC_KEY,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CLAUDE_CONFIG_DIR": str(tmp / "claude"),
        "HOME": str(tmp / "home"),
        "WORKER_TOKEN": "",
        "GITHUB_TOKEN": "",
    }


def open_for_agents(path: Path) -> None:
    """Let agent users reach folders below `path` (search, not list): as root, the worker starts
    each owner's agent as its own user, and pytest makes its temporary folders 0700."""
    path.mkdir(parents=True, exist_ok=True)
    for folder in [path, *path.parents]:
        mode = folder.stat().st_mode
        if not mode & 0o001:
            os.chmod(folder, mode | 0o001)


def worker_env(tmp: Path, *, relay_url: str, github_url: str, origin: Path, **overrides: str) -> dict[str, str]:
    """The worker's settings. As root (CI), agents are isolated for real; a developer running the
    suite unprivileged gets AGENT_ISOLATION=off, as `./scripts/dev` does."""
    isolated = os.geteuid() == 0
    if isolated:
        open_for_agents(tmp)
    env = {
        "AGENT_ISOLATION": "on" if isolated else "off",
        "WORKER_TOKEN": WORKER_TOKEN,
        "RELAY_CALLBACK_URL": relay_url,
        "WORKSPACE_DIR": str(tmp / "workspace"),
        "REPO_URL": f"file://{origin}",
        "GITHUB_TOKEN": GITHUB_TOKEN,
        "GITHUB_API_URL": github_url,
        "GITHUB_REPO": "owner/demo",
        "IMAGES_DIR": str(tmp / "images"),
        "IDLE_TIMEOUT_MS": "600000",
        "CHROMIUM_PATH": CHROMIUM,
        "ENABLE_TEST_APP": "true",
        "CLAUDE_CONFIG_DIR": str(tmp / "claude"),
        "DEPLOYED_SHA": "test-sha",
    }
    env.update(overrides)
    return env
