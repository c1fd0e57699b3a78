//! A fleet with roles: `gpufleet auth` (the real command) writes the keys,
//! the settings and the nats-server configuration; the server, the
//! coordinator and the workers run from them, and people use the real
//! `gpufleet` as a user. A test can also connect as any member, to try
//! what that member's permissions allow.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use async_nats::Client;
use gpufleet_natsutil::{connect, Auth};
use gpufleet_schema::roles::Role;
use gpufleet_schema::{UserId, WorkerId};
use serde_json::Value;
use tempfile::TempDir;

use crate::fleet::{spawn_worker, worker_test_args, WorkerSpec, COORDINATOR_TEST_CONFIG};
use crate::procs::{bin, Proc};
use crate::server::{free_port, NatsServer};
use crate::wait::eventually;

pub struct SecureFleet {
    pub server: NatsServer,
    pub coordinator: Option<Proc>,
    pub workers: Vec<(String, Proc)>,
    /// What `gpufleet auth` wrote.
    pub auth: PathBuf,
    dir: TempDir,
}

impl SecureFleet {
    /// Writes credentials for `workers`, `users` and `admins` with
    /// `gpufleet auth`, then starts the server and the coordinator.
    pub async fn start(workers: &[&str], users: &[&str], admins: &[&str]) -> SecureFleet {
        let dir = tempfile::Builder::new()
            .prefix("gpufleet-secure-")
            .tempdir()
            .expect("tempdir");
        // Workers started as root run their tasks as `nobody`, who must
        // reach their work directories here and the files tests use.
        crate::fleet::open_to_tasks(dir.path());
        let port = free_port();
        let auth = dir.path().join("auth");
        let out = std::process::Command::new(bin("gpufleet"))
            .env_remove("GPUFLEET_CONFIG")
            .args(["--nats-url", &format!("nats://127.0.0.1:{port}"), "auth"])
            .arg("--out")
            .arg(&auth)
            .args(["--workers", &workers.join(",")])
            .args(["--users", &users.join(",")])
            .args(["--admins", &admins.join(",")])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--store-dir")
            .arg(dir.path().join("store"))
            .output()
            .expect("run gpufleet auth");
        assert!(out.status.success(), "gpufleet auth: {out:?}");
        let server = NatsServer::from_config(&auth.join("nats-server.conf"), port);
        // The generated settings with the test's short timers.
        let generated =
            std::fs::read_to_string(auth.join("coordinator.toml")).expect("coordinator.toml");
        std::fs::write(
            dir.path().join("coordinator.toml"),
            generated + COORDINATOR_TEST_CONFIG,
        )
        .expect("write coordinator settings");
        let mut fleet = SecureFleet {
            server,
            coordinator: None,
            workers: vec![],
            auth,
            dir,
        };
        fleet.start_coordinator().await;
        fleet
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the coordinator and waits until it answers `admin`'s calls
    /// (with roles on it answers no discovery pings).
    pub async fn start_coordinator(&mut self) {
        let config = self.dir.path().join("coordinator.toml");
        let args = vec!["--config".to_string(), config.display().to_string()];
        self.coordinator = Some(Proc::spawn("gpufleet-coordinator", &args, &[]));
    }

    /// Starts worker `spec.name` with its own settings and `spec`'s flags.
    pub fn add_worker(&mut self, spec: WorkerSpec) {
        let mut args = vec![
            "--config".to_string(),
            self.auth
                .join(format!("worker-{}.toml", spec.name))
                .display()
                .to_string(),
        ];
        args.extend(worker_test_args(self.dir.path(), &spec));
        let proc = spawn_worker(&args, &spec);
        self.workers.push((spec.name.clone(), proc));
    }

    /// The settings file of a user or admin, for `gpufleet`.
    pub fn user_config(&self, user: &str) -> PathBuf {
        self.auth.join(format!("user-{user}.toml"))
    }

    /// Runs `gpufleet ARGS` as `user` to its end.
    pub async fn gpufleet(&self, user: &str, args: &[&str]) -> Output {
        let mut cmd = tokio::process::Command::new(bin("gpufleet"));
        cmd.args(args)
            .env("GPUFLEET_CONFIG", self.user_config(user))
            .env_remove("GPUFLEET_NATS_URL")
            .current_dir(self.dir.path())
            .kill_on_drop(true);
        tokio::time::timeout(Duration::from_secs(120), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("gpufleet {args:?} as {user} did not end within 120s"))
            .expect("run gpufleet")
    }

    /// `gpufleet --json ARGS` as `user`, which must succeed; its JSON.
    pub async fn json(&self, user: &str, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.gpufleet(user, &all).await;
        assert!(
            out.status.success(),
            "gpufleet {args:?} as {user}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
    }

    /// A client connected as `role`, with that member's key and inbox.
    pub async fn client_as(&self, role: &Role) -> Client {
        let file = match role {
            Role::Coordinator => "coordinator.nk".to_string(),
            Role::Worker(w) => format!("worker-{w}.nk"),
            Role::User(u) | Role::Admin(u) => format!("user-{u}.nk"),
        };
        let auth = Auth {
            nkey: Some(self.auth.join(file)),
            inbox_prefix: Some(role.inbox_prefix()),
            ..Auth::default()
        };
        connect(&self.url(), &auth, role.identity(), Duration::from_secs(10))
            .await
            .expect("connect as a member")
    }

    /// Waits until `admin` sees worker `name` listed.
    pub async fn wait_worker_listed(&self, admin: &str, name: &str) {
        eventually(
            Duration::from_secs(60),
            &format!("worker {name} to be listed"),
            || async move {
                let out = self.gpufleet(admin, &["--json", "workers"]).await;
                let v: Value = serde_json::from_slice(&out.stdout).ok()?;
                v.as_array()?
                    .iter()
                    .any(|w| w["name"] == name)
                    .then_some(())
            },
        )
        .await;
    }
}

pub fn user(name: &str) -> UserId {
    UserId::new(name).expect("a user name")
}

pub fn worker(name: &str) -> WorkerId {
    WorkerId::new(name).expect("a worker name")
}
