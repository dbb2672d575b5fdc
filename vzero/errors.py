"""The exception types a `vzero` command reports as one message, without a traceback.

- `UserError` (and `vzero.config.ConfigError`): a problem the user can fix (bad config, unusable data, missing model,
  impossible resources, a full disk); exit status 2. The message names the file or field and says what to change.
- `RunStopped`: the training run cannot go on in this process (a learner rank died: its trained weights exist only
  in the last checkpoint); exit status 3. The outputs are consistent up to the last complete checkpoint and the
  message says how to continue (`--resume`).
Anything else is an internal error and keeps its traceback. Knows nothing about the CLI or Ray.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in what the user gave us (the message names the file/field and the fix); CLI exit status 2."""


def causes(exc: BaseException) -> list[BaseException]:
    """`exc`, then its causes and contexts, breadth first, each once; an attribute `cause` counts too (what an actor
    raised, as Ray's `RayTaskError` carries it)."""
    out, todo = [], [exc]
    while todo:
        e = todo.pop(0)
        if e is not None and not any(e is o for o in out):
            out.append(e)
            todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return out


class RunStopped(Exception):
    """The run stopped on a failure it cannot recover from in-process; `--resume` continues it. CLI exit status 3."""


EXIT_USER_ERROR = 2
EXIT_RUN_STOPPED = 3
