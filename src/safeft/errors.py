"""User-facing errors: one line, naming the field (or file and line) and what was expected.

The CLI turns every :class:`SafeftError` into ``safeft: error: <message>`` on stderr and
exit code 2, with no traceback.
"""

from __future__ import annotations


class SafeftError(Exception):
    """A problem with the user's input (config, data, model path, flag)."""

    exit_code = 2

    def __init__(self, message: str, *, field: str | None = None):
        self.field = field
        text = f"{field}: {message}" if field else message
        super().__init__(" ".join(text.split()))


class ConfigError(SafeftError):
    """An invalid config value or CLI override."""


class DataError(SafeftError):
    """Unreadable, malformed or empty data."""


class ModelLoadError(SafeftError):
    """A model or tokenizer that cannot be loaded."""
