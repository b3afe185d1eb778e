"""The errors llmopt raises. Every message says what is wrong and what to do about it.

The CLI maps them to exit codes at the edge (see ``exit_code``); library code only raises.
"""


class LLMOptError(Exception):
    """Base class: something llmopt cannot do, with a message fit to show a user."""

    exit_code = 1


class InputError(LLMOptError):
    """The user's input is wrong: a bad path, an unsupported option, an existing output."""

    exit_code = 2


class ModelNotFoundError(InputError):
    """The model argument names neither a directory nor a built-in model."""


class InvalidModelError(InputError):
    """The path exists but does not hold a loadable model (missing config, corrupt weights...)."""


class UnsupportedError(InputError):
    """A valid request llmopt does not support (a scheme, a group size, an architecture)."""


class OutputError(LLMOptError):
    """The output location cannot be written: it exists, is read-only, or the disk is full."""

    exit_code = 3


class NotYetAvailableError(LLMOptError):
    """A command whose capability has not been built yet."""

    exit_code = 4
