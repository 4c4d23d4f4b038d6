"""Errors of the diagnostics package; they derive from the gateway's one root."""

from gateway.errors import OutpostError


class DiagnosticsError(OutpostError):
    """A diagnostics request failed. `hint` says what the technician can do about it."""

    def __init__(self, message: str, *, hint: str = "", retriable: bool | None = None) -> None:
        super().__init__(message)
        self.hint = hint
        if retriable is not None:
            self.retriable = retriable
