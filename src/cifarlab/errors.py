"""Errors meant for the person at the terminal: the message says what went wrong and what to do."""


class UserError(Exception):
    """Bad input (file, config value, argument). The CLI prints it without a traceback."""


class DataError(UserError):
    """A dataset file is missing, corrupt, truncated or in the wrong format."""


class ConfigError(UserError):
    """A recipe or config value is unknown or out of range."""


class RunError(Exception):
    """A run failed for a reason the message explains (not the user's input): the CLI prints it without a
    traceback and exits 1."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C after the command has said what it means and how to go on: the CLI exits 130 without adding its bare
    "interrupted" line."""
