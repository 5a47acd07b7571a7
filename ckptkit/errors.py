"""The three kinds of failure ckptkit reports, mapped to exit codes by the CLI.

``BadInput`` (exit 2): the checkpoint, the options or the destination are wrong;
the message names the file and the tensor. ``Unsupported`` (exit 2): valid input
that ckptkit does not handle (yet). ``InternalError`` (exit 1): a bug in ckptkit.
"""


class CkptError(Exception):
    exit_code = 1


class BadInput(CkptError):
    exit_code = 2


class Unsupported(CkptError):
    exit_code = 2


class InternalError(CkptError):
    exit_code = 1
