"""Errors a user can cause. The CLI prints them as one line instead of a traceback."""


class UserError(Exception):
    """A problem with the user's input (path, file, option, checkpoint); exit code 1."""

    exit_code = 1


class ConfigError(UserError):
    """An unknown option, config key or malformed override; exit code 2 like a usage error."""

    exit_code = 2


class Terminated(Exception):
    """The process was told to stop (SIGTERM: a scheduler's time limit, ``kill``); exit code 143.
    Not a UserError: a sweep stops with it rather than going on to its next run."""

    exit_code = 143


def count(n: int, noun: str) -> str:
    """``1 scenario``, ``2 scenarios``: a count for a message to the user."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"
