//! The harness itself must work: a server that starts, restarts on the same
//! store, a cluster that replicates, and a server run by someone else.

use std::time::Duration;

use async_nats::jetstream;
use gpufleet_testkit::{pids, with_deadline, NatsCluster, NatsServer};

const T: Duration = Duration::from_secs(30);

#[tokio::test]
async fn server_starts_and_restart_keeps_the_store() {
    let mut server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    let kv = js
        .create_key_value(jetstream::kv::Config {
            bucket: "harness".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    kv.put("k", "v1".into()).await.unwrap();
    let store = server.store_dir();
    assert!(store.exists());

    server.restart();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    let kv = with_deadline(T, "bucket after restart", async {
        loop {
            // JetStream recovers its streams a moment after the port opens.
            if let Ok(kv) = js.get_key_value("harness").await {
                return kv;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(kv.get("k").await.unwrap().unwrap(), "v1");

    let pid = server.pid().unwrap();
    drop(server);
    assert!(pids::gone(pid), "server process {pid} outlived its guard");
    assert!(
        !store.exists(),
        "store dir {} was not removed",
        store.display()
    );
}

#[tokio::test]
async fn two_servers_run_side_by_side() {
    let a = NatsServer::start();
    let b = NatsServer::start();
    assert_ne!(a.port(), b.port());
    async_nats::connect(a.url()).await.unwrap();
    async_nats::connect(b.url()).await.unwrap();
}

#[tokio::test]
async fn an_external_server_is_used_as_it_is_and_outlives_its_handle() {
    let server = NatsServer::start();
    let external = NatsServer::external(server.url()).unwrap();
    assert_eq!(external.url(), server.url());
    assert_eq!(external.port(), server.port());
    assert_eq!(external.pid(), None);
    drop(external);
    async_nats::connect(server.url()).await.unwrap();

    let err = NatsServer::external("nats://127.0.0.1".into())
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("GPUFLEET_TEST_NATS_URL=nats://127.0.0.1: no port"),
        "{err:#}"
    );
}

#[test]
#[should_panic(expected = "run it without GPUFLEET_TEST_NATS_URL")]
fn a_test_cannot_kill_an_external_server() {
    NatsServer::external("nats://127.0.0.1:4222".into())
        .unwrap()
        .kill();
}

#[tokio::test]
async fn cluster_replicates_a_stream_across_three_nodes() {
    let cluster = NatsCluster::start();
    let addrs: Vec<async_nats::ServerAddr> = cluster
        .url()
        .split(',')
        .map(|u| u.parse().unwrap())
        .collect();
    let client = async_nats::connect(addrs).await.unwrap();
    let js = jetstream::new(client);
    let kv = with_deadline(T, "R3 bucket", async {
        loop {
            // The cluster needs a JetStream meta leader before it can create.
            match js
                .create_key_value(jetstream::kv::Config {
                    bucket: "replicated".into(),
                    num_replicas: 3,
                    ..Default::default()
                })
                .await
            {
                Ok(kv) => return kv,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await;
    kv.put("k", "v".into()).await.unwrap();
    let mut stream = js.get_stream("KV_replicated").await.unwrap();
    let info = stream.info().await.unwrap();
    let cluster_info = info.cluster.clone().expect("cluster info");
    assert_eq!(cluster_info.replicas.len() + 1, 3, "{cluster_info:?}");

    // Every node can serve the value.
    for node in &cluster.nodes {
        let c = async_nats::connect(node.url()).await.unwrap();
        let kv = jetstream::new(c).get_key_value("replicated").await.unwrap();
        assert_eq!(kv.get("k").await.unwrap().unwrap(), "v");
    }
}
