//! `gantry schedules`: list every schedule (functions' from their manifests, job
//! templates' from `create`) with its next and last run; create or delete a job template's.

use std::path::Path;

use gantry_shared::api::JobSpec;
use gantry_shared::resources::Parsed;
use gantry_shared::schedules::{
    CreateJobSchedule, Overlap, ScheduleSpec, ScheduleTarget, ScheduleView,
};

/// A job schedule from the command line: the template is a job spec as `POST /v1/jobs`
/// takes it (JSON).
pub fn create_request(
    name: &str,
    (cron, timezone, period): (Option<String>, Option<String>, Option<String>),
    allow_overlap: bool,
    job_file: &Path,
) -> anyhow::Result<CreateJobSchedule> {
    let text = std::fs::read_to_string(job_file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", job_file.display()))?;
    let job: JobSpec = serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: not a job spec (JSON, as POST /v1/jobs takes): {e}",
            job_file.display()
        )
    })?;
    let period = period
        .map(|p| {
            serde_json::from_value::<Parsed<_>>(serde_json::Value::String(p))
                .map_err(|e| anyhow::anyhow!("--period: {e}"))
        })
        .transpose()?;
    let req = CreateJobSchedule {
        name: name.to_owned(),
        schedule: ScheduleSpec {
            cron,
            timezone,
            period,
            overlap: if allow_overlap {
                Overlap::Allow
            } else {
                Overlap::Skip
            },
        },
        job,
    };
    // Checked here too, so a mistake is named before anything is sent.
    req.validate()
        .map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))?;
    Ok(req)
}

pub fn print_list(schedules: &[ScheduleView], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(schedules)?);
        return Ok(());
    }
    let now = gantry_shared::now_ms();
    println!("{:<32} {:<24} {:<12} LAST", "SCHEDULE", "WHEN", "NEXT");
    for s in schedules {
        let target = match &s.target {
            ScheduleTarget::Function { app, function } => format!("function {app}/{function}"),
            ScheduleTarget::Job { name } => format!("job {name}"),
        };
        let when = match (&s.schedule.cron, &s.schedule.period) {
            (Some(cron), _) => format!(
                "{cron} ({})",
                s.schedule.timezone.as_deref().unwrap_or("UTC")
            ),
            (None, Some(p)) => format!("every {}", p.as_str()),
            _ => String::new(),
        };
        let next = match s.next_run_ms {
            Some(at) if at > now => format!("in {}s", (at - now).div_ceil(1000)),
            Some(_) => "now".into(),
            None => "never".into(),
        };
        let last = match &s.last_run {
            None => "-".into(),
            Some(l) => {
                let what = match (&l.id, &l.skipped) {
                    (Some(id), _) => id.clone(),
                    (None, Some(why)) => format!("skipped: {why}"),
                    (None, None) => "-".into(),
                };
                format!("{} {what}", crate::print::ago(now, l.at_ms))
            }
        };
        println!("{target:<32} {when:<24} {next:<12} {last}");
    }
    Ok(())
}
