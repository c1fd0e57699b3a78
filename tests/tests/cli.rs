//! The `gpufleet` command line end to end: the real binary against a real
//! fleet (nats-server, coordinator, workers with simulated GPUs), driven as
//! a person or a script would, plus `gpufleet up`, the example settings
//! files and the Python example of the README.
//!
//! Every wait has a deadline and waits on something that happens (a line
//! of output, an event, a process exit), never on the clock.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use gpufleet_schema::{EventBody, TaskState};
use gpufleet_testkit::server::workspace_root;
use gpufleet_testkit::{
    api, bin, eventually, pids, state_events, with_deadline, Fleet, NatsServer, Proc, WorkerSpec,
};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

const T: Duration = Duration::from_secs(60);

/// What a finished `gpufleet` said.
#[derive(Debug)]
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }

    /// The job id from "submitted job <id>".
    fn submitted(&self) -> String {
        self.stderr
            .lines()
            .find_map(|l| l.strip_prefix("submitted job "))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("no job id in {self:#?}"))
            .to_string()
    }
}

fn command(url: Option<&str>, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("gpufleet"));
    cmd.args(args)
        .current_dir(workspace_root())
        .env_remove("GPUFLEET_CONFIG")
        .env_remove("GPUFLEET_NATS_URL")
        .env_remove("GPUFLEET_CONNECT_TIMEOUT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(u) = url {
        cmd.env("GPUFLEET_NATS_URL", u);
    }
    cmd
}

/// Runs `gpufleet ARGS` to its end, with `stdin` as its input.
async fn gpufleet_in(url: Option<&str>, args: &[&str], stdin: Option<&str>) -> Out {
    let mut cmd = command(url, args);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().expect("spawn gpufleet");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(text.as_bytes()).await.expect("write stdin");
    }
    let out = with_deadline(
        T,
        &format!("gpufleet {}", args.join(" ")),
        child.wait_with_output(),
    )
    .await
    .expect("gpufleet runs");
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn gpufleet(url: &str, args: &[&str]) -> Out {
    gpufleet_in(Some(url), args, None).await
}

/// Reads `from` into `seen` until `seen` holds `needle`.
async fn read_until(from: &mut (impl AsyncRead + Unpin), seen: &mut String, needle: &str) {
    with_deadline(T, &format!("{needle:?} in the output"), async {
        let mut buf = [0u8; 4096];
        while !seen.contains(needle) {
            let n = from.read(&mut buf).await.expect("read output");
            assert!(n > 0, "output ended before {needle:?}:\n{seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await
}

fn sigint(child: &Child) {
    let pid = child.id().expect("running") as i32;
    // SAFETY: kill(2) on our own, unreaped child.
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
}

async fn exit_code(child: &mut Child) -> Option<i32> {
    with_deadline(T, "gpufleet to exit", child.wait())
        .await
        .expect("wait")
        .code()
}

/// `gpufleet ARGS` (a shell line) on a terminal: a pty from util-linux
/// `script`, whose stdin and stdout are the terminal's keyboard and screen.
fn on_a_terminal(url: &str, args: &str) -> Child {
    // `exec`: script(1) runs the line with $SHELL, and a dash that stays as
    // the parent is killed by a Ctrl-C, so script would report its 130
    // rather than the CLI's own exit code.
    let line = format!("exec {} {args}", bin("gpufleet").display());
    Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .env("GPUFLEET_NATS_URL", url)
        .env_remove("GPUFLEET_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("util-linux `script` gives the test a terminal")
}

async fn wait_running(fleet: &Fleet, job: &str) -> Value {
    fleet
        .wait_job(job, T, "its task to run", |s| {
            s["tasks"][0]["state"] == "RUNNING"
        })
        .await
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write a file");
    p
}

const TWO_TASKS_TOML: &str = r#"
name = "cli-e2e"

[[tasks]]
name = "train"
command = ["sh", "-c", "echo line-1; echo '{\"step\": 1}' >> $GPUFLEET_EVENTS; echo err-1 >&2; echo '{\"acc\": 0.5}' > $GPUFLEET_RESULT; echo line-2"]
resources = { gpus = 1, gpu_memory = "10GiB" }

[[tasks]]
name = "eval"
command = ["sh", "-c", "echo evaluating"]
resources = { cpus = 0.5 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_follow_then_status_list_and_logs_for_people_and_scripts() {
    let mut fleet = Fleet::start().await;
    fleet
        .add_worker(WorkerSpec::new("w1").gpus("2x24GiB:L4"))
        .await;
    let url = fleet.url();
    let file = write(fleet.dir(), "job.toml", TWO_TASKS_TOML);
    let file = file.to_str().unwrap();

    // Follow: output with task prefixes on stdout, progress and stderr
    // lines on stderr, the table at the end, exit 0.
    let out = gpufleet(&url, &["submit", file, "--follow"]).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    for line in [
        "[train] line-1\n",
        "[train] line-2\n",
        "[eval] evaluating\n",
    ] {
        assert!(out.stdout.contains(line), "{line:?} missing: {out:#?}");
    }
    assert!(
        out.stderr.contains("[train] progress: {\"step\":1}\n"),
        "{out:#?}"
    );
    assert!(out.stderr.contains("[train] err-1\n"), "{out:#?}");
    // Where it ran: a task this short sends no RUNNING event (it ends
    // within the worker's `running_event_after`), so the table says it.
    assert!(
        out.stderr
            .lines()
            .any(|l| l.starts_with("train ") && l.contains(" SUCCEEDED ") && l.contains(" w1 ")),
        "{out:#?}"
    );
    assert!(
        out.stderr.contains("status: FINISHED:COMPLETED"),
        "{out:#?}"
    );
    let job = out.submitted();

    // status --json is the API's JobStatus.
    let s = gpufleet(&url, &["status", &job, "--json"]).await.json();
    assert_eq!(s["status"], "FINISHED:COMPLETED");
    assert_eq!(s["tasks"][0]["result"], json!({"acc": 0.5}));
    assert_eq!(s["tasks"][0]["gpus"].as_array().unwrap().len(), 1);
    assert_eq!(s["tasks"][1]["gpus"], json!([]));
    let table = gpufleet(&url, &["status", &job]).await;
    assert!(
        table.stdout.contains("TASK") && table.stdout.contains("train  SUCCEEDED"),
        "{table:#?}"
    );

    let list = gpufleet(&url, &["list", "--json"]).await.json();
    assert!(list.as_array().unwrap().iter().any(|j| j["job_id"] == job));
    let running = gpufleet(&url, &["list", "--status", "RUNNING", "--json"])
        .await
        .json();
    assert!(!running
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["job_id"] == job));
    let table = gpufleet(&url, &["list"]).await;
    assert!(table.stdout.contains(&job) && table.stdout.contains("cli-e2e"));

    // One task's output, by name, without prefixes, each stream to its own.
    let logs = gpufleet(&url, &["logs", &job, "train"]).await;
    assert_eq!(logs.code, Some(0));
    assert_eq!(logs.stdout, "line-1\nline-2\n");
    assert_eq!(logs.stderr, "err-1\n");
    // A finished job's logs --follow ends by itself, with every line.
    let follow = gpufleet(&url, &["logs", &job, "--follow"]).await;
    assert_eq!(follow.code, Some(0));
    assert!(follow.stdout.contains("[eval] evaluating\n"), "{follow:#?}");
    assert!(follow.stdout.contains("[train] line-2\n"), "{follow:#?}");
    // --json: one event per line.
    let events = gpufleet(&url, &["logs", &job, "--json"]).await;
    let kinds: Vec<String> = events
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("a JSON line")["body"]["kind"].to_string())
        .collect();
    assert!(
        !kinds.is_empty() && kinds.iter().all(|k| k == "\"log\""),
        "{kinds:?}"
    );
    let missing = gpufleet(&url, &["logs", &job, "nope"]).await;
    assert_eq!(missing.code, Some(2));
    assert!(missing
        .stderr
        .contains("no task \"nope\" (its tasks: train, eval)"));

    // A job from stdin that fails: exit 1 and the code in the summary.
    let out = gpufleet_in(
        Some(&url),
        &["submit", "-", "--wait"],
        Some(r#"{"tasks": [{"command": ["sh", "-c", "exit 7"]}]}"#),
    )
    .await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(
        out.stderr.contains("FINISHED:EXECUTION_EXCEPTION") && out.stderr.contains("exit 7"),
        "{out:#?}"
    );

    // TOML from stdin may start with `[[tasks]]`; without --wait only the
    // id is printed, for `JOB=$(gpufleet submit -)`.
    let out = gpufleet_in(
        Some(&url),
        &["submit", "-"],
        Some("[[tasks]]\ncommand = [\"true\"]\n"),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    let id = out.stdout.trim();
    assert!(
        !id.is_empty() && !id.contains(char::is_whitespace),
        "{out:#?}"
    );
    let done = gpufleet(&url, &["status", id, "--wait", "--json"]).await;
    assert_eq!(done.code, Some(0), "{done:#?}");
    assert_eq!(done.json()["status"], "FINISHED:COMPLETED");

    // Artifacts: listed by task and name, fetched to a file or to stdout.
    let out = gpufleet(
        &url,
        &[
            "run",
            "--name",
            "saver",
            "--artifact",
            "out/*.pt",
            "--",
            "sh",
            "-c",
            "mkdir out && echo weights > out/model.pt && echo skipped > out/notes.txt",
        ],
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    let job = out.submitted();
    let list = gpufleet(&url, &["artifacts", "list", &job, "--json"])
        .await
        .json();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list:#}");
    assert_eq!(list[0]["task"], "saver");
    assert_eq!(list[0]["name"], "out/model.pt");
    assert_eq!(list[0]["size"], 8);
    let target = fleet.dir().join("fetched.pt");
    let got = gpufleet(
        &url,
        &[
            "artifacts",
            "get",
            &job,
            "saver",
            "out/model.pt",
            "-o",
            target.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(got.code, Some(0), "{got:#?}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "weights\n");
    let piped = gpufleet(
        &url,
        &["artifacts", "get", &job, "saver", "out/model.pt", "-o", "-"],
    )
    .await;
    assert_eq!(piped.stdout, "weights\n", "{piped:#?}");
    let missing = gpufleet(&url, &["artifacts", "get", &job, "saver", "out/notes.txt"]).await;
    assert_eq!(missing.code, Some(2), "{missing:#?}");
    assert!(
        missing.stderr.contains("uploaded no \"out/notes.txt\""),
        "{missing:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_flags_then_workers_shows_the_holder_and_cancel_stops_it() {
    let mut fleet = Fleet::start().await;
    fleet
        .add_worker(WorkerSpec::new("w1").gpus("2x24GiB:L4").labels("zone=a"))
        .await;
    let url = fleet.url();

    // Every resource flag, env, a constraint and a name; output streams.
    let out = gpufleet(
        &url,
        &[
            "run",
            "--gpus",
            "1",
            "--gpu-memory",
            "20GiB",
            "--cpus",
            "0.5",
            "--memory",
            "1GiB",
            "--timeout",
            "30s",
            "--name",
            "flagged",
            "-e",
            "GREETING=hi",
            "--label",
            "zone=a",
            "--worker",
            "w1",
            "--",
            "sh",
            "-c",
            "echo \"$GREETING gpus=[$CUDA_VISIBLE_DEVICES]\"",
        ],
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    let line = out.stdout.trim();
    assert!(line == "hi gpus=[0]" || line == "hi gpus=[1]", "{out:#?}");
    let s = gpufleet(&url, &["status", &out.submitted(), "--json"])
        .await
        .json();
    assert_eq!(s["name"], "flagged");
    assert_eq!(s["tasks"][0]["name"], "flagged");
    assert_eq!(s["tasks"][0]["worker"], "w1");
    assert_eq!(s["tasks"][0]["gpus"].as_array().unwrap().len(), 1);

    // --timeout stops it: exit 1, TIMED_OUT. `--wait --follow`, as
    // `submit` takes them, are what `run` does anyway.
    let out = gpufleet(
        &url,
        &[
            "run",
            "--wait",
            "--follow",
            "--timeout",
            "1s",
            "--",
            "sh",
            "-c",
            "echo up; sleep 30",
        ],
    )
    .await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("TIMED_OUT"), "{out:#?}");
    assert_eq!(out.stdout, "up\n", "its output was followed: {out:#?}");

    // More GPUs than any worker has: queued with the reason, and a cancel
    // ends it at once.
    let out = gpufleet(&url, &["run", "--no-wait", "--gpus", "4", "--", "true"]).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    let big = out.stdout.trim().to_string();
    let s = fleet
        .wait_job(&big, T, "a reason to wait", |s| s["reason"].is_string())
        .await;
    assert!(s["reason"].as_str().unwrap().contains("4 GPUs"), "{s:#}");
    let table = gpufleet(&url, &["status", &big]).await;
    assert!(table.stdout.contains("reason: "), "{table:#?}");
    let c = gpufleet(&url, &["cancel", &big, "--json"]).await;
    assert_eq!(c.code, Some(0), "{c:#?}");
    let done = gpufleet(&url, &["status", &big, "--wait"]).await;
    assert_eq!(done.code, Some(3), "cancelled means 3: {done:#?}");

    // A running task: `workers` shows which GPU it holds.
    let out = gpufleet(
        &url,
        &[
            "run",
            "--no-wait",
            "--gpus",
            "1",
            "--name",
            "holder",
            "--",
            "sleep",
            "60",
        ],
    )
    .await;
    let job = out.stdout.trim().to_string();
    let s = wait_running(&fleet, &job).await;
    let task = s["tasks"][0]["task_id"].as_str().unwrap().to_string();
    let gpu = s["tasks"][0]["gpus"][0].as_str().unwrap().to_string();
    let ws = gpufleet(&url, &["workers", "--json"]).await.json();
    let w1 = &ws[0];
    assert_eq!(w1["name"], "w1");
    let gpus = w1["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 2);
    for g in gpus {
        let expected = if g["uuid"] == gpu.as_str() {
            json!([task])
        } else {
            json!([])
        };
        assert_eq!(g["held_by"], expected, "{ws:#}");
        assert_eq!(g["model"], "L4");
        assert_eq!(g["memory_total"], 24u64 << 30);
    }
    let table = gpufleet(&url, &["workers"]).await;
    assert!(
        table.stdout.contains("HELD BY")
            && table.stdout.contains(&task)
            && table.stdout.contains("0 L4")
            && table.stdout.contains("zone=a")
            && table.stdout.contains("/24 GiB"),
        "{table:#?}"
    );

    let c = gpufleet(&url, &["cancel", &job]).await;
    assert_eq!(c.code, Some(0), "{c:#?}");
    assert!(
        c.stdout.starts_with(&format!("cancelling job {job}")),
        "{c:#?}"
    );
    let done = gpufleet(&url, &["status", &job, "--wait", "--json"]).await;
    assert_eq!(done.code, Some(3), "{done:#?}");
    assert_eq!(done.json()["tasks"][0]["state"], "CANCELLED");
    let again = gpufleet(&url, &["cancel", &job]).await;
    assert_eq!(again.code, Some(0));
    assert!(again.stdout.contains("cancelled job"), "{again:#?}");
}

#[tokio::test]
async fn bad_input_is_refused_with_exit_2_naming_the_field_before_any_network() {
    // Nothing listens here: each error must come before a connection.
    let nowhere = "nats://127.0.0.1:9";
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(Vec<String>, Option<&str>, &str)> = vec![
        (
            vec![
                "submit".into(),
                write(
                    dir.path(),
                    "typo.json",
                    r#"{"tasks": [{"command": ["true"], "resources": {"gpu_memroy": "1GiB"}}]}"#,
                )
                .display()
                .to_string(),
            ],
            None,
            "typo.json: tasks[0].resources.gpu_memroy: unknown field `gpu_memroy`",
        ),
        (
            vec![
                "submit".into(),
                write(
                    dir.path(),
                    "job.toml",
                    "name = \"x\"\n\n[[tasks]]\ncommand = [\"true\"]\ntimeout = \"soon\"\n",
                )
                .display()
                .to_string(),
            ],
            None,
            "job.toml:5: tasks[0].timeout: invalid duration \"soon\"",
        ),
        (
            vec!["submit".into(), "-".into()],
            Some(r#"{"tasks": [{"command": ["true"], "env": {"CUDA_VISIBLE_DEVICES": "3"}}]}"#),
            "stdin: tasks[0].env.CUDA_VISIBLE_DEVICES: is set by the worker",
        ),
        (
            vec!["submit".into(), "-".into()],
            Some("[[tasks]]\ncomand = [\"true\"]\n"),
            "stdin:2: tasks[0].comand: unknown field `comand`",
        ),
        (
            vec!["submit".into(), "-".into()],
            Some(r#"{"tasks": []}"#),
            "stdin: tasks: a job needs at least one task",
        ),
        (
            vec!["run", "--gpu-memory", "lots", "--", "true"]
                .into_iter()
                .map(String::from)
                .collect(),
            None,
            "--gpu-memory \"lots\"",
        ),
        (
            vec!["run", "-e", "GPUFLEET_X=1", "--", "true"]
                .into_iter()
                .map(String::from)
                .collect(),
            None,
            "--env GPUFLEET_X: is set by the worker",
        ),
        (
            vec!["list", "--status", "DONE"]
                .into_iter()
                .map(String::from)
                .collect(),
            None,
            "--status: unknown job status \"DONE\"",
        ),
        (
            vec![
                "--config".into(),
                write(dir.path(), "cli.toml", "nats_url = \"x\"\nbogus_key = 1\n")
                    .display()
                    .to_string(),
                "list".into(),
            ],
            None,
            "unknown field `bogus_key`",
        ),
        (
            vec!["run".into()],
            None,
            "required arguments were not provided",
        ),
        (
            vec!["run", "--no-wait", "--follow", "--", "true"]
                .into_iter()
                .map(String::from)
                .collect(),
            None,
            "'--no-wait' cannot be used with '--follow'",
        ),
    ];
    for (args, stdin, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = gpufleet_in(Some(nowhere), &args, stdin).await;
        assert_eq!(out.code, Some(2), "{args:?}: {out:#?}");
        assert!(
            out.stderr.contains(expected),
            "{args:?} should say {expected:?}: {out:#?}"
        );
        assert!(
            !out.stderr.contains("cannot connect"),
            "{args:?} must fail before connecting: {out:#?}"
        );
    }

    // And no fleet at all is a clear exit 2 as well, as quickly as asked
    // (GPUFLEET_CONNECT_TIMEOUT, the env layer of the settings).
    let mut cmd = command(Some(nowhere), &["workers"]);
    cmd.env("GPUFLEET_CONNECT_TIMEOUT", "1s")
        .stdin(Stdio::null());
    let out = with_deadline(T, "gpufleet workers", cmd.output())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot connect to NATS at nats://127.0.0.1:9")
            && stderr.contains("gpufleet up"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_asks_on_a_terminal_and_otherwise_leaves_the_job_running() {
    let mut fleet = Fleet::start().await;
    fleet
        .add_worker(WorkerSpec::new("w1").gpus("1x24GiB"))
        .await;
    let url = fleet.url();
    let client = fleet.client().await;

    // Not a terminal (or --detach): Ctrl-C leaves the job running, exit 130.
    let mut child = command(Some(&url), &["run", "--detach", "--", "sleep", "60"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut seen = String::new();
    read_until(&mut stderr, &mut seen, "RUNNING on w1").await;
    sigint(&child);
    assert_eq!(exit_code(&mut child).await, Some(130));
    stderr.read_to_string(&mut seen).await.unwrap();
    assert!(seen.contains("left job"), "{seen}");
    let job = seen
        .lines()
        .find_map(|l| l.strip_prefix("submitted job "))
        .unwrap()
        .to_string();
    let s = api(&client, "gpufleet.api.jobs.get", &json!({"job_id": job}))
        .await
        .unwrap();
    assert_eq!(s["status"], "RUNNING", "the job must go on: {s:#}");
    gpufleet(&url, &["cancel", &job, "--wait"]).await;

    // On a terminal (a pty from `script`), with bars: Ctrl-C asks, and "y"
    // cancels the job: exit 3.
    let mut child = on_a_terminal(&url, "run --name asked -- sleep 60");
    let mut tty_in = child.stdin.take().unwrap();
    let mut tty_out = child.stdout.take().unwrap();
    let mut seen = String::new();
    // The job bar says the task runs.
    read_until(&mut tty_out, &mut seen, "1 running").await;
    tty_in.write_all(b"\x03").await.unwrap();
    read_until(&mut tty_out, &mut seen, "? [y/N]").await;
    tty_in.write_all(b"y\n").await.unwrap();
    read_until(&mut tty_out, &mut seen, "cancelling job").await;
    assert_eq!(exit_code(&mut child).await, Some(3), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_tasks_spinner_shows_its_newest_progress_while_output_streams() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("w1")).await;
    let url = fleet.url();
    // Three steps; after each, the task prints a line every 0.1 s until the
    // test has seen the step on the spinner. Output that never pauses is
    // what once kept the spinner on its first step (or none): it was only
    // redrawn when the job's status was read again, and every event put
    // that read off.
    let ctl = fleet.dir().to_path_buf();
    let task = write(
        &ctl,
        "steps.sh",
        r#"for k in 1 2 3; do
  echo "{\"step\":$k}" >> "$GPUFLEET_EVENTS"
  while [ ! -e "$CTL/go-$k" ]; do echo "working on $k"; sleep 0.1; done
done
"#,
    );
    let args = format!(
        "run --name stepper -e CTL={} -- sh {}",
        ctl.display(),
        task.display()
    );
    let mut child = on_a_terminal(&url, &args);
    let _tty_in = child.stdin.take().unwrap();
    let mut tty_out = child.stdout.take().unwrap();
    let mut seen = String::new();
    for k in 1..=3 {
        // The spinner's text is followed by its elapsed time; the
        // `progress:` line the follower prints ends the line instead.
        read_until(&mut tty_out, &mut seen, &format!("{{\"step\":{k}}} ")).await;
        std::fs::write(ctl.join(format!("go-{k}")), b"").unwrap();
    }
    assert_eq!(exit_code(&mut child).await, Some(0), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_rides_out_a_coordinator_restart() {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("w1")).await;
    let url = fleet.url();
    let gate = fleet.dir().join("go");
    let script = format!(
        "echo waiting; while [ ! -e {} ]; do sleep 0.05; done; echo through",
        gate.display()
    );
    let mut child = command(Some(&url), &["run", "--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut seen = String::new();
    read_until(&mut stderr, &mut seen, "RUNNING on w1").await;

    // The coordinator dies, and the follower notices; the task ends while
    // it is away; it comes back.
    fleet.coordinator.as_mut().unwrap().kill9();
    read_until(&mut stderr, &mut seen, "still following its events").await;
    std::fs::write(&gate, "").unwrap();
    fleet.start_coordinator().await;

    let mut stdout = String::new();
    let mut out_pipe = child.stdout.take().unwrap();
    let (a, b) = tokio::join!(
        out_pipe.read_to_string(&mut stdout),
        stderr.read_to_string(&mut seen)
    );
    a.unwrap();
    b.unwrap();
    assert_eq!(exit_code(&mut child).await, Some(0), "{seen}");
    assert_eq!(stdout, "waiting\nthrough\n", "{seen}");
    assert!(seen.contains("FINISHED:COMPLETED"), "{seen}");
    assert!(seen.contains("the coordinator answers again"), "{seen}");
}

/// Removes `up`'s data folder when a test ends early: a `kill -9`ed (or
/// panicking) `up` cannot.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts `gpufleet up ARGS` and waits for it to say it is ready; returns
/// it, the NATS URL it printed and its data folder.
async fn start_up(args: &[&str]) -> (Child, String, PathBuf, String) {
    let mut child = command(None, args).stdin(Stdio::null()).spawn().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut seen = String::new();
    read_until(&mut stderr, &mut seen, "press Ctrl-C to stop the fleet").await;
    let mut url = String::new();
    read_until(child.stdout.as_mut().unwrap(), &mut url, "\n").await;
    let dir = seen
        .lines()
        .find_map(|l| l.strip_prefix("starting a local fleet in "))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no data folder in {seen}"));
    // Keep draining its stderr so that it never blocks on a full pipe.
    drop(tokio::spawn(async move {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s).await;
    }));
    (child, url.trim().to_string(), dir, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_starts_a_fleet_and_ctrl_c_stops_every_process_it_started() {
    let (mut up, url, dir, said) = start_up(&[
        "up",
        "--workers",
        "2",
        "--simulate-gpus",
        "2x24GiB",
        "--port",
        "0",
    ])
    .await;
    let pid = up.id().unwrap();
    let kids = pids::children(pid);
    let names: BTreeMap<u32, String> = kids.iter().map(|&k| (k, pids::comm(k))).collect();
    let mut sorted: Vec<&str> = names.values().map(String::as_str).collect();
    sorted.sort();
    // /proc shows 15 characters of a name.
    assert_eq!(
        sorted,
        [
            "gpufleet-coordi",
            "gpufleet-worker",
            "gpufleet-worker",
            "nats-server"
        ],
        "{said}"
    );
    for k in &kids {
        assert!(
            said.contains(&format!("pid {k} ")),
            "pid {k} not announced: {said}"
        );
    }
    assert!(url.starts_with("nats://127.0.0.1:"), "{url}");
    assert!(dir.exists());
    let _cleanup = RemoveOnDrop(dir.clone());

    // The fleet works: two workers of two simulated GPUs, and a command.
    let ws = gpufleet(&url, &["workers", "--json"]).await.json();
    assert_eq!(ws.as_array().unwrap().len(), 2, "{ws:#}");
    assert_eq!(ws[0]["gpus"].as_array().unwrap().len(), 2);
    assert_eq!(ws[0]["gpus"][0]["memory_total"], 24u64 << 30);
    let out = gpufleet(&url, &["run", "--", "echo", "via-up"]).await;
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (Some(0), "via-up\n"),
        "{out:#?}"
    );

    sigint(&up);
    assert_eq!(exit_code(&mut up).await, Some(0));
    for (k, name) in &names {
        assert!(!pids::alive(*k, name), "{name} (pid {k}) survived `up`");
    }
    assert!(!dir.exists(), "the temporary data folder is removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_killed_with_sigkill_takes_its_fleet_and_tasks_down_too() {
    let (mut up, url, dir, _) = start_up(&["up", "--workers", "1", "--port", "0"]).await;
    let _cleanup = RemoveOnDrop(dir);
    let out = gpufleet(&url, &["run", "--no-wait", "--", "sleep", "300"]).await;
    let job = out.stdout.trim().to_string();
    let client = async_nats::connect(&url).await.unwrap();
    // Running: the worker holds a child process for it.
    eventually(T, "the task to run", || {
        let client = client.clone();
        let job = job.clone();
        async move {
            let s = api(&client, "gpufleet.api.jobs.get", &json!({"job_id": job}))
                .await
                .ok()?;
            (s["tasks"][0]["state"] == "RUNNING").then_some(())
        }
    })
    .await;
    // The task's process comes a moment after RUNNING is announced; the
    // process table has no event to wait on.
    let up_pid = up.id().unwrap();
    let procs: Vec<(u32, String)> = eventually(T, "the task's process", || async move {
        let mut procs: Vec<(u32, String)> = vec![];
        for k in pids::children(up_pid) {
            procs.push((k, pids::comm(k)));
            if pids::comm(k) == "gpufleet-worker" {
                procs.extend(pids::children(k).into_iter().map(|t| (t, pids::comm(t))));
            }
        }
        procs.iter().any(|(_, n)| n == "sleep").then_some(procs)
    })
    .await;
    assert_eq!(
        procs.len(),
        5,
        "nats-server, coordinator, worker, its watchdog, task: {procs:?}"
    );
    assert!(
        procs
            .iter()
            .any(|(_, n)| n == gpufleet_worker::watchdog::NAME),
        "{procs:?}"
    );

    up.start_kill().unwrap(); // SIGKILL: `up` cleans nothing up itself.
    let _ = exit_code(&mut up).await;
    eventually(
        Duration::from_secs(15),
        "every child to die with `up`",
        || {
            let procs = procs.clone();
            async move { procs.iter().all(|(p, n)| !pids::alive(*p, n)).then_some(()) }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_run_once_runs_the_sample_job_and_exits_with_its_outcome() {
    // What ./scripts/demo.sh does, minus the release build.
    let mut up = command(
        None,
        &[
            "up",
            "--workers",
            "2",
            "--port",
            "0",
            "--run",
            "examples/hello.json",
            "--once",
        ],
    )
    .stdin(Stdio::null())
    .spawn()
    .unwrap();
    let pid = up.id().unwrap();
    let mut stderr = up.stderr.take().unwrap();
    let mut said = String::new();
    read_until(&mut stderr, &mut said, "fleet ready").await;
    let kids: Vec<(u32, String)> = pids::children(pid)
        .into_iter()
        .map(|k| (k, pids::comm(k)))
        .collect();
    assert_eq!(kids.len(), 4, "{kids:?}");
    let dir = said
        .lines()
        .find_map(|l| l.strip_prefix("starting a local fleet in "))
        .map(PathBuf::from)
        .unwrap();
    let _cleanup = RemoveOnDrop(dir.clone());
    let (mut stdout, mut rest) = (String::new(), String::new());
    let mut out_pipe = up.stdout.take().unwrap();
    let (a, b) = tokio::join!(
        out_pipe.read_to_string(&mut stdout),
        stderr.read_to_string(&mut rest)
    );
    a.unwrap();
    b.unwrap();
    assert_eq!(exit_code(&mut up).await, Some(0), "{said}{rest}");
    assert!(
        stdout.contains("[hello-gpu-0] training step 3\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("[hello-cpu] cpu task, no GPUs: ''\n"),
        "{stdout}"
    );
    assert!(
        rest.contains("status: FINISHED:COMPLETED") && rest.contains("fleet stopped"),
        "{rest}"
    );
    for (k, name) in &kids {
        assert!(
            !pids::alive(*k, name),
            "{name} (pid {k}) survived `up --once`"
        );
    }
    assert!(!dir.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_secure_runs_the_sample_job_with_roles_and_signed_reservations() {
    let mut up = command(
        None,
        &[
            "up",
            "--secure",
            "--workers",
            "2",
            "--port",
            "0",
            "--run",
            "examples/hello.json",
            "--once",
        ],
    )
    .stdin(Stdio::null())
    .spawn()
    .unwrap();
    let mut stderr = up.stderr.take().unwrap();
    let mut said = String::new();
    read_until(&mut stderr, &mut said, "fleet ready").await;
    let dir = said
        .lines()
        .find_map(|l| l.strip_prefix("starting a local fleet in "))
        .map(PathBuf::from)
        .unwrap();
    // The fleet runs from what `gpufleet auth` wrote: roles on, a signing
    // key, and every worker trusting it.
    let auth = dir.join("auth");
    let coordinator = std::fs::read_to_string(auth.join("coordinator.toml")).unwrap();
    assert!(coordinator.contains("roles = true"), "{coordinator}");
    let worker = std::fs::read_to_string(auth.join("worker-local-1.toml")).unwrap();
    assert!(worker.contains("trusted_keys = [\"U"), "{worker}");
    let (mut stdout, mut rest) = (String::new(), String::new());
    let mut out_pipe = up.stdout.take().unwrap();
    let (a, b) = tokio::join!(
        out_pipe.read_to_string(&mut stdout),
        stderr.read_to_string(&mut rest)
    );
    a.unwrap();
    b.unwrap();
    assert_eq!(exit_code(&mut up).await, Some(0), "{said}{rest}");
    assert!(
        stdout.contains("[hello-gpu-0] training step 3\n"),
        "{stdout}"
    );
    assert!(
        rest.contains("status: FINISHED:COMPLETED") && rest.contains("fleet stopped"),
        "{rest}"
    );
    assert!(!dir.exists());
}

/// Waits until `$SRV.PING.gpufleet` answers on `url`.
async fn wait_coordinator(url: &str) {
    let client = async_nats::connect(url).await.unwrap();
    eventually(T, "the coordinator to serve", || {
        let client = client.clone();
        async move {
            client
                .request("$SRV.PING.gpufleet", Bytes::new())
                .await
                .ok()
        }
    })
    .await;
}

async fn advert(url: &str, name: &str) -> Value {
    let client = async_nats::connect(url).await.unwrap();
    eventually(T, &format!("worker {name} to be listed"), || {
        let client = client.clone();
        async move {
            let ws = api(&client, "gpufleet.api.workers.list", &json!({}))
                .await
                .ok()?;
            ws.as_array()?.iter().find(|w| w["name"] == name).cloned()
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_settings_files_load_and_layers_and_unknown_keys_behave() {
    let server = NatsServer::start();
    let url = server.url();
    let examples = workspace_root().join("examples");
    let path = |p: &Path| p.display().to_string();

    // The example files, as shipped, start real programs.
    let _coordinator = Proc::spawn(
        "gpufleet-coordinator",
        &[
            "--config".into(),
            path(&examples.join("coordinator.toml")),
            "--nats-url".into(),
            url.clone(),
        ],
        &[],
    );
    wait_coordinator(&url).await;
    let _worker = Proc::spawn(
        "gpufleet-worker",
        &[
            "--config".into(),
            path(&examples.join("worker.toml")),
            "--nats-url".into(),
            url.clone(),
            "--name".into(),
            "from-example".into(),
            "--simulate-gpus".into(),
            "1x8GiB:T4".into(),
        ],
        &[],
    );
    let w = advert(&url, "from-example").await;
    assert_eq!(w["ttl"], 10, "advert_ttl of the example: {w:#}");
    assert_eq!(w["gpus"][0]["model"], "T4");
    let out = gpufleet_in(
        None,
        &[
            "--config",
            &path(&examples.join("cli.toml")),
            "--nats-url",
            &url,
            "workers",
            "--json",
        ],
        None,
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:#?}");

    // defaults < file < GPUFLEET_* env < flags.
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "w.toml",
        "advert_ttl = \"7s\"\nheartbeat = \"1s\"\ncpus = 3\nname = \"from-file\"\n[labels]\nzone = \"file\"\n",
    );
    let _layered = Proc::spawn(
        "gpufleet-worker",
        &[
            "--config".into(),
            path(&file),
            "--nats-url".into(),
            url.clone(),
            "--cpus".into(),
            "6".into(),
        ],
        &[("GPUFLEET_ADVERT_TTL", "9s"), ("GPUFLEET_CPUS", "5")],
    );
    let w = advert(&url, "from-file").await;
    assert_eq!(w["ttl"], 9, "env beats file: {w:#}");
    assert_eq!(w["cpus_milli"], 6000, "flag beats env: {w:#}");
    assert_eq!(
        w["labels"],
        json!({"zone": "file"}),
        "file beats default: {w:#}"
    );

    // An unknown key stops each program with its name.
    let bad = write(
        dir.path(),
        "bad.toml",
        "nats_url = \"nats://127.0.0.1:4222\"\nnats_ulr = \"x\"\n",
    );
    for program in ["gpufleet-coordinator", "gpufleet-worker"] {
        let mut p = Proc::spawn(
            program,
            &[
                "--config".into(),
                path(&bad),
                "--nats-url".into(),
                url.clone(),
            ],
            &[],
        );
        let status = p
            .wait_exit(T)
            .unwrap_or_else(|| panic!("{program} must refuse the file"));
        assert!(!status.success(), "{program}");
        assert!(
            p.output().contains("unknown field `nats_ulr`"),
            "{program}: {}",
            p.output()
        );
    }
}

/// `import nats, msgpack` works with this PYTHONPATH, installing the
/// example's pinned requirements under .tools/ the first time.
fn python_path() -> String {
    let root = workspace_root();
    let target = root.join(".tools/python");
    let importable = || {
        std::process::Command::new("python3")
            .args(["-c", "import nats, msgpack"])
            .env("PYTHONPATH", &target)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !importable() {
        let status = std::process::Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&target)
            .arg("-r")
            .arg(root.join("examples/requirements.txt"))
            .env("PIP_ROOT_USER_ACTION", "ignore")
            .status()
            .expect("python3 -m pip runs");
        assert!(
            status.success() && importable(),
            "could not install examples/requirements.txt"
        );
    }
    target.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_submits_a_job_and_follows_it_to_the_end() {
    // The README shows the example whole; it must be this tested file.
    let root = workspace_root();
    let example = std::fs::read_to_string(root.join("examples/submit_and_follow.py")).unwrap();
    let shown = gpufleet_testkit::readme_python("\"\"\"Submit a job");
    assert_eq!(
        shown, example,
        "README's Python example differs from examples/submit_and_follow.py"
    );

    let pythonpath = tokio::task::spawn_blocking(python_path).await.unwrap();
    let mut fleet = Fleet::start().await;
    // Its tasks send no RUNNING (they end sooner): the example must not
    // need one.
    fleet
        .add_worker(
            WorkerSpec::new("w1")
                .gpus("2x24GiB:L4")
                .env([("GPUFLEET_RUNNING_EVENT_AFTER".into(), "60s".into())]),
        )
        .await;
    let out = with_deadline(
        T,
        "examples/submit_and_follow.py",
        Command::new("python3")
            .arg(root.join("examples/submit_and_follow.py"))
            .env("GPUFLEET_NATS_URL", fleet.url())
            .env("PYTHONPATH", pythonpath)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with("[train] step "))
            .count(),
        3,
        "every line, once: {stdout}"
    );
    assert!(stdout.contains("[train] step 2\n"), "{stdout}");
    assert!(
        stdout.contains("[evaluate] evaluating on GPU ["),
        "{stdout}"
    );
    assert!(
        stderr.contains("[train] progress: {\"step\": 2}"),
        "{stderr}"
    );
    assert!(
        stderr.contains("[train] result: SUCCEEDED {\"accuracy\": 0.9}"),
        "{stderr}"
    );
    assert!(stderr.contains("FINISHED:COMPLETED"), "{stderr}");
    let job = stderr
        .lines()
        .find_map(|l| l.strip_prefix("submitted job "))
        .expect("the job's id");
    let states: Vec<TaskState> = state_events(&fleet.events(job).await)
        .into_iter()
        .map(|(_, s, _)| s)
        .collect();
    assert!(!states.contains(&TaskState::Running), "{states:?}");
}

/// A task that ends before its worker's `running_event_after` sends no
/// RUNNING event (one write less): its result says when it started, and
/// `run`, `status --wait` and `logs` follow it to the end all the same
/// (output counts from the holder the coordinator's RESERVED names).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_task_sends_no_running_event_and_every_reader_follows_it_to_the_end() {
    let mut fleet = Fleet::start().await;
    fleet
        .add_worker(
            WorkerSpec::new("w1").env([("GPUFLEET_RUNNING_EVENT_AFTER".into(), "60s".into())]),
        )
        .await;
    let url = fleet.url();
    let out = gpufleet(
        &url,
        &[
            "run",
            "--",
            "sh",
            "-c",
            "echo short-lived; echo '{\"ok\": 1}' > \"$GPUFLEET_RESULT\"",
        ],
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(out.stdout.trim(), "short-lived", "{out:#?}");
    let job = out.submitted();
    let done = gpufleet(&url, &["status", &job, "--wait", "--json"])
        .await
        .json();
    assert_eq!(done["status"], "FINISHED:COMPLETED", "{done:#}");
    assert_eq!(done["tasks"][0]["result"], json!({"ok": 1}));
    let logs = gpufleet(&url, &["logs", &job]).await;
    assert_eq!(logs.stdout.trim(), "short-lived", "{logs:#?}");

    let evs = fleet.events(&job).await;
    let states: Vec<TaskState> = state_events(&evs).into_iter().map(|(_, s, _)| s).collect();
    assert!(
        !states.contains(&TaskState::Running),
        "no RUNNING for a task that ended at once: {states:?}"
    );
    let started = evs.iter().find_map(|e| match &e.body {
        EventBody::Result(o) => Some(o.started_at),
        _ => None,
    });
    assert!(
        matches!(started, Some(Some(_))),
        "the result says when it started: {evs:?}"
    );
}

/// A fleet with worker w1 running a one-task job named `name` whose task
/// waits for `$CTL/go`, and `gpufleet status JOB --wait` waiting for it
/// (it has said RUNNING on w1).
struct Waiting {
    fleet: Fleet,
    url: String,
    ctl: PathBuf,
    job: String,
    child: Child,
    stderr: tokio::process::ChildStderr,
    seen: String,
}

async fn waiting_on_w1(name: &str) -> Waiting {
    let mut fleet = Fleet::start().await;
    fleet.add_worker(WorkerSpec::new("w1")).await;
    let url = fleet.url();
    let ctl = fleet.dir().to_path_buf();
    let env = format!("CTL={}", ctl.display());
    let out = gpufleet(
        &url,
        &[
            "run",
            "--no-wait",
            "--name",
            name,
            "-e",
            &env,
            "--",
            "sh",
            "-c",
            "while [ ! -e \"$CTL/go\" ]; do sleep 0.05; done",
        ],
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    let job = out.stdout.trim().to_string();
    let mut child = command(Some(&url), &["status", &job, "--wait"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut seen = String::new();
    read_until(&mut stderr, &mut seen, "RUNNING on w1").await;
    Waiting {
        fleet,
        url,
        ctl,
        job,
        child,
        stderr,
        seen,
    }
}

/// The coordinator publishes no SUCCEEDED state event (one write less per
/// task): `status --wait` and `run` take the holder's result as the end,
/// read the status again until the record says so, print SUCCEEDED as
/// before, and end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_without_its_state_event_is_shown_from_the_holders_result() {
    // `status --wait` follows no output: before, it read only state events.
    let Waiting {
        fleet,
        url,
        ctl,
        job,
        mut child,
        mut stderr,
        mut seen,
    } = waiting_on_w1("waiter").await;
    write(&ctl, "go", "");
    assert_eq!(exit_code(&mut child).await, Some(0), "{seen}");
    stderr.read_to_string(&mut seen).await.unwrap();
    assert!(seen.contains("[waiter] SUCCEEDED\n"), "{seen}");
    assert!(seen.contains("FINISHED:COMPLETED"), "{seen}");
    let evs = fleet.events(&job).await;
    assert!(
        !state_events(&evs)
            .iter()
            .any(|(_, s, _)| *s == TaskState::Succeeded),
        "no SUCCEEDED state event: {evs:?}"
    );

    // `run` (following output) of a task that ends at once, the same.
    let out = gpufleet(&url, &["run", "--name", "quick", "--", "true"]).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stderr.contains("[quick] SUCCEEDED\n"), "{out:#?}");
    assert!(out.stderr.contains("FINISHED:COMPLETED"), "{out:#?}");
}

/// A worker's SUCCEEDED result counts for readers only from the attempt's
/// holder, and only while the coordinator has not ended the attempt: a
/// forged result from another worker, and the holder's own after its
/// attempt ended LOST, are not shown as the task's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_result_from_a_non_holder_or_after_lost_is_not_shown_as_the_end() {
    use gpufleet_schema::subjects::{self, Sender};
    use gpufleet_schema::{codec, Event, EventKind, JobId, TaskId, TaskOutcome, UserId, WorkerId};

    let Waiting {
        mut fleet,
        url,
        job,
        mut child,
        mut stderr,
        mut seen,
        ..
    } = waiting_on_w1("victim").await;

    // Results of attempt 1 as `from` would publish them (roles are off
    // here: anyone may publish under any worker's name).
    let js = async_nats::jetstream::new(fleet.client().await);
    let job_id = JobId::new(job.clone()).unwrap();
    let task = TaskId::for_index(&job_id, 0);
    let forge = |from: &str| {
        let worker = WorkerId::new(from).unwrap();
        let event = Event {
            job_id: job_id.clone(),
            task_id: task.clone(),
            attempt: 1,
            worker: Some(worker.clone()),
            lease_rev: Some(1),
            at: time::OffsetDateTime::now_utc(),
            body: EventBody::Result(TaskOutcome {
                state: TaskState::Succeeded,
                exit_code: Some(0),
                signal: None,
                result: Some(json!({"forged": from})),
                error: None,
                artifacts: vec![],
                started_at: None,
                finished_at: time::OffsetDateTime::now_utc(),
                usage: None,
            }),
            token: None,
        };
        let subject = subjects::events(
            &UserId::default_user(),
            &job_id,
            &task,
            EventKind::Result,
            &Sender::Worker(worker),
        );
        (subject, Bytes::from(codec::encode(&event).unwrap()))
    };
    let (subject, body) = forge("w2");
    gpufleet_natsutil::events::publish(&js, subject, body, None)
        .await
        .expect("publish w2's result");

    // The holder dies; the coordinator ends its attempt LOST; then a
    // result of that attempt in the holder's name comes.
    fleet.worker("w1").kill9();
    fleet
        .wait_event(&job, T, "attempt 1 LOST", |e| {
            e.attempt == 1
                && matches!(
                    e.body,
                    EventBody::State {
                        state: TaskState::Lost,
                        ..
                    }
                )
        })
        .await;
    let (subject, body) = forge("w1");
    gpufleet_natsutil::events::publish(&js, subject, body, None)
        .await
        .expect("publish w1's late result");
    read_until(&mut stderr, &mut seen, "LOST").await;

    let out = gpufleet(&url, &["cancel", &job, "--wait"]).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    let code = exit_code(&mut child).await;
    stderr.read_to_string(&mut seen).await.unwrap();
    assert_eq!(code, Some(3), "{seen}");
    assert!(!seen.contains("SUCCEEDED"), "{seen}");
    let s = fleet.get(&job).await;
    assert_eq!(s["tasks"][0]["state"], "CANCELLED", "{s:#}");
}
