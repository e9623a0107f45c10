"""The one exception type that the CLI turns into a single line on stderr."""


class MbtrainError(Exception):
    """A problem with the user's input (file, column, flag): reported without a traceback."""
