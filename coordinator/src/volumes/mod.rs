//! Volumes: named directory trees that outlive containers (`gantry volume`, `volumes =
//! { "/data" = "NAME" }`). [`VolumeStore`] records them and resolves the volumes a job or
//! function names into where each lives; [`VolumeService`] makes and removes them on
//! their nodes and streams their files. The agent side is `gantry_agent::volumes`.

mod service;
mod store;

pub use service::{VolumeService, VolumeServiceError};
pub use store::{VolumeStore, VolumeUseError};
