"""Data: loading (hub, local files, built-in readers), chat formatting, collation."""

from .formatting import Collator, detect_format, tokenize_rows
from .loaders import load_rows

__all__ = ["Collator", "detect_format", "load_rows", "tokenize_rows"]
