"""One exception type for bad input: the CLI prints its message on one line, no traceback."""


class GptlabError(Exception):
    """A user-facing error: bad input, corrupt files, mismatched components. Message is one line."""
