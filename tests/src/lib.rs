//! gantry-tests: end-to-end tests across processes. The multi-host harness arrives with
//! cluster membership; today the agent's own integration tests live in `agent/tests/`.
