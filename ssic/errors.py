"""The one exception type ssic raises for anything a user can cause."""

from __future__ import annotations


class SSICError(Exception):
    """A user-facing error: bad input, a corrupt artefact, a missing library.

    The message is one line that says what is wrong and, where possible, how to fix it.
    The command line prints it as ``error: <message>`` and exits with status 2.
    """
