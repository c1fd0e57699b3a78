//! Secured servers: credentials in the URL, tokens, bare NKey seeds and
//! client certificates (a private CA made here) reach the server, a
//! password never shows in an error, and a refused certificate is named.

use std::path::Path;
use std::time::Duration;

use gpufleet_natsutil::{connect, Auth};
use gpufleet_testkit::tls::{CertFiles, PrivateCa};
use gpufleet_testkit::NatsServer;

const PATIENCE: Duration = Duration::from_millis(300);

#[tokio::test]
async fn user_and_password_from_the_url() {
    let server = NatsServer::start_with("authorization { user: alice, password: s3cret }\n");
    let good = format!("nats://alice:s3cret@127.0.0.1:{}", server.port());
    let client = connect(&good, &Auth::default(), "t", PATIENCE)
        .await
        .unwrap();
    client.flush().await.unwrap();

    let bad = format!("nats://alice:wr0ng@127.0.0.1:{}", server.port());
    let err = connect(&bad, &Auth::default(), "t", PATIENCE)
        .await
        .unwrap_err()
        .to_string();
    assert!(!err.contains("wr0ng"), "the password leaked: {err}");
    assert!(err.contains("alice:***"), "{err}");
    let err = connect(&server.url(), &Auth::default(), "t", PATIENCE)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.to_lowercase().contains("author"), "{err}");
}

#[tokio::test]
async fn a_token() {
    let server = NatsServer::start_with("authorization { token: t0ken-abc }\n");
    let auth = Auth {
        token: Some("t0ken-abc".into()),
        ..Auth::default()
    };
    connect(&server.url(), &auth, "t", PATIENCE).await.unwrap();
    assert!(connect(&server.url(), &Auth::default(), "t", PATIENCE)
        .await
        .is_err());
}

#[tokio::test]
async fn a_missing_credentials_file_is_named() {
    let server = NatsServer::start();
    let auth = Auth {
        creds: Some("/nonexistent/user.creds".into()),
        ..Auth::default()
    };
    let err = connect(&server.url(), &auth, "t", PATIENCE)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/user.creds"), "{err}");
}

/// Mutual TLS with `client`'s certificate, trusting `ca`.
fn tls(client: &CertFiles, ca: &Path) -> Auth {
    Auth {
        tls_cert: Some(client.cert.clone()),
        tls_key: Some(client.key.clone()),
        tls_ca: Some(ca.to_path_buf()),
        ..Auth::default()
    }
}

fn nkey_file(dir: &std::path::Path, name: &str, seed: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.nk"));
    std::fs::write(&path, format!("{seed}\n")).unwrap();
    path
}

#[tokio::test]
async fn a_bare_nkey_seed() {
    let alice = nkeys::KeyPair::new_user();
    let server = NatsServer::start_with(&format!(
        "authorization {{ users = [ {{ nkey: {} }} ] }}\n",
        alice.public_key()
    ));
    let dir = tempfile::tempdir().unwrap();
    let auth = Auth {
        nkey: Some(nkey_file(dir.path(), "alice", &alice.seed().unwrap())),
        ..Auth::default()
    };
    let client = connect(&server.url(), &auth, "t", PATIENCE).await.unwrap();
    client.flush().await.unwrap();

    // A seed the server does not list is refused.
    let mallory = nkeys::KeyPair::new_user();
    let auth = Auth {
        nkey: Some(nkey_file(dir.path(), "mallory", &mallory.seed().unwrap())),
        ..Auth::default()
    };
    let err = connect(&server.url(), &auth, "t", PATIENCE)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.to_lowercase().contains("author"), "{err}");

    // A file that holds no seed is named before anything is sent.
    let auth = Auth {
        nkey: Some(nkey_file(dir.path(), "public", &alice.public_key())),
        ..Auth::default()
    };
    let err = connect(&server.url(), &auth, "t", PATIENCE)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nats_nkey") && err.contains("public.nk") && err.contains("not an NKey seed"),
        "{err}"
    );
}

#[tokio::test]
async fn mutual_tls_with_a_private_ca() {
    let ca = PrivateCa::new("gpufleet test CA");
    let server = NatsServer::start_with(&ca.server_tls_block(false));
    let alice = ca.client("alice");
    let auth = tls(&alice, &ca.ca_file);
    let client = connect(&server.url(), &auth, "t", PATIENCE).await.unwrap();
    client.flush().await.unwrap();

    // A certificate from another CA: the server ends the handshake, and
    // the error says which certificate to look at.
    let other = PrivateCa::new("someone else's CA");
    let stranger = other.client("alice");
    let auth = tls(&stranger, &ca.ca_file);
    let err = connect(&server.url(), &auth, "t", PATIENCE)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("TLS handshake failed") && err.contains(&stranger.cert.display().to_string()),
        "{err}"
    );

    // No client certificate at all.
    let auth = Auth {
        tls_ca: Some(ca.ca_file.clone()),
        ..Auth::default()
    };
    assert!(connect(&server.url(), &auth, "t", PATIENCE).await.is_err());

    // A server certificate this client does not trust.
    let auth = tls(&alice, &other.ca_file);
    let err = connect(&server.url(), &auth, "t", PATIENCE)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("TLS"), "{err}");

    // A key without its certificate is named before anything is sent.
    let auth = Auth {
        tls_key: Some(alice.key.clone()),
        ..Auth::default()
    };
    let err = connect(&server.url(), &auth, "t", PATIENCE)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("nats_tls_cert"), "{err}");
}

#[tokio::test]
async fn a_certificate_maps_to_a_user_and_its_permissions() {
    let ca = PrivateCa::new("gpufleet test CA");
    let server = NatsServer::start_with(&format!(
        "{}authorization {{ users = [ {{ user: \"CN=alice\", permissions: {{ publish: [\"ok.>\"], subscribe: [\"_INBOX.alice.>\"] }} }} ] }}\n",
        ca.server_tls_block(true)
    ));
    let alice = ca.client("alice");
    let auth = Auth {
        inbox_prefix: Some("_INBOX.alice".into()),
        ..tls(&alice, &ca.ca_file)
    };
    let client = connect(&server.url(), &auth, "t", PATIENCE).await.unwrap();
    client.publish("ok.1", "x".into()).await.unwrap();
    client.flush().await.unwrap();
    // Its own inbox is where replies come: a request gets "no responders"
    // rather than a permissions error.
    let err = client.request("ok.2", "x".into()).await.unwrap_err();
    assert_eq!(
        err.kind(),
        async_nats::RequestErrorKind::NoResponders,
        "{err}"
    );

    // A certificate from the same CA whose name maps to no user.
    let bob = ca.client("bob");
    let auth = tls(&bob, &ca.ca_file);
    let err = connect(&server.url(), &auth, "t", PATIENCE)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.to_lowercase().contains("author"), "{err}");
}
