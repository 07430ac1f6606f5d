"""A unified diff rendered as a phone-sized PNG: colored, wrapped, with a file summary on top."""

from __future__ import annotations

from html import escape

from common.protocol import MAX_IMAGE_BYTES
from common.visible import visible
from vm.browser import BrowserPool
from vm.workspace import Changes

PHONE_WIDTH = 430  # CSS pixels; rendered at 2x so text stays sharp when zoomed
MAX_LINES = 160
# Wrapped rows the picture may hold (a row is ~58 characters at PHONE_WIDTH): 160 long lines
# would wrap to a page 40,000 px tall, a PNG three times what WhatsApp takes.
MAX_ROWS = 320
ROW_CHARS = 58
MAX_FILES = 30
MAX_LINE_CHARS = 400
NOT_SHOWN = "(binary or over 1 MB: content not shown)"
DIFF_CUT = "✂ the diff is longer than can be shown: the rest is not here"

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
        f'<div>{escape(visible(f.path))} <span class="more">{NOT_SHOWN}</span></div>'
        if f.binary
        else f'<div>{escape(visible(f.path))} <span class="add-n">+{f.added}</span> '
        f'<span class="del-n">−{f.removed}</span></div>'
        for f in changes.files[:MAX_FILES]
    )
    if changes.file_count > MAX_FILES:
        files += f'<div class="more">… and {changes.file_count - MAX_FILES} more files</div>'
    lines = diff_lines(changes.diff)
    shown: list[str] = []
    rows = 0
    for kind, text in lines[:max_lines]:
        clipped = _clip_line(text)
        rows += max(1, -(-len(clipped) // ROW_CHARS))
        if rows > MAX_ROWS:
            break
        shown.append(_line(kind, clipped))
    if len(shown) < len(lines):
        shown.append(f'<span class="more">… {len(lines) - len(shown)} more lines</span>')
    elif changes.diff_cut:
        shown.append(f'<span class="more">{DIFF_CUT}</span>')
    count = changes.file_count
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><style>{STYLE}</style></head><body>"
        f"<header><h1>{count} file{'s' if count != 1 else ''} changed</h1>{files}</header>"
        f"<pre>{''.join(shown)}</pre></body></html>"
    )


def diff_lines(diff: str) -> list[tuple[str, str]]:
    """(kind, text) for each line worth showing: "file", "hunk", "add", "del", "ctx" or "note".

    This is what stands between the owner and the commit, so nothing may hide in it: lines are
    split on "\n" only (as git does; `splitlines` would also split on form feeds and Unicode
    separators, showing one added line as an added and an unchanged one), header lines are
    dropped only in a file's header (an added line "++ x" is "+++ x" in the diff), control,
    format and bidi characters are shown as escapes, and a file whose text holds a NUL byte is
    named as binary instead of printed.
    """
    out: list[tuple[str, str]] = []
    for section in _sections(diff):
        header, _, body = section.partition("\n@@")
        path = header.split("\n", 1)[0].split(" b/", 1)[-1]
        out.append(("file", visible(path)))
        out.extend(("note", note) for line in header.split("\n")[1:] if (note := _header_note(line)))
        if not body:
            continue
        for line in ("@@" + body).split("\n"):
            kind = {"+": "add", "-": "del", "@": "hunk", " ": "ctx"}.get(line[:1], "note")
            if line:
                out.append((kind, visible(line)))
    return out


def _header_note(line: str) -> str:
    """What a file header says that the hunks do not: a mode (a file made executable, a
    symlink, whose one "line" is where it points), or content git will not show."""
    kind, _, mode = line.rpartition(" ")
    if line.startswith("Binary files"):
        return NOT_SHOWN
    if kind in ("new file mode", "new mode", "old mode", "deleted file mode"):
        what = {"120000": "symlink", "100755": "executable", "160000": "submodule"}.get(mode, "file")
        return f"({kind.replace(' file', '').replace('mode', '').strip()}: {what}, mode {mode})"
    return ""


def _sections(diff: str) -> list[str]:
    parts = diff.split("\ndiff --git ")
    return [p if i == 0 else "diff --git " + p for i, p in enumerate(parts) if p.strip()]


def _clip_line(text: str) -> str:
    return text if len(text) <= MAX_LINE_CHARS else f"{text[:MAX_LINE_CHARS]}… (+{len(text) - MAX_LINE_CHARS} chars)"


def _line(kind: str, text: str) -> str:
    css = {"file": "file", "add": "add", "del": "del", "hunk": "hunk", "note": "more"}.get(kind, "")
    return f'<span class="{css}">{escape(text) or " "}</span>'


async def render_diff(browser: BrowserPool, changes: Changes) -> bytes | None:
    """The picture, or None when even at 1x it is more than WhatsApp takes (the text excerpt
    still goes out)."""
    page = diff_html(changes)
    for scale in (2.0, 1.0):
        png = await browser.screenshot_html(page, width=PHONE_WIDTH, scale=scale)
        if len(png) <= MAX_IMAGE_BYTES:
            return png
    return None


def phone_excerpt(changes: Changes, limit: int = 900) -> str:
    """The diff cut to fit a phone message: file names and hunks, cut at a line."""
    kept: list[str] = []
    size = 0
    lines = diff_lines(changes.diff)
    for kind, text in lines:
        line = f"# {text}" if kind == "file" else text
        if size + len(line) + 1 > limit:
            kept.append("…")
            break
        kept.append(line)
        size += len(line) + 1
    else:
        if changes.diff_cut:
            kept.append(DIFF_CUT)
    return "\n".join(kept)
