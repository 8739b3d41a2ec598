"""The project's exceptions: each carries a one-line message naming the file, line or field at fault.

The CLI prints `error: <message>` and exits with `exit_code` (2 for bad input, 1 for a runtime
failure); tracebacks are shown only with `--debug`.
"""


class ModelcrewError(Exception):
    """A failure the user can act on; `str(err)` is the whole story in one line."""

    exit_code = 1


class InputError(ModelcrewError):
    """The input is wrong (a file, a record, a field, an argument): fix it and try again."""

    exit_code = 2
