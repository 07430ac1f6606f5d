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
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({**BASE, name: value})


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
