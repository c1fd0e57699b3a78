//! The KV facts gpufleet's leases are built on, checked against a real
//! nats-server (see the design notes on ADR-43/48 and nats-server#6959).

use std::time::Duration;

use async_nats::jetstream;
use gpufleet_natsutil::kv::Entry;
use gpufleet_natsutil::{create_stores, KvError, KvEvent, KvOp, RawKv, Setup};
use gpufleet_schema::subjects::LEASES_BUCKET;
use gpufleet_testkit::{with_deadline, NatsServer};

const T: Duration = Duration::from_secs(15);

async fn setup() -> (NatsServer, RawKv) {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    with_deadline(T, "the stores", create_stores(&js, &Setup::default()))
        .await
        .unwrap();
    let kv = RawKv::open(&js, LEASES_BUCKET).await.unwrap();
    (server, kv)
}

/// Waits on the watcher for the next change of `key`.
async fn next_change(w: &mut gpufleet_natsutil::KvWatcher, key: &str) -> (KvOp, u64) {
    with_deadline(T, "a change", async {
        loop {
            match w.next().await.unwrap().unwrap() {
                KvEvent::Change(c) if c.key == key => return (c.op, c.revision),
                _ => {}
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_key_created_with_ttl_expires_and_watchers_see_max_age() {
    let (_s, kv) = setup().await;
    let mut w = kv.watch(">").await.unwrap();
    assert!(matches!(w.next().await.unwrap().unwrap(), KvEvent::Synced));
    let rev = kv
        .create("a", "x".into(), Some(Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!(next_change(&mut w, "a").await, (KvOp::Put, rev));
    let (op, _) = next_change(&mut w, "a").await;
    assert_eq!(op, KvOp::Expired);
    assert!(kv.get("a").await.unwrap().is_none());
}

#[tokio::test]
async fn re_creating_over_an_expiry_marker_keeps_the_ttl() {
    let (_s, kv) = setup().await;
    let mut w = kv.watch(">").await.unwrap();
    kv.create("k", "1".into(), Some(Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!(next_change(&mut w, "k").await.0, KvOp::Put);
    assert_eq!(next_change(&mut w, "k").await.0, KvOp::Expired);
    // The trap: the client's create_with_ttl would drop the TTL here.
    kv.create("k", "2".into(), Some(Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!(next_change(&mut w, "k").await.0, KvOp::Put);
    assert_eq!(next_change(&mut w, "k").await.0, KvOp::Expired);
}

#[tokio::test]
async fn create_refuses_a_live_key_and_accepts_a_purged_one() {
    let (_s, kv) = setup().await;
    kv.create("k", "1".into(), None).await.unwrap();
    assert!(matches!(
        kv.create("k", "2".into(), None).await,
        Err(KvError::Conflict { .. })
    ));
    kv.purge("k", Duration::from_secs(60)).await.unwrap();
    assert!(kv.get("k").await.unwrap().is_none());
    let rev = kv.create("k", "3".into(), None).await.unwrap();
    let Entry {
        revision, value, ..
    } = kv.get("k").await.unwrap().unwrap();
    assert_eq!((revision, value.as_ref()), (rev, b"3".as_ref()));
}

#[tokio::test]
async fn compare_and_set_update_renews_the_ttl_and_fences_stale_writers() {
    let (_s, kv) = setup().await;
    let mut w = kv.watch(">").await.unwrap();
    let r1 = kv
        .create("l", "reserved".into(), Some(Duration::from_secs(2)))
        .await
        .unwrap();
    let r2 = kv
        .update("l", "running".into(), Some(Duration::from_secs(2)), r1)
        .await
        .unwrap();
    assert!(r2 > r1);
    // A writer holding the old revision loses.
    assert!(matches!(
        kv.update("l", "stale".into(), Some(Duration::from_secs(2)), r1)
            .await,
        Err(KvError::Conflict { .. })
    ));
    // Renewed with a TTL, it still expires when renewals stop. (Under
    // load the watch has twice shown only the update, not the create made
    // a moment before it; why is not pinned down yet. This test is about
    // the fencing and the expiry, which it checks either way.)
    let mut seen = next_change(&mut w, "l").await;
    if seen == (KvOp::Put, r1) {
        seen = next_change(&mut w, "l").await;
    }
    assert_eq!(seen, (KvOp::Put, r2));
    assert_eq!(next_change(&mut w, "l").await.0, KvOp::Expired);
}

#[tokio::test]
async fn an_update_without_ttl_cancels_the_expiry() {
    // nats-server#6959: why every lease write carries Nats-TTL.
    let (_s, kv) = setup().await;
    let mut w = kv.watch(">").await.unwrap();
    let r1 = kv
        .create("n", "a".into(), Some(Duration::from_secs(1)))
        .await
        .unwrap();
    kv.update("n", "b".into(), None, r1).await.unwrap();
    // A sentinel with the same TTL, written after: once it has expired the
    // first key would have too, had it kept its TTL.
    kv.create("sentinel", "s".into(), Some(Duration::from_secs(1)))
        .await
        .unwrap();
    let expired = with_deadline(T, "sentinel expiry", async {
        let mut seen = Vec::new();
        loop {
            if let KvEvent::Change(c) = w.next().await.unwrap().unwrap() {
                if c.op == KvOp::Expired {
                    seen.push(c.key.clone());
                    if c.key == "sentinel" {
                        return seen;
                    }
                }
            }
        }
    })
    .await;
    assert_eq!(expired, vec!["sentinel".to_string()]);
    assert_eq!(kv.get("n").await.unwrap().unwrap().value.as_ref(), b"b");
}

#[tokio::test]
async fn purge_markers_expire_so_released_keys_do_not_pile_up() {
    let (_s, kv) = setup().await;
    for i in 0..20 {
        kv.create(&format!("t{i}"), "v".into(), None).await.unwrap();
        kv.purge(&format!("t{i}"), Duration::from_secs(1))
            .await
            .unwrap();
    }
    let client = async_nats::connect(_s.url()).await.unwrap();
    let js = jetstream::new(client);
    let stream = js.get_stream("KV_gpufleet-leases").await.unwrap();
    let count = gpufleet_testkit::eventually(T, "purge markers to expire", || {
        let mut stream = stream.clone();
        async move {
            let n = stream.info().await.unwrap().state.messages;
            (n == 0).then_some(n)
        }
    })
    .await;
    assert_eq!(count, 0);
}

#[tokio::test]
async fn the_watcher_replays_current_keys_then_says_synced() {
    let (_s, kv) = setup().await;
    kv.put("w1.a.1", "x".into(), None).await.unwrap();
    kv.put("w1.b.1", "y".into(), None).await.unwrap();
    kv.put("w2.c.1", "z".into(), None).await.unwrap();
    let mut w = kv.watch("w1.>").await.unwrap();
    let mut keys = Vec::new();
    while let KvEvent::Change(c) = with_deadline(T, "replay", w.next()).await.unwrap().unwrap() {
        keys.push(c.key);
    }
    assert_eq!(keys, vec!["w1.a.1", "w1.b.1"]);
    kv.put("w1.d.1", "n".into(), None).await.unwrap();
    assert_eq!(next_change(&mut w, "w1.d.1").await.0, KvOp::Put);
}
