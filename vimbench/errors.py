"""vimbench's exception types: bad user input, a backend that cannot run here, and a sweep stopped by Ctrl-C."""


class InputError(ValueError):
    """Bad user input (an option value, a file, a resolution spec). The message names the problem."""


class BackendUnavailable(RuntimeError):
    """A requested scan or attention backend cannot run here; the message says why."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep; the message says where the rows written so far are kept."""
