"""Where the SDK finds the coordinator: the same places as the `gantry` CLI.

GANTRY_ADDR, GANTRY_TOKEN and GANTRY_CA override the file that `gantry dev` writes
(`$XDG_CONFIG_HOME/gantry/config.json`, by default `~/.config/gantry/config.json`).
GANTRY_INGRESS names the web endpoints' ingress when it is not the API's port + 1.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

from .exception import AuthError


@dataclass(frozen=True)
class Config:
    #: `http://host:port` or `https://host:port`.
    url: str
    token: str
    ca_file: Optional[str]

    @property
    def ingress_url(self) -> str:
        explicit = os.environ.get("GANTRY_INGRESS")
        if explicit:
            return explicit if "://" in explicit else "http://" + explicit
        parts = urlsplit(self.url)
        port = (parts.port or (443 if parts.scheme == "https" else 80)) + 1
        return f"{parts.scheme}://{parts.hostname}:{port}"


def config_path() -> str:
    base = os.environ.get("XDG_CONFIG_HOME")
    if not base:
        home = os.environ.get("HOME")
        base = os.path.join(home, ".config") if home else "/etc"
    return os.path.join(base, "gantry", "config.json")


def load() -> Config:
    path = config_path()
    file: dict = {}
    try:
        with open(path, "rb") as f:
            file = json.load(f)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        raise AuthError(f"{path} is not valid ({e}); delete it or rerun `gantry dev`") from None
    addr = os.environ.get("GANTRY_ADDR") or file.get("addr")
    token = os.environ.get("GANTRY_TOKEN") or file.get("token")
    ca_file = os.environ.get("GANTRY_CA") or file.get("ca_file")
    if not addr or not token:
        raise AuthError(
            "no coordinator configured: start one with `gantry dev`, "
            "or set GANTRY_ADDR and GANTRY_TOKEN"
        )
    url = addr if "://" in addr else "http://" + addr
    return Config(url=url.rstrip("/"), token=token, ca_file=ca_file)
