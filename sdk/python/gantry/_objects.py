"""`Secret` and `Volume`: named objects of the cluster that functions use. They are made
(when asked to) at deploy, not when the Python object is created."""

from __future__ import annotations

import hashlib
import json
import re
import urllib.parse
from typing import Dict, Optional

from . import _http
from .exception import ConflictError, InvalidError, NotFoundError

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class Secret:
    """Environment variables a function's containers get. `Secret.from_name("hf")` names one
    made with `gantry secret create`; `Secret.from_dict({...})` is made by the SDK at deploy
    (named by its content's hash, so equal dicts share one; making it needs an admin token)."""

    def __init__(self, name: str, values: Optional[Dict[str, str]] = None):
        self.name = name
        self._values = values

    @staticmethod
    def from_name(name: str, *, environment_name: Optional[str] = None,
                  required_keys: Optional[list] = None) -> "Secret":
        if not isinstance(name, str) or not name:
            raise InvalidError(f"a secret name must be a non-empty string, not {name!r}")
        return Secret(name)

    @staticmethod
    def from_dict(env_dict: Dict[str, Optional[str]]) -> "Secret":
        values = {k: v for k, v in env_dict.items() if v is not None}
        for k, v in values.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise InvalidError("Secret.from_dict takes str keys and str values")
        digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()
        return Secret(f"sdk-{digest[:20]}", values)

    @staticmethod
    def from_local_environ(env_keys: list) -> "Secret":
        import os

        missing = [k for k in env_keys if k not in os.environ]
        if missing:
            raise InvalidError(f"not set here: {', '.join(missing)}")
        return Secret.from_dict({k: os.environ[k] for k in env_keys})

    def _ensure(self, client: "_http.Client") -> None:
        """Makes a `from_dict` secret in the cluster (idempotent: same name, same values)."""
        if self._values is None:
            return
        client.request(
            "POST", "/v1/secrets", {"name": self.name, "values": self._values, "replace": True}
        )

    def __repr__(self) -> str:
        return f"Secret({self.name!r})"


class Volume:
    """A cluster volume (docs/volumes.md), mounted with `volumes={"/data": vol}`.

    A volume here is a directory on a node (or on the cluster's shared filesystem): writes
    are visible at once to everything that mounts it, so `commit()` and `reload()` have
    nothing to do and return at once."""

    def __init__(self, name: str, create_if_missing: bool = False):
        self.name = name
        self._create = create_if_missing

    @staticmethod
    def from_name(name: str, *, create_if_missing: bool = False,
                  environment_name: Optional[str] = None, version: Optional[int] = None) -> "Volume":
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidError(
                f"volume name {name!r}: lowercase letters, digits, '.', '_' and '-', at most 63"
            )
        return Volume(name, create_if_missing)

    def _ensure(self, client: "_http.Client") -> None:
        if not self._create:
            return
        try:
            client.request("POST", "/v1/volumes", {"name": self.name})
        except ConflictError:
            pass  # it exists

    def commit(self) -> None:
        """Nothing to do: writes are on the volume already (see the class's note)."""

    def reload(self) -> None:
        """Nothing to do: other containers' writes are visible already."""

    def read_file(self, path: str) -> bytes:
        resp = _http.client().raw(
            "GET", f"/v1/volumes/{self.name}/files/{urllib.parse.quote(path.lstrip('/'))}")
        data = resp.read()
        if resp.status != 200:
            raise _http.error_of(resp.status, data)
        return data

    def listdir(self, path: str = "/", recursive: bool = False) -> list:
        q = "&recursive=true" if recursive else ""
        _, body = _http.client().request(
            "GET", f"/v1/volumes/{self.name}/ls?path={urllib.parse.quote(path)}{q}")
        return body.get("entries", []) if isinstance(body, dict) else body

    def __repr__(self) -> str:
        return f"Volume({self.name!r})"


def check_exists(client: "_http.Client", volume: Volume) -> None:
    _, body = client.request("GET", "/v1/volumes")
    names = {v.get("name") for v in (body or {}).get("volumes", [])}
    if volume.name not in names:
        raise NotFoundError(
            f"volume `{volume.name}` does not exist: create it with "
            f"`gantry volume create {volume.name}` or use "
            f"Volume.from_name({volume.name!r}, create_if_missing=True)"
        )
