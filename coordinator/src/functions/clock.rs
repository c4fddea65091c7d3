//! Where the function service reads the time (unix ms) it stamps on inputs, leases,
//! containers and start backoffs. [`SystemClock`] is the product's; the in-process
//! simulation (`gantry_tests::function_sim`) gives a virtual one, so that deadlines,
//! retries, backoffs and scale-down windows run on the simulation's time, the same time
//! its reconcile passes are given.

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    /// Now, in milliseconds since the unix epoch.
    fn now_ms(&self) -> u64;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        gantry_shared::now_ms()
    }
}
