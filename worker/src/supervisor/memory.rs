//! Host memory accounting for one task's process group.
//!
//! The only implementation today reads `/proc`: every process whose process
//! group is the task's is summed. It works on any Linux without privileges,
//! but it samples (a spike between two samples goes unseen) and it loses
//! track of a process that leaves the group with `setsid`/`setpgid`. A cgroup
//! v2 implementation (a child cgroup per task with `memory.max`, reading
//! `memory.events` for `oom_kill`) would be exact and should take over when
//! the worker runs with a delegated cgroup subtree; it only has to implement
//! [`MemoryProbe`] and be chosen in [`probe_for_group`].

use std::io;
use std::path::Path;

use nix::unistd::Pid;

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
        let page = page_size();
        let mut total = 0u64;
        for member in group_members(Path::new("/proc"), self.pgid)? {
            // A process may exit between the scan and this read; it then
            // holds no memory, so skipping it is right.
            let Ok(statm) = std::fs::read_to_string(format!("/proc/{}/statm", member.pid)) else {
                continue;
            };
            if let Some(pages) = parse_statm_resident(&statm) {
                total = total.saturating_add(pages.saturating_mul(page));
            }
        }
        Ok(total)
    }
}

pub(crate) fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions; it only reads a constant.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u64
    } else {
        4096
    }
}

/// One process found in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Member {
    pub pid: i32,
    /// The state letter of `/proc/<pid>/stat` (`Z` for a zombie).
    pub state: char,
}

/// Every process under `proc_root` whose process group is `pgid`.
/// Blocking.
pub(super) fn group_members(proc_root: &Path, pgid: Pid) -> io::Result<Vec<Member>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(proc_root)? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((state, pgrp)) = parse_stat(&stat) {
            if pgrp == pgid.as_raw() {
                found.push(Member { pid, state });
            }
        }
    }
    Ok(found)
}

/// State and process group from a `/proc/<pid>/stat` line. The command name
/// sits in parentheses and may itself contain spaces and `)`, so fields are
/// counted from the last `)`.
pub(super) fn parse_stat(stat: &str) -> Option<(char, i32)> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

/// Resident pages, the second field of `/proc/<pid>/statm`.
fn parse_statm_resident(statm: &str) -> Option<u64> {
    statm.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_paren() {
        let line = "1234 (we) ird (name)) S 1 999 999 0 -1 4194560 100 0 0 0";
        assert_eq!(parse_stat(line), Some(('S', 999)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) Z"), None);
    }

    #[test]
    fn statm_resident_is_the_second_field() {
        assert_eq!(
            parse_statm_resident("5000 1200 300 1 0 400 0\n"),
            Some(1200)
        );
        assert_eq!(parse_statm_resident("5000"), None);
    }

    #[test]
    fn own_group_is_found_and_measured() {
        let me = std::process::id() as i32;
        let pgid = nix::unistd::getpgrp();
        let members = group_members(Path::new("/proc"), pgid).unwrap();
        assert!(members.iter().any(|m| m.pid == me), "{members:?}");
        let used = probe_for_group(pgid).usage().unwrap();
        assert!(used > 0);
    }
}
