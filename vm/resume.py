"""A run cut short by a crash, continued once at the next boot: what the owner and Claude are told.

The worker decides at boot (`Worker._recover`): a run its state file still calls `running` was
cut short with its end never reported (a kill, running out of memory, a host migration, a
deploy), and the owner did not cancel it (that run would be `cancelling`). It is continued once,
in the same Claude session. Claude Code writes its transcript as the turn goes, but whatever it
had not written when the process died is lost, so the message restates the owner's request
whole instead of saying "go on", and asks Claude to look at the checkout before trusting its
memory of it: files may be half written, and the commands it had running were ended.
"""

from __future__ import annotations

NOTICE = "♻️ The VM restarted; continuing your run"

# Today's report of a run cut short (a cancel, or the second time), and the second time's.
FAILED = "the VM restarted during the run"
FAILED_AGAIN = "the VM restarted during the run again (it had already continued it once)"


def restate(asked: str, *, attached: bool = False) -> str:
    """The message that continues the session: why, what to check, and the request itself (the
    owner's text with any attachments named where they are in the checkout)."""
    files = " The attached files are still where the request says; open an image to see it again." if attached else ""
    return (
        "The machine running this session restarted while you were working on the request below, "
        "and your work on it was cut off. What you did last may be missing from this conversation, "
        "and any command you had running was stopped.\n\n"
        "Before going on, check the checkout (git status, git diff, and the files you were changing) "
        f"to see what is already done and what is not, then finish the request.{files}\n\n"
        f"The request, as the owner sent it:\n\n{asked}"
    )
