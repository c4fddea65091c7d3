"""`gantry dev` started for the SDK's tests and benchmark: a coordinator and one agent
on this machine (real containers) with their own HOME and state directory, on free
loopback ports (the ingress on the API's port + 1).

GANTRY_BIN names the `gantry` binary (default: the workspace's target/debug/gantry)."""

import os
import socket
import subprocess
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def gantry_bin() -> str:
    explicit = os.environ.get("GANTRY_BIN")
    if explicit:
        return explicit
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target")
    return os.path.join(target, "debug", "gantry")


def free_port_pair() -> int:
    """A port P with P + 1 free too (the ingress listens on the API's port + 1)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two free adjacent ports")


class Dev:
    def __init__(self, root: str, binary: str = ""):
        self.root = root
        self.binary = binary or gantry_bin()
        self.home = os.path.join(root, "home")
        self.state = os.path.join(root, "dev")
        api = free_port_pair()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            control = s.getsockname()[1]
        self.api = f"127.0.0.1:{api}"
        self.ingress = f"http://127.0.0.1:{api + 1}"
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("GANTRY_ADDR", "GANTRY_TOKEN", "GANTRY_CA", "XDG_CONFIG_HOME")}
        self.env["HOME"] = self.home
        self.log = open(os.path.join(root, "dev.log"), "wb")
        self.proc = subprocess.Popen(
            [self.binary, "dev", "--node", "sdk-node", "--api-listen", self.api,
             "--control-listen", f"127.0.0.1:{control}", "--state-dir", self.state],
            env=self.env, stdout=subprocess.PIPE, stderr=self.log)
        self.lines = []
        running = threading.Event()

        def pump() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                self.log.write(line)
                self.log.flush()
                if b"gantry dev is running" in line:
                    running.set()

        threading.Thread(target=pump, daemon=True).start()
        if not running.wait(120):
            self.stop()
            raise RuntimeError(f"gantry dev did not start; its log: {self.tail()}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = self.gantry("nodes", "list").stdout
            if b"ready" in out:
                return
            time.sleep(0.3)
        raise RuntimeError(f"the dev node is not ready; log: {self.tail()}")

    def gantry(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([self.binary, *args], env=self.env, capture_output=True,
                              timeout=kw.pop("timeout", 600), **kw)

    def tail(self) -> str:
        try:
            with open(os.path.join(self.root, "dev.log"), "rb") as f:
                return f.read()[-4000:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
