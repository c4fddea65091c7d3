#!/usr/bin/env python3
"""Ray peer of `gantry-bench functions` (bench/README.md, "Functions"), on this machine only.

Usage: ray_functions.py --json OUT [--calls 2000] [--map-inputs 20000] [--cold-trials 20]
                        [--fleet 20] [--temp-dir DIR]

Ray runs as a local cluster on 127.0.0.1 started by this process (no dashboard, usage stats
off, nothing sent elsewhere; bench/run starts it in a network namespace that has only
loopback, since some of Ray's servers bind every address), with 4 CPUs so that tasks run on 4 warm worker processes, the
peer of Gantry's 4 warm containers:
- warm task round trip: `ray.get(echo.remote(x))`, sequential, after a warm-up;
- map: `ray.get([echo.remote(i) for i in range(N)])`, 4 workers already started;
- scale from zero: Ray Serve, a deployment with `min_replicas = 0` drained to zero between
  trials, then one `handle.remote(x).result()` (no HTTP proxy: a handle from the driver);
- an actor's creation to its first result (a new worker process per actor), and 20 actors
  created at once to all answering (the peer of 0 -> 20 containers).
Every loop is bounded by a count and a deadline. Prints the results and writes them as JSON.
"""
import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")
# Tuned in Ray's favour: a handle reports queued requests every 0.1 s instead of every 10 s
# (Ray's default; "this interval will affect the cold start time period"), see serve_cold.
os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.1")

import ray  # noqa: E402


def pct(v, p):
    if not v:
        return None
    s = sorted(v)
    return s[round(p / 100 * (len(s) - 1))]


def stats(v):
    return {"n": len(v), "p50_ms": pct(v, 50), "p90_ms": pct(v, 90), "p99_ms": pct(v, 99),
            "max_ms": pct(v, 100), "mean_ms": statistics.mean(v) if v else None}


@ray.remote
def echo(x):
    return x


@ray.remote(num_cpus=0.1)
class Echo:
    def echo(self, x):
        return x


def warm(calls):
    for i in range(100):
        ray.get(echo.remote(f"w{i}"))
    ms = []
    deadline = time.monotonic() + 300
    for i in range(calls):
        t = time.perf_counter()
        out = ray.get(echo.remote(f"c{i}"))
        ms.append((time.perf_counter() - t) * 1e3)
        assert out == f"c{i}"
        if time.monotonic() > deadline:
            break
    return stats(ms)


def map_(n):
    ray.get([echo.remote(str(i)) for i in range(200)])
    t = time.perf_counter()
    out = ray.get([echo.remote(str(i)) for i in range(n)])
    secs = time.perf_counter() - t
    assert len(out) == n and out[-1] == str(n - 1)
    return {"inputs": n, "workers": 4, "seconds": secs, "per_s": n / secs}


def actor_cold(trials):
    ms = []
    for i in range(trials):
        t = time.perf_counter()
        a = Echo.remote()
        assert ray.get(a.echo.remote(i), timeout=60) == i
        ms.append((time.perf_counter() - t) * 1e3)
        ray.kill(a)
        time.sleep(0.3)
    return stats(ms)


def actors(n, trials):
    ms = []
    for _ in range(trials):
        t = time.perf_counter()
        group = [Echo.remote() for _ in range(n)]
        ray.get([a.echo.remote(0) for a in group], timeout=120)
        ms.append((time.perf_counter() - t) * 1e3)
        for a in group:
            ray.kill(a)
        time.sleep(1)
    return {"actors": n, **stats(ms)}


# Ray Serve's scale from zero (also bench/ray_web.py's): as fast as its autoscaler goes.
SERVE_COLD_CONFIG = {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0,
                     "upscale_delay_s": 0, "downscale_delay_s": 2, "downscale_to_zero_delay_s": 2,
                     "target_ongoing_requests": 1}


def serve_replicas(app):
    from ray import serve
    st = serve.status().applications[app].deployments
    d = next(iter(st.values()))
    return sum(d.replica_states.values()) if d.replica_states else 0


def serve_wait_zero(app):
    deadline = time.monotonic() + 60
    while serve_replicas(app) > 0:
        if time.monotonic() > deadline:
            raise RuntimeError("Serve did not scale to zero within 60 s")
        time.sleep(0.05)


def serve_cold(trials):
    from ray import serve

    try:
        serve.start(proxy_location="Disabled")
    except Exception:  # older releases: no Disabled location
        serve.start(http_options={"host": "127.0.0.1"})
    config = dict(SERVE_COLD_CONFIG)

    def make(cfg):
        @serve.deployment(autoscaling_config=cfg, ray_actor_options={"num_cpus": 0.1})
        class Cold:
            def __call__(self, x):
                return x
        return Cold

    try:
        handle = serve.run(make(config).bind(), name="cold", route_prefix=None)
    except Exception as e:  # a key this release does not know
        print(f"serve: {e}; without downscale_to_zero_delay_s", file=sys.stderr)
        config.pop("downscale_to_zero_delay_s")
        handle = serve.run(make(config).bind(), name="cold", route_prefix=None)

    handle.remote("first").result(timeout_s=120)
    ms = []
    budget = time.monotonic() + 400
    for i in range(trials):
        serve_wait_zero("cold")
        time.sleep(0.3)
        t = time.perf_counter()
        assert handle.remote(f"c{i}").result(timeout_s=120) == f"c{i}"
        ms.append((time.perf_counter() - t) * 1e3)
        if time.monotonic() > budget:
            break
    serve.shutdown()
    return {"config": config, **stats(ms)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--map-inputs", type=int, default=20000)
    ap.add_argument("--cold-trials", type=int, default=20)
    ap.add_argument("--fleet", type=int, default=20)
    ap.add_argument("--temp-dir", default="/tmp/gantry-bench-functions/ray")
    a = ap.parse_args()
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=256 << 20, _temp_dir=a.temp_dir, log_to_driver=False)
    out = {"version": ray.__version__}
    for key, fn in [("warm", lambda: warm(a.calls)), ("map", lambda: map_(a.map_inputs)),
                    ("actor_cold", lambda: actor_cold(a.cold_trials)),
                    ("actors", lambda: actors(a.fleet, 3)),
                    ("serve_cold", lambda: serve_cold(a.cold_trials))]:
        print(f"ray: {key}", file=sys.stderr)
        try:
            out[key] = fn()
        except Exception as e:  # report what failed, keep the rest
            out[key] = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
        print(f"ray: {key}: {json.dumps(out[key])}", file=sys.stderr)
    ray.shutdown()
    with open(a.json, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
