"""`Image`: a recipe (shared/src/recipes.rs) written in Python, built in the cluster by
`POST /v1/images/builds` into its registry. Each method returns a new image with one more
step; steps already built are taken from the registry's cache."""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
from typing import Any, Dict, List, Optional, Sequence

from . import _http
from .exception import ExecutionError, InvalidError

#: The Python versions `debian_slim` offers (the Debian release that ships each).
DEBIAN_PYTHONS = {"3.11": "bookworm", "3.13": "trixie"}


def local_python() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def _flatten(items: Sequence[Any]) -> List[str]:
    out: List[str] = []
    for item in items:
        if isinstance(item, (list, tuple)):
            out.extend(_flatten(item))
        elif item is not None:
            out.append(str(item))
    return out


class Image:
    """An image recipe. Build with `gantry run`/`gantry deploy` (or `image.build()`)."""

    def __init__(self, base: Dict[str, str], steps: List[Dict[str, Any]],
                 python: Optional[str], python_sources: List[str]):
        self._base = base
        self._steps = steps
        #: The image's Python minor version where the recipe says it (debian_slim).
        self.python_version = python
        self._python_sources = python_sources
        self._built: Optional[str] = None

    def _with(self, step: Optional[Dict[str, Any]] = None, sources: Sequence[str] = ()) -> "Image":
        steps = self._steps + ([step] if step else [])
        return Image(self._base, steps, self.python_version, self._python_sources + list(sources))

    # Bases.

    @staticmethod
    def debian_slim(python_version: Optional[str] = None, force_build: bool = False) -> "Image":
        version = python_version or local_python()
        if version not in DEBIAN_PYTHONS:
            offered = ", ".join(f"{v} ({r})" for v, r in DEBIAN_PYTHONS.items())
            raise InvalidError(
                f"debian_slim offers Python {offered}, not {version}; pass one of those, or use "
                f"Image.from_registry with an image that has Python {version}"
            )
        return Image({"debian_slim": version}, [], version, [])

    @staticmethod
    def from_registry(tag: str, *, add_python: Optional[str] = None, setup_dockerfile_commands=(),
                      secret=None, force_build: bool = False) -> "Image":
        if setup_dockerfile_commands:
            raise InvalidError(
                "from_registry(setup_dockerfile_commands=…) is not supported: use run_commands"
            )
        if add_python:
            raise InvalidError(
                "from_registry(add_python=…) is not supported: use an image with python3 in it"
            )
        if not isinstance(tag, str) or not tag or " " in tag:
            raise InvalidError(f"from_registry needs an image reference, not {tag!r}")
        return Image({"image": tag}, [], None, [])

    # Steps.

    def apt_install(self, *packages: Any, force_build: bool = False, secrets=(), gpu=None) -> "Image":
        pkgs = _flatten(packages)
        return self._with({"apt_install": pkgs}) if pkgs else self

    def pip_install(self, *packages: Any, index_url: Optional[str] = None,
                    extra_index_url: Optional[str] = None, find_links: Optional[str] = None,
                    pre: bool = False, extra_options: str = "", force_build: bool = False,
                    secrets=(), gpu=None) -> "Image":
        pkgs = _flatten(packages)
        if extra_index_url or find_links or pre or extra_options:
            raise InvalidError(
                "pip_install takes packages and index_url here; use run_commands(\"pip install …\") "
                "for other pip options"
            )
        if not pkgs:
            return self
        step: Any = pkgs if index_url is None else {"packages": pkgs, "index_url": index_url}
        return self._with({"pip_install": step})

    def uv_pip_install(self, *packages: Any, **kw: Any) -> "Image":
        return self.pip_install(*packages, **kw)

    def run_commands(self, *commands: Any, secrets=(), gpu=None, force_build: bool = False) -> "Image":
        cmds = _flatten(commands)
        return self._with({"run_commands": cmds}) if cmds else self

    def env(self, vars: Dict[str, str]) -> "Image":
        return self._with({"env": {str(k): str(v) for k, v in vars.items()}})

    def workdir(self, path: str) -> "Image":
        return self._with({"workdir": str(path)})

    def entrypoint(self, entrypoint_commands: List[str]) -> "Image":
        return self._with({"entrypoint": list(entrypoint_commands)})

    def cmd(self, cmd: List[str]) -> "Image":
        return self._with({"cmd": list(cmd)})

    def add_local_file(self, local_path: Any, remote_path: str, *, copy: bool = False) -> "Image":
        # Checked when the image is built: a container imports this module too, where the
        # local file is not.
        local = os.path.abspath(os.fspath(local_path))
        if remote_path.endswith("/"):
            remote_path += os.path.basename(local)
        return self._with({"add_local_file": {"local": local, "remote": remote_path}})

    def add_local_dir(self, local_path: Any, remote_path: str, *, copy: bool = False,
                      ignore: Any = ()) -> "Image":
        local = os.path.abspath(os.fspath(local_path))
        return self._with({"add_local_dir": {"local": local, "remote": remote_path}})

    def add_local_python_source(self, *modules: str, copy: bool = False, ignore: Any = ()) -> "Image":
        """Local Python packages or modules (by import name), mounted read-only under `/root`
        with the app's own code when a container starts."""
        for m in modules:
            if not isinstance(m, str) or not m:
                raise InvalidError(f"add_local_python_source takes module names, not {m!r}")
        return self._with(None, modules)

    # Building.

    def _recipe(self, client: "_http.Client") -> Dict[str, Any]:
        steps = []
        for step in self._steps:
            kind = next(iter(step))
            if kind in ("add_local_file", "add_local_dir"):
                spec = dict(step[kind])
                want = os.path.isfile if kind == "add_local_file" else os.path.isdir
                if not want(spec["local"]):
                    what = "file" if kind == "add_local_file" else "directory"
                    raise InvalidError(f"{kind}: {spec['local']} is not a {what}")
                data = _archive(spec["local"], spec["remote"])
                digest = "sha256:" + hashlib.sha256(data).hexdigest()
                if not client.has_blob(digest):
                    client.upload_blob("gantry-build-uploads", digest, data)
                spec["digest"] = digest
                step = {kind: spec}
            steps.append(step)
        return {"base": self._base, "steps": steps}

    def build(self, client: Optional["_http.Client"] = None, log=None) -> str:
        """Builds the image in the cluster (once per process) and returns its reference.
        `log(line)` gets the progress; nothing is printed without it."""
        if self._built:
            return self._built
        client = client or _http.client()
        recipe = self._recipe(client)
        for event in client.json_lines("POST", "/v1/images/builds", {"recipe": recipe}):
            kind = event.get("type")
            if kind == "step" and log:
                how = "cached" if event.get("cached") else (
                    f"building on {event['node']}" if event.get("node") else "building")
                log(f"[{event['index']}/{event['total']}] {event['summary']}: {how}")
            elif kind == "log" and log:
                log("    " + event.get("line", ""))
            elif kind == "done":
                self._built = event["image"]
                return self._built
            elif kind == "failed":
                at = f" at step {event['step']}" if event.get("step") is not None else ""
                code = f" (exit code {event['exit_code']})" if event.get("exit_code") is not None else ""
                raise ExecutionError(f"the image build failed{at}{code}: {event.get('message')}")
        raise ExecutionError("the image build ended without a result; see the coordinator's log")

    def __repr__(self) -> str:
        return f"Image(base={self._base}, steps={len(self._steps)})"


def _archive(local: str, remote: str) -> bytes:
    """`local` (a file, or a directory and everything in it) as a tar placed at `remote`,
    byte for byte the same for the same content: sorted, no times, no owners."""
    remote = remote.strip("/")
    buf = io.BytesIO()

    def info(name: str, path: str) -> tarfile.TarInfo:
        st = os.lstat(path)
        ti = tarfile.TarInfo(name)
        ti.mode = st.st_mode & 0o7777
        ti.mtime = 0
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        return ti

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(path: str, name: str) -> None:
            ti = info(name, path)
            if os.path.islink(path):
                ti.type = tarfile.SYMTYPE
                ti.linkname = os.readlink(path)
                tar.addfile(ti)
            elif os.path.isdir(path):
                ti.type = tarfile.DIRTYPE
                tar.addfile(ti)
                for entry in sorted(os.listdir(path)):
                    add(os.path.join(path, entry), f"{name}/{entry}")
            else:
                ti.size = os.path.getsize(path)
                with open(path, "rb") as f:
                    tar.addfile(ti, f)

        add(local, remote)
    return buf.getvalue()
