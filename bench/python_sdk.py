#!/usr/bin/env python3
"""The Python SDK against Ray, on this machine only (bench/README.md, "Python SDK").

Usage: python_sdk.py gantry --json OUT [--gantry BIN] [--calls 2000] [--map-inputs 10000]
       python_sdk.py ray --json OUT [--calls 2000] [--map-inputs 10000] [--temp-dir DIR]

- gantry: starts `gantry dev` as the SDK's tests do (sdk/python/tests/devcluster.py: a
  coordinator and an agent on loopback, its own HOME and state directory), deploys bench/sdk_app.py with `app.run()` (four warm containers of the
  Python runtime, eight inputs each), then times `echo.remote(i)` one after another (p50,
  p99, after 200 warm-up calls) and `list(echo.map(range(N)))` (inputs per second, the
  median of 3 maps, after one warm-up map).
- ray: a local Ray with 4 CPUs started by this process, the same two measurements as
  `ray.get(echo.remote(i))` and `ray.get([echo.remote(i) for i in range(N)])`.
Every loop is bounded by its count. Prints the results and writes them as JSON.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SDK = os.path.join(os.path.dirname(HERE), "sdk", "python")


def pct(values, p):
    s = sorted(values)
    return s[round(p / 100 * (len(s) - 1))]


def timed_calls(call, n):
    out = []
    for i in range(n):
        t = time.perf_counter()
        call(i)
        out.append((time.perf_counter() - t) * 1000)
    return out


def timed_map(run_map, n, trials=3):
    rates = []
    for _ in range(trials):
        t = time.perf_counter()
        got = run_map(n)
        took = time.perf_counter() - t
        assert len(got) == n and got[-1] == n - 1, "the map lost or reordered outputs"
        rates.append(n / took)
    return statistics.median(rates), rates


def bench_gantry(args):
    sys.path[:0] = [SDK, os.path.join(SDK, "tests"), HERE]
    from devcluster import Dev

    root = tempfile.mkdtemp(prefix="gantry-sdk-bench-")
    dev = Dev(root, args.gantry)
    try:
        os.environ.update(HOME=dev.home)
        for k in ("GANTRY_ADDR", "GANTRY_TOKEN", "GANTRY_CA", "XDG_CONFIG_HOME"):
            os.environ.pop(k, None)
        import sdk_app

        t = time.perf_counter()
        with sdk_app.app.run():
            deploy_s = time.perf_counter() - t
            echo = sdk_app.echo
            timed_calls(echo.remote, 200)
            calls = timed_calls(echo.remote, args.calls)
            list(echo.map(range(1000)))
            rate, rates = timed_map(lambda n: list(echo.map(range(n))), args.map_inputs)
        return {
            "deploy_s": deploy_s,
            "remote_p50_ms": pct(calls, 50), "remote_p99_ms": pct(calls, 99), "calls": len(calls),
            "map_inputs": args.map_inputs, "map_per_s": rate, "map_trials_per_s": rates,
        }
    finally:
        dev.stop()
        shutil.rmtree(root, ignore_errors=True)


def bench_ray(args):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=args.temp_dir,
             _node_ip_address="127.0.0.1", logging_level="ERROR")
    try:
        @ray.remote
        def echo(x):
            return x

        # Four workers started and warm.
        ray.get([echo.remote(i) for i in range(200)])
        timed_calls(lambda i: ray.get(echo.remote(i)), 200)
        calls = timed_calls(lambda i: ray.get(echo.remote(i)), args.calls)
        rate, rates = timed_map(lambda n: ray.get([echo.remote(i) for i in range(n)]),
                                args.map_inputs)
        return {
            "version": ray.__version__,
            "remote_p50_ms": pct(calls, 50), "remote_p99_ms": pct(calls, 99), "calls": len(calls),
            "map_inputs": args.map_inputs, "map_per_s": rate, "map_trials_per_s": rates,
        }
    finally:
        ray.shutdown()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("system", choices=["gantry", "ray"])
    p.add_argument("--json", required=True)
    p.add_argument("--gantry", default=os.path.join(os.path.dirname(HERE), "target", "release", "gantry"))
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--map-inputs", type=int, default=10000)
    p.add_argument("--temp-dir", default=None)
    args = p.parse_args()
    result = bench_gantry(args) if args.system == "gantry" else bench_ray(args)
    print(json.dumps(result, indent=2))
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
