//! What the suites read of a process by its pid: whether it is gone, its
//! process group, its peak memory, its children and its name. Parsing is
//! the worker's ([`gpufleet_worker::procs`]); this only points it at one
//! pid and answers in the terms a test asserts in.

use std::path::PathBuf;

use gpufleet_worker::procs;

// Pids come as `u32` (std's `Child::id`) and as `i32` (libc's); both fit.
fn dir(pid: impl Into<i64>) -> PathBuf {
    let pid: i64 = pid.into();
    PathBuf::from(procs::ROOT).join(pid.to_string())
}

/// Whether `/proc` has an entry for `pid` at all (a zombie still has one).
pub fn exists(pid: impl Into<i64>) -> bool {
    dir(pid).exists()
}

/// No such process, or only its zombie (which holds nothing).
pub fn gone(pid: impl Into<i64>) -> bool {
    procs::stat(&dir(pid)).is_none_or(|s| s.is_dead())
}

/// The process group of a live process.
pub fn pgid(pid: impl Into<i64>) -> i32 {
    procs::stat(&dir(pid)).expect("process is alive").pgrp
}

/// Peak resident memory of a live process (`VmHWM`), in bytes.
pub fn peak_resident_bytes(pid: impl Into<i64>) -> u64 {
    procs::status_bytes(&dir(pid), "VmHWM:").expect("process status has VmHWM")
}

/// The children of `pid` (all its threads').
pub fn children(pid: impl Into<i64>) -> Vec<u32> {
    let mut out = vec![];
    for task in std::fs::read_dir(dir(pid).join("task"))
        .into_iter()
        .flatten()
    {
        let path = task.unwrap().path().join("children");
        let text = std::fs::read_to_string(path).unwrap_or_default();
        out.extend(text.split_whitespace().map(|p| p.parse::<u32>().unwrap()));
    }
    out.sort();
    out
}

/// The program name of `pid` (15 characters at most); empty once it is
/// gone.
pub fn comm(pid: impl Into<i64>) -> String {
    std::fs::read_to_string(dir(pid).join("comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Whether `pid` still runs as the program `name` (a zombie is dead).
pub fn alive(pid: impl Into<i64>, name: &str) -> bool {
    let pid = pid.into();
    !gone(pid) && comm(pid) == name
}
