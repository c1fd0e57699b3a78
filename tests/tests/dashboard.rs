//! `gpufleet dashboard` driven in a real headless Chromium (through
//! chromedriver, WebDriver) against a real fleet: the page shows what the
//! fleet does as it happens, and cancels from the page stop real tasks.
//! Screenshots of each step go to `target/tmp/dashboard/`.
//!
//! Needs Debian's `chromium` and `chromium-driver` (scripts/test.sh
//! installs them when absent).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use gpufleet_testkit::http::{self, free_port};
use gpufleet_testkit::{eventually, with_deadline, Fleet, Proc, WorkerSpec};
use serde_json::json;

const STEP: Duration = Duration::from_secs(60);

/// A chromedriver with one headless Chromium session. Both run in a
/// process group of their own, killed whole on drop, so that no browser
/// outlives a failed test.
struct Browser {
    client: Client,
    _driver: Driver,
    _profile: tempfile::TempDir,
}

/// The chromedriver's process group, killed on drop, also when the session
/// could not be made.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        // SAFETY: killpg on the group this driver leads.
        unsafe {
            libc::killpg(self.0.id() as i32, libc::SIGKILL);
        }
        let _ = self.0.wait();
    }
}

impl Browser {
    async fn start() -> Browser {
        let driver_bin = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let port = free_port();
        let mut cmd = Command::new(&driver_bin);
        cmd.arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let driver = Driver(cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start {driver_bin} ({e}): run scripts/test.sh, or apt-get install chromium chromium-driver")
        }));
        let profile = tempfile::Builder::new()
            .prefix("gpufleet-chromium-")
            .tempdir()
            .expect("tempdir");
        let url = format!("http://127.0.0.1:{port}");
        let status = format!("{url}/status");
        eventually(STEP, "chromedriver to answer", || {
            let status = status.clone();
            async move { http::get(&status).await.ok().filter(|r| r.status == 200) }
        })
        .await;
        // As root in a container: no sandbox, and nothing that reaches out
        // to the network on its own.
        let mut args: Vec<String> = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1400,1000",
        ]
        .map(String::from)
        .to_vec();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        let mut chrome = json!({ "args": args });
        if let Ok(bin) = std::env::var("CHROMIUM") {
            chrome["binary"] = json!(bin);
        }
        let caps = json!({ "browserName": "chrome", "goog:chromeOptions": chrome });
        let caps = caps.as_object().cloned().expect("an object");
        let client = with_deadline(
            STEP,
            "a Chromium session",
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(caps)
                .connect(&url),
        )
        .await
        .expect("a WebDriver session with headless Chromium");
        Browser {
            client,
            _driver: driver,
            _profile: profile,
        }
    }

    async fn close(self) {
        let _ = with_deadline(STEP, "the browser to close", self.client.clone().close()).await;
    }
}

/// Where screenshots go; printed so that a person finds them.
fn shots() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&dir).expect("screenshot folder");
    dir
}

async fn screenshot(c: &Client, name: &str) {
    let png = with_deadline(STEP, "a screenshot", c.screenshot())
        .await
        .expect("a screenshot");
    let path = shots().join(format!("{name}.png"));
    std::fs::write(&path, png).expect("write the screenshot");
    eprintln!("screenshot: {}", path.display());
}

/// The text of the first element matching `css`, once `pred` holds for it.
async fn text_when(c: &Client, css: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let pred = &pred;
    eventually(STEP, what, || {
        let c = c.clone();
        async move {
            let text = c.find(Locator::Css(css)).await.ok()?.text().await.ok()?;
            pred(&text).then_some(text)
        }
    })
    .await
}

async fn click(c: &Client, css: &str) {
    let e = eventually(STEP, &format!("{css} to be shown"), || {
        let c = c.clone();
        async move { c.find(Locator::Css(css)).await.ok() }
    })
    .await;
    e.click()
        .await
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
}

/// Starts `gpufleet dashboard` on a free port; returns it and its URL.
async fn dashboard(fleet: &Fleet) -> (Proc, String) {
    let args: Vec<String> = [
        "--nats-url",
        &fleet.url(),
        "dashboard",
        "--listen",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .to_vec();
    let proc = Proc::spawn("gpufleet", &args, &[]);
    let url = eventually(STEP, "the dashboard's URL", || {
        let out = proc.output();
        async move {
            out.lines()
                .find(|l| l.starts_with("http://"))
                .map(|l| l.trim().to_string())
        }
    })
    .await;
    (proc, url)
}

/// A task that prints a line, then waits until `gate` exists.
fn gated(name: &str, gate: &Path, lines: &[&str]) -> serde_json::Value {
    let script = format!(
        "echo {first}; while [ ! -e {gate} ]; do sleep 0.05; done; {rest}",
        first = lines[0],
        gate = gate.display(),
        rest = lines[1..]
            .iter()
            .map(|l| format!("echo {l}; "))
            .collect::<String>(),
    );
    json!({"name": name, "tasks": [{"name": "main", "command": ["sh", "-c", script],
        "resources": {"gpu_memory": "2GiB", "cpus": 0.5}}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_follows_a_job_streams_its_logs_and_cancels_from_the_page() {
    let mut fleet = Fleet::start().await;
    fleet
        .add_worker(WorkerSpec::new("dash-w1").gpus("2x24GiB:L4"))
        .await;
    let (_dash, url) = dashboard(&fleet).await;
    let gates = tempfile::tempdir().unwrap();
    let gate = gates.path().join("go");

    let browser = Browser::start().await;
    let c = &browser.client;
    c.goto(&url).await.expect("open the dashboard");
    text_when(
        c,
        "[data-worker=dash-w1] .name",
        "the worker on the page",
        |t| t == "dash-w1",
    )
    .await;

    // A submitted job appears, and its task goes RUNNING, then SUCCEEDED.
    let job = fleet
        .submit(&gated(
            "dash-demo",
            &gate,
            &["first-line", "second-line", "last-line"],
        ))
        .await;
    let row = format!("tr[data-job='{job}']");
    text_when(c, &row, "the job in the list", |t| t.contains("dash-demo")).await;
    click(c, &row).await;
    let task_state = format!("tr[data-task='{job}-0'] .task-state");
    text_when(c, &task_state, "the task RUNNING on the page", |t| {
        t == "RUNNING"
    })
    .await;
    text_when(c, "#log", "the first line streamed", |t| {
        t.contains("first-line")
    })
    .await;
    // What it uses so far: its simulated GPU share, from the advert.
    let usage = format!("tr[data-task='{job}-0'] .usage");
    text_when(c, &usage, "the task's usage", |t| t.contains("GPU 2 GiB")).await;
    // While it runs, its GPU share shows who holds it.
    text_when(
        c,
        "[data-worker=dash-w1] .holders",
        "the holder of a GPU",
        |t| t.contains(&format!("{job}-0")),
    )
    .await;
    screenshot(c, "1-running").await;
    std::fs::write(&gate, "").unwrap();
    text_when(c, &task_state, "the task SUCCEEDED on the page", |t| {
        t == "SUCCEEDED"
    })
    .await;
    let log = text_when(c, "#log", "the last line streamed", |t| {
        t.contains("last-line")
    })
    .await;
    let order: Vec<usize> = ["first-line", "second-line", "last-line"]
        .iter()
        .map(|l| log.find(l).expect("every line on the page"))
        .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "lines out of order: {log}"
    );
    text_when(c, "#job-status", "the job COMPLETED on the page", |t| {
        t == "FINISHED:COMPLETED"
    })
    .await;
    screenshot(c, "2-succeeded").await;

    // The status filter: a finished job is not among the running ones.
    let filter = c
        .find(Locator::Css("#status-filter"))
        .await
        .expect("the filter");
    filter
        .select_by_value("RUNNING")
        .await
        .expect("choose RUNNING");
    text_when(c, "#job-rows", "the running-only list", |t| {
        t.contains("no jobs") && !t.contains("dash-demo")
    })
    .await;
    filter
        .select_by_value("")
        .await
        .expect("choose every status");

    // Cancel from the page stops a running job.
    let long = fleet
        .submit(&json!({"name": "dash-long", "tasks": [{"name": "sleeper",
            "command": ["sh", "-c", "echo sleeping; exec sleep 600"], "resources": {"cpus": 0.5}}]}))
        .await;
    c.goto(&format!("{url}#job={long}"))
        .await
        .expect("open the job");
    let long_state = format!("tr[data-task='{long}-0'] .task-state");
    text_when(c, &long_state, "the sleeper RUNNING", |t| t == "RUNNING").await;
    text_when(c, "#log", "the sleeper's line", |t| t.contains("sleeping")).await;
    click(c, "#cancel").await;
    text_when(c, "#job-status", "the job ABORTED on the page", |t| {
        t == "FINISHED:ABORTED"
    })
    .await;
    text_when(c, &long_state, "the sleeper CANCELLED", |t| {
        t == "CANCELLED"
    })
    .await;
    screenshot(c, "3-cancelled").await;
    let status = fleet.wait_finished(&long, STEP).await;
    assert_eq!(status["status"], "FINISHED:ABORTED", "{status}");
    assert_eq!(status["tasks"][0]["state"], "CANCELLED", "{status}");
    browser.close().await;
}

#[tokio::test]
async fn the_dashboard_refuses_other_sites_and_bad_input() {
    let fleet = Fleet::start().await;
    let (_dash, url) = dashboard(&fleet).await;
    let host = url.trim_start_matches("http://").trim_end_matches('/');
    // Another name for this address (DNS rebinding) is refused...
    let r = http::request(
        "GET",
        &format!("{url}api/jobs"),
        &[("Host", "evil.example:80")],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 403, "{r:?}");
    // ...and so is a cancel without the header a cross-site form cannot send.
    let r = http::request("POST", &format!("{url}api/jobs/j1/cancel"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("x-gpufleet-action"), "{r:?}");
    // Bad input names the field; an unknown job is the coordinator's 404.
    let r = http::get(&format!("{url}api/jobs?status=DONE"))
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("status"), "{r:?}");
    let r = http::request(
        "POST",
        &format!("{url}api/jobs/nope/cancel"),
        &[("x-gpufleet-action", "cancel")],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 404, "{r:?}");
    let r = http::get(&format!("{url}api/jobs/nope/events?from=middle"))
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("from"), "{r:?}");
    // The page itself is served, from the binary.
    let r = http::get(&format!("http://{host}/")).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.contains("<title>gpufleet</title>"));
}
