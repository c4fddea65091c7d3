//! Schedules: a function called with an empty input, or a job submitted from a template,
//! on a cron expression (in a time zone) or every period. Parsed and checked here, where
//! they enter; [`Schedule::next_after`] is the one place a next run is computed.

use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::JobSpec;
use crate::resources::{HumanDuration, Parsed};

/// The shortest period, and the most often a cron expression may fire (to the second).
pub const MIN_PERIOD: Duration = Duration::from_secs(1);
/// The longest period.
pub const MAX_PERIOD: Duration = Duration::from_secs(366 * 24 * 3600);

/// When a schedule runs, as written: `{ cron = "*/5 * * * *", timezone = "UTC" }` or
/// `{ period = "1h" }`, either with `overlap = "skip"` (the default) or `"allow"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// A cron expression: 5 fields (minute hour day-of-month month day-of-week), or 6 with
    /// seconds first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// The cron expression's time zone (IANA name; default `UTC`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Every this long instead (`30s`, `1h`), the first one period after it is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub period: Option<Parsed<HumanDuration>>,
    /// What a tick does while the previous run is still going.
    #[serde(default)]
    pub overlap: Overlap,
}

/// What a tick does while the previous run of its schedule is still going.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Skip the tick (recorded as skipped).
    #[default]
    Skip,
    /// Run anyway.
    Allow,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error(
        "a schedule is either `cron` (with an optional `timezone`) or `period`, not both and \
         not neither: write {{ cron = \"*/5 * * * *\" }} or {{ period = \"1h\" }}"
    )]
    OneOf,
    #[error("`{cron}` is not a cron expression ({reason}); write 5 fields, e.g. `*/5 * * * *`")]
    Cron { cron: String, reason: String },
    #[error("`{0}` is not a time zone; use an IANA name such as `UTC` or `Europe/Berlin`")]
    TimeZone(String),
    #[error("`timezone` applies to `cron` only")]
    TimeZoneWithPeriod,
    #[error("the period must be between 1s and 366 days")]
    Period,
    #[error("`{cron}` never fires")]
    Never { cron: String },
}

/// A checked schedule.
#[derive(Debug, Clone)]
pub enum Schedule {
    Cron {
        cron: Box<croner::Cron>,
        tz: chrono_tz::Tz,
    },
    Period(Duration),
}

impl ScheduleSpec {
    /// The schedule, or what is wrong with it.
    pub fn parse(&self) -> Result<Schedule, ScheduleError> {
        match (&self.cron, &self.period) {
            (Some(text), None) => {
                let cron =
                    croner::Cron::from_str(text.trim()).map_err(|e| ScheduleError::Cron {
                        cron: text.clone(),
                        reason: e.to_string(),
                    })?;
                let tz = match &self.timezone {
                    None => chrono_tz::Tz::UTC,
                    Some(name) => name
                        .parse()
                        .map_err(|_| ScheduleError::TimeZone(name.clone()))?,
                };
                let schedule = Schedule::Cron {
                    cron: Box::new(cron),
                    tz,
                };
                // A pattern that matches no date (`0 0 31 2 *`) is refused here.
                if schedule.next_after(0).is_none() {
                    return Err(ScheduleError::Never { cron: text.clone() });
                }
                Ok(schedule)
            }
            (None, Some(period)) => {
                if self.timezone.is_some() {
                    return Err(ScheduleError::TimeZoneWithPeriod);
                }
                let period: Duration = (*period.value()).into();
                if !(MIN_PERIOD..=MAX_PERIOD).contains(&period) {
                    return Err(ScheduleError::Period);
                }
                Ok(Schedule::Period(period))
            }
            _ => Err(ScheduleError::OneOf),
        }
    }
}

impl Schedule {
    /// The first run strictly after `after_ms` (unix ms), if any.
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        match self {
            Schedule::Period(p) => Some(after_ms.saturating_add(p.as_millis() as u64)),
            Schedule::Cron { cron, tz } => {
                use chrono::TimeZone as _;
                let at = chrono::Utc
                    .timestamp_millis_opt(i64::try_from(after_ms).ok()?)
                    .single()?
                    .with_timezone(tz);
                let next = cron.find_next_occurrence(&at, false).ok()?;
                u64::try_from(next.timestamp_millis()).ok()
            }
        }
    }
}

/// `POST /v1/schedules`: a job template submitted on a schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJobSchedule {
    /// 1 to 64 letters, digits, `-` and `_`.
    pub name: String,
    pub schedule: ScheduleSpec,
    /// The job each run submits.
    pub job: JobSpec,
}

impl CreateJobSchedule {
    /// Checks the name, the schedule and the job template.
    pub fn validate(&self) -> Result<Schedule, crate::api::FieldError> {
        let ok = (1..=64).contains(&self.name.len())
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            return Err(crate::api::FieldError {
                field: "name",
                message: "must be 1 to 64 letters, digits, `-` and `_`".into(),
            });
        }
        self.job.validate().map_err(|e| crate::api::FieldError {
            field: "job",
            message: format!("{}: {}", e.field, e.message),
        })?;
        self.schedule.parse().map_err(|e| crate::api::FieldError {
            field: "schedule",
            message: e.to_string(),
        })
    }
}

/// What a schedule runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ScheduleTarget {
    /// A deployed function, called with an empty input.
    Function { app: String, function: String },
    /// A job template.
    Job { name: String },
}

/// A schedule's last tick.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LastRun {
    pub at_ms: u64,
    /// The call or job it started; `None` when the tick was skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Skipped because the run before was still going (`overlap = "skip"`), or why it
    /// could not start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// A schedule as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ScheduleView {
    pub target: ScheduleTarget,
    pub schedule: ScheduleSpec,
    pub next_run_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<LastRun>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(toml_text: &str) -> ScheduleSpec {
        toml::from_str(toml_text).expect("parses")
    }

    #[test]
    fn cron_and_period_schedules_parse_and_find_their_next_run() {
        // 2026-11-30 10:02:00 UTC.
        let t = 1_796_032_920_000;
        let every5 = spec("cron = \"*/5 * * * *\"").parse().expect("valid");
        assert_eq!(every5.next_after(t), Some(t + 3 * 60_000), "10:05");
        // 9:00 in Berlin (UTC+1 in winter) is 8:00 UTC, the next day.
        let berlin = spec("cron = \"0 9 * * *\"\ntimezone = \"Europe/Berlin\"")
            .parse()
            .expect("valid");
        let next = berlin.next_after(t).expect("next");
        assert_eq!(next, t - (2 * 60_000) - 2 * 3_600_000 + 24 * 3_600_000);
        let hourly = spec("period = \"1h\"").parse().expect("valid");
        assert_eq!(hourly.next_after(t), Some(t + 3_600_000));
        assert_eq!(spec("period = \"1h\"").overlap, Overlap::Skip);
        assert_eq!(
            spec("period = \"1h\"\noverlap = \"allow\"").overlap,
            Overlap::Allow
        );

        for (text, says) in [
            ("", "either `cron`"),
            ("cron = \"* * * * *\"\nperiod = \"1h\"", "either `cron`"),
            ("cron = \"61 * * * *\"", "not a cron expression"),
            (
                "cron = \"* * * * *\"\ntimezone = \"Mars/Olympus\"",
                "not a time zone",
            ),
            (
                "period = \"1h\"\ntimezone = \"UTC\"",
                "applies to `cron` only",
            ),
            ("period = \"100ms\"", "between 1s"),
            ("cron = \"0 0 31 2 *\"", "never fires"),
        ] {
            let e = spec(text).parse().expect_err(text).to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
    }
}
