"""Keep hostile text inert and config-named writes inside the output directory.

Model generations, dataset rows and file names from configs are untrusted text. Printed raw
to a terminal, an ANSI/OSC escape sequence in a generation can recolour or clear the screen,
retitle the window, write a hyperlink, or (on some terminals) answer back as if typed;
bidirectional-override characters can make a log line read differently from what it holds.
:func:`strip_control` removes all of these; :class:`SanitizingFilter` applies it to every log
record, and :func:`safe_print` to anything printed.

A method, recipe or report that writes a file whose name comes from a config (a suite name,
a method name, a tag) goes through :func:`safe_child`, which refuses absolute paths, ``..``
and symlinks that would land the write outside the output directory.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from .errors import ConfigError

# ESC-introduced sequences: CSI (ESC [ ... final), OSC/DCS/SOS/PM/APC strings (ESC ] ... BEL
# or ST), and two-character escapes (ESC + one byte). Their 8-bit C1 forms too.
_ESCAPES = re.compile(
    r"""
      (?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]                     # CSI ... final byte
    | (?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f]).*?(?:\x07|\x1b\\|\x9c|$)  # OSC/DCS/SOS/PM/APC ... BEL/ST
    | \x1b[ -/]*[0-~]                                      # other ESC sequences
    """,
    re.VERBOSE | re.DOTALL,
)
# Remaining C0/C1 controls (tab and newline kept), DEL, and Unicode bidi controls.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def strip_control(text: str, *, one_line: bool = False) -> str:
    """``text`` with terminal escape sequences, control and bidi characters removed.

    Printable text, tabs and newlines are kept; with ``one_line`` newlines (and tabs) become
    the visible escapes ``\\n`` / ``\\t`` so one record stays one line.
    """
    text = _CONTROLS.sub("", _ESCAPES.sub("", str(text)))
    if one_line:
        text = text.replace("\r", "").replace("\n", "\\n").replace("\t", "\\t")
    return text


def safe_print(*parts, file=None, **kwargs) -> None:
    """``print`` for untrusted text: every part passes through :func:`strip_control`."""
    print(*(strip_control(str(p)) for p in parts), file=file or sys.stdout, **kwargs)


class SanitizingFilter(logging.Filter):
    """A logging filter that renders each record's message and strips control sequences.

    Attach it to a handler (``handler.addFilter(SanitizingFilter())``); the CLI does so for
    its stderr handler, so a generation logged by any module cannot drive the terminal.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is logged as-is, then cleaned
            msg = str(record.msg)
        record.msg, record.args = strip_control(msg), None
        return True


def install_log_sanitizer(logger: logging.Logger | None = None) -> None:
    """Add a :class:`SanitizingFilter` to every handler of ``logger`` (default: the root)."""
    for h in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, SanitizingFilter) for f in h.filters):
            h.addFilter(SanitizingFilter())


_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._+=@-]+")


def safe_name(text: str, *, max_len: int = 100) -> str:
    """A file-name component from untrusted text: one component, no dots-only, bounded length."""
    name = _UNSAFE_NAME.sub("_", strip_control(str(text))).strip("._") or "_"
    return name[:max_len]


def safe_child(root: str | Path, relative: str | Path, *, field: str | None = None) -> Path:
    """``root / relative``, guaranteed to stay inside ``root`` once symlinks are resolved.

    Raises :class:`ConfigError` (naming ``field``) for an absolute path, a ``..`` that climbs
    out, a NUL byte, or a symlink inside ``root`` pointing elsewhere.
    """
    rel = str(relative)
    if not rel or "\x00" in rel:
        raise ConfigError(f"invalid file name {strip_control(repr(rel))}", field=field)
    if Path(rel).is_absolute() or rel.startswith("~"):
        raise ConfigError(
            f"{strip_control(rel)!r} is an absolute path; only names inside the output directory "
            "are allowed here", field=field,
        )
    base = Path(root).resolve()
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise ConfigError(
            f"{strip_control(rel)!r} would write outside the output directory {base}", field=field
        )
    return target


__all__ = ["SanitizingFilter", "install_log_sanitizer", "safe_child", "safe_name", "safe_print", "strip_control"]
