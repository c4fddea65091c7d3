//! `gpu list` and `gpu inject`.

use crate::*;

pub(crate) fn gpu_command(state_dir: &std::path::Path, cmd: &GpuCommand) -> anyhow::Result<()> {
    match cmd {
        GpuCommand::List { simulate } => {
            let gpus = match simulate {
                Some(spec) => gantry_agent::gpu::simulated::parse_spec(spec, "local")?,
                None => {
                    let mut source = NvmlSource::open()?;
                    gantry_agent::gpu::inventory::GpuSource::discover(&mut source)?
                }
            };
            println!(
                "{:<5} {:<40} {:<24} {:>9} {:<16} {:>4} {:>6} {:<10}",
                "INDEX", "UUID", "MODEL", "MEMORY", "PCI", "NUMA", "NVLINK", "HEALTH"
            );
            for g in gpus {
                let opt = |v: Option<u32>| v.map_or("-".into(), |v| v.to_string());
                println!(
                    "{:<5} {:<40} {:<24} {:>8}G {:<16} {:>4} {:>6} {:<10}{}",
                    g.index,
                    g.uuid,
                    g.model,
                    g.memory_bytes >> 30,
                    if g.pci_bus_id.is_empty() {
                        "-"
                    } else {
                        &g.pci_bus_id
                    },
                    opt(g.numa_node),
                    opt(g.nvlink_group),
                    g.health.to_compact(),
                    if g.simulated { " (simulated)" } else { "" }
                );
            }
            Ok(())
        }
        GpuCommand::Inject { index, xid, ecc } => {
            let event = match (xid, ecc) {
                (Some(x), _) => HealthEvent::Xid(*x),
                (None, _) => HealthEvent::DoubleBitEcc,
            };
            gantry_agent::gpu::simulated::inject(
                state_dir,
                gantry_agent::gpu::simulated::Fault {
                    index: *index,
                    event,
                },
            )?;
            Ok(())
        }
    }
}
