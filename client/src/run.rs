//! `gantry run`: submits a job and, unless detached, follows its output and state to the
//! end, exiting with the job's exit code.

use gantry_shared::Parsed;
use gantry_shared::api::{Job, JobResources, JobSpec, JobState};

use crate::api::ApiClient;
use crate::config::CliConfig;
use crate::print::print_job;

/// What `gantry run` submits.
#[derive(Debug, Clone)]
pub struct RunArgs {
    pub image: String,
    pub name: Option<String>,
    pub cpu: String,
    pub memory: String,
    /// Per node.
    pub gpus: u32,
    /// Acceptable GPU models in order of preference.
    pub gpu_types: Vec<String>,
    /// Least memory per GPU (`40G`).
    pub gpu_memory: Option<String>,
    /// Gang size.
    pub nodes: u32,
    pub selector: Vec<(String, String)>,
    pub spot: bool,
    pub priority: i32,
    pub env: Vec<(String, String)>,
    /// Secrets the job gets (`--secret NAME[:files]`).
    pub secrets: Vec<gantry_shared::secrets::SecretUse>,
    /// Volumes mounted into the job's containers (`--volume NAME:/path`).
    pub volumes: Vec<(
        gantry_shared::volumes::MountPath,
        gantry_shared::volumes::VolumeUse,
    )>,
    pub retries: u32,
    /// Wait before the first retry (doubling per failure, at most 5 minutes).
    pub retry_delay: Option<String>,
    pub timeout: Option<String>,
    pub command: Vec<String>,
    pub detach: bool,
}

/// Submits a job; unless detached, waits for it and returns its exit code.
pub async fn run(cfg: &CliConfig, args: RunArgs, json: bool) -> anyhow::Result<i32> {
    let spec = spec(args.clone())?;
    let client = cfg.client()?;
    let job = client.submit(&spec).await?;
    if args.detach {
        print_job(&job, json)?;
        return Ok(0);
    }
    follow(&client, job, json).await
}

/// A flag's value parsed as the spec's field `field`; a bad one is named the way the API
/// would name it.
fn field<T>(field: &str, text: String) -> anyhow::Result<Parsed<T>>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    Parsed::try_from(text).map_err(|e| anyhow::anyhow!("{field}: {e}"))
}

/// The job `gantry run` submits.
fn spec(args: RunArgs) -> anyhow::Result<JobSpec> {
    Ok(JobSpec {
        name: args.name.unwrap_or_else(|| args.image.clone()),
        image: args.image,
        command: args.command,
        env: args.env.into_iter().collect(),
        secrets: args.secrets,
        volumes: crate::volumes::mounts(args.volumes)?,
        resources: JobResources {
            cpu: field("resources.cpu", args.cpu)?,
            memory: field("resources.memory", args.memory)?,
            gpus: args.gpus,
            gpu_types: args.gpu_types,
            gpu_memory: args
                .gpu_memory
                .map(|m| field("resources.gpu_memory", m))
                .transpose()?,
        },
        nodes: args.nodes,
        spot: args.spot,
        selector: args.selector.into_iter().collect(),
        retries: args.retries,
        backoff: match args.retry_delay {
            Some(d) => gantry_shared::api::Backoff {
                initial: field("backoff.initial", d)?,
                ..Default::default()
            },
            None => Default::default(),
        },
        timeout: args.timeout.map(|t| field("timeout", t)).transpose()?,
        priority: args.priority,
    })
}

/// Follows a submitted job to its end: its reasons to stderr, each generation's output to
/// stdout; returns its exit code.
async fn follow(client: &ApiClient, job: Job, json: bool) -> anyhow::Result<i32> {
    if !json {
        eprintln!("submitted {}", job.id);
    }
    let mut last_reason = None;
    let mut followed = gantry_shared::Generation::NONE;
    let mut seen = 0;
    let mut look_now = false;
    loop {
        // Each look waits for the next change (a long poll), so the end is seen at once;
        // after following output, look again at once (the job may have ended meanwhile).
        let job = if std::mem::take(&mut look_now) {
            client.job(job.id.as_str()).await?
        } else {
            client.job_changed(job.id.as_str(), seen, "30s").await?
        };
        seen = job.updated_at_ms;
        if !json && job.reason != last_reason {
            if let Some(r) = &job.reason {
                eprintln!("{}: {r}", job.id);
            }
            last_reason = job.reason.clone();
        }
        // Stream each generation's output once its members run (after a retry too).
        let members = job.current_members();
        if !json
            && !members.is_empty()
            && members[0].generation > followed
            && members
                .iter()
                .all(|a| a.started_at_ms.is_some() || !a.is_live())
        {
            followed = members[0].generation;
            if members.len() == 1 {
                if let Err(e) = client
                    .logs(job.id.as_str(), true, None, &mut std::io::stdout())
                    .await
                {
                    eprintln!("{}: output unavailable: {e}", job.id);
                }
            } else {
                follow_ranks(client, job.id.as_str(), members.len() as u32).await;
            }
            look_now = true;
            continue;
        }
        if job.state.is_terminal() {
            let code = job.exit_code().unwrap_or(match job.state {
                JobState::Succeeded => 0,
                _ => 1,
            });
            if json {
                print_job(&job, true)?;
            }
            return Ok(code);
        }
    }
}

/// Follows every rank's output at once, each line prefixed `[rank<r>]: ` as torchrun's
/// logs are.
async fn follow_ranks(client: &ApiClient, id: &str, ranks: u32) {
    let tasks = (0..ranks).map(|rank| {
        let (client, id) = (client.clone(), id.to_owned());
        tokio::spawn(async move {
            let mut out = RankLines {
                prefix: format!("[rank{rank}]: "),
                partial: Vec::new(),
            };
            if let Err(e) = client.logs(&id, true, Some(rank), &mut out).await {
                eprintln!("{id}: output of rank {rank} unavailable: {e}");
            }
        })
    });
    for t in futures_util::future::join_all(tasks).await {
        if let Err(e) = t {
            eprintln!("{id}: following output failed: {e}");
        }
    }
}

/// Writes whole lines to stdout with a prefix; a partial line waits for its end (or for
/// the writer to be dropped), so ranks' lines never interleave mid-line.
struct RankLines {
    prefix: String,
    partial: Vec<u8>,
}

impl RankLines {
    fn emit(&self, line: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        out.write_all(self.prefix.as_bytes())?;
        out.write_all(line)?;
        out.flush()
    }
}

impl std::io::Write for RankLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.partial.extend_from_slice(buf);
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            self.emit(&line)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for RankLines {
    fn drop(&mut self) {
        if !self.partial.is_empty() {
            let mut line = std::mem::take(&mut self.partial);
            line.push(b'\n');
            let _ = self.emit(&line);
        }
    }
}
