"""A real cluster for the SDK's tests: `gantry dev` (devcluster.py) started once per
session. The first deploy builds the default image (debian_slim with this Python) in the
cluster, about 30 s; later deploys take it from the registry."""

import os
import shutil
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SDK = os.path.dirname(HERE)
sys.path.insert(0, SDK)
sys.path.insert(0, HERE)

from devcluster import Dev, gantry_bin  # noqa: E402


@pytest.fixture(scope="session")
def cluster():
    if not os.path.exists(gantry_bin()):
        pytest.fail(f"{gantry_bin()} is missing: run `cargo build --workspace --bins` (or set GANTRY_BIN)")
    root = tempfile.mkdtemp(prefix="gantry-sdk-")
    dev = Dev(root)
    saved = {k: os.environ.get(k) for k in ("HOME", "GANTRY_ADDR", "GANTRY_TOKEN", "GANTRY_CA",
                                            "XDG_CONFIG_HOME")}
    for k in ("GANTRY_ADDR", "GANTRY_TOKEN", "GANTRY_CA", "XDG_CONFIG_HOME"):
        os.environ.pop(k, None)
    os.environ["HOME"] = dev.home
    import gantry._http

    gantry._http._client = None
    try:
        yield dev
    finally:
        dev.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        gantry._http._client = None
        if os.environ.get("GANTRY_KEEP_TEST_DIRS"):
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
