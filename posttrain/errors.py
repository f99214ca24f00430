"""User-facing errors: one readable message, exit code 2, no traceback."""

from __future__ import annotations

import difflib
import errno


class UserError(Exception):
    """Bad input from the user (recipe, file, flag). The CLI prints `str(err)` and exits with code 2."""

    exit_code = 2


def closest(word: str, choices) -> str | None:
    """The closest valid spelling of `word` among `choices`, or None if nothing is close."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(word: str, choices) -> str:
    """' (did you mean `x`?)' or a list of the valid choices when nothing is close."""
    choices = sorted(choices)
    best = closest(word, choices)
    if best is not None:
        return f" (did you mean `{best}`?)"
    return f" (valid: {', '.join(choices)})"


def describe(err: BaseException, limit: int = 500) -> str:
    """`Type: message` of an exception, cut to `limit` characters (for warnings and worker replies)."""
    try:
        text = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    except Exception:  # a message that cannot be rendered
        text = type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


_STORAGE = {errno.ENOSPC: "no space left on the device", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted", errno.EROFS: "read-only file system",
            errno.EDQUOT: "disk quota exceeded", errno.ENOTDIR: "a part of the path is a file, not a directory"}


def storage_error(err: OSError) -> str | None:
    """A one-line message for a write that failed for a reason the user can fix (full disk, permissions,
    read-only file system, a file where a directory should be), naming the path; None for other errors."""
    cause = _STORAGE.get(err.errno)
    if cause is None:
        return None
    where = err.filename or "a file"
    return f"cannot write `{where}`: {cause}. Free space, fix the permissions or pass another --run-dir; " \
           f"a run stopped by this resumes from its last checkpoint with --resume"

