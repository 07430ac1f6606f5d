"""Text the owner reads on a phone, made so that nothing in it prints as nothing."""

from __future__ import annotations

import unicodedata

# Characters that print as nothing, or as a blank, though they are not a space: a name made of
# one of them, or a payload hidden in a run of them, would not show on a phone.
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cn", "Co", "Cs", "Zl", "Zp", "Zs", "Mn", "Me"})
INVISIBLE = frozenset({0x115F, 0x1160, 0x3164, 0xFFA0, 0x2800, 0x180E, 0x034F})


def visible(text: str) -> str:
    """Control, format (bidi, zero-width), unassigned, combining and blank-looking characters as
    escapes; plain spaces and tabs stay."""
    return "".join(
        f"\\u{ord(c):04x}"
        if c not in " \t" and (ord(c) in INVISIBLE or unicodedata.category(c) in INVISIBLE_CATEGORIES)
        else c
        for c in text
    )


def clip_path(path: str, limit: int = 80) -> str:
    """A path that fits, keeping its end (the file's own name), with the cut marked."""
    return path if len(path) <= limit else "…" + path[-(limit - 1) :]
