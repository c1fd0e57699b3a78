//! The floor: the bare NATS operations one single-task job costs in
//! gpufleet's design, run by three small actors with no gpufleet logic:
//!
//! | step | who | operation |
//! |---|---|---|
//! | 1 | client → coordinator | submit request/reply |
//! | 2 | coordinator | job record KV put (before the reply) |
//! | 3 | coordinator | reservation create with TTL + RESERVED state publish (with 2) |
//! | 4 | worker | sees the reservation on its KV watch; claim (CAS + TTL) |
//! | 5 | worker | RUNNING state publish, result publish |
//! | 6 | worker | lease purge |
//! | 7 | coordinator | sees the result on its stream consumer; job record put + SUCCEEDED publish |
//! | 8 | client | sees the result event |
//!
//! Latency is submit to result (step 1 to 8); gpufleet's own path has the
//! same hops and writes, so the ratio of the two is what gpufleet's logic
//! costs.
//!
//! [`run_five`] is a barer floor, the one the performance targets are set
//! against: five NATS operations per cycle, passed between three actors
//! the way a task's control flow passes (client → coordinator → worker →
//! client), with no record, watch or consumer:
//!
//! | step | who | operation |
//! |---|---|---|
//! | 1 | client → coordinator | request/reply |
//! | 2 | coordinator | KV create with a TTL (the lease), before the reply |
//! | 3 | coordinator → worker | core publish (the assignment) |
//! | 4 | worker → client | stream publish (the result), seen by the client's subscription |
//! | 5 | worker | KV delete (the release) |
//!
//! A cycle ends when the client has both the reply and the result.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use futures::StreamExt;
use gpufleet_natsutil::events::{self, Replay, Replayed, Until};
use gpufleet_natsutil::histogram::Histogram;
use gpufleet_natsutil::{KvEvent, KvOp, RawKv};
use tokio::sync::oneshot;

pub struct FloorResult {
    pub cycles: u64,
    pub elapsed: Duration,
    pub latency: Histogram,
}

impl FloorResult {
    pub fn rate(&self) -> f64 {
        self.cycles as f64 / self.elapsed.as_secs_f64()
    }
}

const LEASES: &str = "floor-leases";
const JOBS: &str = "floor-jobs";
const STREAM: &str = "FLOOR_EVENTS";

async fn setup(js: &jetstream::Context) -> anyhow::Result<()> {
    for (bucket, markers) in [(LEASES, true), (JOBS, false)] {
        let _ = js.delete_key_value(bucket).await;
        js.create_key_value(kv::Config {
            bucket: bucket.into(),
            history: 1,
            limit_markers: markers.then_some(Duration::from_secs(60)),
            max_value_size: 8 << 20,
            ..Default::default()
        })
        .await?;
    }
    let _ = js.delete_stream(STREAM).await;
    js.create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec!["floor.events.>".into()],
        allow_direct: true,
        ..Default::default()
    })
    .await?;
    Ok(())
}

/// An event, with the headers gpufleet's events carry.
async fn publish(js: &jetstream::Context, subject: String, body: Bytes) -> anyhow::Result<()> {
    events::publish(js, subject, body, None).await?;
    Ok(())
}

/// A payload about the size of gpufleet's messages for a small task.
fn payload(n: usize) -> Bytes {
    Bytes::from(vec![b'x'; n])
}

async fn coordinator(client: async_nats::Client) -> anyhow::Result<()> {
    let js = jetstream::new(client.clone());
    let jobs = RawKv::open(&js, JOBS).await?;
    let leases = RawKv::open(&js, LEASES).await?;
    let mut requests = client.subscribe("floor.submit").await?;
    let (c, j, l) = (client.clone(), jobs.clone(), leases.clone());
    let js2 = js.clone();
    tokio::spawn(async move {
        while let Some(m) = requests.next().await {
            let (c, j, l, js) = (c.clone(), j.clone(), l.clone(), js2.clone());
            tokio::spawn(async move {
                let id = String::from_utf8_lossy(&m.payload).to_string();
                let key = format!("w.{id}.1");
                let (a, b, e) = tokio::join!(
                    j.put(&id, payload(400), None),
                    l.create(&key, payload(600), Some(Duration::from_secs(30))),
                    publish(&js, format!("floor.events.{id}.t.state"), payload(200)),
                );
                if a.is_ok() && b.is_ok() && e.is_ok() {
                    if let Some(reply) = m.reply {
                        let _ = c.publish(reply, Bytes::from_static(b"{}")).await;
                    }
                }
            });
        }
    });
    // Results, as the coordinator's stream consumer sees them: from the
    // start of the stream, which `setup` has just made empty.
    let filters = vec!["floor.events.*.*.result".to_string()];
    let mut results = Replay::start(&js, STREAM, filters, 1, Until::Live).await?;
    tokio::spawn(async move {
        while let Some(r) = results.next().await {
            let Ok(Replayed { message: m, .. }) = r else {
                continue;
            };
            let (j, js) = (jobs.clone(), js.clone());
            let id = m.subject.split('.').nth(2).unwrap_or_default().to_string();
            tokio::spawn(async move {
                let _ = tokio::join!(
                    j.put(&id, payload(500), None),
                    publish(&js, format!("floor.events.{id}.t.state"), payload(200)),
                );
            });
        }
    });
    Ok(())
}

async fn worker(client: async_nats::Client) -> anyhow::Result<()> {
    let js = jetstream::new(client);
    let leases = RawKv::open(&js, LEASES).await?;
    let mut watch = leases.watch("w.>").await?;
    tokio::spawn(async move {
        while let Some(Ok(ev)) = watch.next().await {
            let KvEvent::Change(c) = ev else { continue };
            // Only new reservations (a first revision); our own claims and
            // purges come back on the watch too.
            if c.op != KvOp::Put || c.value.len() != 600 {
                continue;
            }
            let (leases, js) = (leases.clone(), js.clone());
            tokio::spawn(async move {
                let id = c.key.split('.').nth(1).unwrap_or_default().to_string();
                if leases
                    .update(
                        &c.key,
                        payload(601),
                        Some(Duration::from_secs(30)),
                        c.revision,
                    )
                    .await
                    .is_err()
                {
                    return;
                }
                let _ = publish(&js, format!("floor.events.{id}.t.state"), payload(200)).await;
                let _ = publish(&js, format!("floor.events.{id}.t.result"), payload(300)).await;
                let _ = leases.purge(&c.key, Duration::from_secs(60)).await;
            });
        }
    });
    Ok(())
}

const FIVE_KV: &str = "floor5-leases";
const FIVE_STREAM: &str = "FLOOR5_EVENTS";

/// Runs `cycles` five-operation cycles with `in_flight` at a time.
pub async fn run_five(url: &str, cycles: u64, in_flight: usize) -> anyhow::Result<FloorResult> {
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client.clone());
    let _ = js.delete_key_value(FIVE_KV).await;
    js.create_key_value(kv::Config {
        bucket: FIVE_KV.into(),
        history: 1,
        limit_markers: Some(Duration::from_secs(60)),
        ..Default::default()
    })
    .await?;
    let _ = js.delete_stream(FIVE_STREAM).await;
    js.create_stream(stream::Config {
        name: FIVE_STREAM.into(),
        subjects: vec!["floor5.events.>".into()],
        ..Default::default()
    })
    .await?;

    // The worker: publishes the result, then releases the lease.
    let wc = async_nats::connect(url).await?;
    let wjs = jetstream::new(wc.clone());
    let wkv = RawKv::open(&wjs, FIVE_KV).await?;
    let mut assignments = wc.subscribe("floor5.go.*").await?;
    tokio::spawn(async move {
        while let Some(m) = assignments.next().await {
            let (wjs, wkv) = (wjs.clone(), wkv.clone());
            tokio::spawn(async move {
                let id = m.subject.split('.').nth(2).unwrap_or_default().to_string();
                let _ = publish(&wjs, format!("floor5.events.{id}"), payload(300)).await;
                let _ = wkv
                    .purge(&format!("w.{id}.1"), Duration::from_secs(60))
                    .await;
            });
        }
    });
    wc.flush().await?;

    // The coordinator: makes the lease, assigns, answers.
    let cc = async_nats::connect(url).await?;
    let ckv = RawKv::open(&jetstream::new(cc.clone()), FIVE_KV).await?;
    let mut requests = cc.subscribe("floor5.submit").await?;
    cc.flush().await?;
    tokio::spawn(async move {
        while let Some(m) = requests.next().await {
            let (cc, ckv) = (cc.clone(), ckv.clone());
            tokio::spawn(async move {
                let id = String::from_utf8_lossy(&m.payload).to_string();
                let leased = ckv
                    .create(
                        &format!("w.{id}.1"),
                        payload(600),
                        Some(Duration::from_secs(30)),
                    )
                    .await;
                if leased.is_ok()
                    && cc
                        .publish(format!("floor5.go.{id}"), payload(200))
                        .await
                        .is_ok()
                {
                    if let Some(reply) = m.reply {
                        let _ = cc.publish(reply, Bytes::from_static(b"{}")).await;
                    }
                }
            });
        }
    });

    drive(
        client,
        "floor5.submit",
        "floor5.events.*",
        cycles,
        in_flight,
    )
    .await
}

/// Runs `cycle(n)` for n in 0..cycles, `in_flight` at a time, and times
/// each.
async fn timed<F, Fut>(cycles: u64, in_flight: usize, cycle: F) -> anyhow::Result<FloorResult>
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let latency = Arc::new(Mutex::new(Histogram::default()));
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut runners = Vec::new();
    for _ in 0..in_flight {
        let (latency, next, cycle) = (latency.clone(), next.clone(), cycle.clone());
        runners.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= cycles {
                    return Ok::<(), anyhow::Error>(());
                }
                let t0 = Instant::now();
                cycle(n).await?;
                latency.lock().expect("lock").record(t0.elapsed());
            }
        }));
    }
    for r in runners {
        r.await??;
    }
    let elapsed = started.elapsed();
    let latency = latency.lock().expect("lock").clone();
    Ok(FloorResult {
        cycles,
        elapsed,
        latency,
    })
}

/// Runs `cycles` jobs through the floor with `in_flight` at a time.
pub async fn run(url: &str, cycles: u64, in_flight: usize) -> anyhow::Result<FloorResult> {
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client.clone());
    setup(&js).await?;
    coordinator(async_nats::connect(url).await?).await?;
    worker(async_nats::connect(url).await?).await?;

    drive(
        client,
        "floor.submit",
        "floor.events.*.*.result",
        cycles,
        in_flight,
    )
    .await
}

/// Submits job ids `j<n>` on `submit` and ends each cycle when a message
/// for it arrives on `results` (whose third token is the id).
async fn drive(
    client: async_nats::Client,
    submit: &'static str,
    results: &'static str,
    cycles: u64,
    in_flight: usize,
) -> anyhow::Result<FloorResult> {
    let waiting: Arc<Mutex<HashMap<String, oneshot::Sender<()>>>> = Arc::default();
    let mut sub = client.subscribe(results).await?;
    client.flush().await?;
    let w = waiting.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let id = m.subject.split('.').nth(2).unwrap_or_default().to_string();
            if let Some(tx) = w.lock().expect("lock").remove(&id) {
                let _ = tx.send(());
            }
        }
    });
    timed(cycles, in_flight, move |n| {
        let (client, waiting) = (client.clone(), waiting.clone());
        async move {
            let id = format!("j{n}");
            let (tx, rx) = oneshot::channel();
            waiting.lock().expect("lock").insert(id.clone(), tx);
            client.request(submit, Bytes::from(id.clone())).await?;
            tokio::time::timeout(Duration::from_secs(30), rx)
                .await
                .map_err(|_| anyhow::anyhow!("cycle {id} on {submit} timed out"))??;
            Ok(())
        }
    })
    .await
}
