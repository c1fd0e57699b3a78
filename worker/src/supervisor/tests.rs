//! Tests with real child processes. Every wait has a deadline; the tests
//! wait for what the task prints rather than for time to pass.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use gpufleet_schema::{ByteSize, GpuGrant, JobId, Rendezvous, Resources, TaskId, TaskSpec};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::*;

/// Generous: the machine may be busy building.
const DEADLINE: Duration = Duration::from_secs(60);

fn spec(cmd: &[&str]) -> TaskSpec {
    TaskSpec {
        name: None,
        command: cmd.iter().map(|s| s.to_string()).collect(),
        env: BTreeMap::new(),
        resources: Resources::default(),
        timeout: None,
        artifacts: vec![],
        array: None,
        load: None,
    }
}

fn task(dir: &Path, cmd: &[&str]) -> TaskRun {
    TaskRun {
        job_id: JobId::new("job1").unwrap(),
        task_id: TaskId::new("job1-0").unwrap(),
        attempt: 1,
        spec: spec(cmd),
        gpus: vec![],
        rendezvous: None,
        dir: dir.join("attempt-1"),
        isolation: Arc::new(Isolation::unconfined()),
        limits: Limits {
            kill_grace: Duration::from_millis(300),
            log_batch_interval: Duration::from_millis(10),
            progress_poll: Duration::from_millis(10),
            memory_poll: Duration::from_millis(20),
            usage_poll: Duration::from_millis(50),
            final_flush: Duration::from_secs(2),
            ..Limits::default()
        },
        usage: Some(crate::usage::Meter::new(vec![])),
        pid: None,
        fence: None,
    }
}

fn sh(dir: &Path, script: &str) -> TaskRun {
    task(dir, &["sh", "-c", script])
}

struct Running {
    handle: JoinHandle<Finished>,
    rx: mpsc::Receiver<Output>,
    stop: watch::Sender<Option<StopReason>>,
    seen: Vec<Output>,
}

fn start(task: TaskRun) -> Running {
    start_with(task, 10_000)
}

fn start_with(task: TaskRun, capacity: usize) -> Running {
    let (tx, rx) = mpsc::channel(capacity);
    let (stop, stop_rx) = watch::channel(None);
    Running {
        handle: tokio::spawn(run(task, tx, stop_rx)),
        rx,
        stop,
        seen: Vec::new(),
    }
}

impl Running {
    /// Reads output until `stream` has shown `needle`; returns that
    /// stream's text so far.
    async fn wait_for(&mut self, stream: LogStream, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let text = text_of(&self.seen, stream);
            if text.contains(needle) {
                return text;
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(o)) => self.seen.push(o),
                Ok(None) => panic!("task ended before printing {needle:?}; saw {text:?}"),
                Err(_) => panic!("no {needle:?} in time; saw {text:?}"),
            }
        }
    }

    fn stop(&self, why: StopReason) {
        self.stop.send_replace(Some(why));
    }

    /// Reads the rest of the output and the end.
    async fn finish(mut self) -> (Finished, Vec<Output>) {
        let collect = async {
            while let Some(o) = self.rx.recv().await {
                self.seen.push(o);
            }
        };
        tokio::time::timeout(DEADLINE, collect)
            .await
            .expect("output did not end in time");
        let finished = tokio::time::timeout(DEADLINE, self.handle)
            .await
            .expect("run did not return in time")
            .expect("run panicked");
        (finished, self.seen)
    }
}

async fn run_to_end(task: TaskRun) -> (Finished, Vec<Output>) {
    start(task).finish().await
}

fn text_of(outputs: &[Output], want: LogStream) -> String {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Log { stream, text, .. } if *stream == want => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

fn progress_of(outputs: &[Output]) -> Vec<serde_json::Value> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Progress(v) => Some(v.clone()),
            _ => None,
        })
        .collect()
}

/// The value printed as `name=value` on a line of its own.
fn field(text: &str, name: &str) -> String {
    let prefix = format!("{name}=");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {name}= in {text:?}"))
        .to_string()
}

/// Whether a process that is neither gone nor a zombie has `pid` and
/// belongs to group `pgid` (the group check guards against pid reuse).
fn alive_in_group(pid: i32, pgid: i32) -> bool {
    match crate::procs::stat(&Path::new(crate::procs::ROOT).join(pid.to_string())) {
        Some(s) => s.pgrp == pgid && !s.is_dead(),
        None => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_with_layout_and_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = sh(
        tmp.path(),
        r#"
        echo "job=$GPUFLEET_JOB_ID"
        echo "task=$GPUFLEET_TASK_ID"
        echo "attempt=$GPUFLEET_ATTEMPT"
        echo "cvd=$CUDA_VISIBLE_DEVICES"
        echo "order=$CUDA_DEVICE_ORDER"
        echo "gpus=$GPUFLEET_GPUS"
        echo "result=$GPUFLEET_RESULT"
        echo "events=$GPUFLEET_EVENTS"
        echo "out=$GPUFLEET_OUTPUT_DIR"
        echo "rank=$GPUFLEET_RANK"
        echo "world=$GPUFLEET_WORLD_SIZE"
        echo "addr=$MASTER_ADDR"
        echo "port=$MASTER_PORT"
        echo "foo=$FOO"
        echo "path=$PATH"
        echo "cwd=$(pwd -P)"
        echo "stdin=$(wc -c)"
        "#,
    );
    t.spec.env.insert("FOO".into(), "bar baz".into());
    t.gpus = vec![
        GpuGrant {
            index: 1,
            uuid: "GPU-aaa".into(),
            memory: ByteSize::gib(1),
        },
        GpuGrant {
            index: 3,
            uuid: "GPU-bbb".into(),
            memory: ByteSize::gib(1),
        },
    ];
    t.rendezvous = Some(Rendezvous {
        rank: 2,
        world_size: 4,
        master_addr: "10.0.0.7".into(),
        master_port: 29500,
    });
    let root = t.dir.clone();
    let (fin, out) = run_to_end(t).await;

    assert_eq!(fin.state, TaskState::Succeeded, "{fin:?}");
    assert_eq!(fin.exit_code, Some(0));
    assert!(fin.launched);
    assert!(fin.error.is_none());
    assert!(fin.started_at.is_some());
    assert_eq!(fin.output_dir, root.join("work"));
    let text = text_of(&out, LogStream::Stdout);
    let paths = TaskPaths::new(&root);
    let expect = [
        ("job", "job1".to_string()),
        ("task", "job1-0".into()),
        ("attempt", "1".into()),
        ("cvd", "1,3".into()),
        ("order", "PCI_BUS_ID".into()),
        ("gpus", "GPU-aaa,GPU-bbb".into()),
        (
            "result",
            root.join("meta/result.json").display().to_string(),
        ),
        (
            "events",
            root.join("meta/events.jsonl").display().to_string(),
        ),
        ("out", paths.work.display().to_string()),
        ("rank", "2".into()),
        ("world", "4".into()),
        ("addr", "10.0.0.7".into()),
        ("port", "29500".into()),
        ("foo", "bar baz".into()),
        ("path", std::env::var("PATH").unwrap()),
        (
            "cwd",
            std::fs::canonicalize(&paths.work)
                .unwrap()
                .display()
                .to_string(),
        ),
        ("stdin", "0".into()),
    ];
    for (name, want) in expect {
        assert_eq!(field(&text, name), want, "{name} in {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_task_sees_no_gpus() {
    let tmp = tempfile::tempdir().unwrap();
    let t = sh(
        tmp.path(),
        r#"echo "cvd=${CUDA_VISIBLE_DEVICES-unset}."; echo "rank=${GPUFLEET_RANK-unset}""#,
    );
    let (fin, out) = run_to_end(t).await;
    assert_eq!(fin.state, TaskState::Succeeded);
    let text = text_of(&out, LogStream::Stdout);
    assert_eq!(field(&text, "cvd"), ".", "set, and empty");
    assert_eq!(field(&text, "rank"), "unset");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_zero_exit_fails_with_its_code() {
    let tmp = tempfile::tempdir().unwrap();
    let (fin, _) = run_to_end(sh(tmp.path(), "echo oops >&2; exit 3")).await;
    assert_eq!(fin.state, TaskState::Failed);
    assert_eq!(fin.exit_code, Some(3));
    assert_eq!(fin.signal, None);
    assert_eq!(fin.error.as_deref(), Some("exited with code 3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_json_comes_back() {
    let tmp = tempfile::tempdir().unwrap();
    let t = sh(
        tmp.path(),
        r#"printf '{"loss": 0.25, "tags": ["a", "b"]}' > "$GPUFLEET_RESULT""#,
    );
    let (fin, _) = run_to_end(t).await;
    assert_eq!(fin.state, TaskState::Succeeded, "{fin:?}");
    assert_eq!(fin.result, Some(json!({"loss": 0.25, "tags": ["a", "b"]})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_over_the_limit_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = sh(
        tmp.path(),
        r#"printf '"%098d"' 0 > "$GPUFLEET_RESULT""#, // 100 bytes of valid JSON
    );
    t.limits.max_result_bytes = 10;
    let (fin, _) = run_to_end(t).await;
    assert_eq!(fin.state, TaskState::Failed);
    assert_eq!(fin.exit_code, Some(0));
    assert_eq!(fin.result, None);
    assert_eq!(
        fin.error.as_deref(),
        Some("result file is 100 bytes, more than the limit of 10")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_result_fails_only_a_successful_task() {
    let tmp = tempfile::tempdir().unwrap();
    let script = r#"printf '{"loss": ' > "$GPUFLEET_RESULT"; exit "$CODE""#;
    let mut t = sh(tmp.path(), script);
    t.spec.env.insert("CODE".into(), "0".into());
    let (fin, _) = run_to_end(t).await;
    assert_eq!(fin.state, TaskState::Failed);
    let error = fin.error.unwrap();
    assert!(
        error.starts_with("result file is not valid JSON: EOF while parsing"),
        "{error}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let mut t = sh(tmp.path(), script);
    t.spec.env.insert("CODE".into(), "4".into());
    let (fin, _) = run_to_end(t).await;
    assert_eq!(fin.state, TaskState::Failed);
    assert_eq!(fin.error.as_deref(), Some("exited with code 4"));
    assert_eq!(fin.result, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_ends_a_task_that_ignores_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    // The handler proves SIGTERM came first; the loop outlives it.
    let mut t = sh(
        tmp.path(),
        r#"trap 'echo got TERM' TERM; while :; do sleep 1; done"#,
    );
    t.spec.timeout = Some(Dur(Duration::from_millis(1500)));
    let (fin, out) = run_to_end(t).await;
    assert_eq!(fin.state, TaskState::TimedOut, "{fin:?}");
    assert_eq!(fin.signal, Some(libc::SIGKILL));
    assert_eq!(fin.error.as_deref(), Some("timed out after 1500ms"));
    assert!(text_of(&out, LogStream::Stdout).contains("got TERM"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_task() {
    let tmp = tempfile::tempdir().unwrap();
    let mut r = start(sh(tmp.path(), "echo ready; exec sleep 1000"));
    r.wait_for(LogStream::Stdout, "ready").await;
    r.stop(StopReason::Cancel);
    let (fin, _) = r.finish().await;
    assert_eq!(fin.state, TaskState::Cancelled);
    assert_eq!(fin.signal, Some(libc::SIGTERM));
    assert_eq!(fin.error.as_deref(), Some("cancelled"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_interrupts_the_task_and_kills_it_after_the_grace() {
    let tmp = tempfile::tempdir().unwrap();
    // Ignored signals stay ignored across exec, so sleep ignores TERM too.
    let mut r = start(sh(
        tmp.path(),
        "trap '' TERM; echo ready; while :; do sleep 1; done",
    ));
    r.wait_for(LogStream::Stdout, "ready").await;
    let asked = tokio::time::Instant::now();
    r.stop(StopReason::Drain);
    let (fin, _) = r.finish().await;
    assert!(asked.elapsed() >= Duration::from_millis(300));
    assert_eq!(fin.state, TaskState::Interrupted);
    assert_eq!(fin.signal, Some(libc::SIGKILL));
    assert_eq!(fin.error.as_deref(), Some("worker is draining"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preempted_task_gets_sigterm_and_the_preemption_grace_before_sigkill() {
    let tmp = tempfile::tempdir().unwrap();
    let mut r = start(sh(
        tmp.path(),
        "trap 'echo got TERM' TERM; echo ready; while :; do sleep 0.1; done",
    ));
    r.wait_for(LogStream::Stdout, "ready").await;
    let asked = tokio::time::Instant::now();
    // Longer than the kill grace these tests run with.
    let grace = Duration::from_millis(1500);
    r.stop(StopReason::Preempt { grace });
    let (fin, out) = r.finish().await;
    assert!(asked.elapsed() >= grace, "{:?}", asked.elapsed());
    assert!(text_of(&out, LogStream::Stdout).contains("got TERM"));
    assert_eq!(fin.state, TaskState::Interrupted);
    assert_eq!(fin.signal, Some(libc::SIGKILL));
    assert!(
        fin.error.as_deref().unwrap().starts_with("preempted"),
        "{fin:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_task_is_cancelled_for_lease_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let mut r = start(sh(tmp.path(), "echo ready; exec sleep 1000"));
    r.wait_for(LogStream::Stdout, "ready").await;
    r.stop(StopReason::Fenced);
    let (fin, _) = r.finish().await;
    assert_eq!(fin.state, TaskState::Cancelled);
    assert_eq!(fin.error.as_deref(), Some("lease lost"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_before_the_start_launches_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("ran");
    let t = task(tmp.path(), &["touch", marker.to_str().unwrap()]);
    let (tx, _rx) = mpsc::channel(10);
    let (_stop, stop_rx) = watch::channel(Some(StopReason::Drain));
    let fin = tokio::time::timeout(DEADLINE, run(t, tx, stop_rx))
        .await
        .unwrap();
    assert_eq!(fin.state, TaskState::Interrupted);
    assert!(!fin.launched);
    assert!(!marker.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grandchildren_die_with_the_group() {
    let tmp = tempfile::tempdir().unwrap();
    let mut r = start(sh(
        tmp.path(),
        r#"sleep 1000 & echo "child=$!"; echo "group=$$"; wait"#,
    ));
    let text = r.wait_for(LogStream::Stdout, "group=").await;
    let child: i32 = field(&text, "child").parse().unwrap();
    let group: i32 = field(&text, "group").parse().unwrap();
    assert!(alive_in_group(child, group));
    r.stop(StopReason::Cancel);
    let (fin, _) = r.finish().await;
    assert_eq!(fin.state, TaskState::Cancelled);
    assert!(!alive_in_group(child, group), "sleep {child} survived");
}

/// Waits for process `pid` to exit, on the event its pidfd gives.
async fn wait_exited(pid: i32) {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::ESRCH), "pidfd_open: {e}");
        return;
    }
    // SAFETY: the fd was just opened, nobody else owns it, and the AsyncFd
    // owns it until both are dropped together.
    let fd = unsafe {
        let fd = OwnedFd::from_raw_fd(fd as i32);
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE).unwrap()
    };
    let ready = tokio::time::timeout(DEADLINE, fd.readable())
        .await
        .expect("the process did not exit in time");
    ready.unwrap().retain_ready();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_run_kills_the_task() {
    let tmp = tempfile::tempdir().unwrap();
    let mut r = start(sh(tmp.path(), r#"echo "pid=$$"; exec sleep 1000"#));
    let text = r.wait_for(LogStream::Stdout, "pid=").await;
    let pid: i32 = field(&text, "pid").parse().unwrap();
    r.handle.abort();
    wait_exited(pid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grandchild_left_behind_is_killed_when_the_task_exits() {
    let tmp = tempfile::tempdir().unwrap();
    // Detached from the pipes: nothing would make us wait for it.
    let t = sh(
        tmp.path(),
        r#"sleep 1000 >/dev/null 2>&1 & echo "child=$!"; echo "group=$$""#,
    );
    let (fin, out) = run_to_end(t).await;
    assert_eq!(fin.state, TaskState::Succeeded);
    let text = text_of(&out, LogStream::Stdout);
    let child: i32 = field(&text, "child").parse().unwrap();
    let group: i32 = field(&text, "group").parse().unwrap();
    assert!(!alive_in_group(child, group), "sleep {child} survived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grandchild_holding_the_pipes_does_not_hang_the_end() {
    let tmp = tempfile::tempdir().unwrap();
    let t = sh(
        tmp.path(),
        r#"sleep 1000 & echo "child=$!"; echo "group=$$"; echo bye >&2"#,
    );
    let (fin, out) = run_to_end(t).await;
    assert_eq!(fin.state, TaskState::Succeeded);
    let text = text_of(&out, LogStream::Stdout);
    let child: i32 = field(&text, "child").parse().unwrap();
    let group: i32 = field(&text, "group").parse().unwrap();
    assert!(!alive_in_group(child, group), "sleep {child} survived");
    assert_eq!(text_of(&out, LogStream::Stderr), "bye\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_outside_the_group_holding_the_pipes_does_not_hang_the_end() {
    let tmp = tempfile::tempdir().unwrap();
    let t = sh(tmp.path(), r#"setsid sleep 1000 & echo "child=$!""#);
    let (fin, out) = run_to_end(t).await;
    let child: i32 = field(&text_of(&out, LogStream::Stdout), "child")
        .parse()
        .unwrap();
    assert_eq!(fin.state, TaskState::Succeeded);
    // It escaped the group, but not the end-of-task sweep.
    wait_exited(child).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_over_the_limit_interrupts() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = task(
        tmp.path(),
        &[
            "python3",
            "-c",
            // Bytes filled with data, so the pages are really resident.
            "import time\nb = b'x' * (200 << 20)\nprint('allocated', flush=True)\ntime.sleep(600)",
        ],
    );
    t.spec.resources.memory = Some(ByteSize::mib(50));
    let (fin, _) = run_to_end(t).await;
    assert_eq!(fin.state, TaskState::Interrupted, "{fin:?}");
    assert_eq!(fin.signal, Some(libc::SIGKILL));
    let error = fin.error.unwrap();
    assert!(
        error.starts_with("memory limit exceeded: the task used "),
        "{error}"
    );
    assert!(
        error.ends_with("more than its limit of 52428800 bytes"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_out_of_memory_message_interrupts_and_others_fail() {
    for (message, state, reason) in [
        (
            "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB",
            TaskState::Interrupted,
            "out of memory: PyTorch reported \"RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB\" (exit code 1)",
        ),
        (
            "warning: step 3 is out of memory budget\nValueError: bad shape",
            TaskState::Failed,
            "exited with code 1",
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let mut t = sh(tmp.path(), r#"printf '%s\n' "$MSG" >&2; exit 1"#);
        t.spec.env.insert("MSG".into(), message.into());
        let (fin, _) = run_to_end(t).await;
        assert_eq!(fin.state, state, "{message}");
        assert_eq!(fin.exit_code, Some(1));
        assert_eq!(fin.error.as_deref(), Some(reason));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_we_did_not_send_interrupts_and_a_crash_fails_with_the_signal_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (fin, _) = run_to_end(sh(tmp.path(), "kill -9 $$")).await;
    assert_eq!(fin.state, TaskState::Interrupted);
    assert_eq!(fin.signal, Some(9));
    assert_eq!(fin.exit_code, None);
    let error = fin.error.unwrap();
    // This machine's shared memory cgroup counted no OOM kill meanwhile.
    assert!(
        error.contains("SIGKILL") && error.contains("likely out of memory"),
        "{error}"
    );
    for (sig, name) in [
        ("SEGV", "SIGSEGV"),
        ("BUS", "SIGBUS"),
        ("ILL", "SIGILL"),
        ("FPE", "SIGFPE"),
        ("ABRT", "SIGABRT"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let (fin, _) = run_to_end(sh(tmp.path(), &format!("kill -{sig} $$"))).await;
        assert_eq!(fin.state, TaskState::Failed, "{sig}");
        let error = fin.error.unwrap();
        assert!(
            error.starts_with(&format!("crashed: killed by {name}")),
            "{error}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_that_cannot_start_fails_unlaunched() {
    let tmp = tempfile::tempdir().unwrap();
    let (fin, out) = run_to_end(task(tmp.path(), &["gpufleet-no-such-program", "x"])).await;
    assert_eq!(fin.state, TaskState::Failed);
    assert!(!fin.launched);
    assert!(fin.started_at.is_none());
    assert!(out.is_empty());
    let error = fin.error.unwrap();
    assert!(error.contains("\"gpufleet-no-such-program\""), "{error}");
    assert!(error.contains("No such file or directory"), "{error}");

    // Not executable: EACCES, even for root.
    let script = tmp.path().join("script.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    let (fin, _) = run_to_end(task(tmp.path(), &[script.to_str().unwrap()])).await;
    assert_eq!(fin.state, TaskState::Failed);
    assert!(!fin.launched);
    let error = fin.error.unwrap();
    assert!(error.contains("script.sh"), "{error}");
    assert!(error.contains("Permission denied"), "{error}");
}

/// Peak and current resident memory of this test process, in bytes.
fn own_memory(field: &str) -> u64 {
    crate::procs::status_bytes(&Path::new(crate::procs::ROOT).join("self"), field)
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

const FLOOD_BYTES: u64 = 200_000_000;
/// 200 MB in 100-byte lines, written as fast as Python can.
const FLOOD: &str = "import sys\nchunk = (b'y' * 99 + b'\\n') * 10000\nfor _ in range(200):\n    sys.stdout.buffer.write(chunk)\n";

/// A caller that takes nothing until the end loses output but does not
/// block the task, and memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_output_with_a_stalled_caller_is_dropped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let before = own_memory("VmRSS:");
    let mut t = task(tmp.path(), &["python3", "-c", FLOOD]);
    t.limits.final_flush = Duration::from_millis(200);
    let (tx, mut rx) = mpsc::channel(4);
    let (_stop, stop_rx) = watch::channel(None);
    let fin = tokio::time::timeout(DEADLINE, run(t, tx, stop_rx))
        .await
        .expect("run did not return in time");
    assert_eq!(fin.state, TaskState::Succeeded, "{fin:?}");
    let mut text_bytes = 0u64;
    while let Ok(o) = rx.try_recv() {
        if let Output::Log { text, .. } = o {
            assert!(text.bytes().all(|b| b == b'y' || b == b'\n'));
            text_bytes += text.len() as u64;
        }
    }
    assert!(fin.log_dropped_bytes > 0);
    assert_eq!(text_bytes + fin.log_dropped_bytes, FLOOD_BYTES);
    let peak = own_memory("VmHWM:");
    assert!(
        peak < before + (100 << 20),
        "peak RSS {peak} from {before}: output was buffered"
    );
}

/// A slow caller gets whole lines, in order, and is told of every loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_output_with_a_slow_caller_reports_every_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = task(tmp.path(), &["python3", "-c", FLOOD]);
    t.limits.final_flush = Duration::from_secs(30);
    t.limits.max_pending_log_bytes = 1 << 20;
    let (tx, mut rx) = mpsc::channel(4);
    let (_stop, stop_rx) = watch::channel(None);
    let handle = tokio::spawn(run(t, tx, stop_rx));
    let consume = async {
        let (mut text_bytes, mut reported) = (0u64, 0u64);
        while let Some(o) = rx.recv().await {
            if let Output::Log {
                text,
                dropped_bytes,
                ..
            } = o
            {
                assert!(text.len() % 100 == 0, "batches hold whole lines");
                text_bytes += text.len() as u64;
                reported += dropped_bytes;
            }
            // The caller's work, e.g. a publish round trip.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        (text_bytes, reported)
    };
    let (text_bytes, reported) = tokio::time::timeout(DEADLINE, consume).await.unwrap();
    let fin = handle.await.unwrap();
    assert_eq!(fin.state, TaskState::Succeeded);
    assert_eq!(reported, fin.log_dropped_bytes);
    assert_eq!(text_bytes + reported, FLOOD_BYTES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_past_the_total_limit_is_dropped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = sh(
        tmp.path(),
        "i=0; while [ $i -lt 1000 ]; do echo 123456789; i=$((i+1)); done",
    );
    t.limits.max_log_bytes = 1000;
    let (fin, out) = run_to_end(t).await;
    let text = text_of(&out, LogStream::Stdout);
    assert_eq!(text, "123456789\n".repeat(100));
    let Some(Output::Log { dropped_bytes, .. }) = out.last() else {
        panic!("no last batch");
    };
    assert_eq!(*dropped_bytes, 9000);
    assert_eq!(fin.log_dropped_bytes, 9000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_lines_are_forwarded_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let t = sh(
        tmp.path(),
        r#"
        for i in 1 2 3; do echo "{\"step\": $i}" >> "$GPUFLEET_EVENTS"; done
        echo "not json" >> "$GPUFLEET_EVENTS"
        printf '{"step": 4}' >> "$GPUFLEET_EVENTS"
        "#,
    );
    let (fin, out) = run_to_end(t).await;
    assert_eq!(fin.state, TaskState::Succeeded);
    let steps: Vec<_> = progress_of(&out)
        .iter()
        .map(|v| v["step"].clone())
        .collect();
    assert_eq!(steps, vec![json!(1), json!(2), json!(3), json!(4)]);
    assert_eq!(
        text_of(&out, LogStream::Stderr),
        "[gpufleet] ignored progress line that is not JSON: not json\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_arrives_while_the_task_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let mut r = start(sh(
        tmp.path(),
        r#"echo '{"epoch": 1}' >> "$GPUFLEET_EVENTS"; echo ready; exec sleep 1000"#,
    ));
    r.wait_for(LogStream::Stdout, "ready").await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while progress_of(&r.seen).is_empty() {
        let o = tokio::time::timeout_at(deadline, r.rx.recv())
            .await
            .expect("no progress in time")
            .expect("output ended");
        r.seen.push(o);
    }
    assert_eq!(progress_of(&r.seen), vec![json!({"epoch": 1})]);
    r.stop(StopReason::Cancel);
    let (fin, _) = r.finish().await;
    assert_eq!(fin.state, TaskState::Cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_keeps_its_order_and_is_all_sent_before_run_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = sh(
        tmp.path(),
        r#"i=0; while [ $i -lt 2000 ]; do echo "out $i"; echo "err $i" >&2; i=$((i+1)); done; echo last; printf 'no newline' >&2"#,
    );
    t.limits.log_batch_bytes = 100;
    let (tx, mut rx) = mpsc::channel(100_000);
    let (_stop, stop_rx) = watch::channel(None);
    let fin = tokio::time::timeout(DEADLINE, run(t, tx, stop_rx))
        .await
        .unwrap();
    assert_eq!(fin.state, TaskState::Succeeded);
    // Everything is already in the channel, and the channel is closed.
    let mut out = Vec::new();
    loop {
        match rx.try_recv() {
            Ok(o) => out.push(o),
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => panic!("run returned with output unsent"),
        }
    }
    let mut want_out: String = (0..2000).map(|i| format!("out {i}\n")).collect();
    want_out.push_str("last\n");
    let mut want_err: String = (0..2000).map(|i| format!("err {i}\n")).collect();
    want_err.push_str("no newline");
    assert_eq!(text_of(&out, LogStream::Stdout), want_out);
    assert_eq!(text_of(&out, LogStream::Stderr), want_err);
    for o in &out {
        if let Output::Log { stream, text, .. } = o {
            assert!(text.len() <= 100);
            if *stream == LogStream::Stdout {
                assert!(text.ends_with('\n'), "cut at a newline: {text:?}");
            }
        }
    }
    assert_eq!(fin.log_dropped_bytes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_dir_removes_what_the_task_left() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let (fin, _) = run_to_end(sh(
        tmp.path(),
        "mkdir -p locked/inner && echo x > locked/inner/f && chmod 500 locked/inner locked",
    ))
    .await;
    assert_eq!(fin.state, TaskState::Succeeded);
    let root = tmp.path().join("attempt-1");
    assert!(root.join("work/locked/inner/f").exists());
    remove_dir(&root).await.unwrap();
    assert!(!root.exists());
    remove_dir(&root).await.unwrap();
    // Leave the temp dir removable whatever happened above.
    let _ = std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700));
}

#[tokio::test]
async fn stale_attempt_dirs_are_removed_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let attempt = tmp.path().join("attempt-1");
    DirPool::new(tmp.path(), "w1").take(&attempt).await.unwrap();
    let (fin, _) = run_to_end(sh(tmp.path(), "echo left > behind")).await;
    assert_eq!(fin.state, TaskState::Succeeded);
    // Another worker's attempt in a shared work_dir, and a stranger.
    let theirs = tmp.path().join("job9-0-1");
    DirPool::new(tmp.path(), "w2").take(&theirs).await.unwrap();
    std::fs::create_dir_all(theirs.join("work")).unwrap();
    std::fs::create_dir_all(tmp.path().join("someone-elses/work")).unwrap();
    std::fs::write(tmp.path().join("notes-1"), b"keep").unwrap();
    assert_eq!(
        clean_up_earlier_run(tmp.path(), "w1", true).await,
        CleanedUp {
            killed: 0,
            removed: 1
        }
    );
    assert!(!attempt.exists());
    assert!(theirs.join("work").exists());
    assert!(tmp.path().join("someone-elses/work").exists());
    assert!(tmp.path().join("notes-1").exists());
    assert_eq!(
        clean_up_earlier_run(&tmp.path().join("missing"), "w1", true).await,
        CleanedUp::default()
    );
}

#[tokio::test]
async fn what_a_stale_attempt_left_running_is_killed_before_its_dir_goes() {
    let tmp = tempfile::tempdir().unwrap();
    let work = std::path::absolute(tmp.path().join("job1-0-1/work")).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    DirPool::new(tmp.path(), "w1")
        .take(&tmp.path().join("job1-0-1"))
        .await
        .unwrap();
    // As a grandchild of a killed worker would be: its environment says
    // which attempt it belongs to.
    let mut orphan = std::process::Command::new("sleep")
        .arg("600")
        .env("GPUFLEET_OUTPUT_DIR", &work)
        .spawn()
        .unwrap();
    let mut bystander = std::process::Command::new("sleep")
        .arg("600")
        .env("GPUFLEET_OUTPUT_DIR", tmp.path().join("other-0-1/work"))
        .spawn()
        .unwrap();
    // Kept directories (keep_task_dirs) still get their processes killed.
    assert_eq!(
        clean_up_earlier_run(tmp.path(), "w1", false).await,
        CleanedUp {
            killed: 1,
            removed: 0
        }
    );
    let status = orphan.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert!(work.exists());
    assert_eq!(
        clean_up_earlier_run(tmp.path(), "w1", true).await,
        CleanedUp {
            killed: 0,
            removed: 1
        }
    );
    assert!(!work.exists());
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "others are left alone"
    );
    bystander.kill().unwrap();
    bystander.wait().unwrap();
}

#[test]
fn classification_of_ends() {
    let exited = |code: i32| ExitStatus::from_raw(code << 8);
    let killed = |sig: i32| ExitStatus::from_raw(sig);
    let c = |ender: Option<Ender>, status: ExitStatus, tail: &str| {
        let (state, code, signal, _) = classify(ender.as_ref(), Ok(&status), tail.as_bytes(), None);
        (state, code, signal)
    };
    assert_eq!(
        c(None, exited(0), ""),
        (TaskState::Succeeded, Some(0), None)
    );
    assert_eq!(c(None, exited(2), ""), (TaskState::Failed, Some(2), None));
    assert_eq!(
        c(
            None,
            exited(2),
            "torch.OutOfMemoryError: CUDA out of memory."
        ),
        (TaskState::Interrupted, Some(2), None)
    );
    assert_eq!(c(None, killed(11), ""), (TaskState::Failed, None, Some(11)));
    assert_eq!(
        c(None, killed(9), ""),
        (TaskState::Interrupted, None, Some(9))
    );
    // A task that exits cleanly on our SIGTERM still ends as we asked.
    assert_eq!(
        c(Some(Ender::Stop(StopReason::Cancel)), exited(0), ""),
        (TaskState::Cancelled, Some(0), None)
    );
    assert_eq!(
        c(
            Some(Ender::Timeout(Duration::from_secs(60))),
            killed(15),
            ""
        ),
        (TaskState::TimedOut, None, Some(15))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_too_long_for_the_clock_is_no_timeout() {
    // It used to panic the worker ("overflow when adding duration to
    // instant"), leaving the task RUNNING for ever.
    for huge in [Duration::MAX, Duration::from_secs(u64::MAX)] {
        let tmp = tempfile::tempdir().unwrap();
        let mut t = sh(tmp.path(), "echo ran");
        t.spec.timeout = Some(gpufleet_schema::Dur(huge));
        let (fin, out) = run_to_end(t).await;
        assert_eq!(fin.state, TaskState::Succeeded, "{huge:?}: {fin:?}");
        assert_eq!(text_of(&out, LogStream::Stdout), "ran\n");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_cgroup_a_process_that_left_the_group_is_found_by_its_environment_and_killed() {
    let tmp = tempfile::tempdir().unwrap();
    let t = sh(
        tmp.path(),
        r#"setsid sleep 1000 >/dev/null 2>&1 & echo "child=$!""#,
    );
    succeeds_and_its_child_exits(t).await;
}

/// Runs a task that prints `child=<pid>` of a process it started, and
/// waits for that process to be gone after the task's end.
async fn succeeds_and_its_child_exits(t: TaskRun) {
    let (fin, out) = run_to_end(t).await;
    assert_eq!(fin.state, TaskState::Succeeded);
    let child: i32 = field(&text_of(&out, LogStream::Stdout), "child")
        .parse()
        .unwrap();
    wait_exited(child).await;
}

/// What a worker running as root on this machine gives its tasks: the
/// user `nobody`, a pids cgroup each, at most `max` processes. `None`
/// (with the reason printed) where this test process cannot have it.
fn confined(tmp: &Path, max: u64) -> Option<Arc<Isolation>> {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: tasks cannot run as another user here");
        return None;
    }
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let owner = format!(
        "test-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let cgroups = match crate::isolation::cgroup::Cgroups::detect(&owner, max) {
        Ok(c) => c,
        Err(why) => {
            eprintln!("no task cgroups here: {why}");
            return None;
        }
    };
    // The task user must reach its directory.
    std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    Some(Arc::new(Isolation {
        user: Some(crate::isolation::resolve_user("nobody").unwrap()),
        cgroups: Some(cgroups),
        max_processes: Some(max),
        ..Isolation::unconfined()
    }))
}

/// The root test machine has what [`confined`] needs; say so loudly if a
/// machine does not, rather than pass without testing anything.
fn require_confined(tmp: &Path, max: u64) -> Arc<Isolation> {
    confined(tmp, max).expect(
        "these tests need root and a pids cgroup hierarchy the test may write (cgroup v1 pids, or a delegated v2)",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confined_task_runs_as_the_task_user_in_its_own_cgroup() {
    let tmp = tempfile::tempdir().unwrap();
    let isolation = require_confined(tmp.path(), 64);
    let base = isolation.cgroups.as_ref().unwrap().base().to_path_buf();
    let mut t = sh(
        tmp.path(),
        r#"echo "uid=$(id -u)"; echo "groups=$(id -G)"; echo "home=$HOME"; grep pids /proc/self/cgroup; touch "$GPUFLEET_OUTPUT_DIR/mine"; echo '{"ok": 1}' > "$GPUFLEET_RESULT""#,
    );
    t.isolation = isolation;
    let (fin, out) = run_to_end(t).await;
    assert_eq!(fin.state, TaskState::Succeeded, "{fin:?} {out:?}");
    assert_eq!(fin.result, Some(json!({"ok": 1})));
    let text = text_of(&out, LogStream::Stdout);
    let nobody = crate::isolation::resolve_user("nobody").unwrap();
    assert_eq!(field(&text, "uid"), nobody.uid.to_string());
    assert_eq!(
        field(&text, "groups"),
        nobody.gid.to_string(),
        "no supplementary groups"
    );
    // nobody's home does not exist: the task gets its work directory.
    assert_eq!(
        field(&text, "home"),
        tmp.path().join("attempt-1/work").display().to_string()
    );
    let cgroup_dir = base.file_name().unwrap().to_string_lossy().to_string();
    assert!(text.contains(&format!("/{cgroup_dir}/t")), "{text}");
    use std::os::unix::fs::MetadataExt;
    let made = std::fs::metadata(tmp.path().join("attempt-1/work/mine")).unwrap();
    assert_eq!(made.uid(), nobody.uid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_its_cgroup_a_process_that_left_the_group_and_cleared_its_environment_is_killed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = sh(
        tmp.path(),
        r#"env -i setsid sleep 1000 >/dev/null 2>&1 & echo "child=$!""#,
    );
    t.isolation = require_confined(tmp.path(), 64);
    succeeds_and_its_child_exits(t).await;
}

/// A fork loop that records how many processes it started.
const FORK_LOOP: &str = r#"n=0; while [ $n -lt 500 ]; do sleep 1000 & n=$((n+1)); echo $n > "$GPUFLEET_OUTPUT_DIR/n"; done; echo "all 500 started""#;

async fn run_fork_loop(isolation: Arc<Isolation>, tmp: &Path) -> (Finished, String, u32) {
    let mut t = sh(tmp, FORK_LOOP);
    t.isolation = isolation;
    // The host must stay responsive meanwhile.
    let probe = tokio::spawn(async {
        let started = std::time::Instant::now();
        let status = tokio::process::Command::new("true").status().await.unwrap();
        assert!(status.success());
        started.elapsed()
    });
    let (fin, out) = run_to_end(t).await;
    let took = probe.await.unwrap();
    assert!(took < Duration::from_secs(10), "spawning took {took:?}");
    let n = std::fs::read_to_string(tmp.join("attempt-1/work/n"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (fin, text_of(&out, LogStream::Stderr), n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_loop_stops_at_the_cgroups_process_limit_and_its_processes_are_gone_after() {
    let tmp = tempfile::tempdir().unwrap();
    let isolation = require_confined(tmp.path(), 32);
    let (fin, stderr, n) = run_fork_loop(isolation, tmp.path()).await;
    assert_eq!(fin.state, TaskState::Failed, "{fin:?}");
    // The shell itself is one of the 32.
    assert!(n <= 31, "{n} processes started");
    assert!(stderr.to_lowercase().contains("fork"), "{stderr}");
    let nobody = crate::isolation::resolve_user("nobody").unwrap();
    let left: Vec<i32> = crate::procs::processes(Path::new(crate::procs::ROOT))
        .unwrap()
        .filter(|(_, dir)| {
            crate::procs::uid_of(dir) == Some(nobody.uid)
                && std::fs::read_link(dir.join("cwd")).is_ok_and(|c| c.starts_with(tmp.path()))
        })
        .map(|(pid, _)| pid)
        .collect();
    assert!(left.is_empty(), "left running: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_cgroup_rlimit_nproc_stops_a_fork_loop() {
    let tmp = tempfile::tempdir().unwrap();
    let confined = require_confined(tmp.path(), 32);
    let isolation = Arc::new(Isolation {
        cgroups: None,
        ..(*confined).clone()
    });
    let (fin, stderr, n) = run_fork_loop(isolation, tmp.path()).await;
    assert_eq!(fin.state, TaskState::Failed, "{fin:?}");
    // Counted for the user across the host: other tasks of nobody's too.
    assert!(n <= 31, "{n} processes started");
    assert!(stderr.to_lowercase().contains("fork"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_file_that_links_elsewhere_is_not_read() {
    let tmp = tempfile::tempdir().unwrap();
    let secret = tmp.path().join("secret.json");
    std::fs::write(&secret, br#"{"secret": "the worker's"}"#).unwrap();
    for (how, cmd) in [("symbolic link", "ln -s"), ("hard link", "ln")] {
        let mut t = sh(
            tmp.path(),
            &format!(r#"{cmd} "$SECRET" "$GPUFLEET_RESULT""#),
        );
        t.spec
            .env
            .insert("SECRET".into(), secret.display().to_string());
        t.dir = tmp.path().join(format!("attempt-{}", how.len()));
        let (fin, _) = run_to_end(t).await;
        assert_eq!(fin.state, TaskState::Failed, "{how}");
        assert_eq!(fin.result, None);
        let error = fin.error.unwrap();
        assert!(error.contains(how), "{how}: {error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_program_is_looked_up_as_the_task_user_would() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let isolation = require_confined(tmp.path(), 64);
    // A directory on the PATH that only root may enter, holding a `true`
    // that fails: the task user cannot run it, and finds /bin's instead.
    let private = tmp.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::write(private.join("true"), "#!/bin/sh\nexit 3\n").unwrap();
    std::fs::set_permissions(private.join("true"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut t = task(tmp.path(), &["true"]);
    t.spec.env.insert(
        "PATH".into(),
        format!("{}:/usr/bin:/bin", private.display()),
    );
    t.isolation = isolation.clone();
    let (fin, _) = run_to_end(t).await;
    assert_eq!(fin.state, TaskState::Succeeded, "{fin:?}");
    // Only there: found, and refused.
    let mut t = task(tmp.path(), &["true"]);
    t.spec
        .env
        .insert("PATH".into(), private.display().to_string());
    t.dir = tmp.path().join("attempt-2");
    t.isolation = isolation;
    let (fin, _) = run_to_end(t).await;
    assert!(!fin.launched);
    assert!(
        fin.error.as_deref().unwrap().contains("Permission denied"),
        "{fin:?}"
    );
}

/// A Python one-liner that makes `mib` MiB resident (written, not just
/// mapped), then sleeps `secs`.
fn allocate(mib: u64, secs: f64) -> String {
    format!(
        "import time; b = bytearray(b'x') * ({mib} << 20); time.sleep({secs}); print(len(b) >> 20)"
    )
}

const MIB: u64 = 1 << 20;

#[tokio::test]
async fn usage_of_a_short_task_comes_from_the_kernel_at_its_end() {
    let dir = tempfile::tempdir().unwrap();
    // Ends before the first sample: the kernel's count is all there is.
    let (f, _) = run_to_end(task(dir.path(), &["python3", "-c", &allocate(200, 0.0)])).await;
    assert_eq!(f.state, TaskState::Succeeded, "{f:?}");
    let u = f.usage.expect("a meter was given");
    // The 200 MiB and the interpreter's own few MiB.
    let peak = u.peak_rss.0;
    assert!(
        (200 * MIB..240 * MIB).contains(&peak),
        "peak {} MiB",
        peak / MIB
    );
    assert!(u.cpu_seconds > 0.0, "{u:?}");
    assert_eq!(u.gpu_memory_peak, None);
}

#[tokio::test]
async fn usage_sums_the_groups_processes_while_they_run() {
    let dir = tempfile::tempdir().unwrap();
    // Two processes of 120 MiB at once: no one process's own peak says
    // 240, only samples of the whole group do.
    let py = allocate(120, 1.0);
    let script = format!("python3 -c \"{py}\" & python3 -c \"{py}\"; wait");
    let (f, _) = run_to_end(sh(dir.path(), &script)).await;
    assert_eq!(f.state, TaskState::Succeeded, "{f:?}");
    let u = f.usage.expect("a meter was given");
    assert!(u.samples > 2, "{u:?}");
    let peak = u.peak_rss.0;
    assert!(
        (240 * MIB..300 * MIB).contains(&peak),
        "peak {} MiB",
        peak / MIB
    );
}
