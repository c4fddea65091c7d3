"""The decorators that mark a function or method before `@app.function` or `@app.cls`
takes it: `@concurrent`, `@batched`, the web kinds, and a class's `@enter`, `@exit` and
`@method`; and `parameter()` for a class's constructor arguments."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from .exception import InvalidError


class PartialFunction:
    """A function with flags a decorator gave it; decorators stack by merging flags."""

    def __init__(self, raw_f: Callable, flags: Dict[str, Any]):
        self.raw_f = raw_f
        self.flags = flags

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.raw_f(*args, **kwargs)

    def __repr__(self) -> str:
        return f"PartialFunction({getattr(self.raw_f, '__qualname__', self.raw_f)}, {self.flags})"


def _mark(obj: Any, **flags: Any) -> Any:
    if isinstance(obj, PartialFunction):
        clash = set(obj.flags) & set(flags)
        if clash:
            raise InvalidError(f"{obj.raw_f.__qualname__}: {', '.join(sorted(clash))} given twice")
        obj.flags.update(flags)
        return obj
    if isinstance(obj, type):
        # `@concurrent` on a class (under `@app.cls`): kept on the class.
        existing = dict(getattr(obj, "__gantry_flags__", {}))
        existing.update(flags)
        obj.__gantry_flags__ = existing
        return obj
    if not callable(obj):
        raise InvalidError(f"this decorator takes a function, not {obj!r}")
    if getattr(obj, "__gantry_function__", False):
        raise InvalidError(
            f"{obj!r}: put this decorator below @app.function(), not above it"
        )
    return PartialFunction(obj, dict(flags))


def concurrent(_f: Any = None, *, max_inputs: int, target_inputs: Optional[int] = None) -> Callable:
    """Up to `max_inputs` inputs at once per container (threads); the autoscaler aims for
    `target_inputs` (default `max_inputs`)."""
    if not 1 <= max_inputs <= 1000:
        raise InvalidError(f"max_inputs must be 1 to 1000, not {max_inputs}")
    if target_inputs is not None and not 1 <= target_inputs <= max_inputs:
        raise InvalidError(f"target_inputs must be 1 to max_inputs ({max_inputs})")

    def wrap(f: Any) -> Any:
        return _mark(f, concurrent=(max_inputs, target_inputs))

    return wrap if _f is None else wrap(_f)


def batched(_f: Any = None, *, max_batch_size: int, wait_ms: int) -> Callable:
    """The function takes lists and returns a list of the same length: calls with single
    inputs are gathered into batches of up to `max_batch_size`, waiting at most `wait_ms`
    for a batch to fill."""
    if not 1 <= max_batch_size <= 1000:
        raise InvalidError(f"max_batch_size must be 1 to 1000, not {max_batch_size}")
    if not 0 <= wait_ms <= 10 * 60 * 1000:
        raise InvalidError(f"wait_ms must be 0 to 600000, not {wait_ms}")

    def wrap(f: Any) -> Any:
        return _mark(f, batched=(max_batch_size, wait_ms))

    return wrap if _f is None else wrap(_f)


def _web(kind: str, **extra: Any) -> Callable:
    def wrap(f: Any) -> Any:
        return _mark(f, web=dict(kind=kind, **extra))

    return wrap


def fastapi_endpoint(_f: Any = None, *, method: str = "GET", label: Optional[str] = None,
                     docs: bool = False, custom_domains: Any = None,
                     requires_proxy_auth: bool = False) -> Callable:
    """The function as one FastAPI route at the endpoint's root (FastAPI must be in the
    image). Public, like Modal's, unless `requires_proxy_auth=True` (then a Gantry
    submitter token is needed)."""
    w = _web("fastapi", method=method.upper(), label=label, docs=docs,
             public=not requires_proxy_auth)
    return w if _f is None else w(_f)


def web_endpoint(*args: Any, **kwargs: Any) -> Callable:
    return fastapi_endpoint(*args, **kwargs)


def asgi_app(_f: Any = None, *, label: Optional[str] = None, custom_domains: Any = None,
             requires_proxy_auth: bool = False) -> Callable:
    """The function returns an ASGI application, which serves the endpoint."""
    w = _web("asgi", label=label, public=not requires_proxy_auth)
    return w if _f is None else w(_f)


def wsgi_app(_f: Any = None, *, label: Optional[str] = None, custom_domains: Any = None,
             requires_proxy_auth: bool = False) -> Callable:
    """The function returns a WSGI application, which serves the endpoint."""
    w = _web("wsgi", label=label, public=not requires_proxy_auth)
    return w if _f is None else w(_f)


def web_server(port: int, *, startup_timeout: float = 5.0, label: Optional[str] = None,
               custom_domains: Any = None, requires_proxy_auth: bool = False) -> Callable:
    """The function starts an HTTP server on `port` (and returns); the endpoint's requests
    go to that port. Ready once the port accepts a connection."""
    if not 1 <= int(port) <= 65535:
        raise InvalidError(f"web_server: {port} is not a port")
    return _web("server", port=int(port), startup_timeout=startup_timeout, label=label,
                public=not requires_proxy_auth)


def enter(_f: Any = None, *, snap: bool = False) -> Callable:
    """A method run once when a container makes the class's instance, before inputs."""
    w = lambda f: _mark(f, enter=True)  # noqa: E731
    return w if _f is None else w(_f)


def exit(_f: Any = None) -> Callable:  # noqa: A001 (Modal's name)
    """A method run when the container is drained or stopped."""
    w = lambda f: _mark(f, exit=True)  # noqa: E731
    return w if _f is None else w(_f)


def method(_f: Any = None, *, is_generator: Optional[bool] = None) -> Callable:
    """A method callable remotely: `Model().predict.remote(x)`."""
    w = lambda f: _mark(f, method=True)  # noqa: E731
    return w if _f is None else w(_f)


class Parameter:
    """A class attribute that is a constructor argument: `x: int = gantry.parameter()`."""

    def __init__(self, default: Any, init: bool):
        self.default = default
        self.init = init


_MISSING = object()


def parameter(*, default: Any = _MISSING, init: bool = True) -> Any:
    return Parameter(default, init)


def has_default(p: Parameter) -> bool:
    return p.default is not _MISSING
