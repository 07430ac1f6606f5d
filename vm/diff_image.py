"""A unified diff rendered as a phone-sized PNG: colored, wrapped, with a file summary on top."""

from __future__ import annotations

from html import escape

from vm.browser import BrowserPool
from vm.workspace import Changes

PHONE_WIDTH = 430  # CSS pixels; rendered at 2x so text stays sharp when zoomed
MAX_LINES = 160

STYLE = """
body { margin: 0; background: #0d1117; color: #c9d1d9;
       font: 12px/1.45 "DejaVu Sans Mono", "Liberation Mono", monospace; }
header { padding: 10px 12px; background: #161b22; border-bottom: 1px solid #30363d; font-family: sans-serif; }
header h1 { font-size: 14px; margin: 0 0 6px; color: #f0f6fc; }
header div { font-size: 12px; }
.add-n { color: #3fb950; } .del-n { color: #f85149; }
pre { margin: 0; padding: 6px 0; white-space: pre-wrap; word-break: break-all; }
pre span { display: block; padding: 0 10px; }
.add { background: #12261e; color: #aff5b4; } .del { background: #2d1417; color: #ffc0c0; }
.hunk { color: #79c0ff; background: #121d2f; } .file { color: #f0f6fc; font-weight: bold; background: #161b22;
        margin-top: 6px; padding-top: 4px; padding-bottom: 4px; }
.more { color: #8b949e; font-style: italic; }
"""


def diff_html(changes: Changes, *, max_lines: int = MAX_LINES) -> str:
    files = "".join(
        f'<div>{escape(f.path)} <span class="add-n">+{f.added}</span> <span class="del-n">−{f.removed}</span></div>'
        for f in changes.files
    )
    lines = changes.diff.splitlines()
    headers = ("index ", "--- ", "+++ ", "new file mode", "deleted file mode")
    shown = [_line(line) for line in lines[:max_lines] if not line.startswith(headers)]
    if len(lines) > max_lines:
        shown.append(f'<span class="more">… {len(lines) - max_lines} more lines</span>')
    count = len(changes.files)
    return (f"<!doctype html><html><head><meta charset='utf-8'><style>{STYLE}</style></head><body>"
            f"<header><h1>{count} file{'s' if count != 1 else ''} changed</h1>{files}</header>"
            f"<pre>{''.join(shown)}</pre></body></html>")


def _line(line: str) -> str:
    if line.startswith("diff --git"):
        path = line.split(" b/", 1)[-1]
        return f'<span class="file">{escape(path)}</span>'
    css = {"+": "add", "-": "del", "@": "hunk"}.get(line[:1], "")
    return f'<span class="{css}">{escape(line) or " "}</span>'


async def render_diff(browser: BrowserPool, changes: Changes) -> bytes:
    return await browser.screenshot_html(diff_html(changes), width=PHONE_WIDTH, scale=2.0)


def phone_excerpt(changes: Changes, limit: int = 900) -> str:
    """The diff cut to fit a phone message: hunks only, headers dropped, cut at a line."""
    kept: list[str] = []
    size = 0
    for line in changes.diff.splitlines():
        if line.startswith(("index ", "--- ", "+++ ", "new file mode", "deleted file mode")):
            continue
        if line.startswith("diff --git"):
            line = "# " + line.split(" b/", 1)[-1]
        if size + len(line) + 1 > limit:
            kept.append("…")
            break
        kept.append(line)
        size += len(line) + 1
    return "\n".join(kept)
