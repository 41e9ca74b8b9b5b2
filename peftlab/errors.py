"""User-facing errors.

Everything a user can get wrong (recipe keys, data rows, paths, model ids, option combinations)
raises :class:`PeftlabError` with a message that says what is wrong, where, and how to fix it. The CLI
prints the message (no traceback) and exits non-zero.
"""
from __future__ import annotations


class PeftlabError(Exception):
    """An error caused by user input, reported without a traceback."""

    exit_code = 2
