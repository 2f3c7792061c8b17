"""Error types that the CLI turns into exit codes (see DESIGN: 2 bad input, 3 engine failure)."""


class ParityError(Exception):
    """Base class for errors parity reports as one line."""

    exit_code = 1


class BadInput(ParityError):
    """Bad input or configuration: one line saying what, where and how to fix; exit 2."""

    exit_code = 2


class EngineFailure(ParityError):
    """An engine crashed or ran out of memory mid-run; exit 3."""

    exit_code = 3
