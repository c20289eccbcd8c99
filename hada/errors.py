"""One exception type for every problem a user can fix: the CLI prints its message as one line."""


class HadaError(Exception):
    """A user-facing error (bad path, malformed file, mismatched store). The CLI exits 2 with its message."""
