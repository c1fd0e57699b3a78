//! gpufleet's test kit: real `nats-server` processes ([`server`]), the real
//! binaries ([`procs`]) and what `/proc` says of a pid ([`pids`]), a whole
//! fleet with the reads the suites share (a job's events and its tasks'
//! states, [`fleet`]), the invariants every fault must leave intact
//! ([`invariants`]), a stand-in NVML library ([`nvml`]) and waiting with
//! deadlines ([`wait`]). The end-to-end suite
//! lives in `tests/tests/`.

pub mod fleet;
pub mod invariants;
pub mod nvml;
pub mod pids;
pub mod procs;
pub mod server;
pub mod wait;

pub use fleet::{api, get_job, state_events, submit_job, task_states, Fleet, WorkerSpec};
pub use procs::{bin, Proc};
pub use server::{nats_server_bin, NatsCluster, NatsServer};
pub use wait::{eventually, with_deadline};
