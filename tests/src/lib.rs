//! gpufleet's test kit: real `nats-server` processes ([`server`]), the real
//! binaries ([`procs`]) and what `/proc` says of a pid ([`pids`]), a whole
//! fleet with the reads the suites share (a job's events and its tasks'
//! states, [`fleet`]), the invariants every fault must leave intact
//! ([`invariants`]), a stand-in NVML library ([`nvml`]), a fleet with
//! roles made by `gpufleet auth` ([`secure`]), a private CA for mutual TLS
//! ([`tls`]), a TCP proxy that cuts a program off from its server
//! ([`proxy`]), a plain HTTP client ([`http`]) and waiting with deadlines
//! ([`wait`]). The end-to-end suite
//! lives in `tests/tests/`.

pub mod fleet;
pub mod http;
pub mod invariants;
pub mod nvml;
pub mod pids;
pub mod procs;
pub mod proxy;
pub mod secure;
pub mod server;
pub mod tls;
pub mod wait;

pub use fleet::{
    api, coordinator_config, get_job, open_to_tasks, spawn_coordinator, spawn_plain_worker,
    spawn_worker, state_events, submit_job, task_states, task_states_read, wait_workers_listed,
    Fleet, WorkerSpec,
};
pub use procs::{bin, Proc};
pub use server::{nats_server_bin, NatsCluster, NatsServer};
pub use wait::{eventually, with_deadline};

/// The README's Python block that starts with `start` (an example's
/// docstring): the README shows each example whole, and its tests check
/// that it is the tested file.
pub fn readme_python(start: &str) -> String {
    let readme =
        std::fs::read_to_string(server::workspace_root().join("README.md")).expect("README.md");
    readme
        .split("```python\n")
        .skip(1)
        .filter_map(|rest| rest.split("```\n").next())
        .find(|block| block.starts_with(start))
        .unwrap_or_else(|| panic!("no python block in the README starts with {start:?}"))
        .to_string()
}
