"""vimbench's two exception types: bad user input, and a backend that cannot run here."""


class InputError(ValueError):
    """Bad user input (an option value, a file, a resolution spec). The message names the problem."""


class BackendUnavailable(RuntimeError):
    """A requested scan or attention backend cannot run here; the message says why."""
