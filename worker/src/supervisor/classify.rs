//! How a task's end is named: its state (which decides whether a retry
//! may help) and the words of its reason, from what ended it, its exit
//! status, the tail of its stderr and what the kernel counted.
//!
//! - A crash (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT) is the program's
//!   own fault: FAILED, with the signal named. Running it again crashes it
//!   again.
//! - A SIGKILL the worker did not send is INTERRUPTED: on a host that is
//!   almost always the kernel's out-of-memory killer, which it says as
//!   "out of memory" when the kernel's OOM-kill count rose while the task
//!   ran, and as "likely out of memory" when it cannot tell.
//! - Out of GPU memory is recognised by the messages frameworks print
//!   ([`OOM_MESSAGES`]), and only when that message is the task's last
//!   error: a warning that merely mentions memory, followed by another
//!   error, is not an OOM. The reason names the framework and quotes the
//!   line.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use gpufleet_schema::TaskState;
use nix::sys::signal::Signal;

/// Known out-of-memory messages: who prints it, and a piece of the line
/// in lower case.
pub(super) const OOM_MESSAGES: &[(&str, &str)] = &[
    // torch.OutOfMemoryError / RuntimeError: CUDA out of memory. Tried to allocate ...
    ("PyTorch", "cuda out of memory"),
    // jaxlib...XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate ...
    ("JAX/XLA", "resource_exhausted: out of memory"),
    // Older XLA: "Resource exhausted: Out of memory while trying to allocate ..."
    ("JAX/XLA", "resource exhausted: out of memory"),
    // ResourceExhaustedError: OOM when allocating tensor with shape[...]
    ("TensorFlow", "oom when allocating tensor"),
    // RuntimeError: CUDA error: out of memory
    ("CUDA runtime", "cuda error: out of memory"),
    ("CUDA runtime", "cudaerrormemoryallocation"),
    // failed to allocate ... from device: CUDA_ERROR_OUT_OF_MEMORY: out of memory
    ("CUDA driver", "cuda_error_out_of_memory"),
    // CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`
    ("cuBLAS", "cublas_status_alloc_failed"),
    // cuDNN error: CUDNN_STATUS_ALLOC_FAILED
    ("cuDNN", "cudnn_status_alloc_failed"),
];

/// The longest piece of a matched line quoted in a reason.
const QUOTE_CHARS: usize = 160;

/// A program's own crash: retrying runs into it again.
const CRASHES: [Signal; 5] = [
    Signal::SIGSEGV,
    Signal::SIGBUS,
    Signal::SIGILL,
    Signal::SIGFPE,
    Signal::SIGABRT,
];

/// What the kernel said about out-of-memory kills while the task ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OomKills {
    /// Kills counted while the task ran.
    pub count: u64,
    /// True when the count is the task's own (its own cgroup), false when
    /// it is of a cgroup the task shared with others.
    pub own: bool,
}

/// An out-of-memory message found as the task's last error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct OomMessage {
    pub framework: &'static str,
    pub line: String,
}

/// The last out-of-memory message of `stderr_tail`, if no other error
/// follows it.
pub(super) fn oom_message(stderr_tail: &[u8]) -> Option<OomMessage> {
    let text = String::from_utf8_lossy(stderr_tail);
    let mut found: Option<OomMessage> = None;
    for line in text.lines() {
        let lower = line.to_lowercase();
        if let Some((framework, _)) = OOM_MESSAGES.iter().find(|(_, m)| lower.contains(m)) {
            found = Some(OomMessage {
                framework,
                line: quote(line.trim()),
            });
        } else if found.is_some() && is_error_line(line) {
            // A later, different error is what ended the task.
            found = None;
        }
    }
    found
}

/// A line that reports an error of its own: `SomeError: ...` or
/// `pkg.mod.SomeException: ...`, as Python and most runtimes print them.
fn is_error_line(line: &str) -> bool {
    let line = line.trim_start();
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .unwrap_or(line.len());
    let (name, rest) = line.split_at(name_end);
    let last = name.rsplit('.').next().unwrap_or(name);
    (last.ends_with("Error") || last.ends_with("Exception"))
        && (rest.is_empty() || rest.starts_with(':'))
}

fn quote(line: &str) -> String {
    match line.char_indices().nth(QUOTE_CHARS) {
        Some((cut, _)) => format!("{}...", &line[..cut]),
        None => line.to_string(),
    }
}

pub(super) fn signal_name(sig: i32) -> String {
    Signal::try_from(sig).map_or_else(|_| format!("signal {sig}"), |s| s.to_string())
}

fn crash_words(sig: Signal) -> &'static str {
    match sig {
        Signal::SIGSEGV => "invalid memory access",
        Signal::SIGBUS => "bus error",
        Signal::SIGILL => "illegal instruction",
        Signal::SIGFPE => "arithmetic error",
        Signal::SIGABRT => "aborted",
        _ => "crashed",
    }
}

fn kernel_oom(kills: Option<OomKills>) -> Option<&'static str> {
    match kills {
        Some(OomKills { count, own: true }) if count > 0 => {
            Some("the kernel's OOM killer killed it (its cgroup counted the kill)")
        }
        Some(OomKills { count, own: false }) if count > 0 => {
            Some("the kernel's OOM killer killed a process of its memory cgroup while it ran")
        }
        _ => None,
    }
}

/// State, exit code, signal and reason of a task that ended on its own
/// (nothing of ours stopped it).
pub(super) fn classify_exit(
    status: Result<&ExitStatus, &io::Error>,
    stderr_tail: &[u8],
    oom_kills: Option<OomKills>,
) -> (TaskState, Option<i32>, Option<i32>, Option<String>) {
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            return (
                TaskState::Interrupted,
                None,
                None,
                Some(format!("lost the task's exit status: {e}")),
            )
        }
    };
    let (code, signal) = (status.code(), status.signal());
    if code == Some(0) {
        return (TaskState::Succeeded, code, signal, None);
    }
    let how = match (code, signal) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => signal_name(s),
        (None, None) => "no exit code or signal".into(),
    };
    if let Some(m) = oom_message(stderr_tail) {
        let reason = format!(
            "out of memory: {} reported {:?} ({how})",
            m.framework, m.line
        );
        return (TaskState::Interrupted, code, signal, Some(reason));
    }
    let (state, reason) = match (code, signal.map(Signal::try_from)) {
        // A shell reports a child killed by SIGKILL as 137.
        (Some(c), _) if c == 128 + libc::SIGKILL => match kernel_oom(oom_kills) {
            Some(why) => (
                TaskState::Interrupted,
                format!("out of memory: {why} (exit code {c})"),
            ),
            None => (TaskState::Failed, format!("exited with code {c}")),
        },
        (Some(c), _) => (TaskState::Failed, format!("exited with code {c}")),
        (None, Some(Ok(sig))) if CRASHES.contains(&sig) => {
            let core = if status.core_dumped() {
                ", core dumped"
            } else {
                ""
            };
            (
                TaskState::Failed,
                format!("crashed: killed by {sig} ({}{core})", crash_words(sig)),
            )
        }
        (None, Some(Ok(Signal::SIGKILL))) => match kernel_oom(oom_kills) {
            Some(why) => (
                TaskState::Interrupted,
                format!("out of memory: {why} (SIGKILL)"),
            ),
            None => (
                TaskState::Interrupted,
                "killed by SIGKILL, which the worker did not send (likely out of memory)".into(),
            ),
        },
        (None, Some(_)) => (
            TaskState::Interrupted,
            format!("killed by {how}, which the worker did not send"),
        ),
        (None, None) => (
            TaskState::Interrupted,
            "ended without an exit code or signal".into(),
        ),
    };
    (state, code, signal, Some(reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    fn signalled(sig: i32) -> ExitStatus {
        ExitStatus::from_raw(sig)
    }

    fn of(status: ExitStatus, stderr: &str, kills: Option<OomKills>) -> (TaskState, String) {
        let (state, _, _, reason) = classify_exit(Ok(&status), stderr.as_bytes(), kills);
        (state, reason.unwrap_or_default())
    }

    #[test]
    fn a_crash_fails_with_the_signal_named() {
        for (sig, name, words) in [
            (libc::SIGSEGV, "SIGSEGV", "invalid memory access"),
            (libc::SIGBUS, "SIGBUS", "bus error"),
            (libc::SIGILL, "SIGILL", "illegal instruction"),
            (libc::SIGFPE, "SIGFPE", "arithmetic error"),
            (libc::SIGABRT, "SIGABRT", "aborted"),
        ] {
            let (state, reason) = of(signalled(sig), "", None);
            assert_eq!(state, TaskState::Failed, "{name}");
            assert!(reason.contains(name) && reason.contains(words), "{reason}");
        }
        // With a core dump (the 0x80 bit), it says so.
        let (_, reason) = of(signalled(libc::SIGSEGV | 0x80), "", None);
        assert!(reason.ends_with("core dumped)"), "{reason}");
    }

    #[test]
    fn a_sigkill_we_did_not_send_is_interrupted_and_out_of_memory_when_the_kernel_says_so() {
        let (state, reason) = of(signalled(libc::SIGKILL), "", None);
        assert_eq!(state, TaskState::Interrupted);
        assert!(reason.contains("(likely out of memory)"), "{reason}");
        let none = Some(OomKills {
            count: 0,
            own: true,
        });
        let (_, reason) = of(signalled(libc::SIGKILL), "", none);
        assert!(reason.contains("likely out of memory"), "{reason}");

        let own = Some(OomKills {
            count: 1,
            own: true,
        });
        let (state, reason) = of(signalled(libc::SIGKILL), "", own);
        assert_eq!(state, TaskState::Interrupted);
        assert!(
            reason.starts_with("out of memory: the kernel's OOM killer killed it"),
            "{reason}"
        );
        let shared = Some(OomKills {
            count: 2,
            own: false,
        });
        let (_, reason) = of(signalled(libc::SIGKILL), "", shared);
        assert!(
            reason.contains("a process of its memory cgroup"),
            "{reason}"
        );

        // A shell's 137 is a killed child: out of memory only on the
        // kernel's word, else just an exit code.
        assert_eq!(of(exited(137), "", own).0, TaskState::Interrupted);
        assert_eq!(
            of(exited(137), "", None),
            (TaskState::Failed, "exited with code 137".into())
        );
        // Another signal someone else sent.
        let (state, reason) = of(signalled(libc::SIGTERM), "", None);
        assert_eq!(state, TaskState::Interrupted);
        assert_eq!(reason, "killed by SIGTERM, which the worker did not send");
    }

    /// One sample line per known message, in each framework's own format.
    const SAMPLES: &[(&str, &str)] = &[
        (
            "PyTorch",
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 3.50 GiB. GPU 0 has a total capacity of 23.57 GiB of which 1.12 GiB is free. Including non-PyTorch memory, this process has 22.43 GiB memory in use.",
        ),
        (
            "PyTorch",
            "RuntimeError: CUDA out of memory. Tried to allocate 512.00 MiB (GPU 0; 10.76 GiB total capacity; 9.31 GiB already allocated; 201.44 MiB free; 9.52 GiB reserved in total by PyTorch)",
        ),
        (
            "JAX/XLA",
            "jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8589934592 bytes.",
        ),
        (
            "JAX/XLA",
            "RuntimeError: Resource exhausted: Out of memory while trying to allocate 2147483648 bytes.",
        ),
        (
            "TensorFlow",
            "tensorflow.python.framework.errors_impl.ResourceExhaustedError: OOM when allocating tensor with shape[256,1024,1024] and type float on /job:localhost/replica:0/task:0/device:GPU:0 by allocator GPU_0_bfc",
        ),
        ("CUDA runtime", "RuntimeError: CUDA error: out of memory"),
        (
            "CUDA runtime",
            "main.cu:42: cudaMalloc failed: cudaErrorMemoryAllocation (out of memory)",
        ),
        (
            "CUDA driver",
            "E external/xla/xla/stream_executor/cuda/cuda_driver.cc:1012] failed to alloc 4294967296 bytes on host: CUDA_ERROR_OUT_OF_MEMORY: out of memory",
        ),
        (
            "cuBLAS",
            "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        ),
        (
            "cuDNN",
            "RuntimeError: cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
        ),
    ];

    #[test]
    fn each_known_out_of_memory_message_is_recognised_and_named() {
        for (framework, line) in SAMPLES {
            let stderr = format!(
                "Traceback (most recent call last):\n  File \"train.py\", line 7, in <module>\n    step()\n{line}\n"
            );
            let (state, reason) = of(exited(1), &stderr, None);
            assert_eq!(state, TaskState::Interrupted, "{framework}: {line}");
            assert!(
                reason.starts_with(&format!("out of memory: {framework} reported")),
                "{framework}: {reason}"
            );
            assert!(reason.ends_with("(exit code 1)"), "{reason}");
        }
        // A C++ exception that aborts is an OOM too, not a crash.
        let (state, reason) = of(
            signalled(libc::SIGABRT),
            "terminate called after throwing an instance of 'c10::OutOfMemoryError'\n  what():  CUDA out of memory. Tried to allocate 20.00 MiB\n",
            None,
        );
        assert_eq!(state, TaskState::Interrupted);
        assert!(reason.ends_with("(SIGABRT)"), "{reason}");
    }

    #[test]
    fn a_warning_about_memory_followed_by_another_error_is_not_out_of_memory() {
        let stderr = "warning: batch 3 is out of memory budget, splitting it\nTraceback (most recent call last):\n  File \"x.py\", line 1\nValueError: shapes (3,) and (4,) not aligned\n";
        assert_eq!(
            of(exited(1), stderr, None),
            (TaskState::Failed, "exited with code 1".into())
        );
        // Even a real OOM message, caught and followed by another error.
        let stderr = "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB\nretrying with a smaller batch\nValueError: bad input\n";
        assert_eq!(of(exited(1), stderr, None).0, TaskState::Failed);
        // The words alone are not a known message.
        assert_eq!(
            of(exited(1), "ran out of memory budget\n", None).0,
            TaskState::Failed
        );
    }

    #[test]
    fn error_lines_are_told_from_other_lines() {
        assert!(is_error_line("ValueError: x"));
        assert!(is_error_line("  jax.errors.JaxRuntimeError: y"));
        assert!(is_error_line("KeyboardInterruptException"));
        assert!(!is_error_line("warning: Error budget"));
        assert!(!is_error_line("Errors: 3"));
        assert!(!is_error_line("  File \"a.py\", line 3"));
    }

    #[test]
    fn a_long_line_is_quoted_short() {
        let line = format!("RuntimeError: CUDA out of memory. {}", "x".repeat(1000));
        let m = oom_message(line.as_bytes()).unwrap();
        assert_eq!(m.line.chars().count(), QUOTE_CHARS + 3);
    }
}
