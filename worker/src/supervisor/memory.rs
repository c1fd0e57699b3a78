//! Host memory accounting for one task's process group.
//!
//! The only implementation today reads `/proc` (through [`crate::procs`]):
//! every process whose process group is the task's is summed. It works on
//! any Linux without privileges, but it samples (a spike between two samples goes unseen) and it loses
//! track of a process that leaves the group with `setsid`/`setpgid`. A cgroup
//! v2 implementation (a child cgroup per task with `memory.max`, reading
//! `memory.events` for `oom_kill`) would be exact and should take over when
//! the worker runs with a delegated cgroup subtree; it only has to implement
//! [`MemoryProbe`] and be chosen in [`probe_for_group`].

use std::io;
use std::path::Path;

use nix::unistd::Pid;

use crate::procs;

/// Measures how much host memory a task holds right now.
pub(super) trait MemoryProbe: Send + Sync {
    /// Bytes of memory in use. Blocking: call it from `spawn_blocking`.
    fn usage(&self) -> io::Result<u64>;
}

/// The probe used for a task whose processes share the group `pgid`.
pub(super) fn probe_for_group(pgid: Pid) -> Box<dyn MemoryProbe> {
    Box::new(ProcGroupProbe { pgid })
}

/// Sums resident memory over `/proc`.
struct ProcGroupProbe {
    pgid: Pid,
}

impl MemoryProbe for ProcGroupProbe {
    fn usage(&self) -> io::Result<u64> {
        let mut total = 0u64;
        for member in procs::group_members(Path::new(procs::ROOT), self.pgid.as_raw())? {
            // A process may exit between the scan and this read; it then
            // holds no memory, so skipping it is right.
            if let Some(bytes) = procs::resident_bytes(member.pid) {
                total = total.saturating_add(bytes);
            }
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_group_is_found_and_measured() {
        let me = std::process::id() as i32;
        let pgid = nix::unistd::getpgrp();
        let members = procs::group_members(Path::new(procs::ROOT), pgid.as_raw()).unwrap();
        assert!(members.iter().any(|m| m.pid == me), "{members:?}");
        let used = probe_for_group(pgid).usage().unwrap();
        assert!(used > 0);
    }
}
