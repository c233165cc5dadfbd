"""The exception saetrain raises for a problem with the user's input.

``python -m saetrain`` prints a :class:`UserError` as one line and exits with status 2; every
other exception is a bug and keeps its traceback (``--debug`` or ``SAETRAIN_DEBUG=1`` shows the
traceback of a user error too). See ``main`` in :mod:`saetrain.cli`.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input (a bad config value or flag, a missing or corrupt file,
    data that cannot be used): the message says what was wrong, the value seen and what to do.

    The CLI prints it as one line and exits 2. It is a ``ValueError``, so callers of the library
    that catch ``ValueError`` keep working.
    """
