//! gpufleet's test kit: real `nats-server` processes ([`server`]), the real
//! binaries ([`procs`]) and what `/proc` says of a pid ([`pids`]), a whole
//! fleet with the reads the suites share (a job's events and its tasks'
//! states, [`fleet`]), a stand-in NVML library ([`nvml`]), a plain HTTP
//! client ([`http`]) and waiting with deadlines ([`wait`]). The end-to-end suite
//! lives in `tests/tests/`.

pub mod fleet;
pub mod http;
pub mod nvml;
pub mod pids;
pub mod procs;
pub mod server;
pub mod wait;

pub use fleet::{api, state_events, task_states, Fleet, WorkerSpec};
pub use procs::{bin, Proc};
pub use server::{nats_server_bin, NatsCluster, NatsServer};
pub use wait::{eventually, with_deadline};
