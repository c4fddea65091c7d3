"""The SDK's errors, with Modal's names where Modal has one."""

from __future__ import annotations


class Error(Exception):
    """Base class of every error the SDK raises itself."""


class AuthError(Error):
    """No coordinator is configured, or it refused the token."""


class InvalidError(Error):
    """An argument or a definition that cannot work; the message says what to change."""


class NotFoundError(Error):
    """An app, function, call, volume or secret that does not exist."""


class ConflictError(Error):
    """The cluster refused because of its state (a stopped app, a volume in use)."""


class ExecutionError(Error):
    """The platform could not run the function (its image, its setup, lost containers)."""


class RemoteError(Error):
    """A remote failure that has no local exception type to re-raise as."""


class FunctionTimeoutError(Error):
    """An input ran past its function's `timeout`."""


class InputCancellation(Error):
    """The input's call was cancelled."""


class TimeoutError(Error):  # noqa: A001 (Modal's name)
    """`FunctionCall.get(timeout=…)` passed before the output arrived."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a container, attached as the re-raised
    exception's cause so that Python prints both."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n" + self.text.rstrip()


class ApiError(Error):
    """The coordinator answered with an error status: `status`, `code`, `field`."""

    def __init__(self, status: int, code: str, message: str, field=None):
        where = f" ({field})" if field else ""
        super().__init__(f"{message}{where} [HTTP {status} {code}]")
        self.status = status
        self.code = code
        self.field = field
        self.message = message
