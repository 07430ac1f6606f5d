"""A fake `flyctl` for the deploy tests: records every call and plays machine states.

State lives in the JSON file named by FAKE_FLY_STATE; every argv is appended to FAKE_FLY_LOG.
The scenario in the state says what goes wrong: machines left stopped or stuck replacing after
a deploy, failing checks, a stale deployed_sha, public IPs, a worker that will not wake.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


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
    app = state["apps"][args[args.index("--app") + 1]] if "--app" in args else None
    name = args[args.index("--app") + 1] if "--app" in args else ""
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
            worker = state["apps"][command.split("//", 1)[1].split(".flycast", 1)[0]]
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


def set_machines(app: dict[str, Any], state: str, checks: str, image: str) -> None:
    for machine in app["machines"]:
        machine["state"] = state
        machine["checks"] = [{"name": "servicecheck-00-http", "status": checks, "output": ""}]
        machine["config"]["image"] = image


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
