//! CPU accounting for the benchmarks that run real processes: CPU seconds of a process
//! (`/proc/PID/stat`) and busy seconds of the whole machine (`/proc/stat`), and a window
//! over a stretch of a benchmark that says where the CPU went.

use std::time::Instant;

use serde_json::{Value, json};

/// CPU seconds (user + system) process `pid` has used so far; 0 when it is gone.
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / clock_ticks()
}

/// Busy CPU seconds of the whole machine so far (`/proc/stat`, all but idle and iowait).
pub fn machine_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle) / clock_ticks()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Where the CPU went over a stretch of the benchmark: the coordinator, the agent, this
/// process (the client) and the whole machine (the rest: shims, containers, others).
pub struct CpuWindow {
    pids: [u32; 3],
    start: [f64; 3],
    machine: f64,
    wall: Instant,
}

impl CpuWindow {
    pub fn start(coordinator: u32, agent: u32) -> Self {
        let pids = [coordinator, agent, std::process::id()];
        Self {
            pids,
            start: pids.map(cpu_secs),
            machine: machine_busy_secs(),
            wall: Instant::now(),
        }
    }

    pub fn end(&self) -> Value {
        let now = self.pids.map(cpu_secs);
        let d = |i: usize| now[i] - self.start[i];
        json!({
            "wall_s": self.wall.elapsed().as_secs_f64(),
            "coordinator_s": d(0),
            "agent_s": d(1),
            "client_s": d(2),
            "machine_busy_s": machine_busy_secs() - self.machine,
        })
    }
}

/// A [`CpuWindow`]'s result over `n` units of work, in words: how busy the machine was and
/// the CPU each process spent per `unit` (`client` names the load's own process, `rest`
/// what else the machine ran).
pub fn summary(v: &Value, n: f64, (unit, client, rest): (&str, &str, &str)) -> String {
    let g = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    format!(
        "{:.2} of the machine's cores busy; per {unit}: coordinator {:.0} µs, agent {:.0} µs, {client} {:.0} µs, the rest ({rest}) {:.0} µs of CPU",
        g("machine_busy_s") / g("wall_s"),
        g("coordinator_s") / n * 1e6,
        g("agent_s") / n * 1e6,
        g("client_s") / n * 1e6,
        (g("machine_busy_s") - g("coordinator_s") - g("agent_s") - g("client_s")) / n * 1e6,
    )
}
