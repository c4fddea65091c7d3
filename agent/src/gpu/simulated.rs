//! Simulated GPUs, for hosts and tests without NVIDIA hardware.
//!
//! Declared with a spec such as `8xH100-80GB,nvlink=4,numa=2` (several kinds joined with
//! `+`: `4xH100-80GB+4xA100-40GB`): count, model, memory in GB as the model's suffix, and
//! optionally NVLink islands of `nvlink` consecutive GPUs and `numa` NUMA nodes the GPUs
//! are spread over evenly. Every simulated GPU says `simulated` wherever it is reported
//! (its UUID starts with `GPU-SIM-`), and the runtime never injects one as a device.
//!
//! Faults are injected through a file: `gantry-agent gpu inject` appends a line
//! (`xid <index> <code>` or `ecc <index>`) to `<state-dir>/gpu-sim/faults`, and the
//! source reads new lines as health events, as NVML would deliver them.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use gantry_shared::gossip::GpuInfo;

use super::health::Throttle;
use super::inventory::{GpuSource, HealthEvent, InventoryError};

/// The faults file below a state directory.
pub fn faults_path(state_dir: &Path) -> PathBuf {
    state_dir.join("gpu-sim").join("faults")
}

/// Parses a spec into the GPUs it declares, for node `node` (UUIDs are unique per node).
pub fn parse_spec(spec: &str, node: &str) -> Result<Vec<GpuInfo>, InventoryError> {
    let err = |reason: String| InventoryError::BadSpec {
        spec: spec.into(),
        reason,
    };
    let mut gpus = Vec::new();
    let mut next_group = 0u32;
    let mut next_numa = 0u32;
    for part in spec.split('+') {
        let mut fields = part.split(',');
        let head = fields.next().unwrap_or_default().trim();
        let (count, model) = head
            .split_once(['x', 'X'])
            .ok_or_else(|| err(format!("`{head}` is not COUNTxMODEL, e.g. 8xH100-80GB")))?;
        let count: u32 = count
            .parse()
            .ok()
            .filter(|c| (1..=64).contains(c))
            .ok_or_else(|| err(format!("GPU count `{count}` must be 1-64")))?;
        let memory_gb: u64 = model
            .rsplit_once('-')
            .and_then(|(_, m)| m.strip_suffix("GB"))
            .and_then(|m| m.parse().ok())
            .filter(|&m| m > 0)
            .ok_or_else(|| {
                err(format!(
                    "model `{model}` needs its memory as a suffix, e.g. H100-80GB"
                ))
            })?;
        let (mut nvlink, mut numa) = (None, None);
        for f in fields {
            let (k, v) = f
                .split_once('=')
                .ok_or_else(|| err(format!("option `{f}` is not KEY=VALUE")))?;
            let n: u32 = v
                .parse()
                .ok()
                .filter(|&n| n >= 1 && n <= count)
                .ok_or_else(|| err(format!("`{k}={v}` must be 1-{count}")))?;
            match k.trim() {
                "nvlink" => nvlink = Some(n),
                "numa" => numa = Some(n),
                other => {
                    return Err(err(format!(
                        "unknown option `{other}` (nvlink=N: islands of N GPUs; numa=N: NUMA nodes)"
                    )));
                }
            }
        }
        for i in 0..count {
            let index = gpus.len() as u32;
            gpus.push(GpuInfo {
                numa_node: numa.map(|n| next_numa + i * n / count),
                nvlink_group: nvlink.map(|n| next_group + i / n),
                ..GpuInfo::simulated(node, index, model, memory_gb << 30)
            });
        }
        if let Some(n) = nvlink {
            next_group += count.div_ceil(n);
        }
        if let Some(n) = numa {
            next_numa += n;
        }
    }
    Ok(gpus)
}

/// A fault to inject into a simulated GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub index: u32,
    pub event: HealthEvent,
}

impl Fault {
    fn to_line(self) -> String {
        match self.event {
            HealthEvent::Xid(x) => format!("xid {} {x}\n", self.index),
            HealthEvent::DoubleBitEcc => format!("ecc {}\n", self.index),
        }
    }

    fn parse(line: &str) -> Option<Self> {
        let mut w = line.split_whitespace();
        let kind = w.next()?;
        let index = w.next()?.parse().ok()?;
        let event = match kind {
            "xid" => HealthEvent::Xid(w.next()?.parse().ok()?),
            "ecc" => HealthEvent::DoubleBitEcc,
            _ => return None,
        };
        Some(Self { index, event })
    }
}

/// Appends a fault for the running agent to pick up (one `write`, so lines never mix).
pub fn inject(state_dir: &Path, fault: Fault) -> Result<(), InventoryError> {
    let path = faults_path(state_dir);
    let io = |source| InventoryError::Faults {
        path: path.clone(),
        source,
    };
    if !path.exists() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no agent with simulated GPUs runs on this state directory",
        )));
    }
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(io)?;
    f.write_all(fault.to_line().as_bytes()).map_err(io)
}

/// The simulated [`GpuSource`].
pub struct SimulatedSource {
    gpus: Vec<GpuInfo>,
    faults: PathBuf,
    offset: u64,
}

impl SimulatedSource {
    /// Parses the spec and creates an empty faults file under `state_dir` (earlier faults
    /// died with the previous agent, as a real GPU's health is re-read at start).
    pub fn new(spec: &str, node: &str, state_dir: &Path) -> Result<Self, InventoryError> {
        let gpus = parse_spec(spec, node)?;
        let faults = faults_path(state_dir);
        let io = |source| InventoryError::Faults {
            path: faults.clone(),
            source,
        };
        if let Some(dir) = faults.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        std::fs::write(&faults, b"").map_err(io)?;
        Ok(Self {
            gpus,
            faults,
            offset: 0,
        })
    }

    fn read_new(&mut self) -> std::io::Result<Vec<(u32, HealthEvent)>> {
        let mut f = std::fs::File::open(&self.faults)?;
        f.seek(SeekFrom::Start(self.offset))?;
        let mut text = String::new();
        f.read_to_string(&mut text)?;
        // Only whole lines; a partial one is read next time.
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        self.offset += complete as u64;
        Ok(text[..complete]
            .lines()
            .filter_map(|l| {
                let fault = Fault::parse(l);
                if fault.is_none() {
                    tracing::warn!(line = l, "ignoring a malformed simulated GPU fault");
                }
                fault
            })
            .map(|f| (f.index, f.event))
            .collect())
    }
}

impl GpuSource for SimulatedSource {
    fn kind(&self) -> &'static str {
        "simulated"
    }

    fn discover(&mut self) -> Result<Vec<GpuInfo>, InventoryError> {
        Ok(self.gpus.clone())
    }

    fn wait_events(&mut self, timeout: Duration) -> Vec<(u32, HealthEvent)> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match self.read_new() {
                Ok(events) if !events.is_empty() => return events,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(path = %self.faults.display(), error = %e, "cannot read simulated GPU faults")
                }
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Vec::new();
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(50)));
        }
    }

    fn throttle(&mut self, _index: u32) -> Option<Throttle> {
        Some(Throttle::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::inventory::Inventory;

    #[test]
    fn specs_declare_models_memory_and_topology() {
        let g = parse_spec("8xH100-80GB,nvlink=4,numa=2", "n1").expect("spec");
        assert_eq!(g.len(), 8);
        assert!(g.iter().all(|g| g.simulated && g.model == "H100-80GB"));
        assert_eq!(g[0].memory_bytes, 80 << 30);
        assert_eq!(g[5].uuid, "GPU-SIM-n1-5");
        let groups: Vec<_> = g.iter().map(|g| g.nvlink_group).collect();
        assert_eq!(groups, [0, 0, 0, 0, 1, 1, 1, 1].map(Some));
        let numa: Vec<_> = g.iter().map(|g| g.numa_node).collect();
        assert_eq!(numa, [0, 0, 0, 0, 1, 1, 1, 1].map(Some));

        let mixed = parse_spec("2xH100-80GB,nvlink=2+2xA100-40GB", "n").expect("spec");
        assert_eq!(mixed[2].model, "A100-40GB");
        assert_eq!((mixed[2].index, mixed[2].nvlink_group), (2, None));
        assert_eq!(mixed[1].nvlink_group, Some(0));
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        for (spec, says) in [
            ("H100", "COUNTxMODEL"),
            ("0xH100-80GB", "1-64"),
            ("8xH100", "memory as a suffix"),
            ("8xH100-80GB,nvlink=9", "nvlink=9"),
            ("8xH100-80GB,nvswitch=1", "unknown option"),
        ] {
            let e = parse_spec(spec, "n").expect_err(spec).to_string();
            assert!(e.contains(says), "{spec}: {e}");
        }
    }

    #[test]
    fn injected_faults_reach_the_inventory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = SimulatedSource::new("4xA100-40GB", "n", dir.path()).expect("source");
        let inv = Inventory::start(source).expect("inventory");
        let mut rx = inv.subscribe();
        // An application Xid changes nothing; a critical one marks the GPU.
        inject(
            dir.path(),
            Fault {
                index: 1,
                event: HealthEvent::Xid(13),
            },
        )
        .expect("inject");
        inject(
            dir.path(),
            Fault {
                index: 2,
                event: HealthEvent::Xid(79),
            },
        )
        .expect("inject");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("rt");
        let gpus = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), rx.changed())
                .await
                .expect("a change within 5 s")
                .expect("watcher alive");
            rx.borrow().clone()
        });
        let health: Vec<_> = gpus.iter().map(|g| g.health.to_compact()).collect();
        assert_eq!(health, ["ok", "ok", "unhealthy:xid_79", "ok"]);
    }

    #[test]
    fn inject_without_an_agent_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = inject(
            dir.path(),
            Fault {
                index: 0,
                event: HealthEvent::DoubleBitEcc,
            },
        )
        .expect_err("no agent");
        assert!(
            e.to_string().contains("no agent with simulated GPUs"),
            "{e}"
        );
    }
}
