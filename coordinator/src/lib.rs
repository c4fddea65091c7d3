//! gantry-coordinator: placement, reconciliation and the HTTP API. Not built yet: this
//! crate holds the binaries' entry points so the workspace layout is final.
