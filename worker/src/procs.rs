//! Everything the worker reads from `/proc`: the processes there, their
//! state, parent, group and user, resident memory and environment, the
//! host name, and the cgroups this process is in and where they are
//! mounted.
//!
//! Hand-written rather than the `procfs` crate: each scan here walks every
//! process on the machine (finding a task's group on every exit wait and
//! memory sample), and needs two or three fields of `stat`, which this
//! reads without parsing the other fifty. The functions taking a `root`
//! read any directory laid out like `/proc`, so tests can hand them one.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};

/// The machine's process table.
pub const ROOT: &str = "/proc";

/// The fields of `/proc/<pid>/stat` the worker uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// `R`, `S`, `Z` (zombie), `X` (dead)...
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
}

impl Stat {
    /// A zombie or a dead process: it holds nothing and runs nothing.
    pub fn is_dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// Parses a `/proc/<pid>/stat` line. The command name sits in parentheses
/// and may itself contain spaces and `)`, so fields are counted from the
/// last `)`.
pub fn parse_stat(stat: &str) -> Option<Stat> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some(Stat { state, ppid, pgrp })
}

/// CPU time a process has used, user and system, in clock ticks (fields
/// 14 and 15 of `/proc/<pid>/stat`); `None` once it is gone.
pub fn cpu_ticks(dir: &Path) -> Option<u64> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let mut after = stat[stat.rfind(')')? + 1..].split_whitespace().skip(11);
    let user: u64 = after.next()?.parse().ok()?;
    let system: u64 = after.next()?.parse().ok()?;
    Some(user + system)
}

/// What one read of `/proc/<pid>/stat` says a process uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatUsage {
    pub pgrp: i32,
    /// utime + stime + cutime + cstime: its own CPU time and that of the
    /// children it reaped.
    pub cpu_ticks: u64,
    pub rss_pages: u64,
}

/// Parses the fields of a `stat` line that usage needs, counted from the
/// last `)` as [`parse_stat`] does: pgrp (5), utime, stime, cutime and
/// cstime (14 to 17), rss (24).
pub fn parse_stat_usage(stat: &str) -> Option<StatUsage> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).copied();
    let num = |n: usize| field(n)?.parse::<u64>().ok();
    Some(StatUsage {
        pgrp: field(5)?.parse().ok()?,
        cpu_ticks: num(14)? + num(15)? + num(16)? + num(17)?,
        rss_pages: num(24)?,
    })
}

/// One reading of a process group.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupUsage {
    /// Resident memory of its processes together.
    pub rss: u64,
    /// CPU time of its processes, and of the children they reaped.
    pub cpu: std::time::Duration,
    pub pids: Vec<u32>,
}

/// The processes under `root` whose group is `pgid`, summed, from one read
/// of each one's `stat`. Blocking.
pub fn group_usage(root: &Path, pgid: i32) -> io::Result<GroupUsage> {
    let (tick, page) = (clock_ticks_per_second(), page_size());
    let mut out = GroupUsage::default();
    let mut ticks = 0u64;
    for (pid, dir) in processes(root)? {
        // A process may end between the listing and this read: it then
        // holds nothing, and its CPU time moved to whoever reaped it.
        let Some(s) = std::fs::read_to_string(dir.join("stat"))
            .ok()
            .and_then(|s| parse_stat_usage(&s))
        else {
            continue;
        };
        if s.pgrp != pgid {
            continue;
        }
        out.rss = out.rss.saturating_add(s.rss_pages.saturating_mul(page));
        ticks = ticks.saturating_add(s.cpu_ticks);
        out.pids.push(pid as u32);
    }
    out.cpu = std::time::Duration::from_secs_f64(ticks as f64 / tick as f64);
    Ok(out)
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions; it only reads a constant.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if n > 0 {
        n as u64
    } else {
        100
    }
}

/// Resident pages, the second field of `/proc/<pid>/statm`.
pub fn parse_statm_resident(statm: &str) -> Option<u64> {
    statm.split_whitespace().nth(1)?.parse().ok()
}

/// Every process directory under `root`, as `(pid, path)`. A process that
/// ends during the scan may or may not be in it.
pub fn processes(root: &Path) -> io::Result<impl Iterator<Item = (i32, PathBuf)>> {
    Ok(std::fs::read_dir(root)?.filter_map(|entry| {
        let entry = entry.ok()?;
        let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
        Some((pid, entry.path()))
    }))
}

/// The `stat` of the process whose directory is `dir`; `None` once it is
/// gone.
pub fn stat(dir: &Path) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(dir.join("stat")).ok()?)
}

/// The environment a process started with (`NAME=value`, NUL-separated);
/// `None` when it is gone or not ours to read.
pub fn environ(dir: &Path) -> Option<Vec<u8>> {
    std::fs::read(dir.join("environ")).ok()
}

/// Bytes of memory a process holds resident; `None` once it is gone.
pub fn resident_bytes(pid: i32) -> Option<u64> {
    let statm =
        std::fs::read_to_string(Path::new(ROOT).join(pid.to_string()).join("statm")).ok()?;
    Some(parse_statm_resident(&statm)?.saturating_mul(page_size()))
}

fn page_size() -> u64 {
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
pub struct Member {
    pub pid: i32,
    /// The state letter of its `stat` (`Z` for a zombie).
    pub state: char,
}

/// Every process under `root` whose process group is `pgid`. Blocking.
pub fn group_members(root: &Path, pgid: i32) -> io::Result<Vec<Member>> {
    Ok(processes(root)?
        .filter_map(|(pid, dir)| {
            let s = stat(&dir)?;
            (s.pgrp == pgid).then_some(Member {
                pid,
                state: s.state,
            })
        })
        .collect())
}

/// This process's descendants, for telling our tasks' GPU memory from
/// others'. Blocking.
pub fn descendants_of_self() -> HashSet<u32> {
    let me = std::process::id();
    let parent: HashMap<u32, u32> = processes(Path::new(ROOT))
        .map(|ps| {
            ps.filter_map(|(pid, dir)| Some((pid as u32, stat(&dir)?.ppid as u32)))
                .collect()
        })
        .unwrap_or_default();
    parent
        .keys()
        .copied()
        .filter(|&pid| {
            let mut p = pid;
            for _ in 0..64 {
                match parent.get(&p) {
                    Some(&pp) if pp == me => return true,
                    Some(&pp) if pp > 1 => p = pp,
                    _ => return false,
                }
            }
            false
        })
        .collect()
}

/// The kernel's host name, when `/proc` has it.
pub fn hostname() -> Option<String> {
    std::fs::read_to_string(Path::new(ROOT).join("sys/kernel/hostname")).ok()
}

/// A size line of `/proc/<pid>/status` (`VmHWM:`, `VmRSS:`...), in bytes;
/// `None` when the process is gone or has no such line.
pub fn status_bytes(dir: &Path, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(dir.join("status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line[field.len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// One line of `/proc/self/cgroup`: a hierarchy, its controllers and the
/// process's cgroup in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupLine {
    /// 0 for the unified (v2) hierarchy.
    pub id: u32,
    pub controllers: Vec<String>,
    /// Relative to the cgroup namespace's root, starting with `/`.
    pub path: String,
}

pub fn parse_cgroups(text: &str) -> Vec<CgroupLine> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let id = f.next()?.parse().ok()?;
            let controllers = f
                .next()?
                .split(',')
                .filter(|c| !c.is_empty())
                .map(String::from)
                .collect();
            let path = f.next()?.to_string();
            Some(CgroupLine {
                id,
                controllers,
                path,
            })
        })
        .collect()
}

/// The cgroups this process is in.
pub fn own_cgroups() -> io::Result<Vec<CgroupLine>> {
    Ok(parse_cgroups(&std::fs::read_to_string(
        Path::new(ROOT).join("self/cgroup"),
    )?))
}

/// A mounted cgroup hierarchy, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    /// `cgroup` (v1) or `cgroup2`.
    pub fstype: String,
    /// The part of the hierarchy mounted there.
    pub root: String,
    pub mount_point: PathBuf,
    /// Its super options: the v1 controllers (`pids`, `memory`) among them.
    pub options: Vec<String>,
}

impl CgroupMount {
    /// Where the cgroup `path` (as `/proc/<pid>/cgroup` names it) is in
    /// this mount; `None` if the mount does not show it.
    pub fn path_of(&self, path: &str) -> Option<PathBuf> {
        let rel = if self.root == "/" {
            path
        } else {
            path.strip_prefix(self.root.as_str())?
        };
        let rel = rel.trim_start_matches('/');
        if rel.split('/').any(|p| p == "..") {
            return None;
        }
        Some(if rel.is_empty() {
            self.mount_point.clone()
        } else {
            self.mount_point.join(rel)
        })
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_cgroup_mounts(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            let fstype = right.next()?;
            if fstype != "cgroup" && fstype != "cgroup2" {
                return None;
            }
            let _source = right.next()?;
            let options = right
                .next()
                .unwrap_or("")
                .split(',')
                .map(String::from)
                .collect();
            Some(CgroupMount {
                fstype: fstype.to_string(),
                root: unescape_mount(left.get(3)?),
                mount_point: PathBuf::from(unescape_mount(left.get(4)?)),
                options,
            })
        })
        .collect()
}

/// The cgroup hierarchies mounted where this process sees them.
pub fn cgroup_mounts() -> io::Result<Vec<CgroupMount>> {
    Ok(parse_cgroup_mounts(&std::fs::read_to_string(
        Path::new(ROOT).join("self/mountinfo"),
    )?))
}

/// The user a process runs as (the owner of its `/proc` directory);
/// `None` once it is gone.
pub fn uid_of(dir: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).ok().map(|m| m.uid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_paren() {
        let line = "1234 (we) ird (name)) S 1 999 999 0 -1 4194560 100 0 0 0";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                state: 'S',
                ppid: 1,
                pgrp: 999
            })
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) Z"), None);
    }

    #[test]
    fn usage_fields_are_counted_from_the_last_paren() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt
        // majflt cmajflt utime stime cutime cstime prio nice threads
        // itrealvalue starttime vsize rss ...
        let line = "42 (a (b) c) S 1 40 40 0 -1 0 0 0 0 0 7 3 20 10 20 0 1 0 100 4096 50 0";
        assert_eq!(
            parse_stat_usage(line),
            Some(StatUsage {
                pgrp: 40,
                cpu_ticks: 40,
                rss_pages: 50
            })
        );
        assert_eq!(parse_stat_usage("42 (x) S 1 40"), None);
        assert_eq!(parse_stat_usage("garbage"), None);
    }

    #[test]
    fn a_fake_group_is_summed() {
        let root = tempfile::tempdir().unwrap();
        let proc = |pid: u32, pgrp: i32, ticks: u64, pages: u64| {
            let dir = root.path().join(pid.to_string());
            std::fs::create_dir(&dir).unwrap();
            let stat = format!(
                "{pid} (t) S 1 {pgrp} {pgrp} 0 -1 0 0 0 0 0 {ticks} 0 0 0 20 0 1 0 100 4096 {pages} 0"
            );
            std::fs::write(dir.join("stat"), stat).unwrap();
        };
        proc(10, 10, 100, 1000);
        proc(11, 10, 50, 500);
        proc(12, 99, 7, 7);
        std::fs::create_dir(root.path().join("self-ish")).unwrap();
        let s = group_usage(root.path(), 10).unwrap();
        let mut pids = s.pids.clone();
        pids.sort();
        assert_eq!(pids, vec![10, 11]);
        assert_eq!(s.rss, 1500 * page_size());
        assert_eq!(
            s.cpu,
            std::time::Duration::from_secs_f64(150.0 / clock_ticks_per_second() as f64)
        );
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
    fn a_fake_table_is_read_like_the_real_one() {
        let root = tempfile::tempdir().unwrap();
        let proc = |pid: i32, stat: &str, environ: &[u8]| {
            let dir = root.path().join(pid.to_string());
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("stat"), stat).unwrap();
            std::fs::write(dir.join("environ"), environ).unwrap();
        };
        proc(10, "10 (lead) S 1 10 10", b"A=1\0");
        proc(11, "11 (child) Z 10 10 10", b"");
        proc(12, "12 (other) R 1 12 12", b"");
        std::fs::create_dir(root.path().join("self-ish")).unwrap();
        let mut members = group_members(root.path(), 10).unwrap();
        members.sort_by_key(|m| m.pid);
        assert_eq!(
            members,
            vec![
                Member {
                    pid: 10,
                    state: 'S'
                },
                Member {
                    pid: 11,
                    state: 'Z'
                }
            ]
        );
        let dir = root.path().join("11");
        assert!(stat(&dir).unwrap().is_dead());
        assert_eq!(environ(&root.path().join("10")).unwrap(), b"A=1\0");
        assert_eq!(stat(&root.path().join("99")), None);
    }

    #[test]
    fn this_process_is_found_and_measured() {
        let me = std::process::id() as i32;
        let pgid = nix::unistd::getpgrp().as_raw();
        let members = group_members(Path::new(ROOT), pgid).unwrap();
        assert!(members.iter().any(|m| m.pid == me), "{members:?}");
        assert!(resident_bytes(me).unwrap() > 0);
        let own = Path::new(ROOT).join("self");
        // The peak, read second, is at least what was resident before.
        let rss = status_bytes(&own, "VmRSS:").unwrap();
        assert!(status_bytes(&own, "VmHWM:").unwrap() >= rss);
        // Some CPU time went into this test already.
        let spun = (0..10_000_000u64).fold(0u64, |a, x| a ^ x.wrapping_mul(31));
        std::hint::black_box(spun);
        assert!(cpu_ticks(&own).unwrap() > 0);
        let child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert!(descendants_of_self().contains(&child.id()));
        let mut child = child;
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(hostname().is_some_and(|h| !h.trim().is_empty()));
    }

    #[test]
    fn cgroup_lines_and_mounts_are_parsed() {
        let own = parse_cgroups("4:memory:/process_api/ab\n8:pids:/\n1:name=systemd:/x\n0::/\n");
        assert_eq!(own.len(), 4);
        assert_eq!(own[0].controllers, vec!["memory"]);
        assert_eq!(own[0].path, "/process_api/ab");
        assert_eq!(own[3].id, 0);
        assert!(own[3].controllers.is_empty());

        let mounts = parse_cgroup_mounts(
            "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
             39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids\n\
             41 31 0:38 /docker/ab /sys/fs/cgroup/uni\\040fied rw shared:5 - cgroup2 cgroup2 rw\n",
        );
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].options, vec!["rw", "pids"]);
        assert_eq!(
            mounts[0].path_of("/a/b"),
            Some(PathBuf::from("/sys/fs/cgroup/pids/a/b"))
        );
        assert_eq!(
            mounts[0].path_of("/"),
            Some(PathBuf::from("/sys/fs/cgroup/pids"))
        );
        let v2 = &mounts[1];
        assert_eq!(v2.mount_point, PathBuf::from("/sys/fs/cgroup/uni fied"));
        assert_eq!(
            v2.path_of("/docker/ab/x"),
            Some(PathBuf::from("/sys/fs/cgroup/uni fied/x"))
        );
        assert_eq!(v2.path_of("/elsewhere"), None);
        assert_eq!(v2.path_of("/docker/ab/../../etc"), None);
        // This machine's own, whatever it has.
        assert!(own_cgroups()
            .unwrap()
            .iter()
            .any(|c| c.path.starts_with('/')));
        cgroup_mounts().unwrap();
    }
}
