"""One exception type for every problem a user can fix: the CLI and notebooks show it as one line."""


class HadaError(Exception):
    """A user-facing error (bad path, malformed file, mismatched store).

    The CLI exits 2 with its message; in Jupyter (and so in papermill runs) IPython calls
    ``_render_traceback_`` and shows the message alone instead of a deep traceback.
    """

    def _render_traceback_(self) -> list[str]:
        return [f"HadaError: {self}"]
