"""`python -m deploy` against a fake flyctl on PATH: every failure stops it and rolls back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fakes.origin import git
from tests.support.processes import ROOT

FAKE = ROOT / "fakes" / "flyctl.py"
OLD = {
    "textslash-vm": "registry.fly.io/textslash-vm:deployment-old",
    "textslash-relay": "registry.fly.io/textslash-relay:deployment-old",
}


def machine(mid: str, image: str) -> dict[str, Any]:
    return {
        "id": mid,
        "state": "started",
        "checks": [{"name": "servicecheck-00-http", "status": "passing"}],
        "config": {"image": image},
    }


@dataclass
class Deploy:
    code: int
    output: str
    calls: list[list[str]]
    state: dict[str, Any]

    def called(self, *prefix: str) -> list[list[str]]:
        return [c for c in self.calls if c[: len(prefix)] == list(prefix)]

    def rolled_back(self) -> list[str]:
        return [c[c.index("--app") + 1] for c in self.called("deploy") if "--image" in c]


def run_deploy(
    tmp: Path,
    scenario: dict[str, Any] | None = None,
    *extra: str,
    dirty: bool = False,
    ips: list[dict[str, str]] | None = None,
) -> Deploy:
    repo = tmp / "repo"
    repo.mkdir()
    git(repo, "init", "--quiet")
    (repo / "README.md").write_text("x\n")
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "-m", "x")
    if dirty:
        (repo / "README.md").write_text("changed\n")
    state = {
        "scenario": scenario or {},
        "images": {OLD["textslash-vm"]: "old-sha", OLD["textslash-relay"]: "old-sha"},
        "apps": {
            "textslash-vm": {
                "sha": "old-sha",
                "machines": [machine("vm1", OLD["textslash-vm"])],
                "ips": ips if ips is not None else [{"Type": "private_v6", "Address": "fdaa::3"}],
            },
            "textslash-relay": {
                "sha": "old-sha",
                "machines": [machine("r1", OLD["textslash-relay"])],
                "ips": [{"Type": "v4", "Address": "1.2.3.4"}],
            },
        },
    }
    (tmp / "state.json").write_text(json.dumps(state))
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "flyctl").write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE} "$@"\n')
    (bin_dir / "flyctl").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "FAKE_FLY_STATE": str(tmp / "state.json"),
        "FAKE_FLY_LOG": str(tmp / "calls.log"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "deploy", "--test-command", "true", "--wait", "1", "--poll", "0.05", *extra],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    log = tmp / "calls.log"
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return Deploy(result.returncode, result.stdout + result.stderr, calls, json.loads((tmp / "state.json").read_text()))


def head(tmp: Path) -> str:
    return git(tmp / "repo", "rev-parse", "HEAD").strip()


def test_a_good_deploy_goes_worker_first_checks_everything_and_remembers_it(tmp_path: Path) -> None:
    result = run_deploy(tmp_path)
    assert result.code == 0, result.output
    deploys = result.called("deploy")
    assert [c[c.index("--app") + 1] for c in deploys] == ["textslash-vm", "textslash-relay"]
    assert all(f"VERSION_SHA={head(tmp_path)}" in c for c in deploys)
    assert result.called("machine", "stop", "vm1")
    wake = [c for c in result.called("machine", "exec") if "textslash-vm.flycast:3001" in c[3]]
    assert wake and wake[0][wake[0].index("--app") + 1] == "textslash-relay"
    assert result.calls.index(result.called("machine", "stop", "vm1")[0]) < result.calls.index(wake[0])
    remembered = json.loads((tmp_path / "repo" / "var" / "deploy-last-good.json").read_text())
    assert remembered["textslash-vm"].endswith("deployment-1")


def test_dry_run_prints_the_calls_and_makes_none(tmp_path: Path) -> None:
    result = run_deploy(tmp_path, None, "--dry-run")
    assert result.code == 0 and result.calls == []
    assert "would run: flyctl deploy . --app textslash-vm" in result.output
    assert "would run: flyctl machine stop" in result.output and ".flycast:3001/health" in result.output


def test_a_dirty_tree_stops_before_anything_is_deployed(tmp_path: Path) -> None:
    result = run_deploy(tmp_path, dirty=True)
    assert result.code == 1 and "uncommitted changes" in result.output
    assert result.called("deploy") == []


def test_failing_tests_stop_before_anything_is_deployed(tmp_path: Path) -> None:
    result = run_deploy(tmp_path, None, "--test-command", "false")
    assert result.code == 1 and "the tests failed" in result.output
    assert result.called("deploy") == []


def test_machines_left_stopped_by_the_deploy_are_started(tmp_path: Path) -> None:
    result = run_deploy(tmp_path, {"after_deploy": {"textslash-vm": "stopped"}})
    assert result.code == 0, result.output
    assert result.called("machine", "start", "vm1")


@pytest.mark.parametrize(
    ("scenario", "message", "rolled_back"),
    [
        pytest.param(
            {"after_deploy": {"textslash-vm": "replacing"}}, "vm1 replacing", ["textslash-vm"], id="replacing"
        ),
        pytest.param(
            {"checks": {"textslash-relay": "critical"}},
            "servicecheck-00-http critical",
            ["textslash-relay", "textslash-vm"],
            id="failing-checks",
        ),
        pytest.param(
            {"stale_sha": ["textslash-relay"]},
            "old code is still running",
            ["textslash-relay", "textslash-vm"],
            id="stale-sha",
        ),
        pytest.param({"wakes": False}, "request timed out", ["textslash-relay", "textslash-vm"], id="never-wakes"),
        pytest.param(
            {"stuck_stop": ["textslash-vm"]}, "did not stop", ["textslash-relay", "textslash-vm"], id="will-not-stop"
        ),
    ],
)
def test_each_failure_stops_the_deploy_and_rolls_back(
    tmp_path: Path, scenario: dict[str, Any], message: str, rolled_back: list[str]
) -> None:
    result = run_deploy(tmp_path, scenario)
    assert result.code == 1
    assert "FAILED" in result.output and message in result.output, result.output
    assert result.rolled_back() == rolled_back
    for app in rolled_back:
        assert result.state["apps"][app]["machines"][0]["config"]["image"] == OLD[app]


@pytest.mark.parametrize(
    ("ips", "message"),
    [
        pytest.param(
            [{"Type": "v4", "Address": "1.2.3.4"}, {"Type": "private_v6", "Address": "fdaa::3"}],
            "reachable from the internet at 1.2.3.4",
            id="public-ip",
        ),
        pytest.param([], "no Flycast address", id="no-flycast"),
    ],
)
def test_a_worker_that_is_public_or_unwakeable_is_refused(
    tmp_path: Path, ips: list[dict[str, str]], message: str
) -> None:
    result = run_deploy(tmp_path, None, ips=ips)
    assert result.code == 1 and message in result.output
    assert result.rolled_back() == ["textslash-relay", "textslash-vm"]
