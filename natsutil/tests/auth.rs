//! Secured servers: credentials in the URL and tokens reach the server,
//! and a password never shows in an error.

use std::time::Duration;

use gpufleet_natsutil::{connect, Auth};
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
        creds: None,
        token: Some("t0ken-abc".into()),
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
        token: None,
    };
    let err = connect(&server.url(), &auth, "t", PATIENCE)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/user.creds"), "{err}");
}
