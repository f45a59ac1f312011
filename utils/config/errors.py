"""The error a user can fix by changing the config or the input (exit code 2, no traceback)."""


class ConfigError(ValueError):
    """A config value or input the launcher cannot use; the message names the key or file and the fix."""
