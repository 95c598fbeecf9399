"""The one exception type for bad user input: the CLI prints its message on one line and exits with 2."""


class InputError(ValueError):
    """Bad user input (an option value, a file, a resolution spec). The message names the problem."""
