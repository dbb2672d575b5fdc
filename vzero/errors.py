"""The one exception type for problems the user can fix: bad config, unusable data, missing model, impossible resources.

`vzero` commands turn a `UserError` (and `vzero.config.ConfigError`) into one message on stderr and exit status 2,
without a traceback: the message must name the file or field and say what to change. Anything else is an internal
error and keeps its traceback. Knows nothing about the CLI or Ray.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in what the user gave us (the message names the file/field and the fix); CLI exit status 2."""


EXIT_USER_ERROR = 2
