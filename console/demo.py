"""What `--demo` runs against: a scripted model and two small local repositories (the owner's
REPOS: try `repos` and `use site`)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from fakes.anthropic import FakeAnthropic, Text, bash, edit, write
from vm.workspace import ATTACHMENTS_DIR

README = "# demo app\n\nA tiny app to try textslash on.\n"
APP = "def main():\n    print('demo app')\n\n\nif __name__ == '__main__':\n    main()\n"
DEMO_FILES = {"README.md": README, "app.py": APP}
# The second repository: its README has the line the scripted model edits, so a run works there too.
SITE_FILES = {
    "README.md": "# demo site\n\nA tiny app to try textslash on.\n",
    "index.html": "<!doctype html>\n<title>demo site</title>\n<h1>Hello from the demo site</h1>\n",
}
HELLO = (
    '"""Say hello: added from a phone through textslash."""\n\n\n'
    "def hello(name: str) -> str:\n    return f'Hello, {name}!'\n\n\n"
    "if __name__ == '__main__':\n    print(hello('phone'))\n"
)


def demo_model() -> FakeAnthropic:
    """Whatever you ask, the demo agent looks around, adds hello.py, edits the README, runs it."""
    model = FakeAnthropic(delay_s=1.0)
    model.default = [
        bash("ls", "list the files"),
        write("{cwd}/hello.py", HELLO),
        edit(
            "{cwd}/README.md",
            "A tiny app to try textslash on.",
            "A tiny app to try textslash on.\n\nIt greets you now: `python hello.py`.",
        ),
        bash("python3 hello.py", "try it"),
        Text(
            "Added hello.py, which greets you, and a line about it in the README (this is the scripted demo "
            "model). Reply *approve* to open a pull request, or *reject* to roll it back."
        ),
    ]
    # A photo or a file (the paperclip in the chat): the worker names where it saved it.
    model.script(
        "The owner attached",
        bash(f"ls -l {ATTACHMENTS_DIR}", "look at what you sent"),
        Text(
            "📎 Got it: it is saved in the checkout, where git ignores it. (This is the scripted demo model, "
            "which cannot look at it; the real Claude sees a photo as an image and reads the files.)"
        ),
    )
    # A schedule to try: `in 10s run the tests` (or `every weekday 09:00 run the tests`).
    model.script(
        "run the tests",
        bash("python3 app.py", "run the app"),
        Text(
            "✅ The app runs: it printed “demo app”, and nothing changed. (The scripted demo model: try "
            "*in 10s run the tests*, then *schedules*.)"
        ),
    )
    return model


def make_demo_repo(origin: Path, files: dict[str, str] | None = None) -> Path:
    """A bare repository with `files` (a tiny app) on `main`, made once and kept."""
    if (origin / "HEAD").exists():
        return origin
    identity = ["-c", "user.name=textslash demo", "-c", "user.email=demo@textslash.invalid"]
    origin.mkdir(parents=True)
    subprocess.run(["git", "init", "--quiet", "--bare", "--initial-branch=main", str(origin)], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        seed = Path(tmp)
        for name, text in (files or DEMO_FILES).items():
            (seed / name).write_text(text)
        for args in (
            ["init", "--quiet", "--initial-branch=main"],
            ["add", "--all"],
            ["commit", "--quiet", "-m", "A tiny demo"],
            ["push", "--quiet", str(origin), "main"],
        ):
            subprocess.run(["git", *identity, *args], cwd=seed, check=True, capture_output=True)
    return origin
