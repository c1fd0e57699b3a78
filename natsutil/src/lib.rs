//! gpufleet's NATS plumbing, shared by the coordinator, the worker and the
//! CLI.
//!
//! - [`connect`]: connect with retries and refuse servers older than 2.11.
//! - [`stores`]: the buckets and the stream of the contract, created by
//!   the coordinator alone (others wait for them), and where existing ones
//!   differ from its settings.
//! - [`kv`]: KV writes with per-message TTLs and compare-and-set done as raw
//!   publishes with headers (see the KV notes in the README: the client's
//!   own helpers lose the TTL when a key is re-created or updated), and a
//!   watcher that tells an expiry from a purge.
//! - [`events`]: publishing an event with its headers, and replaying a
//!   subject of the events stream from a sequence, resuming after a failed
//!   consumer (both the replay and the KV watcher read through the one
//!   ordered consumer in `ordered`, which notices a dead consumer within
//!   seconds, and both resume after the last sequence they handed out).
//! - [`artifacts`]: uploading a task's files as chunks and a description,
//!   listing a job's and downloading one, checked by size and sha256.
//! - [`retry`]: the delays between tries of anything that failed.
//! - [`settings`]: defaults < file < environment < flags, for every binary.
//! - [`server_conf`]: the nats-server `authorization` block that gives each
//!   member of a fleet its role's permissions.
//! - [`metrics`]: a program's Prometheus registry served on `/metrics`.

pub mod artifacts;
pub mod connect;
pub mod events;
pub mod histogram;
pub mod kv;
pub mod metrics;
mod ordered;
pub mod retry;
pub mod server_conf;
pub mod settings;
pub mod stores;
pub mod telemetry;

pub use connect::{check_server_version, connect, redact, Auth, ConnectError, MIN_SERVER};
pub use events::{EventsError, Replay, ReplayEvent, Replayed, Until};
pub use kv::{KvChange, KvError, KvEvent, KvOp, KvWatcher, RawKv};
pub use retry::Backoff;
pub use stores::{create_stores, Setup, Stores};
