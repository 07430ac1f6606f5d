"""Settings: defaults, and a clear error naming any bad variable without echoing secrets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fakes.wiring import relay_env
from relay.settings import ConfigError, Settings
from tests.support.processes import ROOT

BASE = relay_env(Path("/tmp/x.sqlite3"), "http://127.0.0.1:1", "http://127.0.0.1:2")


def test_defaults() -> None:
    env = {k: v for k, v in BASE.items() if k not in ("TWILIO_API_BASE_URL", "WAKE_TIMEOUT_MS", "DEPLOYED_SHA")}
    settings = Settings.from_env(env)
    assert settings.twilio_api_base_url == "https://api.twilio.com"
    assert settings.approval_timeout_s == 1800 and settings.wake_timeout_s == 30
    assert settings.min_send_interval_s == 0 and settings.port == 3000
    assert "twilio-auth-token" not in repr(settings) and "worker-token" not in repr(settings)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PUBLIC_URL", ""),
        ("PUBLIC_URL", "relay.example.com"),
        ("PUBLIC_URL", "https://x.test/?a=1"),
        ("TWILIO_ACCOUNT_SID", "not-a-sid"),
        ("TWILIO_AUTH_TOKEN", ""),
        ("TWILIO_AUTH_TOKEN", "short"),
        ("TWILIO_WHATSAPP_NUMBER", "4155238886"),
        ("ALLOWED_PHONE_NUMBERS", "+1555000111,oops"),
        ("CLAUDE_HOST", "textslash-vm.flycast:3001"),
        ("WORKER_TOKEN", ""),
        ("APPROVAL_TIMEOUT_MS", "soon"),
        ("WAKE_TIMEOUT_MS", "0"),
        ("TWILIO_MIN_SEND_INTERVAL_MS", "-1"),
        ("PORT", "99999"),
        ("REPOS", "web"),
        ("REPOS", "Web=https://github.com/a/b.git"),
        ("REPOS", "web=https://github.com/a/b.git,web=https://github.com/a/c.git"),
        ("REPOS", "web=https://user:tok@github.com/a/b.git"),
        ("REPOS", "web=ftp://example.com/b.git"),
        ("REPO_URL", "https://user:tok@github.com/a/b.git"),
        ("BUTTONS", "maybe"),
        ("CLAUDE_MODEL", "opus; rm -rf"),
        ("MONTHLY_BUDGET_USD", "lots"),
        ("MONTHLY_BUDGET_USD", "-5"),
        ("RUN_BUDGET_USD", "nan"),
        ("VM_COST_PER_HOUR_USD", "free"),
        ("TWILIO_TEMPLATE_CONTENT_SID", "HX123"),
        ("WHATSAPP_WINDOW_MS", "a day"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({**BASE, name: value})


def test_repositories_the_model_and_the_ceilings() -> None:
    settings = Settings.from_env(
        {
            **BASE,
            "REPOS": " web = https://github.com/you/web.git , api=git@github.com:you/api.git ",
            "CLAUDE_MODEL": "sonnet",
            "MONTHLY_BUDGET_USD": "$25",
            "RUN_BUDGET_USD": "0.50",
            "VM_COST_PER_HOUR_USD": "0",
        }
    )
    assert [(r.name, r.url) for r in settings.repos] == [
        ("web", "https://github.com/you/web.git"),
        ("api", "git@github.com:you/api.git"),
    ]
    assert (settings.claude_model, settings.monthly_budget_usd, settings.run_budget_usd) == ("sonnet", 25.0, 0.5)
    assert settings.vm_cost_per_hour_usd == 0 and settings.buttons
    # REPO_URL alone is the one repository, named after it; with neither, the worker's own.
    one = Settings.from_env({**BASE, "REPO_URL": "https://github.com/you/My_Project.git"})
    assert [(r.name, r.url) for r in one.repos] == [("my_project", "https://github.com/you/My_Project.git")]
    assert Settings.from_env(BASE).repos == () and Settings.from_env(BASE).vm_cost_per_hour_usd > 0


def test_a_malformed_repos_never_echoes_a_url() -> None:
    for raw in ("https://me:hunter22@github.com/a/b.git", "https://me:hunter22@github.com/a/b.git=web"):
        with pytest.raises(ConfigError, match="REPOS is malformed: pair 1") as info:
            Settings.from_env({**BASE, "REPOS": raw})
        assert "hunter22" not in str(info.value)


def test_the_window_template_is_optional_and_a_malformed_one_is_not_echoed() -> None:
    assert Settings.from_env(BASE).template_content_sid == ""
    assert Settings.from_env(BASE).whatsapp_window_s == 24 * 3600 - 300  # 5 minutes to spare
    sid = "HX" + "0123456789abcdef" * 2
    assert Settings.from_env({**BASE, "TWILIO_TEMPLATE_CONTENT_SID": sid}).template_content_sid == sid
    with pytest.raises(ConfigError, match="TWILIO_TEMPLATE_CONTENT_SID is malformed") as info:
        Settings.from_env({**BASE, "TWILIO_TEMPLATE_CONTENT_SID": "textslash reminder"})
    assert "reminder" not in str(info.value)


def test_a_short_secret_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**BASE, "WORKER_TOKEN": "s3cr3t"})
    assert "s3cr3t" not in str(info.value)


def test_python_m_relay_stops_with_a_message_naming_the_variable(tmp_path: Path) -> None:
    env = {k: v for k, v in BASE.items() if k != "CLAUDE_HOST"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "relay"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "CLAUDE_HOST is required" in result.stderr
    assert BASE["TWILIO_AUTH_TOKEN"] not in result.stderr + result.stdout


PER_OWNER = {**BASE, "WORKER_MODE": "per-owner", "FLY_API_TOKEN": "fly-token-secret-value"}


def test_per_owner_mode_and_its_defaults() -> None:
    assert Settings.from_env(BASE).fleet is None  # shared, as before
    fleet = Settings.from_env(PER_OWNER).fleet
    assert fleet is not None and fleet.api_base_url == "http://_api.internal:4280"
    assert fleet.app == "textslash-vm" and fleet.image == "" and fleet.volume_gb == 10
    assert "fly-token-secret-value" not in repr(Settings.from_env(PER_OWNER))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WORKER_MODE", "each"),
        ("FLY_API_TOKEN", ""),
        ("FLY_API_BASE_URL", "_api.internal:4280"),
        ("WORKER_APP", "Textslash VM"),
        ("WORKER_IMAGE", "registry.fly.io/app:tag; rm -rf /"),
        ("WORKER_REGION", "Ashburn"),
        ("WORKER_VOLUME_GB", "0"),
    ],
)
def test_bad_per_owner_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({**PER_OWNER, name: value})
