"""The files a function's containers need, found and uploaded by content hash: the app's
own code (its module's top-level package, or the lone script, and the modules named by
`add_local_python_source`) mounted read-only at `/root`, and this SDK (with its vendored
cloudpickle) at `/opt/gantry/sdk`. Only blobs the cluster's registry lacks are sent."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import stat
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable, List, Tuple

from . import _http
from .exception import InvalidError

APP_MOUNT = "/root"
SDK_MOUNT = "/opt/gantry/sdk"
#: Files of one function's mounts together (the manifest's bound).
MAX_FILES = 20000
_SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn", ".venv", "venv", "node_modules", ".mypy_cache",
              ".pytest_cache", ".tox"}


class LocalFile:
    def __init__(self, rel: str, path: str):
        self.rel = rel
        self.path = path
        with open(path, "rb") as f:
            self.data = f.read()
        self.digest = "sha256:" + hashlib.sha256(self.data).hexdigest()
        self.executable = bool(os.stat(path).st_mode & stat.S_IXUSR)

    def manifest(self) -> Dict[str, object]:
        return {"path": self.rel, "digest": self.digest, "executable": self.executable}


def _walk(root: str, rel_base: str) -> Iterable[Tuple[str, str]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith((".pyc", ".pyo")) or name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            if os.path.islink(path) and not os.path.exists(path):
                continue
            rel = os.path.relpath(path, root)
            yield (os.path.join(rel_base, rel) if rel_base else rel), path


def module_name_of(module_name: str) -> str:
    """The name a container imports a function's module by: a script run as `__main__`
    is imported by its file's stem."""
    if module_name != "__main__":
        return module_name
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path:
        raise InvalidError(
            "functions defined in an interactive session cannot run remotely: put them in a file"
        )
    return os.path.splitext(os.path.basename(path))[0]


def source_files(module_name: str) -> List[Tuple[str, str]]:
    """(path under /root, local path) for a module: its whole top-level package, or the
    single file of a top-level module."""
    if module_name == "__main__":
        path = os.path.abspath(sys.modules["__main__"].__file__)
        return [(os.path.basename(path), path)]
    top = module_name.split(".")[0]
    mod = sys.modules.get(top)
    if mod is None:
        try:
            mod = importlib.import_module(top)
        except ImportError as e:
            raise InvalidError(f"cannot find module `{top}` to upload: {e}") from None
    paths = getattr(mod, "__path__", None)
    if paths:
        out: List[Tuple[str, str]] = []
        for p in list(paths)[:1]:
            out.extend(_walk(p, top))
        return out
    path = getattr(mod, "__file__", None)
    if not path or not path.endswith(".py"):
        raise InvalidError(f"module `{top}` is not a Python source file ({path}); it cannot be uploaded")
    return [(os.path.basename(path), os.path.abspath(path))]


def sdk_files() -> List[Tuple[str, str]]:
    here = os.path.dirname(os.path.abspath(__file__))
    return list(_walk(here, "gantry"))


def mount(path: str, files: List[Tuple[str, str]]) -> Tuple[Dict[str, object], List[LocalFile]]:
    """A code mount of the manifest, and its files (for the upload)."""
    seen: Dict[str, LocalFile] = {}
    for rel, local in files:
        rel = rel.replace(os.sep, "/")
        if rel not in seen:
            seen[rel] = LocalFile(rel, local)
    ordered = [seen[k] for k in sorted(seen)]
    if len(ordered) > MAX_FILES:
        raise InvalidError(f"{path}: {len(ordered)} files; at most {MAX_FILES} can be mounted")
    return {"path": path, "files": [f.manifest() for f in ordered]}, ordered


def upload(client: "_http.Client", files: Iterable[LocalFile]) -> int:
    """Uploads the files the registry lacks; returns how many were sent."""
    unique = {f.digest: f for f in files}

    def one(f: LocalFile) -> int:
        if client.has_blob(f.digest):
            return 0
        client.upload_blob("gantry-code", f.digest, f.data)
        return 1

    if not unique:
        return 0
    with ThreadPoolExecutor(max_workers=min(8, len(unique))) as pool:
        return sum(pool.map(one, unique.values()))
