//! The watchdog process on its own (the worker's binary in its watchdog
//! mode), fed by this test as a worker would feed it: it signals a task's
//! process group by its deadline, not before, lets renewals move the
//! deadline, survives garbage, answers a forget, and kills every task it
//! watches when its input ends (the worker died).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use gpufleet_worker::watchdog::monotonic_now;

const MS: u64 = 1_000_000;

fn watchdog() -> (Child, ChildStdin, BufReader<ChildStdout>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpufleet-worker"))
        .arg("--gpufleet-watchdog")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the watchdog");
    let stdin = child.stdin.take().unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    (child, stdin, stdout)
}

/// A stand-in task: `sleep` leading a process group of its own.
fn task() -> Child {
    Command::new("sleep")
        .arg("600")
        .process_group(0)
        .spawn()
        .expect("start sleep")
}

/// Waits up to `limit` for `child` to exit.
fn exit_within(child: &mut Child, limit: Duration) -> Option<(ExitStatus, Instant)> {
    let end = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some((status, Instant::now()));
        }
        if Instant::now() >= end {
            return None;
        }
        // A process's exit has no event to wait on here.
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn send(to: &mut ChildStdin, line: &[u8]) {
    to.write_all(line).unwrap();
    to.flush().unwrap();
}

#[test]
fn garbage_changes_nothing_and_the_group_is_stopped_by_its_deadline_not_before() {
    let (mut dog, mut to, mut from) = watchdog();
    let mut t = task();
    let pgid = t.id();
    // Garbage of every kind: unknown kinds, bad numbers, a group the
    // watchdog must never signal, a line far too long, bytes that are no
    // text.
    send(
        &mut to,
        b"hello\nW 1 1 5 5\nW 2 -1 5 5\nW 3 0 5 5\nL x y\nA\n\xff\xfe\x00\n",
    );
    send(&mut to, &vec![b'W'; 10_000]);
    send(&mut to, b"\n");
    let now = monotonic_now();
    let (until, grace) = (now + 800 * MS, 300 * MS);
    let start = Instant::now();
    send(&mut to, format!("W 7 {pgid} {until} {grace}\n").as_bytes());
    let (status, at) = exit_within(&mut t, Duration::from_secs(10)).expect("the task stopped");
    let took = at - start;
    assert_eq!(status.signal(), Some(libc::SIGTERM), "asked to stop first");
    assert!(
        took >= Duration::from_millis(480),
        "stopped {took:?} after the watch, before the deadline less the grace"
    );
    assert!(
        took < Duration::from_millis(800),
        "stopped {took:?} after the watch"
    );
    // Asked to forget, it says that it signalled the task; an unknown task
    // it never did.
    send(&mut to, b"F 7\nF 8\n");
    let mut line = String::new();
    from.read_line(&mut line).unwrap();
    assert_eq!(line, "F 7 1\n");
    line.clear();
    from.read_line(&mut line).unwrap();
    assert_eq!(line, "F 8 0\n");
    drop(to);
    let (status, _) = exit_within(&mut dog, Duration::from_secs(10)).expect("the watchdog exits");
    assert!(status.success(), "{status:?}");
}

#[test]
fn renewals_keep_a_task_and_the_end_of_the_input_kills_every_task() {
    let (mut dog, mut to, _from) = watchdog();
    let (mut a, mut b) = (task(), task());
    let now = monotonic_now();
    send(
        &mut to,
        format!(
            "A {}\nW 1 {} {} {}\n",
            now + 400 * MS,
            a.id(),
            now + 400 * MS,
            100 * MS
        )
        .as_bytes(),
    );
    send(
        &mut to,
        format!("W 2 {} {} 0\n", b.id(), now + 400 * MS).as_bytes(),
    );
    // Renewed (lease and advert) every 100 ms for a second: well past the
    // first deadline.
    for _ in 0..10 {
        let until = monotonic_now() + 400 * MS;
        send(
            &mut to,
            format!("A {until}\nL 1 {until}\nL 2 {until}\n").as_bytes(),
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        a.try_wait().unwrap().is_none(),
        "a task renewed in time runs on"
    );
    assert!(
        b.try_wait().unwrap().is_none(),
        "a task renewed in time runs on"
    );
    // The worker is gone: both die at once, with SIGKILL.
    let gone = Instant::now();
    drop(to);
    for t in [&mut a, &mut b] {
        let (status, at) = exit_within(t, Duration::from_secs(10)).expect("the task killed");
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(at - gone < Duration::from_millis(300), "{:?}", at - gone);
    }
    let (status, _) = exit_within(&mut dog, Duration::from_secs(10)).expect("the watchdog exits");
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_lapsed_advert_stops_every_task_whatever_its_lease_says() {
    let (_dog, mut to, _from) = watchdog();
    let mut t = task();
    let now = monotonic_now();
    let start = Instant::now();
    send(
        &mut to,
        format!(
            "W 1 {} {} 0\nA {}\n",
            t.id(),
            now + 60_000 * MS,
            now + 300 * MS
        )
        .as_bytes(),
    );
    let (status, at) = exit_within(&mut t, Duration::from_secs(10)).expect("the task killed");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "no grace: killed");
    assert!(at - start >= Duration::from_millis(280), "{:?}", at - start);
}

#[test]
fn a_task_that_ended_on_its_own_before_its_deadline_is_not_called_stopped_by_the_watchdog() {
    let (_dog, mut to, mut from) = watchdog();
    // Exited, not reaped (as the worker leaves a leader until the
    // watchdog has forgotten it).
    let mut done = Command::new("true").process_group(0).spawn().unwrap();
    // SAFETY: waitid on our own child, without reaping it.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(
            libc::P_PID,
            done.id(),
            &mut info,
            libc::WEXITED | libc::WNOWAIT,
        );
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    }
    let mut live = task();
    // Both past their deadlines: signalled on the watchdog's next pass.
    let past = monotonic_now() - 1;
    send(
        &mut to,
        format!("W 1 {} {past} 0\nW 2 {} {past} 0\n", done.id(), live.id()).as_bytes(),
    );
    let (status, _) = exit_within(&mut live, Duration::from_secs(10)).expect("the task killed");
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    send(&mut to, b"F 1\nF 2\n");
    let mut answers = String::new();
    from.read_line(&mut answers).unwrap();
    from.read_line(&mut answers).unwrap();
    assert_eq!(
        answers, "F 1 0\nF 2 1\n",
        "only the live one was the watchdog's"
    );
    done.wait().unwrap();
}
