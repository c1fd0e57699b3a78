//! gpufleet's NATS plumbing, shared by the coordinator, the worker and the
//! CLI.
//!
//! - [`connect`]: connect with retries and refuse servers older than 2.11.
//! - [`stores`]: the buckets and the stream of the contract, created on
//!   first use by whichever program starts first.
//! - [`kv`]: KV writes with per-message TTLs and compare-and-set done as raw
//!   publishes with headers (see the KV notes in the README: the client's
//!   own helpers lose the TTL when a key is re-created or updated), and a
//!   watcher that tells an expiry from a purge.
//! - [`events`]: publishing an event with its headers, and replaying a
//!   subject of the events stream from a sequence, resuming after a failed
//!   consumer (both the replay and the KV watcher read through the one
//!   ordered-consumer wrapper in `ordered`).
//! - [`retry`]: the delays between tries of anything that failed.
//! - [`settings`]: defaults < file < environment < flags, for every binary.
//! - [`metrics`]: a program's Prometheus registry served on `/metrics`.

pub mod connect;
pub mod events;
pub mod histogram;
pub mod kv;
pub mod metrics;
mod ordered;
pub mod retry;
pub mod settings;
pub mod stores;
pub mod telemetry;

pub use connect::{check_server_version, connect, redact, Auth, ConnectError, MIN_SERVER};
pub use events::{EventsError, Replay, Replayed, Until};
pub use kv::{KvChange, KvError, KvEvent, KvOp, KvWatcher, RawKv};
pub use retry::Backoff;
pub use stores::{ensure_stores, Setup, Stores};
