"""The one exception type users can cause, and the exit codes the CLI maps it to."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

# Exit codes: 0 ok, 1 verdict FAIL (clip_score), 2 bad input / usage, 3 too many per-sample errors.
EXIT_BAD_INPUT = 2
EXIT_TOO_MANY_ERRORS = 3


class ModelTestError(Exception):
    """A problem the user can fix: the message names the file, line or key and says what to do."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.exit_code = exit_code


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The closest known name to `name`, for 'did you mean' hints (None when nothing is close)."""
    matches = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return matches[0] if matches else None


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> ModelTestError:
    """Error for an unknown registry name that lists the known ones and suggests the closest."""
    choices = sorted(choices)
    hint = closest(name, choices)
    msg = f"unknown {kind} {name!r}"
    if hint:
        msg += f" (did you mean {hint!r}?)"
    msg += f"; available: {', '.join(choices)}"
    return ModelTestError(msg)
