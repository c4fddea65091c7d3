#!/usr/bin/env python3
"""Writes BENCHMARKS.md from the JSON results `bench/run` collected in one directory.

Usage: bench/report.py RESULTS_DIR OUTPUT.md
       bench/report.py --functions-table RESULTS_DIR   (prints the functions table, Gantry
                                                        beside Ray, for bench/README.md)
       bench/report.py --web-table RESULTS_DIR         (the web endpoints table, Gantry's
                                                        ingress beside Ray Serve's proxy)

Each metric is the median over the runs (cold-start-N.json, submit-N.json); the spread
(min-max over runs) is shown beside it, and the report states how noisy the machine was.
Missing inputs are reported as not measured, never invented.
"""
import glob
import json
import os
import re
import statistics
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def runs(results, prefix):
    return [r for r in (load(p) for p in sorted(glob.glob(os.path.join(results, prefix + "-*.json")))) if r]


def med(values):
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(values) if values else None


def spread(values):
    values = [v for v in values if isinstance(v, (int, float))]
    if len(values) < 2:
        return ""
    return f" ({min(values):.1f}–{max(values):.1f})"


def rel_spread(values):
    values = [v for v in values if isinstance(v, (int, float)) and v > 0]
    if len(values) < 2:
        return None
    return (max(values) - min(values)) / statistics.median(values)


def ms(v):
    return "—" if v is None else f"{v:.1f} ms"


def secs(v):
    return "—" if v is None else f"{v / 1000:.2f} s"


def ratio(ours, peer, lower_is_better=True):
    if ours is None or peer is None or ours <= 0 or peer <= 0:
        return "—"
    if lower_is_better:
        return f"{peer / ours:.2f}× faster" if ours < peer else f"{ours / peer:.2f}× slower"
    return f"{ours / peer:.2f}× more" if ours > peer else f"{peer / ours:.2f}× fewer"


def goal(value, limit, lower_is_better=True):
    if value is None:
        return "not measured"
    met = value <= limit if lower_is_better else value >= limit
    return "met" if met else "not met"


def functions_table(results):
    """Gantry's functions (functions.json) beside Ray (ray-functions.json), as lines."""
    g = load(os.path.join(results, "functions.json"))
    r = load(os.path.join(results, "ray-functions.json")) or {}
    if not g:
        return ["Not measured in this run."]
    lines = []
    w = lines.append
    rv = r.get("version", "?")

    def get(d, *path):
        for p in path:
            d = d.get(p) if isinstance(d, dict) else None
        return d

    def ray_cell(key, stat, what):
        if key not in r:
            return "not measured"
        if "error" in r[key]:
            return f"did not run: {str(r[key]['error']).replace('|', '/')}"
        return f"{ms(r[key].get(stat))} ({what})"

    def rate(v):
        return "—" if v is None else f"{v:,.0f}/s"

    w(f"| metric | Gantry | Ray {rv} | Gantry vs Ray | goal |")
    w("|---|---|---|---|---|")
    wp50, wp99 = get(g, "warm", "p50_ms"), get(g, "warm", "p99_ms")
    w(f"| warm sync call round trip, p50 ({get(g, 'warm', 'n')} sequential calls) | {ms(wp50)} (`POST …/calls`, HTTP, durable) | "
      f"{ray_cell('warm', 'p50_ms', '`ray.get(f.remote(x))`')} | {ratio(wp50, get(r, 'warm', 'p50_ms'))} | ≤ 2 ms: {goal(wp50, 2)} |")
    w(f"| … p99 | {ms(wp99)} | {ray_cell('warm', 'p99_ms', 'same')} | {ratio(wp99, get(r, 'warm', 'p99_ms'))} | ≤ 5 ms: {goal(wp99, 5)} |")
    mp = get(g, "map", "per_s")
    n = get(g, "map", "inputs") or 0
    rmap = (f"did not run: {r['map']['error']}" if "error" in r.get("map", {}) else
            f"{rate(get(r, 'map', 'per_s'))} ({n:,} tasks, 4 workers)") if "map" in r else "not measured"
    w(f"| map of {n:,} inputs over 4 warm containers (`max_inputs = {get(g, 'map', 'max_inputs')}`), end to end | "
      f"{rate(mp)} (one call) | {rmap} | {ratio(mp, get(r, 'map', 'per_s'), lower_is_better=False)} | "
      f"≥ 5,000/s: {goal(mp, 5000, lower_is_better=False)} |")
    cli = get(g, "map", "cli", "per_s")
    if cli is not None:
        w(f"| … through `gantry map` (CLI process, one streamed map fed in chunks of 500) | {rate(cli)} | — | | |")
    quiet = get(g, "map", "polling_counters", "per_s")
    if quiet is not None:
        w(f"| … one call, the client polling the function's counters instead of a long poll on the call | {rate(quiet)} | — | | |")
    cp50 = get(g, "cold", "p50_ms")
    w(f"| scale from zero to the first output, cached image, p50 ({get(g, 'cold', 'n')} trials) | {ms(cp50)} | "
      f"{ray_cell('serve_cold', 'p50_ms', 'Ray Serve, `min_replicas = 0`, through a handle')} | "
      f"{ratio(cp50, get(r, 'serve_cold', 'p50_ms'))} | ≤ 50 ms: {goal(cp50, 50)} |")
    w(f"| … an actor's creation to its first result (Ray's nearest to a container start), p50 | — | "
      f"{ray_cell('actor_cold', 'p50_ms', '`A.remote()`, then a method call')} | {ratio(cp50, get(r, 'actor_cold', 'p50_ms'))} | |")
    fp50 = get(g, "fleet", "all_ready", "p50_ms")
    nf = get(g, "fleet", "containers")
    ract = get(r, "actors", "p50_ms")
    ra = ("not measured" if "actors" not in r else f"did not run: {r['actors']['error']}" if "error" in r["actors"]
          else f"{secs(ract)} ({get(r, 'actors', 'actors')} actors created to all answering)")
    w(f"| 0 → {nf} containers ready, p50 ({get(g, 'fleet', 'all_ready', 'n')} trials) | {secs(fp50)} | {ra} | "
      f"{ratio(fp50, ract)} | ≤ 2 s: {goal(fp50, 2000)} |")
    return lines


def web_table(results):
    """Gantry's web endpoints (web.json) beside Ray Serve's HTTP proxy (ray-web.json)."""
    g = load(os.path.join(results, "web.json"))
    r = load(os.path.join(results, "ray-web.json")) or {}
    if not g:
        return ["Not measured in this run."]

    def get(d, *path):
        for p in path:
            d = d.get(p) if isinstance(d, dict) else None
        return d

    def rate(v):
        return "—" if v is None else f"{v:,.0f}/s"

    def ray(key, *path, fmt=ms, what=""):
        if key not in r:
            return "not measured"
        if "error" in r[key]:
            return f"did not run: {str(r[key]['error']).replace('|', '/')}"
        return fmt(get(r, key, *path)) + what

    lines = []
    w = lines.append
    si, sd = get(g, "sequential", "ingress") or {}, get(g, "sequential", "direct") or {}
    ci, cd = get(g, "concurrent", "ingress") or {}, get(g, "concurrent", "direct") or {}
    c = g.get("cold") or {}
    conc = g.get("concurrency", "?")
    added = (si.get("p50_ms") - sd.get("p50_ms")) if si.get("p50_ms") is not None and sd.get("p50_ms") is not None else None
    added99 = (si.get("p99_ms") - sd.get("p99_ms")) if si.get("p99_ms") is not None and sd.get("p99_ms") is not None else None
    w(f"| metric | Gantry (ingress) | Gantry, directly | Ray Serve {r.get('version', '?')} (HTTP proxy) | goal |")
    w("|---|---|---|---|---|")
    w(f"| one request at a time, p50 ({si.get('n', '?')} each way) | {ms(si.get('p50_ms'))} | {ms(sd.get('p50_ms'))} | "
      f"{ray('warm', 'sequential', 'p50_ms')} | |")
    w(f"| … p99 | {ms(si.get('p99_ms'))} | {ms(sd.get('p99_ms'))} | {ray('warm', 'sequential', 'p99_ms')} | |")
    w(f"| latency the ingress adds over directly, p50 / p99 | {ms(added)} / {ms(added99)} | | | "
      f"p50 ≤ 1 ms: {goal(added, 1)} |")
    w(f"| requests/s, {conc} at a time over 4 warm containers (replicas) | {rate(ci.get('per_s'))} | {rate(cd.get('per_s'))} | "
      f"{ray('warm', 'concurrent', 'per_s', fmt=rate)} | |")
    w(f"| … p50 / p99 latency | {ms(ci.get('p50_ms'))} / {ms(ci.get('p99_ms'))} | {ms(cd.get('p50_ms'))} / {ms(cd.get('p99_ms'))} | "
      f"{ray('warm', 'concurrent', 'p50_ms')} / {ray('warm', 'concurrent', 'p99_ms')} | |")
    rc = r.get("cold", {})
    rn = f" ({rc.get('n')} trials)" if "n" in rc else ""
    w(f"| scale from zero to the first byte, cached image, p50 ({c.get('n', '?')} trials) | {ms(c.get('p50_ms'))} | — | "
      f"{ray('cold', 'p50_ms', what=rn)} | ≤ 60 ms: {goal(c.get('p50_ms'), 60)} |")
    w(f"| … p90 / max | {ms(c.get('p90_ms'))} / {ms(c.get('max_ms'))} | — | "
      f"{ray('cold', 'p90_ms')} / {ray('cold', 'max_ms')} | |")
    return lines


def main():
    if sys.argv[1] == "--functions-table":
        print("\n".join(functions_table(sys.argv[2])))
        return
    if sys.argv[1] == "--web-table":
        print("\n".join(web_table(sys.argv[2])))
        return
    results, out = sys.argv[1], sys.argv[2]
    machine = load(os.path.join(results, "machine.json")) or {}
    cold = runs(results, "cold-start")
    submit = runs(results, "submit")
    slurm = load(os.path.join(results, "slurm.json"))
    recovery = load(os.path.join(results, "recovery.json"))
    schedule = load(os.path.join(results, "schedule.json"))
    footprint = load(os.path.join(results, "footprint.json"))
    fsim = load(os.path.join(results, "functions-sim.json"))
    noise = []
    lines = []
    w = lines.append

    w("# Gantry benchmarks, side by side with its peers")
    w("")
    w(f"Measured {machine.get('date', '?')} on: {machine.get('machine', '?')}. "
      f"Written by `bench/run` (one command; it installs the peers from Debian packages). "
      f"Medians over {machine.get('runs', '?')} runs where a benchmark was repeated, with the "
      f"range over runs in brackets. Peers: {machine.get('versions', '?')}.")
    w("")
    w("Everything runs on this one machine, on loopback. Detailed tables, methods and the "
      "reasoning behind each number are in [bench/README.md](bench/README.md).")
    w("")

    # Container cold start.
    w("## Container cold start (cached image, to the container's first instruction)")
    w("")
    if cold:
        def series(key, stat):
            return [r.get(key, {}).get(stat) for r in cold]
        runc50 = med(series("runc", "p50_ms"))
        w("| path | p50 | p99 | vs `runc run` (p50) |")
        w("|---|---|---|---|")
        rows = [
            ("Gantry agent runtime (`Runtime::start`, what the daemon does)", "gantry_runtime_api"),
            ("`gantry-agent run` (a new agent process per start)", "gantry_agent_run"),
            ("`runc run`", "runc"),
            ("`crun run`", "crun"),
            ("`podman run --rm`", "podman"),
        ]
        for name, key in rows:
            p50s, p99s = series(key, "p50_ms"), series(key, "p99_ms")
            if med(p50s) is None:
                err = next((r.get(key, {}).get("error") for r in cold if r.get(key, {}).get("error")), "no samples")
                w(f"| {name} | — | — | did not run: {str(err).replace('|', '/')} |")
                continue
            noise.append((name, rel_spread(p50s)))
            base = "baseline" if key == "runc" else ratio(med(p50s), runc50)
            w(f"| {name} | {med(p50s):.1f} ms{spread(p50s)} | {med(p99s):.1f} ms | {base} |")
        if submit:
            r50 = [r.get("running_p50_ms") for r in submit]
            r99 = [r.get("running_p99_ms") for r in submit]
            noise.append(("submit → running", rel_spread(r50)))
            w(f"| full path: `POST /v1/jobs` → coordinator → QUIC → agent → container | "
              f"{med(r50):.1f} ms{spread(r50)} | {med(r99):.1f} ms | {ratio(med(r50), runc50)} |")
        w("")
    else:
        w("Not measured in this run.")
        w("")

    # Throughput and latency against Slurm.
    w("## Job throughput and latency, against Slurm")
    w("")
    w("The same trivial work (`true`): Slurm runs it as a bare process, Gantry in a container "
      "(its own namespaces, cgroup, overlay root filesystem), so Gantry does more per job. "
      "Slurm gives each job a whole core (2 at a time here); Gantry's throughput jobs ask for "
      "half a core (4 at a time), `gantry run` for one.")
    w("")
    w("| metric | Gantry | Slurm | ratio | goal |")
    w("|---|---|---|---|---|")
    g_tp = [r.get("completed_per_s") for r in submit]
    g_rt50 = [r.get("gantry_run_p50_ms") for r in submit]
    g_rt99 = [r.get("gantry_run_p99_ms") for r in submit]
    s_tp = slurm.get("throughput_median") if slurm else None
    s50 = slurm.get("srun_p50_median") if slurm else None
    s99 = slurm.get("srun_p99_median") if slurm else None
    noise.append(("jobs/s to completion", rel_spread(g_tp)))
    noise.append(("gantry run p50", rel_spread(g_rt50)))
    tp = med(g_tp)
    n_jobs = med([r.get("completed_jobs") for r in submit])
    jobs_label = f"{n_jobs:,.0f} jobs" if n_jobs else "—"
    w(f"| jobs/s to completion ({jobs_label}) | {'—' if tp is None else f'{tp:.0f}'}{spread(g_tp)} | "
      f"{'—' if s_tp is None else f'{s_tp:.1f}'} (`sbatch --wrap true`) | "
      f"{ratio(tp, s_tp, lower_is_better=False)} | ≥ 150 jobs/s: {'met' if tp and tp >= 150 else 'not met'} |")
    rt = med(g_rt50)
    w(f"| `gantry run … -- true` round trip, p50 | {ms(rt)}{spread(g_rt50)} | {ms(s50)} (`srun -n1 true`) | "
      f"{ratio(rt, s50)} | ≤ 20 ms: {'met' if rt and rt <= 20 else 'not met'} |")
    w(f"| … p99 | {ms(med(g_rt99))} | {ms(s99)} | {ratio(med(g_rt99), s99)} | |")
    seq = med([r.get("submits_per_s_sequential") for r in submit])
    sub = med([r.get("submits_per_s_concurrent") for r in submit])
    s_sub = slurm.get("submit_per_s_median") if slurm else None
    if seq is not None:
        peer = "—" if s_sub is None else f"{s_sub:.0f} (`sbatch`, one after another)"
        w(f"| durable submissions/s, one client | {seq:.0f} | {peer} | "
          f"{ratio(seq, s_sub, lower_is_better=False)} | |")
    if sub is not None:
        w(f"| durable submissions/s, 32 clients | {sub:.0f} | — | | |")
    w("")
    if slurm:
        tuned_keys = ("Epilog", "SchedulerParameters", "MinJobAge", "MaxJobCount",
                      "SlurmctldDebug", "SlurmdDebug", "SelectTypeParameters")
        tuned = [s for s in slurm.get("settings", []) if s.split("=")[0] in tuned_keys]
        w(f"Slurm {slurm.get('slurm_version', '?')} (slurmctld + slurmd + munge on this machine), "
          "tuned rather than a strawman: " + ", ".join(f"`{s}`" for s in tuned)
          + f"; {slurm.get('note', '').rstrip('. ')}. Every setting is listed by `bench/slurm.sh`.")
    else:
        w("Slurm was not measured in this run (see `bench/slurm.sh`).")
    w("")

    # Recovery.
    w("## Failure recovery")
    w("")
    if recovery:
        nl = recovery.get("node_loss", {})
        w("| from (to the job running again, elsewhere) | p50 | max | trials |")
        w("|---|---|---|---|")
        for key, what in [("node_loss", "kill -9 of the host"),
                          ("preempt", "spot preemption notice (job exits on SIGTERM)"),
                          ("preempt_no_grace", "…the old container's exit (grace excluded)"),
                          ("xid", "Xid 79 on the job's GPU")]:
            r = recovery.get(key, {})
            w(f"| {what} | {secs(r.get('p50_ms'))} | {secs(r.get('max_ms'))} | {r.get('trials', 0)} |")
        w("")
        p50 = nl.get("p50_ms")
        against = (f" Against those, Gantry is {360000 / p50:.0f}× and {20000 / p50:.0f}× faster."
                   if p50 else "")
        w(f"Node loss ≤ 3 s p50: {'met' if p50 and p50 <= 3000 else 'not met'}. Peers, by their "
          "documented defaults (cited, not measured): Kubernetes marks a node NotReady after "
          "`node-monitor-grace-period` (40–50 s) and evicts its pods after the 300 s "
          "`tolerationSeconds` of the default not-ready/unreachable tolerations — about 6 "
          "minutes; Nomad replaces a lost client's allocations once its heartbeat TTL and "
          "`heartbeat_grace` (10 s) passed — about 20 s." + against)
    else:
        w("Not measured in this run.")
    w("")

    # Functions.
    w("## Functions, against Ray")
    w("")
    if os.path.exists(os.path.join(results, "functions.json")):
        w("Gantry through its HTTP API (every input durable before the answer, a real container "
          "per warm worker, the static echo runtime); Ray through its Python API in the driver "
          "(no HTTP, nothing durable), a local cluster on 127.0.0.1 with 4 CPUs. The method of "
          "each row is in bench/README.md (\"Functions\").")
        w("")
    for line in functions_table(results):
        w(line)
    w("")

    # Web endpoints.
    w("## Web endpoints, against Ray Serve")
    w("")
    if os.path.exists(os.path.join(results, "web.json")):
        w("Busybox `httpd` in 4 warm containers serving a 6-byte file, reached through the "
          "coordinator's ingress (bearer token, QUIC to the agent, TCP into the container's "
          "namespace) and directly (the same servers on their namespaces' loopback); Ray Serve: "
          "4 replicas answering the same body through its HTTP proxy. One load generator for all "
          "(`gantry-bench http-load`, one thread). The method is in bench/README.md (\"Web "
          "endpoints\").")
        w("")
    for line in web_table(results):
        w(line)
    w("")

    # Image builds.
    w("## Image builds from recipes")
    w("")
    builds = load(os.path.join(results, "builds.json"))
    if builds:
        first = builds.get("first_build_s")
        cached = builds.get("cached_p50_ms")
        changed = builds.get("changed_last_p50_ms")
        n = len(builds.get("cached_ms", []))
        w("`gantry-bench builds` on `gantry dev` (coordinator and agent on this machine), wall "
          "time around `gantry image build`, the CLI included; the method is in bench/README.md "
          "(\"Image builds\").")
        w("")
        w("| build | wall time | goal |")
        w("|---|---|---|")
        w(f"| first: `debian_slim` 3.11 base (mmdebstrap from this machine's apt sources) + one step that runs Python | {first:.1f} s | |")
        w(f"| the same recipe again, every step cached (median of {n}) | {cached:.0f} ms | ≤ 1 s: {goal(cached, 1000)} |")
        w(f"| only the last step (a configuration step) changed (median of {n}) | {changed:.0f} ms | |")
    else:
        w("Not measured in this run.")
    w("")

    # The Python SDK.
    w("## Python SDK, against Ray")
    w("")
    sdk = load(os.path.join(results, "sdk.json"))
    ray_sdk = load(os.path.join(results, "ray-sdk.json")) or {}
    if sdk:
        rv = ray_sdk.get("version", "")
        w("`bench/python_sdk.py` on `gantry dev`: `echo.remote(i)` and `list(echo.map(range(N)))` "
          "from Python through the SDK (pickled arguments, HTTP to the coordinator, a durable "
          "input, QUIC to the agent, the Python runtime in 4 warm containers of 8 inputs each); "
          "Ray's `ray.get(echo.remote(i))` and `ray.get([echo.remote(i) for i in range(N)])` "
          "on a local Ray with 4 CPUs. The method is in bench/README.md (\"Python SDK\").")
        w("")
        w(f"| metric | Gantry SDK | Ray {rv} | Gantry vs Ray | goal |")
        w("|---|---|---|---|---|")
        p50, rp50 = sdk.get("remote_p50_ms"), ray_sdk.get("remote_p50_ms")
        w(f"| `.remote()` round trip to a warm function, p50 ({sdk.get('calls')} sequential calls) | "
          f"{ms(p50)} | {ms(rp50)} | {ratio(p50, rp50)} | ≤ 3 ms: {goal(p50, 3)} |")
        p99, rp99 = sdk.get("remote_p99_ms"), ray_sdk.get("remote_p99_ms")
        w(f"| … p99 | {ms(p99)} | {ms(rp99)} | {ratio(p99, rp99)} | |")
        rate, rrate = sdk.get("map_per_s"), ray_sdk.get("map_per_s")
        rcell = f"{rrate:,.0f}/s" if rrate else "—"
        w(f"| `.map` over {sdk.get('map_inputs'):,} inputs, inputs/s (median of 3) | {rate:,.0f}/s | "
          f"{rcell} | {ratio(rate, rrate, lower_is_better=False)} | ≥ 3,000/s: "
          f"{goal(rate, 3000, lower_is_better=False)} |")
    else:
        w("Not measured in this run.")
    w("")

    # Functions on the in-process simulation.
    w("## Functions scale-up, in the in-process simulation")
    w("")
    if fsim and fsim.get("runs"):
        sim_runs = fsim["runs"]
        n = fsim.get("containers")

        def worst(key):
            values = [r.get(key) for r in sim_runs]
            return None if None in values else max(values)

        decided, ready = worst("decided_ms"), worst("ready_ms")
        start = fsim.get("start_ms", ["?", "?"])
        sim_ms = lambda v: "—" if v is None else f"{v} ms"
        w(f"The real coordinator (store, reconciler, function service, autoscaler, router) against "
          f"{fsim.get('nodes')} fake agents on a virtual clock, one map of {fsim.get('inputs'):,} inputs "
          f"(`gantry-bench functions-sim`; the method is in bench/README.md). Simulated time from the "
          f"map's acceptance, the worst of {len(sim_runs)} seeds, in steps of {fsim.get('step_ms')} ms:")
        w("")
        w("| metric | simulated | goal |")
        w("|---|---|---|")
        w(f"| 0 → {n} containers decided (placed, starts sent) | {sim_ms(decided)} | ≤ 1 s: {goal(decided, 1000)} |")
        w(f"| 0 → {n} containers ready (simulated start delays {start[0]}–{start[1]} ms) | {sim_ms(ready)} | |")
        step = med([r.get("deciding_step_wall_ms") for r in sim_runs])
        if step is not None:
            w(f"| wall time of the step that decided them (the pass, its commit, the starts sent and answered), median | {step:.1f} ms | |")
    else:
        w("Not measured in this run.")
    w("")

    # Footprint.
    w("## Resource footprint")
    w("")
    w("| what | memory (RSS) |")
    w("|---|---|")
    if footprint:
        n = footprint.get("containers")
        w(f"| `gantry-agent serve`, idle | {footprint['agent_idle_mib']:.1f} MiB |")
        w(f"| `gantry-agent serve`, {n} containers running | {footprint['agent_loaded_mib']:.1f} MiB |")
        shim = footprint.get("shim_mib")
        w(f"| one shim (per container; median of {footprint.get('shims')}) | {'—' if shim is None else f'{shim:.1f} MiB'} |")
        w(f"| `gantry-coordinator serve`, one node, idle | {footprint['coordinator_idle_mib']:.1f} MiB |")
    if schedule:
        w(f"| coordinator state with {schedule['nodes']:,} simulated nodes and {schedule['jobs']:,} jobs "
          f"(store, active jobs and placement engine, in process) | {schedule['rss_mib']:.0f} MiB |")
    if not footprint and not schedule:
        w("| — | not measured in this run |")
    w("")

    # Noise.
    w("## How noisy the machine was")
    w("")
    measured = [(n, s) for n, s in noise if s is not None]
    if measured:
        worst = max(measured, key=lambda x: x[1])
        w("Range over runs relative to the median, per metric: "
          + "; ".join(f"{n} {s * 100:.0f} %" for n, s in measured)
          + f". The noisiest was {worst[0]} ({worst[1] * 100:.0f} %).")
    else:
        w("Only one run per benchmark: no spread to report.")
    w("")
    w(f"Load average (1, 5, 15 min) before the run: {machine.get('load_before', '?')}; after: "
      f"{machine.get('load_after', '?')}.")
    w("")
    notes = os.path.join(results, "notes.md")
    if os.path.exists(notes):
        with open(notes) as f:
            w(f.read().strip())
            w("")
    text = keep_unmeasured(results, out, "\n".join(lines))
    with open(out, "w") as f:
        f.write(text.rstrip() + "\n")


# Which results make each section of BENCHMARKS.md; a section none of whose results this run
# has is kept from the report before (a `GANTRY_BENCH_ONLY` run rewrites only its own).
SECTION_INPUTS = {
    "## Container cold start": ["cold-start-*.json"],
    "## Job throughput and latency": ["submit-*.json", "slurm.json"],
    "## Failure recovery": ["recovery.json"],
    "## Functions, against Ray": ["functions.json", "ray-functions.json"],
    "## Web endpoints": ["web.json", "ray-web.json"],
    "## Functions scale-up, in the in-process simulation": ["functions-sim.json"],
    "## Image builds from recipes": ["builds.json"],
    "## Python SDK, against Ray": ["sdk.json", "ray-sdk.json"],
    "## Resource footprint": ["footprint.json", "schedule.json"],
}


# Rows of a measured section that come from other results: when this run lacks those, the
# row is kept from the report before (a cold-start-only run keeps the full-path row).
KEPT_ROWS = {
    "## Container cold start": [("| full path:", ["submit-*.json"])],
}


def keep_rows(results, key, body, old):
    prev = next((b for h, b in old.items() if h.startswith(key)), None)
    if prev is None:
        return body
    body = list(body)
    for prefix, inputs in KEPT_ROWS[key]:
        if any(glob.glob(os.path.join(results, pat)) for pat in inputs):
            continue
        if any(line.startswith(prefix) for line in body):
            continue
        row = next((line for line in prev if line.startswith(prefix)), None)
        if row is None:
            continue
        if "not measured in this run" not in row:
            cells = row.split(" | ")
            cells[0] += " (not measured in this run: kept from the report before)"
            row = " | ".join(cells)
        last = max((i for i, line in enumerate(body) if line.startswith("|")), default=len(body) - 1)
        body.insert(last + 1, row)
    return body


def sections(text):
    """(heading line, body lines) in order; the part before the first heading has None."""
    out = [(None, [])]
    for line in text.split("\n"):
        if line.startswith("## "):
            out.append((line, []))
        else:
            out[-1][1].append(line)
    return out


def keep_unmeasured(results, out, text):
    try:
        with open(out) as f:
            old_text = f.read()
    except OSError:
        return text
    old = {h: b for h, b in sections(old_text) if h}
    when = re.search(r"^Measured (\S+) on: (.*?)\. Written by", old_text, flags=re.M)
    when = (when.group(1), when.group(2)) if when else None
    # A section the report before had itself kept keeps its own provenance (one line per
    # date and machine).
    provenance = {}
    for m in re.finditer(r"^Not measured in this run, kept from the report before \(measured (\S+) on: (.*?)\): (.*)\.$", old_text, flags=re.M):
        for name in m.group(3).split(", "):
            provenance[name] = (m.group(1), m.group(2))
    kept = []
    parts = []
    for heading, body in sections(text):
        key = next((k for k in SECTION_INPUTS if heading and heading.startswith(k)), None)
        measured = key is None or any(glob.glob(os.path.join(results, pat)) for pat in SECTION_INPUTS[key])
        if not measured:
            prev = next((h for h in old if h.startswith(key)), None)
            if prev:
                heading, body = prev, old[prev]
                kept.append(key[3:])
        elif key and key in KEPT_ROWS and old:
            body = keep_rows(results, key, body, old)
        parts.append(([heading] if heading else []) + body)
    text = "\n".join("\n".join(p) for p in parts)
    by_source = {}
    for name in kept:
        by_source.setdefault(provenance.get(name, when), []).append(name)
    notes = []
    for source, names in by_source.items():
        notes.append("Not measured in this run, kept from the report before"
                     + (f" (measured {source[0]} on: {source[1]})" if source else "")
                     + ": " + ", ".join(names) + ".")
    for note in reversed(notes):
        text = text.replace("\n\nEverything runs on this one machine", "\n\n" + note + "\n\nEverything runs on this one machine", 1)
    return text


if __name__ == "__main__":
    main()
