#!/usr/bin/env bash
# bench/slurm.sh: Slurm as a peer for Gantry's benchmarks, on this one machine.
#
# Usage (as root): bench/slurm.sh [--jobs N] [--latency-runs M] [--runs R] [--submitters K]
#                                 [--set Key=Value]...
#   --jobs N          batch jobs per throughput run (default 1000)
#   --latency-runs M  sequential `srun -n1 true` per latency run (default 100)
#   --runs R          repetitions of both measurements; medians are reported (default 3)
#   --submitters K    parallel sbatch loops sharing the N submissions (default 1: one shell,
#                     sequential, as a user's `for` loop would do)
#   --set Key=Value   replace (or add) one slurm.conf line, to try other settings; it shows
#                     up in the JSON's "settings" like every other line; `--set Key=` drops it
#
# What it does: installs slurmctld, slurmd, slurm-client and munge from Debian packages if
# missing; starts a private munged and a single-node Slurm cluster (slurmctld + slurmd,
# SlurmctldHost/NodeAddr 127.0.0.1, free loopback ports, everything under one temp
# directory, config passed through SLURM_CONF, nothing under /etc touched); then, R times:
#   a) throughput: N x `sbatch --wrap true -o /dev/null`, then waits until squeue shows none
#      of them; jobs/s = N / (first submit -> last completion); also submissions/s alone;
#      the completion log (jobcomp/filetxt) must show N COMPLETED records with exit code 0.
#   b) latency: M sequential `srun -n1 true`, each timed with EPOCHREALTIME; p50 and p99
#      (nearest rank).
# Progress goes to stderr; the LAST line of stdout is one JSON object with the results and
# every line of the slurm.conf used (temp paths shown as $TMP).
# All traffic is on loopback. Every daemon it starts (munged, slurmctld, slurmd and any
# slurmstepd left behind) is stopped on exit, also on error or Ctrl-C, and the temp
# directory is removed.
set -euo pipefail
export LC_ALL=C

jobs=1000 lat_runs=100 runs=3 submitters=1
overrides=()
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --jobs) jobs=${2:?}; shift 2 ;;
    --latency-runs) lat_runs=${2:?}; shift 2 ;;
    --runs) runs=${2:?}; shift 2 ;;
    --submitters) submitters=${2:?}; shift 2 ;;
    --set) [[ "${2:-}" == *=* ]] || usage; overrides+=("$2"); shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
for v in "$jobs" "$lat_runs" "$runs" "$submitters"; do
  [[ "$v" =~ ^[1-9][0-9]*$ ]] || { echo "counts must be positive integers, got '$v'" >&2; exit 2; }
done
[ "$submitters" -le "$jobs" ] || submitters=$jobs

log() { printf '[slurm-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "bench/slurm.sh must run as root (slurmd runs jobs as their user)"
[ "${BASH_VERSINFO[0]}" -ge 5 ] || die "needs bash >= 5 (EPOCHREALTIME)"
script_start=$EPOCHREALTIME

# ---------------------------------------------------------------- cleanup
tmp="" munged_pid="" ctld_pid="" slurmd_pid="" policy_rc_d="" submit_pids=()
stop_pid() { # stop_pid PID NAME: TERM, wait up to 10 s, then KILL
  local pid=$1 name=$2 i
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  log "$name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
our_pids() { # every process still carrying our SLURM_CONF: daemons, slurmstepd, job processes
  local d p x e=()
  [ -n "$tmp" ] || return 0
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    if [ "$p" = "$$" ] || [ "$p" = "$BASHPID" ]; then continue; fi
    mapfile -d '' -t e 2>/dev/null <"$d/environ" || continue
    for x in ${e[@]+"${e[@]}"}; do
      if [ "$x" = "SLURM_CONF=$tmp/slurm.conf" ]; then echo "$p"; break; fi
    done
  done
  return 0
}
cleanup() {
  local rc=$? i p x
  set +e
  trap - EXIT INT TERM HUP
  for p in ${submit_pids[@]+"${submit_pids[@]}"}; do kill -TERM "$p" 2>/dev/null; done
  if [ -n "$ctld_pid" ] && kill -0 "$ctld_pid" 2>/dev/null; then
    # Cancel whatever is still queued or running in our private cluster (bounded).
    timeout 10 scancel --quiet --user=root >/dev/null 2>&1
    for ((i = 0; i < 50; i++)); do
      [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.1
    done
  fi
  stop_pid "$slurmd_pid" slurmd
  stop_pid "$ctld_pid" slurmctld
  stop_pid "$munged_pid" munged
  # Whatever is left (a slurmstepd or job whose daemon died first): SIGKILL, bounded.
  for ((i = 0; i < 5; i++)); do
    p=$(our_pids)
    [ -z "$p" ] && break
    log "killing leftover processes: $(echo "$p" | tr '\n' ' ')"
    for x in $p; do kill -KILL "$x" 2>/dev/null; done
    sleep 0.2
  done
  [ -n "$policy_rc_d" ] && rm -f "$policy_rc_d"
  if [ "$rc" != 0 ] && [ "$rc" -lt 129 ] && [ -n "$tmp" ]; then
    # Leave out the start-up noise every run has (no PMIx library, no MailProg, no state
    # from an earlier run) so that the lines that matter show.
    for f in slurmctld.log slurmd.log slurmctld.out slurmd.out munge/munged.log; do
      [ -s "$tmp/$f" ] || continue
      x=$(grep -Ev 'pmix|PMIx|mpi/pmix|MPI: Cannot create|MailProg|state file|Trying backup state' "$tmp/$f" | tail -n 15)
      [ -n "$x" ] && { log "last lines of $f:"; echo "$x" >&2; }
    done
  fi
  [ -n "$tmp" ] && rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted; cleaning up"; exit 130' INT
trap 'log "terminated; cleaning up"; exit 143' TERM
trap 'log "hung up; cleaning up"; exit 129' HUP

# ---------------------------------------------------------------- install
export DEBIAN_FRONTEND=noninteractive
need=()
for p in slurmctld slurmd slurm-client munge; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  # Keep the packages' maintainer scripts from starting system daemons (munge would start
  # one with /etc/munge/munge.key): a temporary policy-rc.d, only if none exists.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy_rc_d=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$policy_rc_d"
    chmod 755 "$policy_rc_d"
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  [ -n "$policy_rc_d" ] && rm -f "$policy_rc_d" && policy_rc_d=""
fi
for c in munged mungekey slurmctld slurmd sbatch srun squeue sinfo scancel scontrol; do
  command -v "$c" >/dev/null || die "$c not found after installing the packages"
done
slurm_version=$(slurmctld -V | awk '{print $2}')

# ---------------------------------------------------------------- private cluster
tmp=$(mktemp -d /tmp/gantry-slurm-bench.XXXXXX)
chmod 755 "$tmp"
mkdir -p "$tmp/munge" "$tmp/ctld" "$tmp/slurmd" "$tmp/work"
chmod 711 "$tmp/munge"

# Clients must never fall back to DNS SRV lookups for their config: scrub inherited Slurm
# variables and point everything at our slurm.conf.
while read -r v; do unset "$v"; done < <(compgen -e | grep '^SLURM_' || true)
export SLURM_CONF="$tmp/slurm.conf"

# munge: its own key and socket, so it neither needs nor touches /etc/munge or a running
# system munged.
mungekey --create --bits=1024 --keyfile="$tmp/munge/munge.key" >/dev/null
munge_sock="$tmp/munge/munge.socket"
munged_args=(--foreground --force --key-file="$tmp/munge/munge.key" --socket="$munge_sock"
  --pid-file="$tmp/munge/munged.pid" --log-file="$tmp/munge/munged.log"
  --seed-file="$tmp/munge/munged.seed" --num-threads=4)
munged "${munged_args[@]}" >/dev/null 2>&1 &
munged_pid=$!
for ((i = 0; i < 100; i++)); do
  [ -S "$munge_sock" ] && break
  kill -0 "$munged_pid" 2>/dev/null || die "munged exited at start-up"
  sleep 0.05
done
[ -S "$munge_sock" ] || die "munged did not create its socket within 5 s"
munge -S "$munge_sock" -n </dev/null | unmunge -S "$munge_sock" >/dev/null ||
  die "munge round trip failed"

free_ports() { # free_ports COUNT: TCP ports below the ephemeral range that no socket uses
  local want=$1 got=() tries p hex used lo
  lo=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  [ "$lo" -gt 11000 ] || lo=32768
  used=$(awk 'NR > 1 {split($2, a, ":"); print a[2]}' /proc/net/tcp /proc/net/tcp6 2>/dev/null | sort -u)
  for ((tries = 0; tries < 500 && ${#got[@]} < want; tries++)); do
    p=$((10000 + RANDOM % (lo - 10000)))
    printf -v hex '%04X' "$p"
    grep -qx "$hex" <<<"$used" && continue
    [[ " ${got[*]} " == *" $p "* ]] && continue
    got+=("$p")
  done
  [ ${#got[@]} -eq "$want" ] || return 1
  echo "${got[@]}"
}

cpus=$(nproc)
mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
real_mem=$((mem_mb * 9 / 10))
node=localhost
# High enough that no run ever hits the job limit, whatever N, M and R are.
max_jobs=$((jobs * runs + lat_runs * runs + 10000))

# Listen on loopback only. Slurm binds to the address its host name resolves to with these
# options, so use them only where that is a loopback address in /etc/hosts (as here);
# elsewhere the daemons listen on all addresses, though all traffic still goes to 127.0.0.1.
comm=()
host_addr=$(getent -s files ahostsv4 "$(hostname)" 2>/dev/null | awk 'NR == 1 {print $1}' || true)
if [[ "$host_addr" == 127.* ]]; then
  comm=("CommunicationParameters=NoCtldInAddrAny,NoInAddrAny")
else
  log "note: host name $(hostname) is not a loopback address in /etc/hosts; daemons will listen on all addresses (traffic still only on 127.0.0.1)"
fi

# Settings. The first block is plumbing (where things live, how daemons talk) and the
# defaults written out; the second is what was TUNED for throughput, with the reasons.
conf=(
  "ClusterName=gantrybench"
  "SlurmctldHost=$node(127.0.0.1)"
  "SlurmctldPort=@CTLD_PORT@"
  "SlurmdPort=@SLURMD_PORT@"
  "SlurmUser=root"
  "SlurmdUser=root"
  "AuthType=auth/munge"
  "AuthInfo=socket=$munge_sock"
  "CredType=cred/munge"
  "StateSaveLocation=$tmp/ctld"
  "SlurmdSpoolDir=$tmp/slurmd"
  "SlurmctldPidFile=$tmp/slurmctld.pid"
  "SlurmdPidFile=$tmp/slurmd.pid"
  "SlurmctldLogFile=$tmp/slurmctld.log"
  "SlurmdLogFile=$tmp/slurmd.log"
  ${comm[@]+"${comm[@]}"}
  "MpiDefault=none"
  "ReturnToService=2"
  # This host has a hybrid cgroup v1 layout: no cgroup plugin anywhere.
  "ProctrackType=proctrack/linuxproc"
  "TaskPlugin=task/none"
  # This VM lacks CAP_SYS_RESOURCE: do not try to raise job limits to the submitter's.
  "PropagateResourceLimits=NONE"
  "SchedulerType=sched/backfill"
  "SelectType=select/cons_tres"
  "SelectTypeParameters=CR_Core"
  "AccountingStorageType=accounting_storage/none"
  "JobAcctGatherType=jobacct_gather/none"
  # Every finished job gets a completion record (more work for slurmctld than the default
  # jobcomp/none): the benchmark counts COMPLETED records with exit code 0 to prove that
  # all N jobs really ran.
  "JobCompType=jobcomp/filetxt"
  "JobCompLoc=$tmp/jobcomp.log"
  # --- tuned for throughput ---
  # With an epilog, slurmd's epilog-complete message makes slurmctld schedule at once when a
  # job's CPUs free up; without one, freed CPUs wait for the next periodic pass (about 1 s):
  # 2 jobs/s instead of ~40 on this machine.
  "Epilog=/bin/true"
  # batch_sched_delay=0: schedule a batch job at submit time (default: may wait 3 s).
  # sched_min_interval=0: no throttle between scheduling passes (default 2 us).
  # sched_interval=10: full-queue pass every 10 s instead of 60 (the event-driven passes
  #   start most jobs; this only catches stragglers sooner).
  # default_queue_depth=1000: each event-driven pass looks at up to 1000 pending jobs
  #   (default 100), so one job's completion can start many waiting ones.
  "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=10,default_queue_depth=1000"
  # Purge finished job records after 2 s (default 300; 2 is the documented minimum).
  "MinJobAge=2"
  "MaxJobCount=$max_jobs"
  # Less logging in the hot path (default: info).
  "SlurmctldDebug=error"
  "SlurmdDebug=error"
  # One node, this machine; one default partition. 1 CPU per job, no oversubscription.
  "NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$node CPUs=$cpus RealMemory=$real_mem State=UNKNOWN"
  "PartitionName=bench Nodes=$node Default=YES MaxTime=INFINITE State=UP"
)
for o in ${overrides[@]+"${overrides[@]}"}; do # Key=Value replaces or adds, Key= removes
  key=${o%%=*} found=0
  for i in "${!conf[@]}"; do
    if [[ "${conf[$i],,}" == "${key,,}="* ]]; then conf[i]=$o; found=1; fi
  done
  [ "$found" = 1 ] || conf+=("$o")
  if [ -z "${o#*=}" ]; then
    for i in "${!conf[@]}"; do [[ "${conf[$i],,}" == "${key,,}="* ]] && unset 'conf[i]'; done
  fi
done
# Start both daemons and wait (bounded) until the node is idle. Ports are picked free, but
# another process may take one in between: then retry with new ports, 3 attempts at most.
start_cluster() { # sets cluster_up=1 once the node is idle; 0 if a port was taken (retry)
  local i state=""
  cluster_up=0
  read -r ctld_port slurmd_port < <(free_ports 2) || die "no free TCP ports found"
  printf '%s\n' "${conf[@]}" | sed -e "s/@CTLD_PORT@/$ctld_port/" -e "s/@SLURMD_PORT@/$slurmd_port/" >"$SLURM_CONF"
  rm -rf "$tmp/ctld" "$tmp/slurmd" && mkdir -p "$tmp/ctld" "$tmp/slurmd"
  cd "$tmp/work" # the daemons (and the jobs) inherit it; keeps them out of the caller's tree
  log "Slurm $slurm_version: slurmctld on 127.0.0.1:$ctld_port, slurmd on 127.0.0.1:$slurmd_port, temp dir $tmp"
  slurmctld -D -i >"$tmp/slurmctld.out" 2>&1 &
  ctld_pid=$!
  slurmd -D -N "$node" >"$tmp/slurmd.out" 2>&1 &
  slurmd_pid=$!
  for ((i = 0; i < 300; i++)); do # 30 s at most
    if ! kill -0 "$ctld_pid" 2>/dev/null || ! kill -0 "$slurmd_pid" 2>/dev/null; then
      if grep -qs 'Address already in use' "$tmp/slurmctld.out" "$tmp/slurmd.out"; then
        stop_pid "$slurmd_pid" slurmd; stop_pid "$ctld_pid" slurmctld
        ctld_pid="" slurmd_pid=""
        : >"$tmp/slurmctld.log"; : >"$tmp/slurmd.log"
        return 0
      fi
      kill -0 "$ctld_pid" 2>/dev/null || die "slurmctld exited at start-up"
      die "slurmd exited at start-up"
    fi
    state=$(timeout 2 sinfo -h -n "$node" -o %T 2>/dev/null || true)
    if [ "$state" = idle ]; then cluster_up=1; return 0; fi
    sleep 0.1
  done
  die "node '$node' not idle after 30 s (state: '${state:-unknown}')"
}
cluster_up=0
for ((attempt = 1; attempt <= 3; attempt++)); do
  start_cluster
  [ "$cluster_up" = 1 ] && break
  log "a port was taken meanwhile (attempt $attempt of 3); retrying with other ports"
done
[ "$cluster_up" = 1 ] || die "could not bind free ports in 3 attempts"
log "node $node idle ($cpus CPUs, RealMemory=$real_mem MB)"

# ---------------------------------------------------------------- helpers
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.6f", b - a}'; }
median() { # median NUMBER...
  printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {
    if (NR % 2) printf "%.2f", v[(NR + 1) / 2]; else printf "%.2f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
percentile() { # percentile Q FILE: nearest rank
  sort -g "$2" | awk -v q="$1" '{v[NR] = $1} END {
    r = q * NR; k = int(r); if (k < r) k++; if (k < 1) k = 1; printf "%.2f", v[k] }'
}
completed_ok() { # completed_ok: our batch jobs with a COMPLETED, exit 0:0 completion record
  [ -e "$tmp/jobcomp.log" ] || { echo 0; return 0; }
  grep -c ' Name=gantrybench JobState=COMPLETED .* ExitCode=0:0' "$tmp/jobcomp.log" || true
}
queue_len() { # our jobs still pending, running or completing; fails if squeue fails
  local out
  out=$(timeout 20 squeue -h -n gantrybench -o %i) || return 1
  grep -c . <<<"$out" || true
}
jsonarr() { local IFS=,; echo "[$*]"; }

submit_share() { # submit_share COUNT: sequential sbatch calls, stop at the first failure
  local k
  for ((k = 0; k < $1; k++)); do
    timeout 60 sbatch --quiet -J gantrybench -D "$tmp/work" -o /dev/null --wrap true ||
      { echo "sbatch failed (submission $((k + 1)) of this loop)" >&2; return 1; }
  done
}

throughput() { # throughput RUN: sets tp_rate, sub_rate
  local n=$1 t0 t1 t2 left errs=0 per extra s done_before done_after i
  [ "$(queue_len)" = 0 ] || die "queue not empty before run $n"
  done_before=$(completed_ok)
  per=$((jobs / submitters)) extra=$((jobs % submitters))
  t0=$EPOCHREALTIME
  if [ "$submitters" = 1 ]; then
    submit_share "$jobs" || die "submission failed in run $n"
  else
    for ((s = 0; s < submitters; s++)); do
      submit_share $((per + (s < extra ? 1 : 0))) &
      submit_pids+=($!)
    done
    for s in "${submit_pids[@]}"; do wait "$s" || die "a submitter failed in run $n"; done
    submit_pids=()
  fi
  t1=$EPOCHREALTIME
  # Bounded wait for the last completion: 60 s plus 0.5 s per job.
  local deadline
  deadline=$(awk -v t="$t1" -v n="$jobs" 'BEGIN {printf "%.0f", t + 60 + n / 2}')
  while :; do
    if left=$(queue_len); then
      [ "$left" = 0 ] && break
    else
      errs=$((errs + 1))
      [ "$errs" -le 20 ] || die "squeue failed 20 times while waiting in run $n"
    fi
    [ "${EPOCHREALTIME%.*}" -lt "$deadline" ] ||
      die "run $n: ${left:-?} of $jobs jobs still queued after $((deadline - ${t1%.*})) s"
    sleep 0.05
  done
  t2=$EPOCHREALTIME
  # The completion record is written as the job leaves the queue; allow it a moment.
  for ((i = 0; i < 50 && verify; i++)); do
    done_after=$(completed_ok)
    [ $((done_after - done_before)) -ge "$jobs" ] && break
    sleep 0.1
  done
  if [ "$verify" = 1 ] && [ $((done_after - done_before)) != "$jobs" ]; then
    tail -n 3 "$tmp/jobcomp.log" >&2 || true
    die "run $n: $((done_after - done_before)) of $jobs jobs have a COMPLETED record with exit code 0"
  fi
  tp_rate=$(awk -v n="$jobs" -v d="$(elapsed "$t0" "$t2")" 'BEGIN {printf "%.2f", n / d}')
  sub_rate=$(awk -v n="$jobs" -v d="$(elapsed "$t0" "$t1")" 'BEGIN {printf "%.2f", n / d}')
  log "run $n: $jobs jobs: submitted in $(elapsed "$t0" "$t1") s ($sub_rate/s), all completed after $(elapsed "$t0" "$t2") s: $tp_rate jobs/s"
}

latency() { # latency RUN: sets lat_p50, lat_p99
  local n=$1 i a b f="$tmp/lat.$1"
  : >"$f"
  for ((i = 0; i < lat_runs; i++)); do
    a=$EPOCHREALTIME
    timeout 60 srun --quiet -J gantrybench-srun -D "$tmp/work" -n1 true || die "srun failed (run $n, call $((i + 1)))"
    b=$EPOCHREALTIME
    echo "$a $b" >>"$f"
  done
  awk '{printf "%.3f\n", ($2 - $1) * 1000}' "$f" >"$f.ms"
  lat_p50=$(percentile 0.50 "$f.ms") lat_p99=$(percentile 0.99 "$f.ms")
  log "run $n: $lat_runs x srun -n1 true: p50 $lat_p50 ms, p99 $lat_p99 ms"
}

# ---------------------------------------------------------------- measure
verify=0
if grep -qx 'JobCompType=jobcomp/filetxt' "$SLURM_CONF" && grep -qxF "JobCompLoc=$tmp/jobcomp.log" "$SLURM_CONF"; then
  verify=1
else
  log "warning: JobCompType/JobCompLoc overridden: cannot check that every job completed with exit code 0"
fi
# Warm up once (page cache, first-use paths in the daemons); not counted.
timeout 60 srun --quiet -J gantrybench-warmup -D "$tmp/work" -n1 true || die "warm-up srun failed"

load_start=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$load_start" -v c="$cpus" 'BEGIN {exit !(l > c / 2)}'; then
  log "warning: load average $load_start on $cpus cores before measuring; results will be noisy"
fi
tps=() subs=() p50s=() p99s=()
for ((r = 1; r <= runs; r++)); do
  throughput "$r"
  tps+=("$tp_rate") subs+=("$sub_rate")
  latency "$r"
  p50s+=("$lat_p50") p99s+=("$lat_p99")
done

# ---------------------------------------------------------------- report
settings=()
while IFS= read -r line; do
  line=${line//$tmp/\$TMP}
  line=${line//\\/\\\\}
  settings+=("\"${line//\"/\\\"}\"")
done <"$SLURM_CONF"
settings+=("\"munged ${munged_args[*]//$tmp/\$TMP}\"")
if [ "$submitters" = 1 ]; then
  how="sbatch calls sequential from one shell"
else
  how="$submitters parallel shells each running sequential sbatch calls"
fi
load_end=$(cut -d' ' -f1 /proc/loadavg)
total=$(awk -v a="$script_start" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.0f", b - a}')
log "done in $total s"
printf '{"slurm_version":"%s","runs":%d,"jobs":%d,"latency_runs":%d,"submitters":%d,"throughput_jobs_per_s":%s,"throughput_median":%s,"submit_per_s":%s,"submit_per_s_median":%s,"srun_ms_p50":%s,"srun_ms_p99":%s,"srun_p50_median":%s,"srun_p99_median":%s,"machine":"%s","loadavg_1m_before_after":[%s,%s],"settings":[%s],"note":"Slurm runs bare processes, no containers; %s; throughput = jobs / (first submit -> squeue empty); srun latency = wall time of one srun -n1 true (allocation + step + exit)","completions_verified":%s,"wall_s":%s}\n' \
  "$slurm_version" "$runs" "$jobs" "$lat_runs" "$submitters" \
  "$(jsonarr "${tps[@]}")" "$(median "${tps[@]}")" "$(jsonarr "${subs[@]}")" "$(median "${subs[@]}")" \
  "$(jsonarr "${p50s[@]}")" "$(jsonarr "${p99s[@]}")" "$(median "${p50s[@]}")" "$(median "${p99s[@]}")" \
  "$cpus cores, $((mem_mb / 1024)) GiB, kernel $(uname -r)" "$load_start" "$load_end" \
  "$(IFS=,; echo "${settings[*]}")" "$how" "$([ "$verify" = 1 ] && echo true || echo false)" "$total"
