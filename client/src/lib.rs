//! gantry-client: the `gantry` command line. A client of the coordinator's HTTP API
//! (`api`), the commands built on it (`run`, `print`, `image`, `functions`, `secrets`, `volumes`), where it finds the
//! coordinator (`config`), and `gantry dev` (`dev`), which runs a coordinator and agents on
//! this machine as child processes; Python apps' `run`, `deploy` and `serve` go to the
//! Python SDK (`python`). It links no server code: no sled, quinn or axum.

pub mod api;
pub mod config;
pub mod dev;
pub mod functions;
pub mod image;
pub mod print;
pub mod python;
pub mod run;
pub mod schedules;
pub mod secrets;
pub mod volumes;
