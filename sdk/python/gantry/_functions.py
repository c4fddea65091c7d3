"""`Function` and `Cls`: what `@app.function` and `@app.cls` return, and what
`Function.from_name` and `Cls.from_name` find. Each is a handle on a deployed function
of an app; calling it sends pickled arguments through the coordinator."""

from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

from . import _http, _invoke
from ._partial import Parameter, PartialFunction, has_default
from .exception import InvalidError, NotFoundError


class _Target:
    """Where calls go: an app's name (once it runs or is looked up) and a function."""

    def __init__(self, app: Any, tag: str, app_name: Optional[str] = None):
        self.app = app
        self.tag = tag
        self.app_name = app_name

    def resolve(self) -> str:
        name = self.app_name or (self.app and self.app._running_name)
        if not name:
            raise InvalidError(
                f"function `{self.tag}` is not deployed: call it under `gantry run`, "
                f"`gantry deploy`, inside `with app.run():`, or look it up with "
                f"Function.from_name"
            )
        return name


class _Invocable:
    """The calling surface shared by functions and a class's methods."""

    _target: _Target
    _generator: bool = False

    def _envelope(self, args: tuple, kwargs: Dict[str, Any]) -> Any:
        return {"a": tuple(args), "k": dict(kwargs)}

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        if self._generator:
            raise InvalidError(f"`{self._target.tag}` is a generator: use .remote_gen()")
        return _invoke.single(self._target.resolve(), self._target.tag, self._envelope(args, kwargs))

    def remote_gen(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """A generator function's items, as it yields them."""
        return _invoke.generator(self._target.resolve(), self._target.tag, self._envelope(args, kwargs))

    def spawn(self, *args: Any, **kwargs: Any) -> _invoke.FunctionCall:
        return _invoke.FunctionCall(
            _invoke.spawn(self._target.resolve(), self._target.tag, self._envelope(args, kwargs))
        )

    def map(self, *input_iterators: Iterable[Any], kwargs: Optional[Dict[str, Any]] = None,
            order_outputs: bool = True, return_exceptions: bool = False,
            wrap_returned_exceptions: bool = True) -> Iterator[Any]:
        if not input_iterators:
            raise InvalidError("map needs at least one iterable of inputs")
        kw = kwargs or {}
        envs = (self._envelope(args, kw) for args in zip(*input_iterators))
        return _invoke.mapped(self._target.resolve(), self._target.tag, envs, order_outputs,
                              return_exceptions)

    def starmap(self, input_iterator: Iterable[tuple], *, kwargs: Optional[Dict[str, Any]] = None,
                order_outputs: bool = True, return_exceptions: bool = False) -> Iterator[Any]:
        kw = kwargs or {}
        envs = (self._envelope(tuple(args), kw) for args in input_iterator)
        return _invoke.mapped(self._target.resolve(), self._target.tag, envs, order_outputs,
                              return_exceptions)

    def for_each(self, *input_iterators: Iterable[Any], kwargs: Optional[Dict[str, Any]] = None,
                 ignore_exceptions: bool = False) -> None:
        for _ in self.map(*input_iterators, kwargs=kwargs, order_outputs=False,
                          return_exceptions=ignore_exceptions):
            pass

    def spawn_map(self, *input_iterators: Iterable[Any], kwargs: Optional[Dict[str, Any]] = None) -> None:
        raise InvalidError("spawn_map is not supported: use map, or spawn per input")


class Function(_Invocable):
    """A function of an app. `f.remote(x)` runs it in the cluster, `f.local(x)` here."""

    def __init__(self, app: Any, tag: str, raw_f: Optional[Callable], options: Dict[str, Any],
                 flags: Dict[str, Any], app_name: Optional[str] = None):
        self._target = _Target(app, tag, app_name)
        self.raw_f = raw_f
        self._options = options
        self._flags = flags
        self._generator = bool(raw_f and inspect.isgeneratorfunction(raw_f))
        self.__gantry_function__ = True
        if raw_f is not None:
            self.__doc__ = raw_f.__doc__
            self.__name__ = getattr(raw_f, "__name__", tag)
            self.__qualname__ = getattr(raw_f, "__qualname__", tag)
            self.__module__ = getattr(raw_f, "__module__", None)

    @property
    def tag(self) -> str:
        return self._target.tag

    def local(self, *args: Any, **kwargs: Any) -> Any:
        if self.raw_f is None:
            raise InvalidError(f"`{self.tag}` was looked up by name: it has no local code")
        return self.raw_f(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.local(*args, **kwargs)

    @staticmethod
    def from_name(app_name: str, name: str, *, environment_name: Optional[str] = None) -> "Function":
        """A deployed app's function (`gantry deploy`); checked now."""
        _require_function(app_name, name)
        return Function(None, name, None, {}, {}, app_name=app_name)

    def hydrate(self) -> "Function":
        return self

    def with_options(self, **options: Any) -> "Function":
        """A variant of this function with other options (gpu, cpu, memory, timeout,
        retries, …): deployed beside it in the app as `TAG--opts-HASH` when first called."""
        return _variant(self, options)

    def get_web_url(self) -> Optional[str]:
        web = self._flags.get("web")
        if not web:
            return None
        from . import _config

        label = web.get("label") or self.tag.replace("_", "-")
        return f"{_config.load().ingress_url}/{self._target.resolve()}/{label}"

    @property
    def web_url(self) -> Optional[str]:
        return self.get_web_url()

    def __repr__(self) -> str:
        return f"Function({self.tag!r})"


def _require_function(app_name: str, name: str) -> None:
    try:
        _, view = _http.client().request("GET", f"/v1/apps/{app_name}")
    except NotFoundError:
        raise NotFoundError(f"app `{app_name}` is not deployed (`gantry apps list`)") from None
    names = {f["name"] for f in view.get("functions", [])}
    if names and name not in names:
        raise NotFoundError(
            f"app `{app_name}` has no function `{name}`; it has: {', '.join(sorted(names))}"
        )


def _variant(fn: Any, options: Dict[str, Any]) -> Any:
    app = fn._target.app
    if app is None:
        raise InvalidError(
            "with_options needs the function's definition (an app in this program); a "
            "function found with from_name has none"
        )
    return app._variant(fn, options)


class _Method(_Invocable):
    """One method of a class's instance, as called remotely."""

    def __init__(self, obj: "Obj", name: str, generator: bool):
        self._obj = obj
        self._name = name
        self._target = obj._cls._target
        self._generator = generator

    def _envelope(self, args: tuple, kwargs: Dict[str, Any]) -> Any:
        return {"m": self._name, "p": self._obj._params, "a": tuple(args), "k": dict(kwargs)}

    def local(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._obj._local(), self._name)(*args, **kwargs)

    def get_web_url(self) -> Optional[str]:
        return None


class Obj:
    """An instance of a remote class with its parameters: its methods are called remotely."""

    def __init__(self, cls: "Cls", params: Dict[str, Any]):
        self._cls = cls
        self._params = params
        self._instance: Any = None

    def _local(self) -> Any:
        if self._instance is None:
            self._instance = self._cls._instantiate(self._params, run_enter=True)
        return self._instance

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        methods = self._cls._methods
        if methods is not None and name not in methods:
            if self._cls._user_cls is not None and hasattr(self._cls._user_cls, name):
                raise AttributeError(f"{name} is not a @method of {self._cls.tag}")
            raise AttributeError(f"{self._cls.tag} has no method {name!r}")
        generator = bool(methods and methods.get(name))
        return _Method(self, name, generator)


class Cls:
    """What `@app.cls` returns: call it with the class's parameters to get an instance
    whose `@method`s run remotely; the container runs `@enter` once per instance."""

    def __init__(self, app: Any, tag: str, user_cls: Optional[type], options: Dict[str, Any],
                 flags: Dict[str, Any], app_name: Optional[str] = None):
        self._target = _Target(app, tag, app_name)
        self._user_cls = user_cls
        self._options = options
        self._flags = flags
        #: method name -> whether it is a generator; None when looked up by name.
        self._methods: Optional[Dict[str, bool]] = None
        self._params: Dict[str, Parameter] = {}
        self._enter: List[str] = []
        self._exit: List[str] = []
        if user_cls is not None:
            self._methods = {}
            for name, value in list(vars(user_cls).items()):
                if isinstance(value, Parameter):
                    self._params[name] = value
                elif isinstance(value, PartialFunction):
                    raw = value.raw_f
                    if value.flags.get("method"):
                        self._methods[name] = inspect.isgeneratorfunction(raw)
                    if value.flags.get("enter"):
                        self._enter.append(name)
                    if value.flags.get("exit"):
                        self._exit.append(name)
                    for k in ("concurrent", "batched", "web"):
                        if k in value.flags:
                            if k == "web":
                                raise InvalidError(
                                    f"{tag}.{name}: web endpoints on classes are not supported; "
                                    f"use a function"
                                )
                            self._flags.setdefault(k, value.flags[k])
                    setattr(user_cls, name, raw)
            if not self._methods:
                raise InvalidError(f"class {tag} has no @method; mark the methods to call remotely")
            self.__doc__ = user_cls.__doc__

    @property
    def tag(self) -> str:
        return self._target.tag

    def __call__(self, *args: Any, **kwargs: Any) -> Obj:
        if args:
            raise InvalidError(f"{self.tag}(...) takes its parameters by keyword")
        if self._user_cls is not None:
            unknown = set(kwargs) - set(self._params)
            if unknown:
                raise InvalidError(
                    f"{self.tag} has no parameter {', '.join(sorted(unknown))}; declare it as "
                    f"`name: type = gantry.parameter()`"
                )
            for name, p in self._params.items():
                if name not in kwargs:
                    if not has_default(p):
                        raise InvalidError(f"{self.tag} needs parameter `{name}`")
                    kwargs[name] = p.default
        return Obj(self, kwargs)

    def _instantiate(self, params: Dict[str, Any], run_enter: bool) -> Any:
        cls = self._user_cls
        if cls is None:
            raise InvalidError(f"{self.tag} was looked up by name: it has no local code")
        obj = cls.__new__(cls)
        for name, p in self._params.items():
            value = params.get(name, p.default)
            setattr(obj, name, value)
        if not self._params and "__init__" in vars(cls):
            obj.__init__()
        if run_enter:
            for name in self._enter:
                getattr(obj, name)()
        return obj

    @staticmethod
    def from_name(app_name: str, name: str, *, environment_name: Optional[str] = None) -> "Cls":
        _require_function(app_name, name)
        return Cls(None, name, None, {}, {}, app_name=app_name)

    def with_options(self, **options: Any) -> "Cls":
        return _variant(self, options)

    def _copy_as(self, tag: str, options: Dict[str, Any]) -> "Cls":
        other = copy.copy(self)
        other._target = _Target(self._target.app, tag, self._target.app_name)
        other._options = options
        return other

    def __repr__(self) -> str:
        return f"Cls({self.tag!r})"
