"""How arguments, results and errors travel: pickled with the vendored cloudpickle, so the
client's and the container's Python must share a minor version (the content type says
which). An exception is sent as its type's name, message and traceback, and re-raised
here as that type when it can be found, with the remote traceback as its cause."""

from __future__ import annotations

import base64
import builtins
import importlib
import sys
import traceback
from typing import Any, Dict, Optional

from ._vendor import cloudpickle
from .exception import (
    ExecutionError,
    FunctionTimeoutError,
    InputCancellation,
    InvalidError,
    RemoteError,
    RemoteTraceback,
)

PY = f"{sys.version_info[0]}.{sys.version_info[1]}"
CONTENT_TYPE = f"application/x-gantry-pickle; python={PY}"


def python_of(content_type: str) -> Optional[str]:
    """The Python version a pickled payload was made with."""
    for part in content_type.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key == "python":
            return value
    return None


def dumps(obj: Any) -> bytes:
    try:
        return cloudpickle.dumps(obj)
    except Exception as e:
        raise InvalidError(f"cannot pickle {type(obj).__name__}: {e}") from e


def loads(data: bytes) -> Any:
    return cloudpickle.loads(data)


def payload(obj: Any) -> Dict[str, str]:
    """An API payload (`{"content_type", "base64"}`) holding `obj` pickled."""
    return {"content_type": CONTENT_TYPE, "base64": base64.b64encode(dumps(obj)).decode()}


def payload_bytes(p: Dict[str, str]) -> bytes:
    if "base64" in p:
        return base64.b64decode(p["base64"])
    return p.get("text", "").encode()


def from_payload(p: Dict[str, str]) -> Any:
    """The object an output payload holds: a pickled envelope from the SDK's runtime, or a
    non-Python function's bytes (text for text/*, else bytes)."""
    ct = p.get("content_type", "")
    data = payload_bytes(p)
    if ct.startswith("application/x-gantry-pickle"):
        theirs = python_of(ct)
        if theirs and theirs != PY:
            raise ExecutionError(
                f"the function answered from Python {theirs} but this is Python {PY}; "
                f"pickles only travel between equal minor versions"
            )
        return loads(data)
    if ct.startswith("text/") or ct.startswith("application/json"):
        return data.decode("utf-8", "replace")
    return data


def exception_type_name(exc: BaseException) -> str:
    t = type(exc)
    if t.__module__ == "builtins":
        return t.__qualname__
    return f"{t.__module__}.{t.__qualname__}"


def error_body(exc: BaseException, output: str = "") -> Dict[str, str]:
    """The runtime API's error JSON for `exc`; the input's printed output comes first in
    the traceback, so a caller sees what the function printed before it failed."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {
        "type": exception_type_name(exc)[:256],
        "message": str(exc)[:65536],
        "traceback": (output + tb)[-262144:],
    }


def _find_type(name: str) -> Optional[type]:
    module, _, qual = name.rpartition(".")
    try:
        if not module:
            obj = getattr(builtins, qual)
        else:
            # A class nested in a class: find the longest importable module prefix.
            parts = name.split(".")
            obj = None
            for i in range(len(parts) - 1, 0, -1):
                mod_name = ".".join(parts[:i])
                mod = sys.modules.get(mod_name)
                if mod is None:
                    try:
                        mod = importlib.import_module(mod_name)
                    except Exception:
                        continue
                obj = mod
                for attr in parts[i:]:
                    obj = getattr(obj, attr)
                break
    except AttributeError:
        return None
    if isinstance(obj, type) and issubclass(obj, BaseException):
        return obj
    return None


def exception_of(error: Dict[str, Any]) -> BaseException:
    """The exception to raise for an input's error (`{cause, type, message, traceback}`):
    the function's own type when it can be found here, else `RemoteError`; timeouts,
    cancellations and platform failures as the SDK's own errors."""
    cause = error.get("cause", "user")
    message = error.get("message", "")
    tb = error.get("traceback") or ""
    if cause == "timeout":
        return FunctionTimeoutError(message)
    if cause == "cancelled":
        return InputCancellation(message)
    if cause in ("init", "platform"):
        exc: BaseException = ExecutionError(f"{error.get('type', cause)}: {message}")
    else:
        kind = _find_type(error.get("type", ""))
        exc = RemoteError(f"{error.get('type')}: {message}")
        if kind is not None:
            try:
                exc = kind(message)
            except Exception:
                try:
                    exc = kind.__new__(kind)
                    exc.args = (message,)
                except Exception:
                    pass
    if tb:
        exc.__cause__ = RemoteTraceback(tb)
    return exc
