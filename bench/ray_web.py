#!/usr/bin/env python3
"""Ray Serve peer of `gantry-bench web` (bench/README.md, "Web endpoints"), on this machine only.

Usage: ray_web.py --bench GANTRY_BENCH --json OUT [--requests 2000] [--load-requests 10000]
                  [--concurrency 16] [--cold-trials 8] [--temp-dir DIR]

Ray runs as a local cluster on 127.0.0.1 started by this process (no dashboard, usage stats
off; bench/run starts it in a network namespace that has only loopback), with 4 CPUs, and
Ray Serve's HTTP proxy on 127.0.0.1:8000:
- a deployment of 4 replicas answering `hello\\n` (the peer of 4 warm containers of busybox
  httpd serving a 6-byte file), loaded through the proxy by the same Rust load generator
  as Gantry's ingress (`gantry-bench http-load`): one request at a time, then
  `--concurrency` at a time;
- scale from zero through the proxy: a deployment with `min_replicas = 0`, drained to zero
  between trials, then one GET on a new connection timed to the response head.
Every loop is bounded by a count and a deadline. Prints the results and writes them as JSON.
"""
import argparse
import http.client
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")
# Tuned in Ray's favour, as in ray_functions.py: handles (the proxy's too) report queued
# requests every 0.1 s instead of every 10 s, which bounds a start from zero.
os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.1")

import ray  # noqa: E402
from ray import serve  # noqa: E402
from starlette.responses import PlainTextResponse  # noqa: E402

from ray_functions import SERVE_COLD_CONFIG, serve_wait_zero, stats  # noqa: E402

PORT = 8000
BODY = "hello\n"


@serve.deployment(num_replicas=4, ray_actor_options={"num_cpus": 0.1})
class Hello:
    async def __call__(self, request):
        return PlainTextResponse(BODY)


def get(path, timeout=10):
    """(ms to the response head, status, body) of one GET on a new connection."""
    c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=timeout)
    try:
        t = time.perf_counter()
        c.request("GET", path)
        r = c.getresponse()
        head = (time.perf_counter() - t) * 1e3
        return head, r.status, r.read().decode(errors="replace")
    finally:
        c.close()


def wait_serving(path, seconds=120):
    deadline = time.monotonic() + seconds
    while True:
        try:
            _, status, body = get(path)
            if status == 200 and body == BODY:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} not served within {seconds} s")
        time.sleep(0.2)


def load(bench, path, requests, concurrency):
    out = subprocess.run(
        [bench, "http-load", "--addr", f"127.0.0.1:{PORT}", "--path", path,
         "--requests", str(requests), "--concurrency", str(concurrency), "--expect-body", BODY],
        check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout)


def warm(a):
    serve.run(Hello.bind(), name="hello", route_prefix="/hello")
    wait_serving("/hello")
    load(a.bench, "/hello", 200, 4)
    return {
        "sequential": load(a.bench, "/hello", a.requests, 1),
        "concurrent": load(a.bench, "/hello", a.load_requests, a.concurrency),
    }


def cold(trials):
    config = dict(SERVE_COLD_CONFIG)

    @serve.deployment(autoscaling_config=config, ray_actor_options={"num_cpus": 0.1})
    class Cold:
        async def __call__(self, request):
            return PlainTextResponse(BODY)

    serve.run(Cold.bind(), name="cold", route_prefix="/cold")

    wait_serving("/cold")
    ms = []
    budget = time.monotonic() + 300
    for _ in range(trials):
        serve_wait_zero("cold")
        time.sleep(0.3)
        head, status, body = get("/cold", timeout=120)
        if status != 200 or body != BODY:
            raise RuntimeError(f"from zero: {status} {body!r}")
        ms.append(head)
        if time.monotonic() > budget:
            break
    return {"config": config, **stats(ms)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--load-requests", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--cold-trials", type=int, default=8)
    ap.add_argument("--temp-dir", default="/tmp/gantry-bench-web/ray")
    a = ap.parse_args()
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=256 << 20, _temp_dir=a.temp_dir, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    out = {"version": ray.__version__}
    for key, fn in [("warm", lambda: warm(a)), ("cold", lambda: cold(a.cold_trials))]:
        print(f"ray web: {key}", file=sys.stderr)
        try:
            out[key] = fn()
        except Exception as e:  # report what failed, keep the rest
            out[key] = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
        print(f"ray web: {key}: {json.dumps(out[key])}", file=sys.stderr)
    serve.shutdown()
    ray.shutdown()
    with open(a.json, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
