"""A fake `flyctl` for the deploy tests: records every call and plays machine states.

State lives in the JSON file named by FAKE_FLY_STATE; every argv is appended to FAKE_FLY_LOG.
The scenario in the state says what goes wrong: machines left stopped or stuck replacing after
a deploy, failing checks, a stale deployed_sha, public IPs, a worker that will not wake.

An app named in the state's `api` ({"url", "app"}) keeps its Machines in the loopback fake
Machines API (fakes/flyapi.py) instead, as the real flyctl does (with FLY_API_TOKEN): there is
then one truth, which both the deploy's API client and this flyctl see. `deploy` updates only
Fly Launch's Machines (metadata `fly_platform_version`), never an owner's; `machine exec` answers
/health with the sha that built the Machine's image (the state's `images`) and fails on a
Machine that is not started, as the real one does.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import httpx

FORCED = re.compile(r"fly-force-instance-id': '([0-9a-z]+)'")


def main(args: list[str]) -> int:
    path = os.environ["FAKE_FLY_STATE"]
    with open(path) as f:
        state: dict[str, Any] = json.load(f)
    with open(os.environ["FAKE_FLY_LOG"], "a") as log:
        log.write(json.dumps(args) + "\n")
    code = run(state, args)
    with open(path, "w") as f:
        json.dump(state, f)
    return code


def run(state: dict[str, Any], args: list[str]) -> int:
    scenario = state.get("scenario", {})
    name = args[args.index("--app") + 1] if "--app" in args else ""
    api = state.get("api") or {}
    if name and name == api.get("app"):
        return run_on_api(state, args, Api(api["url"], name))
    app = state["apps"][name] if name else None
    if args[0] == "deploy" and app is not None:
        if "--image" in args:  # a rollback
            image = args[args.index("--image") + 1]
            app["sha"] = state["images"].get(image, "unknown")
            set_machines(app, "started", "passing", image)
            return 0
        sha = next(a.split("=", 1)[1] for a in args if a.startswith("VERSION_SHA="))
        state["builds"] = state.get("builds", 0) + 1
        image = f"registry.fly.io/{name}:deployment-{state['builds']}"
        state["images"][image] = sha
        app["sha"] = app["sha"] if name in scenario.get("stale_sha", []) else sha
        set_machines(
            app,
            scenario.get("after_deploy", {}).get(name, "started"),
            scenario.get("checks", {}).get(name, "passing"),
            image,
        )
        return 0
    if args[:2] == ["machines", "list"] and app is not None:
        print(json.dumps(app["machines"]))
        return 0
    if args[:2] == ["ips", "list"] and app is not None:
        print(json.dumps(app.get("ips", [])))
        return 0
    if args[:2] in (["machine", "start"], ["machine", "stop"]) and app is not None:
        if name in scenario.get("stuck_stop", []) and args[1] == "stop":
            return 0
        for machine in app["machines"]:
            if machine["id"] == args[2]:
                machine["state"] = "started" if args[1] == "start" else "stopped"
        return 0
    if args[:2] == ["machine", "exec"] and app is not None:
        command = args[3]
        if ".flycast" in command:
            target = command.split("//", 1)[1].split(".flycast", 1)[0]
            if target == api.get("app"):
                return wake_on_api(state, command, Api(api["url"], target))
            worker = state["apps"][target]
            if not scenario.get("wakes", True):
                print("Error: request timed out", file=sys.stderr)
                return 1
            for machine in worker["machines"]:
                machine["state"] = "started"
            print(json.dumps({"status": "ok", "deployed_sha": worker["sha"], "uptime_s": 0.5, "busy": False}))
            return 0
        print(json.dumps({"status": "ok", "deployed_sha": app["sha"], "uptime_s": 12.0}))
        return 0
    print(f"fake flyctl: unexpected call {args}", file=sys.stderr)
    return 2


class Api:
    """The fake Machines API, as flyctl reaches it: with FLY_API_TOKEN."""

    def __init__(self, url: str, app: str) -> None:
        self.base = f"{url}/v1/apps/{app}"
        self.headers = {"Authorization": f"Bearer {os.environ.get('FLY_API_TOKEN', '')}"}

    def call(self, method: str, path: str, body: Any = None) -> Any:
        response = httpx.request(method, self.base + path, json=body, headers=self.headers, timeout=30)
        response.raise_for_status()
        return response.json()

    def launched(self) -> list[dict[str, Any]]:
        """Fly Launch's Machines: those `flyctl deploy` updates."""
        found: list[dict[str, Any]] = self.call("GET", "/machines")
        return [m for m in found if "fly_platform_version" in (m["config"].get("metadata") or {})]

    def update_image(self, image: str) -> None:
        for machine in self.launched():
            self.call("POST", f"/machines/{machine['id']}", {"config": {**machine["config"], "image": image}})


def run_on_api(state: dict[str, Any], args: list[str], api: Api) -> int:
    if args[0] == "deploy":
        if "--image" in args:  # a rollback
            api.update_image(args[args.index("--image") + 1])
            return 0
        sha = next(a.split("=", 1)[1] for a in args if a.startswith("VERSION_SHA="))
        state["builds"] = state.get("builds", 0) + 1
        image = f"registry.fly.io/{args[args.index('--app') + 1]}:deployment-{state['builds']}"
        state["images"][image] = sha
        api.update_image(image)
        return 0
    if args[:2] == ["machines", "list"]:
        print(json.dumps(api.call("GET", "/machines")))
        return 0
    if args[:2] in (["machine", "start"], ["machine", "stop"]):
        api.call("POST", f"/machines/{args[2]}/{args[1]}")
        return 0
    if args[:2] == ["machine", "exec"]:
        machine = api.call("GET", f"/machines/{args[2]}")
        if machine["state"] != "started":
            print(f"Error: machine {args[2]} is {machine['state']}, not started", file=sys.stderr)
            return 1
        print(json.dumps(health(state, machine)))
        return 0
    if args[:2] == ["ips", "list"]:
        print(json.dumps(state.get("api_ips", [{"Type": "private_v6", "Address": "fdaa::3"}])))
        return 0
    print(f"fake flyctl: unexpected call {args}", file=sys.stderr)
    return 2


def wake_on_api(state: dict[str, Any], command: str, api: Api) -> int:
    """A request through Flycast: Fly's proxy starts the Machine the header names (or, without
    one, any of the app's: here Fly Launch's first)."""
    forced = FORCED.search(command)
    target = forced.group(1) if forced else api.launched()[0]["id"]
    api.call("POST", f"/machines/{target}/start")
    print(json.dumps({**health(state, api.call("GET", f"/machines/{target}")), "uptime_s": 0.5}))
    return 0


def health(state: dict[str, Any], machine: dict[str, Any]) -> dict[str, Any]:
    sha = state["images"].get(machine["config"]["image"], "unknown")
    return {"status": "ok", "deployed_sha": sha, "uptime_s": 12.0, "busy": False}


def set_machines(app: dict[str, Any], state: str, checks: str, image: str) -> None:
    for machine in app["machines"]:
        machine["state"] = state
        machine["checks"] = [{"name": "servicecheck-00-http", "status": checks, "output": ""}]
        machine["config"]["image"] = image


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
