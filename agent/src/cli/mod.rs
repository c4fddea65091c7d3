//! The commands of `gantry-agent` that are more than a call into the library.

pub(crate) mod gpu;
pub(crate) mod run;
pub(crate) mod serve;
