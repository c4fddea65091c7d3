"""`App`: the functions and classes of one app, turned into the coordinator's manifest
(docs/functions.md) and deployed: images built in the cluster, code uploaded by hash,
secrets and volumes made where asked. `app.run()` deploys an ephemeral copy that is
stopped when the block ends; `app.deploy()` a persistent one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

from . import _code, _http, _image
from ._functions import Cls, Function
from ._image import Image
from ._objects import Secret, Volume, check_exists
from ._partial import PartialFunction
from ._schedule import Schedule, retries_manifest, seconds_text
from .exception import InvalidError

#: Every App made in this process, so the container's runtime finds its function by tag.
_APPS: List["App"] = []

#: Options with no meaning on Gantry: accepted, with a warning.
_IGNORED = ("region", "cloud", "enable_memory_snapshot", "ephemeral_disk", "block_network",
            "proxy", "i6pn", "restrict_modal_access", "network_file_systems",
            "cloud_bucket_mounts", "max_inputs", "allow_concurrent_inputs",
            "experimental_options", "include_source", "serialized", "is_generator",
            "single_use_containers", "nonpreemptible")

#: What starts a Python function's container: the SDK and the app's code on the path,
#: then the runtime (gantry/_container.py). The last argument is the runtime's spec.
BOOT = (
    "import sys;sys.path[:0]=['" + _code.SDK_MOUNT + "','" + _code.APP_MOUNT + "'];"
    "import gantry._container as c;c.main(sys.argv[1])"
)


#: The cores a function reserves unless it says otherwise (Modal's default).
DEFAULT_CPU = "0.125"


def app_name_of(raw: str) -> str:
    """An app name the coordinator takes (a DNS label): lowercase, `_` and other
    characters as `-`."""
    name = re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-")[:63].strip("-")
    if not name:
        raise InvalidError(f"app name {raw!r} has no letters or digits")
    return name


def _warn_ignored(where: str, options: Dict[str, Any]) -> None:
    for key, value in options.items():
        if key in _IGNORED:
            if value not in (None, False, (), [], {}):
                warnings.warn(f"{where}: `{key}` has no meaning on Gantry and is ignored",
                              stacklevel=3)
        else:
            raise TypeError(f"{where}() got an unexpected keyword argument '{key}'")


def _memory_text(memory: Any) -> str:
    if isinstance(memory, tuple):
        memory = memory[1]
    if isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0:
        raise InvalidError(f"memory is in MiB, a positive int; not {memory!r}")
    return f"{memory}M"


def _cpu_text(cpu: Any) -> str:
    if isinstance(cpu, tuple):
        cpu = cpu[1]
    if isinstance(cpu, bool) or not isinstance(cpu, (int, float)) or cpu <= 0:
        raise InvalidError(f"cpu is a number of cores, such as 0.5 or 2; not {cpu!r}")
    return str(cpu)


def _gpu_manifest(gpu: Any) -> Any:
    if gpu is None:
        return None
    choices = gpu if isinstance(gpu, (list, tuple)) else [gpu]
    out = []
    for g in choices:
        if not isinstance(g, str) or not g:
            raise InvalidError(f"gpu is a string like \"H100\" or \"A100:2\", or a list; not {g!r}")
        out.append(g if ":" in g else f"{g}:1")
    return out[0] if len(out) == 1 else out


class App:
    """An app: `app = gantry.App("name")`, then `@app.function()` and `@app.cls()`."""

    def __init__(self, name: Optional[str] = None, *, image: Optional[Image] = None,
                 secrets: Optional[List[Secret]] = None,
                 volumes: Optional[Dict[str, Volume]] = None, include_source: bool = True,
                 tags: Optional[Dict[str, str]] = None) -> None:
        if image is not None and not isinstance(image, Image):
            raise InvalidError(f"image must be a gantry.Image, not {image!r}")
        self._name = name
        self._image = image
        self._secrets = list(secrets or [])
        self._volumes = dict(volumes or {})
        self._objects: Dict[str, Union[Function, Cls]] = {}
        self._entrypoints: Dict[str, Callable] = {}
        self._variants: Dict[str, Tuple[Union[Function, Cls], Dict[str, Any]]] = {}
        self._deployed_variants: set = set()
        #: The deployed app's name while it runs (or once deployed).
        self._running_name: Optional[str] = None
        self._script: Optional[str] = None
        _APPS.append(self)

    @property
    def name(self) -> Optional[str]:
        return self._name

    @property
    def registered_functions(self) -> Dict[str, Function]:
        return {k: v for k, v in self._objects.items() if isinstance(v, Function)}

    @property
    def registered_classes(self) -> Dict[str, Cls]:
        return {k: v for k, v in self._objects.items() if isinstance(v, Cls)}

    @property
    def registered_entrypoints(self) -> Dict[str, Callable]:
        return dict(self._entrypoints)

    # Definitions.

    def function(self, _warn_parentheses_missing: Any = None, *, image: Optional[Image] = None,
                 schedule: Optional[Schedule] = None, env: Optional[Dict[str, str]] = None,
                 secrets: Optional[List[Secret]] = None, gpu: Any = None,
                 volumes: Optional[Dict[str, Volume]] = None, cpu: Any = None,
                 memory: Any = None, min_containers: Optional[int] = None,
                 max_containers: Optional[int] = None, buffer_containers: Optional[int] = None,
                 scaledown_window: Optional[float] = None, retries: Any = None,
                 timeout: Optional[float] = None, startup_timeout: Optional[float] = None,
                 name: Optional[str] = None, **ignored: Any) -> Callable[[Any], Function]:
        if _warn_parentheses_missing is not None:
            raise InvalidError("use @app.function() with parentheses")
        _warn_ignored("app.function", ignored)
        options = dict(image=image, schedule=schedule, env=env, secrets=secrets, gpu=gpu,
                       volumes=volumes, cpu=cpu, memory=memory, min_containers=min_containers,
                       max_containers=max_containers, buffer_containers=buffer_containers,
                       scaledown_window=scaledown_window, retries=retries, timeout=timeout,
                       startup_timeout=startup_timeout)

        def wrap(f: Any) -> Function:
            flags: Dict[str, Any] = {}
            if isinstance(f, PartialFunction):
                flags, f = dict(f.flags), f.raw_f
                if {"enter", "exit", "method"} & set(flags):
                    raise InvalidError(f"{f.__qualname__}: @enter, @exit and @method belong in @app.cls")
            if isinstance(f, (Function, Cls)) or not callable(f):
                raise InvalidError(f"@app.function() takes a plain function, not {f!r}")
            if "<locals>" in getattr(f, "__qualname__", ""):
                raise InvalidError(
                    f"{f.__qualname__}: a function for @app.function must be defined at a "
                    f"module's top level, where its container can import it"
                )
            tag = name or f.__name__
            if flags.get("web") and schedule is not None:
                raise InvalidError(f"{tag}: a web endpoint cannot have a schedule")
            fn = Function(self, tag, f, options, flags)
            self._add(tag, fn)
            return fn

        return wrap

    def cls(self, _warn_parentheses_missing: Any = None, *, image: Optional[Image] = None,
            env: Optional[Dict[str, str]] = None, secrets: Optional[List[Secret]] = None,
            gpu: Any = None, volumes: Optional[Dict[str, Volume]] = None, cpu: Any = None,
            memory: Any = None, min_containers: Optional[int] = None,
            max_containers: Optional[int] = None, buffer_containers: Optional[int] = None,
            scaledown_window: Optional[float] = None, retries: Any = None,
            timeout: Optional[float] = None, startup_timeout: Optional[float] = None,
            name: Optional[str] = None, **ignored: Any) -> Callable[[type], Cls]:
        if _warn_parentheses_missing is not None:
            raise InvalidError("use @app.cls() with parentheses")
        _warn_ignored("app.cls", ignored)
        options = dict(image=image, env=env, secrets=secrets, gpu=gpu, volumes=volumes, cpu=cpu,
                       memory=memory, min_containers=min_containers,
                       max_containers=max_containers, buffer_containers=buffer_containers,
                       scaledown_window=scaledown_window, retries=retries, timeout=timeout,
                       startup_timeout=startup_timeout, schedule=None)

        def wrap(user_cls: type) -> Cls:
            if not isinstance(user_cls, type):
                raise InvalidError(f"@app.cls() takes a class, not {user_cls!r}")
            flags = dict(getattr(user_cls, "__gantry_flags__", {}))
            tag = name or user_cls.__name__
            c = Cls(self, tag, user_cls, options, flags)
            self._add(tag, c)
            return c

        return wrap

    def local_entrypoint(self, _warn_parentheses_missing: Any = None, *,
                         name: Optional[str] = None) -> Callable[[Callable], Callable]:
        if _warn_parentheses_missing is not None:
            raise InvalidError("use @app.local_entrypoint() with parentheses")

        def wrap(f: Callable) -> Callable:
            self._entrypoints[name or f.__name__] = f
            return f

        return wrap

    def include(self, other: "App") -> "App":
        for tag, obj in other._objects.items():
            self._add(tag, obj)
        return self

    def _add(self, tag: str, obj: Union[Function, Cls]) -> None:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_-]{0,62}$", tag):
            raise InvalidError(f"`{tag}`: a function's name is letters, digits, _ and -")
        if tag in self._objects and self._objects[tag] is not obj:
            raise InvalidError(f"app has two functions named `{tag}`; pass name= to one")
        self._objects[tag] = obj

    def _variant(self, obj: Union[Function, Cls], options: Dict[str, Any]) -> Union[Function, Cls]:
        base_tag = obj._target.tag
        key = hashlib.sha256(json.dumps(
            {k: repr(v) for k, v in sorted(options.items())}).encode()).hexdigest()[:8]
        tag = f"{base_tag}--{key}"
        merged = dict(obj._options)
        merged.update(options)
        if isinstance(obj, Cls):
            variant: Union[Function, Cls] = obj._copy_as(tag, merged)
        else:
            variant = Function(self, tag, obj.raw_f, merged, obj._flags)
        self._variants[tag] = (variant, {"object": base_tag})
        if self._running_name and tag not in self._deployed_variants:
            self._deploy_as(self._running_name)
        return variant

    # Deploying.

    def _default_name(self) -> str:
        if self._name:
            return app_name_of(self._name)
        if self._script:
            return app_name_of(os.path.splitext(os.path.basename(self._script))[0])
        for obj in self._objects.values():
            mod = _module_of(obj)
            return app_name_of(_code.module_name_of(mod).split(".")[-1])
        raise InvalidError("the app has no name and no functions")

    def _deploy_as(self, app_name: str,
                   log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
        client = _http.client()
        manifest = self._manifest(client, app_name, log)
        _, view = client.request("POST", f"/v1/apps/{app_name}/deployments", manifest)
        self._deployed_variants = set(self._variants)
        self._running_name = app_name
        return view

    def _manifest(self, client: "_http.Client", app_name: str,
                  log: Optional[Callable[[str], None]]) -> Dict[str, Any]:
        objects: List[Tuple[str, Union[Function, Cls], str]] = [
            (tag, obj, tag) for tag, obj in self._objects.items()
        ]
        objects += [(tag, obj, extra["object"]) for tag, (obj, extra) in self._variants.items()]
        if not objects:
            raise InvalidError("the app has no functions: decorate one with @app.function()")
        # The code every container gets: the app's modules and the SDK.
        app_files: List[Tuple[str, str]] = []
        images: Dict[int, Tuple[Image, str]] = {}
        for _, obj, _ in objects:
            app_files += _code.source_files(_module_of(obj))
            image = obj._options.get("image") or self._image
            if image is None:
                image = _default_image()
            for source in image._python_sources:
                app_files += _code.source_files(source)
            if image.python_version and image.python_version != _image.local_python():
                raise InvalidError(
                    f"`{obj._target.tag}`'s image has Python {image.python_version} but this is "
                    f"Python {_image.local_python()}: arguments and results are pickled, which "
                    f"needs equal minor versions; use Image.debian_slim() (the local version) "
                    f"or deploy from Python {image.python_version}")
            if id(image) not in images:
                images[id(image)] = (image, "")
        root_mount, root_local = _code.mount(_code.APP_MOUNT, app_files)
        sdk_mount, sdk_local = _code.mount(_code.SDK_MOUNT, _code.sdk_files())
        sent = _code.upload(client, root_local + sdk_local)
        if log:
            log(f"code: {len(root_local)} files of the app, {len(sdk_local)} of the SDK "
                f"({sent} uploaded)")
        for key, (image, _) in list(images.items()):
            images[key] = (image, image.build(client, log))
        secrets_made: set = set()
        functions: Dict[str, Any] = {}
        for tag, obj, object_tag in objects:
            o = obj._options
            image = o.get("image") or self._image or _default_image()
            ref = images[id(image)][1]
            secrets = list(self._secrets) + list(o.get("secrets") or [])
            for s in secrets:
                if s.name not in secrets_made:
                    s._ensure(client)
                    secrets_made.add(s.name)
            volumes = dict(self._volumes)
            volumes.update(o.get("volumes") or {})
            for v in volumes.values():
                if not isinstance(v, Volume):
                    raise InvalidError(f"{tag}: volumes map paths to gantry.Volume, not {v!r}")
                if v._create:
                    v._ensure(client)
                else:
                    check_exists(client, v)
            functions[tag] = self._function_manifest(
                obj, object_tag, ref, secrets, volumes, [root_mount, sdk_mount])
        return {"app": app_name, "functions": functions}

    def _function_manifest(self, obj: Union[Function, Cls], object_tag: str, image_ref: str,
                           secrets: List[Secret], volumes: Dict[str, Volume],
                           mounts: List[Dict[str, Any]]) -> Dict[str, Any]:
        o = obj._options
        flags = obj._flags
        module = _code.module_name_of(_module_of(obj))
        spec: Dict[str, Any] = {
            "module": module,
            "object": object_tag,
            "python": _image.local_python(),
        }
        m: Dict[str, Any] = {
            "image": image_ref,
            "command": ["python3", "-u", "-c", BOOT, json.dumps(spec, separators=(",", ":"))],
        }
        env = dict(o.get("env") or {})
        if env:
            m["env"] = {str(k): str(v) for k, v in env.items()}
        # Modal reserves 0.125 cores unless told more; so does a function here, so that
        # idle warm containers do not hold whole cores.
        m["cpu"] = _cpu_text(o["cpu"]) if o.get("cpu") is not None else DEFAULT_CPU
        if o.get("memory") is not None:
            m["memory"] = _memory_text(o["memory"])
        gpu = _gpu_manifest(o.get("gpu"))
        if gpu is not None:
            m["gpu"] = gpu
        if o.get("timeout") is not None:
            m["timeout"] = seconds_text(o["timeout"])
        if o.get("startup_timeout") is not None:
            m["startup_timeout"] = seconds_text(o["startup_timeout"])
        if o.get("retries") is not None:
            m["retries"] = retries_manifest(o["retries"])
        for k in ("min_containers", "max_containers", "buffer_containers"):
            if o.get(k) is not None:
                m[k] = int(o[k])
        if o.get("scaledown_window") is not None:
            m["scaledown_window"] = seconds_text(max(2, o["scaledown_window"]))
        max_inputs, target = 1, None
        if "concurrent" in flags:
            max_inputs, target = flags["concurrent"]
        if "batched" in flags:
            max_inputs = max(max_inputs, flags["batched"][0])
        web = flags.get("web")
        if web:
            label = web.get("label") or obj._target.tag.replace("_", "-")
            w: Dict[str, Any] = {"public": bool(web.get("public")), "label": label.lower()}
            if web["kind"] == "server":
                w.update(via="port", port=web["port"])
                if o.get("startup_timeout") is None:
                    m["startup_timeout"] = seconds_text(max(1, round(web["startup_timeout"] + 25)))
            else:
                w["via"] = "runtime_api"
            # A web container serves `max_inputs` requests at once (1 unless @concurrent).
            w["max_concurrency"] = max_inputs
            w["target_concurrency"] = target or max_inputs
            m["web"] = w
        else:
            m["max_inputs"] = max_inputs
            if target is not None:
                m["target_inputs"] = target
        if o.get("schedule") is not None:
            m["schedule"] = o["schedule"].manifest()
        if secrets:
            m["secrets"] = [s.name for s in secrets]
        if volumes:
            m["volumes"] = {path: v.name for path, v in volumes.items()}
        m["mounts"] = mounts
        return m

    def deploy(self, *, name: Optional[str] = None, log: Optional[Callable[[str], None]] = None) -> "App":
        """Deploys the app under `name` (default: its own) as a new version."""
        view = self._deploy_as(app_name_of(name) if name else self._default_name(), log=log)
        if log:
            log(f"deployed {view['app']} version {view['version']}")
        return self

    @contextlib.contextmanager
    def run(self, *, name: Optional[str] = None, log: Optional[Callable[[str], None]] = None,
            show_progress: Optional[bool] = None, detach: bool = False,
            interactive: bool = False) -> Iterator["App"]:
        """Deploys an ephemeral copy of the app (`NAME-run-XXXXXX`) for the block; stops it
        when the block ends."""
        base = app_name_of(name) if name else self._default_name()
        ephemeral = f"{base[:51].rstrip('-')}-run-{os.urandom(3).hex()}"
        self._deploy_as(ephemeral, log=log)
        try:
            yield self
        finally:
            try:
                _http.client().request("POST", f"/v1/apps/{ephemeral}/stop")
            except Exception as e:  # the block's own error matters more
                print(f"gantry: could not stop ephemeral app {ephemeral}: {e}", file=sys.stderr)
            self._running_name = None

    def __repr__(self) -> str:
        return f"App({self._name!r})"


def _module_of(obj: Union[Function, Cls]) -> str:
    if isinstance(obj, Function):
        return obj.raw_f.__module__ if obj.raw_f else "__main__"
    return obj._user_cls.__module__ if obj._user_cls else "__main__"


_DEFAULT_IMAGE: Optional[Image] = None


def _default_image() -> Image:
    global _DEFAULT_IMAGE
    if _DEFAULT_IMAGE is None:
        _DEFAULT_IMAGE = Image.debian_slim()
    return _DEFAULT_IMAGE


def find(tag: str) -> Union[Function, Cls]:
    """The function or class `tag` of the apps made in this process (the container's
    runtime looks its function up so)."""
    for app in _APPS:
        if tag in app._objects:
            return app._objects[tag]
    known = sorted({t for a in _APPS for t in a._objects})
    raise InvalidError(f"no function `{tag}` in the app's module; it defines: {', '.join(known) or 'none'}")
