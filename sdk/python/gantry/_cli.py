"""`gantry run|deploy|serve FILE.py`: the Rust CLI hands these to `python -m gantry`.

- `run FILE.py[::NAME] [ARGS…]`: deploys an ephemeral copy of the app, runs a local
  entrypoint (its parameters become `--options`) or calls a function, then stops the app.
- `deploy FILE.py [--name NAME]`: a persistent deployment (a new version).
- `serve FILE.py`: an ephemeral deployment, deployed again whenever a file of the app
  changes, until Ctrl-C."""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import _app, _code, _http
from ._invoke import enable_output
from ._functions import Cls, Function
from .exception import Error, InvalidError

USAGE = """usage: gantry run FILE.py[::NAME] [ARGS...]
       gantry deploy FILE.py [--name NAME]
       gantry serve FILE.py [--name NAME]"""


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _import_file(path: str) -> Tuple[Any, str]:
    """Imports FILE.py by its module name: a file in a package (directories with
    `__init__.py`) by its dotted name from the package's root, else by its stem."""
    path = os.path.abspath(path)
    if not path.endswith(".py") or not os.path.isfile(path):
        raise InvalidError(f"{path} is not a Python file")
    parts = [os.path.splitext(os.path.basename(path))[0]]
    root = os.path.dirname(path)
    while os.path.isfile(os.path.join(root, "__init__.py")):
        parts.insert(0, os.path.basename(root))
        root = os.path.dirname(root)
    name = ".".join(parts)
    sys.path.insert(0, root)
    return importlib.import_module(name), name


def load(ref: str) -> Tuple[_app.App, Optional[str], str]:
    path, _, name = ref.partition("::")
    module, _ = _import_file(path)
    apps = [v for v in vars(module).values() if isinstance(v, _app.App)]
    if name and "." in name:
        # `::app.NAME` names the App; `::Class.method` a class's method.
        app_var, _, rest = name.partition(".")
        chosen = getattr(module, app_var, None)
        if isinstance(chosen, _app.App):
            apps, name = [chosen], rest
        elif not isinstance(chosen, Cls):
            raise InvalidError(f"{path} has no App or class named `{app_var}`")
    if not apps:
        raise InvalidError(f"{path} defines no gantry.App (`app = gantry.App(...)`)")
    if len(apps) > 1:
        by_name = [a for a in apps if a is getattr(module, "app", None)]
        apps = by_name or apps[:1]
    app = apps[0]
    app._script = path
    return app, name or None, path


def _arg_parser(prog: str, f: Callable) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False)
    for p in inspect.signature(f).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name == "self":
            continue
        flag = "--" + p.name.replace("_", "-")
        ann = p.annotation
        if isinstance(ann, str):
            ann = {"int": int, "float": float, "str": str, "bool": bool}.get(ann, str)
        required = p.default is inspect.Parameter.empty
        if ann is bool:
            parser.add_argument(flag, dest=p.name, action=argparse.BooleanOptionalAction,
                                default=None if required else p.default, required=required)
        else:
            kind = ann if ann in (int, float, str) else str
            parser.add_argument(flag, dest=p.name, type=kind, required=required,
                                default=None if required else p.default)
    return parser


def _choose(app: _app.App, name: Optional[str]) -> Tuple[str, Any]:
    entrypoints = app.registered_entrypoints
    objects = app._objects
    if name:
        if name in entrypoints:
            return "entrypoint", entrypoints[name]
        if name in objects:
            return "function", objects[name]
        cls_tag, _, method = name.partition(".")
        obj = objects.get(cls_tag)
        if isinstance(obj, Cls) and method:
            if method not in (obj._methods or {}):
                raise InvalidError(f"`{cls_tag}` has no @method `{method}`; it has: "
                                   f"{', '.join(sorted(obj._methods or {}))}")
            return "method", (obj, method)
        choices = sorted(set(entrypoints) | set(objects))
        raise InvalidError(f"no local entrypoint or function `{name}`; choose one of: {', '.join(choices)}")
    if len(entrypoints) == 1:
        return "entrypoint", next(iter(entrypoints.values()))
    if not entrypoints and len(objects) == 1:
        return "function", next(iter(objects.values()))
    choices = sorted(set(entrypoints) | set(objects))
    raise InvalidError(f"name what to run: FILE.py::NAME, one of: {', '.join(choices)}")


def cmd_run(argv: List[str]) -> int:
    with enable_output():
        return _run(argv)


def _run(argv: List[str]) -> int:
    pre = argparse.ArgumentParser(prog="gantry run", usage="gantry run [-q] FILE.py[::NAME] [ARGS...]",
                                  allow_abbrev=False)
    pre.add_argument("-q", "--quiet", action="store_true")
    pre.add_argument("ref")
    opts, rest = pre.parse_known_args(argv)
    app, name, _ = load(opts.ref)
    kind, target = _choose(app, name)
    log = None if opts.quiet else _log
    if kind == "entrypoint":
        args = vars(_arg_parser(f"gantry run {opts.ref}", target).parse_args(rest))
        with app.run(log=log):
            result = target(**args)
            if inspect.iscoroutine(result):
                import asyncio

                asyncio.run(result)
        return 0
    if kind == "method":
        # `::Class.method`: the class with its parameters' defaults, the method's options.
        cls, method = target
        args = vars(_arg_parser(f"gantry run {opts.ref}",
                                getattr(cls._user_cls, method)).parse_args(rest))
        with app.run(log=log):
            _call_and_print(getattr(cls(), method), args)
        return 0
    if isinstance(target, Cls):
        raise InvalidError(f"`{target.tag}` is a class: run FILE.py::{target.tag}.METHOD, "
                           f"or a local entrypoint that calls it")
    args = vars(_arg_parser(f"gantry run {opts.ref}", target.raw_f).parse_args(rest))
    with app.run(log=log):
        _call_and_print(target, args)
    return 0


def _call_and_print(target: Any, args: Dict[str, Any]) -> None:
    """Calls a function or method remotely and prints what it returns (or yields)."""
    if target._generator:
        for item in target.remote_gen(**args):
            print(item)
        return
    result = target.remote(**args)
    if result is not None:
        print(result)


def _print_urls(app: _app.App) -> None:
    for tag, obj in app._objects.items():
        if isinstance(obj, Function) and obj._flags.get("web"):
            print(f"{tag}: {obj.get_web_url()}")


def cmd_deploy(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="gantry deploy", usage="gantry deploy FILE.py [--name NAME]")
    p.add_argument("ref")
    p.add_argument("--name")
    p.add_argument("-q", "--quiet", action="store_true")
    opts = p.parse_args(argv)
    app, _, _ = load(opts.ref)
    app.deploy(name=opts.name, log=None if opts.quiet else _log)
    _print_urls(app)
    return 0


def _mtimes(paths: List[str]) -> Dict[str, float]:
    out = {}
    for p in paths:
        try:
            out[p] = os.stat(p).st_mtime
        except OSError:
            out[p] = -1.0
    return out


def cmd_serve(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="gantry serve", usage="gantry serve FILE.py [--name NAME]")
    p.add_argument("ref")
    p.add_argument("--name")
    p.add_argument("--timeout", type=float, default=None,
                   help="stop after this many seconds (default: at Ctrl-C)")
    opts = p.parse_args(argv)
    app, _, path = load(opts.ref)
    base = _app.app_name_of(opts.name) if opts.name else app._default_name()
    ephemeral = f"{base[:49].rstrip('-')}-serve-{os.urandom(3).hex()}"
    files = sorted({local for obj in app._objects.values()
                    for _, local in _code.source_files(_app._module_of(obj))} | {path})

    def deploy() -> None:
        # A fresh interpreter each time, so the changed files are what gets imported.
        subprocess.run([sys.executable, "-m", "gantry", "deploy", path, "--name", ephemeral],
                       check=False)

    deploy()
    seen = _mtimes(files)
    end = None if opts.timeout is None else time.monotonic() + opts.timeout
    _log(f"serving {ephemeral}; watching {len(files)} files (Ctrl-C stops)")
    try:
        while end is None or time.monotonic() < end:
            time.sleep(0.5)
            now = _mtimes(files)
            if now != seen:
                seen = now
                _log("files changed; deploying again")
                deploy()
    except KeyboardInterrupt:
        pass
    finally:
        try:
            _http.client().request("POST", f"/v1/apps/{ephemeral}/stop")
            _log(f"stopped {ephemeral}")
        except Exception as e:
            _log(f"could not stop {ephemeral}: {e}")
    return 0


def main(argv: List[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    commands = {"run": cmd_run, "deploy": cmd_deploy, "serve": cmd_serve}
    cmd = commands.get(argv[0])
    if cmd is None:
        print(f"gantry: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return cmd(argv[1:])
    except Error as e:
        if os.environ.get("GANTRY_DEBUG"):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        return 1
