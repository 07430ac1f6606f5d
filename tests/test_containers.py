"""The images and Fly files, checked without a Docker daemon.

Each image's dependency set is installed from the lock file into a fresh virtual environment,
with only the folders its Dockerfile copies, and started to a healthy /health: the "it worked
on my laptop" failure, where a module or a dependency was only ever on the developer's machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from fakes.wiring import relay_env
from tests.support.processes import ROOT, free_port, image_command, wait_healthy

pytestmark = pytest.mark.anyio
DOCKERFILES = {"relay": ROOT / "Dockerfile", "vm": ROOT / "vm" / "Dockerfile"}


def uv() -> str:
    found = os.environ.get("UV") or shutil.which("uv")
    assert found, "uv is needed to check the images' dependency sets"
    return found


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


@pytest.mark.parametrize("half", DOCKERFILES)
def test_hadolint_passes(half: str) -> None:
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    result = subprocess.run([hadolint, str(DOCKERFILES[half])], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("half", DOCKERFILES)
def test_exec_form_cmd_no_entrypoint_script_least_privilege_and_sha(half: str) -> None:
    steps = instructions(DOCKERFILES[half])
    cmds = [arg for op, arg in steps if op == "CMD"]
    # Exec form, and only exec()s before python: signals reach python.
    assert cmds and json.loads(cmds[-1])[-3:] == ["python", "-m", half]
    assert not [arg for op, arg in steps if op == "ENTRYPOINT"]
    users = [arg for op, arg in steps if op == "USER"]
    if half == "relay":
        assert users and not users[-1].startswith(("root", "0"))
    else:
        # Root, to start each owner's agent as its own user, with a trimmed capability set.
        assert not users or users[-1].startswith(("root", "0"))
        setpriv, bounding, *_ = json.loads(cmds[-1])
        kept = set(bounding.removeprefix("--bounding-set=-all,").split(","))
        assert setpriv == "setpriv" and bounding.startswith("--bounding-set=-all,")
        assert "+sys_ptrace" not in kept and "+sys_admin" not in kept and {"+setuid", "+setgid", "+kill"} <= kept
    assert ("ARG", "VERSION_SHA=unknown") in steps
    assert any(op == "ENV" and "DEPLOYED_SHA=${VERSION_SHA}" in arg for op, arg in steps)
    assert any(op == "RUN" and f"uv sync --locked --no-dev --extra {half}" in arg for op, arg in steps)


def test_no_crlf_anywhere_in_the_tree() -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    offenders = [
        f.decode() for f in files if f and (ROOT / f.decode()).is_file() and b"\r\n" in (ROOT / f.decode()).read_bytes()
    ]
    assert offenders == []
    assert "eol=lf" in (ROOT / ".gitattributes").read_text()


def image_tree(half: str, dest: Path) -> Path:
    """What the image holds: pyproject.toml, uv.lock and the folders its Dockerfile copies."""
    app = dest / "app"
    app.mkdir(parents=True)
    for op, arg in instructions(DOCKERFILES[half]):
        if op != "COPY" or arg.startswith("--from"):
            continue
        *sources, _ = arg.split()
        for source in sources:
            path = ROOT / source.rstrip("/")
            if path.is_dir():
                shutil.copytree(path, app / source.rstrip("/"), ignore=shutil.ignore_patterns("__pycache__"))
            else:
                (app / source).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, app / source)
    venv = dest / "venv"
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(venv)}
    env.pop("VIRTUAL_ENV", None)
    subprocess.run([uv(), "sync", "--locked", "--no-dev", "--extra", half, "--quiet"], cwd=app, env=env, check=True)
    return app


def installed(venv: Path) -> set[str]:
    site = next(venv.glob("lib/python*/site-packages"))
    return {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}


@contextmanager
def isolated(app: Path, venv: Path, module: str, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m module` from the image's venv and folders only: no PYTHONPATH, no repository."""
    # The image's own CMD where this machine can run it (the worker's drops capabilities: root only).
    python = str(venv / "bin" / "python")
    command = image_command(DOCKERFILES[module], python)
    if module == "vm" and os.geteuid() != 0:
        command, env = [python, "-m", "vm"], {**env, "AGENT_ISOLATION": "off"}
    with (app / "out.log").open("wb") as log:
        proc = subprocess.Popen(
            command,
            cwd=app,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={"PATH": f"{venv}/bin:/usr/bin:/bin", "HOME": str(app), **env},
        )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


async def start_and_check(app: Path, venv: Path, module: str, env: dict[str, str]) -> None:
    port = free_port()
    with isolated(app, venv, module, {**env, "PORT": str(port), "HOST": "127.0.0.1"}) as proc:
        await wait_healthy(f"http://127.0.0.1:{port}", proc, timeout=60)
        async with httpx.AsyncClient() as client:
            health = (await client.get(f"http://127.0.0.1:{port}/health")).json()
        assert health["status"] == "ok" and health["deployed_sha"] == "image-test"


async def test_the_relay_image_starts_from_its_own_dependency_set(tmp_path: Path) -> None:
    app = image_tree("relay", tmp_path)
    venv = tmp_path / "venv"
    packages = installed(venv)
    assert "twilio" in packages and "claude_agent_sdk" not in packages and "playwright" not in packages
    # Per-owner, which also needs vm/fly.toml (each owner's Machine is made as it says) at start.
    env = relay_env(
        tmp_path / "relay.sqlite3",
        "http://127.0.0.1:9",
        "http://127.0.0.1:9",
        DEPLOYED_SHA="image-test",
        WORKER_MODE="per-owner",
        FLY_API_TOKEN="fly-token-for-tests",
        FLY_API_BASE_URL="http://127.0.0.1:9",
    )
    await start_and_check(app, venv, "relay", env)


async def test_the_worker_image_starts_from_its_own_dependency_set(tmp_path: Path) -> None:
    app = image_tree("vm", tmp_path)
    venv = tmp_path / "venv"
    packages = installed(venv)
    assert "claude_agent_sdk" in packages and "playwright" in packages and "twilio" not in packages
    env = {
        "WORKER_TOKEN": "worker-token-for-tests",
        "RELAY_CALLBACK_URL": "http://127.0.0.1:9",
        "REPO_URL": "file:///nonexistent.git",
        "WORKSPACE_DIR": str(tmp_path / "ws"),
        "IMAGES_DIR": str(tmp_path / "img"),
        "DEPLOYED_SHA": "image-test",
    }
    await start_and_check(app, venv, "vm", env)


def fly(path: str) -> dict[str, object]:
    return tomllib.loads((ROOT / path).read_text())


def test_relay_fly_toml() -> None:
    cfg = fly("fly.toml")
    http = cfg["http_service"]
    assert isinstance(http, dict)
    assert http["min_machines_running"] == 1 and http["auto_stop_machines"] == "off"
    assert http["force_https"] is True and http["internal_port"] == 3000
    assert http["checks"][0]["path"] == "/health"
    assert cfg["kill_signal"] == "SIGTERM" and isinstance(cfg["kill_timeout"], int)
    assert cfg["mounts"][0]["destination"] == "/data"  # type: ignore[index]
    env = cfg["env"]
    assert isinstance(env, dict)
    assert env["RELAY_DB"].startswith("/data/") and env["HOST"] == "0.0.0.0"
    assert ".flycast:" in env["CLAUDE_HOST"] and ".internal" not in env["CLAUDE_HOST"]
    assert int(cfg["vm"][0]["memory"].removesuffix("mb")) <= 512  # type: ignore[index]


def test_worker_fly_toml() -> None:
    cfg = fly("vm/fly.toml")
    http = cfg["http_service"]
    assert isinstance(http, dict)
    assert http["auto_stop_machines"] == "off" and http["auto_start_machines"] is True
    assert http["min_machines_running"] == 0 and http["force_https"] is False
    assert http["internal_port"] == 3001 and http["checks"][0]["path"] == "/health"
    assert cfg["kill_signal"] == "SIGTERM" and isinstance(cfg["kill_timeout"], int)
    assert cfg["mounts"][0] == {"source": "vm_data", "destination": "/data"}  # type: ignore[index]
    env = cfg["env"]
    assert isinstance(env, dict)
    assert env["IDLE_TIMEOUT_MS"] == "3600000" and env["HOST"] == "0.0.0.0"
    assert env["CLAUDE_CONFIG_DIR"].startswith("/data/") and env["WORKSPACE_DIR"].startswith("/data/")


def test_compose_runs_the_pair_with_a_data_volume() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert text.count("env_file: .env") == 2
    assert "dockerfile: vm/Dockerfile" in text and "vm_data:/data" in text
