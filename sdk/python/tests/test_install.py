"""`pip install ./sdk/python` works in a fresh virtual environment, and what it installs
holds the runtime and the vendored cloudpickle that function containers use."""

import os
import subprocess
import venv

SDK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pip_install_into_a_fresh_venv(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = str(env_dir / "bin" / "python")
    out = subprocess.run([py, "-m", "pip", "install", "--quiet", "--no-cache-dir", SDK],
                         capture_output=True, timeout=300, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr.decode()
    check = ("import gantry, gantry._container, gantry._vendor.cloudpickle as c, os;"
             "print(c.__version__, os.path.dirname(gantry.__file__))")
    out = subprocess.run([py, "-c", check], capture_output=True, timeout=60, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr.decode()
    version, where = out.stdout.decode().split()
    assert version == "3.1.1"
    assert where.startswith(str(env_dir))
    # `python -m gantry` is the CLI the Rust `gantry` hands .py files to.
    out = subprocess.run([py, "-m", "gantry", "--help"], capture_output=True, timeout=60)
    assert out.returncode == 0 and b"gantry run FILE.py" in out.stdout
