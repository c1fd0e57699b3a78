//! Attempt directories, recycled.
//!
//! An attempt's directory holds `owner`, `meta/events.jsonl` and an
//! empty `work/`: five inodes. Making and removing them for every task was
//! most of the worker's kernel time with short tasks (ext4 looks hard for a
//! free inode that was not recently deleted). So a directory that a task
//! leaves as it found it (nothing in `work/`, nothing unknown in `meta/`,
//! `work/` with its mode unchanged) is renamed to a spare,
//! `<work_dir>/.spare-<n>`, and the next attempt renames a spare into place.
//! A spare is checked again when taken: a process that escaped its task's
//! group could still write into it. Spares belong to the worker that made
//! them (`owner`), so a restarted worker removes them with the rest of
//! what its earlier run left (see `clean_up_earlier_run`).

use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{remove_tree, TaskPaths};

/// At most this many spares are kept: enough for the tasks a busy worker
/// ends at once, few enough to be nothing on disk.
const MAX_SPARES: usize = 64;

/// Makes and recycles one worker's attempt directories.
#[derive(Debug, Clone)]
pub struct DirPool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    work_dir: PathBuf,
    owner: String,
    spares: Mutex<Vec<PathBuf>>,
    next: AtomicU64,
    /// Mode of a fresh `work/` (what the umask leaves), once one was made;
    /// a `work/` whose mode a task changed is not reused.
    work_mode: AtomicU32,
}

impl DirPool {
    /// Attempt directories under `work_dir`, owned by `owner`.
    pub fn new(work_dir: &Path, owner: &str) -> DirPool {
        DirPool {
            inner: Arc::new(Inner {
                work_dir: work_dir.to_path_buf(),
                owner: owner.to_string(),
                spares: Mutex::new(Vec::new()),
                next: AtomicU64::new(0),
                work_mode: AtomicU32::new(u32::MAX),
            }),
        }
    }

    /// How many spares are kept now.
    pub fn spares(&self) -> usize {
        self.inner.spares()
    }

    /// Makes `dir` an attempt directory of this worker's, with an empty
    /// `work/`: a spare renamed into place, else a new one.
    pub async fn take(&self, dir: &Path) -> io::Result<()> {
        self.off_runtime(dir, Inner::take).await
    }

    /// Done with `dir`: kept as a spare if its task left it as it found
    /// it, else removed.
    pub async fn give_back(&self, dir: &Path) -> io::Result<()> {
        self.off_runtime(dir, Inner::give_back).await
    }

    async fn off_runtime(
        &self,
        dir: &Path,
        f: fn(&Inner, &Path) -> io::Result<()>,
    ) -> io::Result<()> {
        let inner = self.inner.clone();
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || f(&inner, &dir))
            .await
            .map_err(io::Error::other)?
    }
}

impl Inner {
    fn take(&self, dir: &Path) -> io::Result<()> {
        while let Some(spare) = self.pop() {
            if self.is_pristine(&TaskPaths::new(&spare)) && std::fs::rename(&spare, dir).is_ok() {
                return Ok(());
            }
            if let Err(e) = remove_tree(&spare) {
                tracing::warn!(dir = %spare.display(), error = %e, "cannot remove a spare task directory");
            }
        }
        let paths = TaskPaths::new(dir);
        std::fs::create_dir_all(paths.meta())?;
        std::fs::write(paths.owner(), &self.owner)?;
        match std::fs::create_dir(&paths.work) {
            Ok(()) => {
                let mode = std::fs::metadata(&paths.work)?.permissions().mode() & 0o7777;
                self.work_mode.store(mode, Ordering::Relaxed);
            }
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            Err(_) => {}
        }
        // The task's start makes the rest (`prepare_dir`).
        Ok(())
    }

    fn give_back(&self, dir: &Path) -> io::Result<()> {
        let paths = TaskPaths::new(dir);
        if self.spares() < MAX_SPARES && self.is_pristine(&paths) {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let spare = self.work_dir.join(format!(".spare-{n}"));
            if std::fs::rename(dir, &spare).is_ok() {
                if let Ok(mut s) = self.spares.lock() {
                    s.push(spare);
                    return Ok(());
                }
                return remove_tree(&spare);
            }
        }
        remove_tree(dir)
    }

    fn pop(&self) -> Option<PathBuf> {
        self.spares.lock().ok()?.pop()
    }

    fn spares(&self) -> usize {
        self.spares.lock().map(|s| s.len()).unwrap_or(MAX_SPARES)
    }

    /// Whether an attempt directory is as [`Inner::take`] makes it, but
    /// for a result or progress, which it clears: `work/` empty with its
    /// mode unchanged, and nothing else in `meta/`. The progress file is
    /// emptied so that a spare holds no space.
    fn is_pristine(&self, paths: &TaskPaths) -> bool {
        let mode = self.work_mode.load(Ordering::Relaxed);
        is_pristine(paths, mode)
    }
}

fn is_pristine(paths: &TaskPaths, work_mode: u32) -> bool {
    let work_ok = std::fs::symlink_metadata(&paths.work)
        .is_ok_and(|m| m.is_dir() && m.permissions().mode() & 0o7777 == work_mode)
        && std::fs::read_dir(&paths.work).is_ok_and(|mut d| d.next().is_none());
    if !work_ok {
        return false;
    }
    let Ok(meta) = std::fs::read_dir(paths.meta()) else {
        return false;
    };
    for entry in meta {
        let Ok(entry) = entry else { return false };
        let Ok(kind) = entry.file_type() else {
            return false;
        };
        let name = entry.file_name();
        let known = super::META_FILES.iter().any(|f| name == *f);
        if !known || !kind.is_file() {
            return false;
        }
    }
    for file in [&paths.result, &paths.inbox, &paths.outbox, &paths.control] {
        match std::fs::remove_file(file) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return false,
            _ => {}
        }
    }
    match std::fs::symlink_metadata(&paths.events) {
        Ok(m) if m.len() > 0 => std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&paths.events)
            .and_then(|f| f.set_len(0))
            .is_ok(),
        Ok(_) => true,
        // Not made yet: the attempt never started.
        Err(e) => e.kind() == io::ErrorKind::NotFound,
    }
}

/// Opens a file in a task's directory for reading, as the task left it:
/// never through a symbolic link, never a FIFO or device, never a file with
/// another hard link (made to a file the task could not read itself), so
/// that the worker reads nothing of its own for the task. Blocking.
pub fn open_task_file(path: &Path) -> io::Result<std::fs::File> {
    open_task_file_with(std::fs::OpenOptions::new().read(true), path)
}

/// [`open_task_file`] with other `options` (to append to a task's file,
/// say), under the same checks. Blocking.
pub fn open_task_file_with(
    options: &mut std::fs::OpenOptions,
    path: &Path,
) -> io::Result<std::fs::File> {
    let refused = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, why.to_string());
    let file = options
        // Non-blocking: opening a FIFO would wait for a writer.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => refused("it is a symbolic link"),
            _ => e,
        })?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(refused("it is not a regular file"));
    }
    if meta.nlink() > 1 {
        return Err(refused("it is a hard link to a file elsewhere"));
    }
    Ok(file)
}

/// Creates (or empties) a file the task is to write, never through a
/// symbolic link. Blocking.
pub(super) fn create_task_file(path: &Path) -> io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn inode(p: &Path) -> u64 {
        std::fs::metadata(p).unwrap().ino()
    }

    /// A pool in a temp dir, and an attempt directory `a-1` taken from it.
    async fn pool_with_one() -> (tempfile::TempDir, DirPool, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let pool = DirPool::new(tmp.path(), "w1");
        let a = tmp.path().join("a-1");
        pool.take(&a).await.unwrap();
        (tmp, pool, a)
    }

    #[tokio::test]
    async fn a_directory_left_as_found_is_reused_and_cleared() {
        let (tmp, pool, a) = pool_with_one().await;
        let paths = TaskPaths::new(&a);
        assert_eq!(std::fs::read_to_string(paths.owner()).unwrap(), "w1");
        assert!(std::fs::read_dir(&paths.work).unwrap().next().is_none());
        let work = inode(&paths.work);
        std::fs::write(&paths.result, b"{}").unwrap();
        std::fs::write(&paths.events, b"{\"step\":1}\n").unwrap();

        pool.give_back(&a).await.unwrap();
        assert!(!a.exists());
        assert_eq!(pool.spares(), 1);

        let b = tmp.path().join("b-1");
        pool.take(&b).await.unwrap();
        let paths = TaskPaths::new(&b);
        assert_eq!(inode(&paths.work), work, "the spare was reused");
        assert_eq!(pool.spares(), 0);
        assert!(!paths.result.exists());
        assert_eq!(std::fs::read(&paths.events).unwrap(), b"");
        assert_eq!(std::fs::read_to_string(paths.owner()).unwrap(), "w1");
    }

    /// A spare once kept the last task's control file: the next task
    /// there read the old GPU line, and the worker its old `ready`.
    #[tokio::test]
    async fn a_reused_spare_holds_no_message_or_control_file_of_the_task_before() {
        let (tmp, pool, a) = pool_with_one().await;
        let paths = TaskPaths::new(&a);
        for f in [&paths.inbox, &paths.outbox, &paths.control] {
            std::fs::write(f, b"ready\n").unwrap();
        }
        pool.give_back(&a).await.unwrap();
        assert_eq!(pool.spares(), 1);
        let b = tmp.path().join("b-1");
        pool.take(&b).await.unwrap();
        assert_eq!(pool.spares(), 0, "the spare was reused");
        let paths = TaskPaths::new(&b);
        for f in [&paths.inbox, &paths.outbox, &paths.control] {
            assert!(!f.exists(), "{}", f.display());
        }
    }

    #[tokio::test]
    async fn a_directory_the_task_changed_is_removed() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let pool = DirPool::new(tmp.path(), "w1");
        type Change = fn(&TaskPaths);
        let changes: [(&str, Change); 3] = [
            ("a file in work/", |p| {
                std::fs::write(p.work.join("out"), b"x").unwrap()
            }),
            ("work/'s mode", |p| {
                std::fs::set_permissions(&p.work, std::fs::Permissions::from_mode(0o700)).unwrap()
            }),
            ("a stranger in meta/", |p| {
                std::fs::write(p.meta().join("other"), b"x").unwrap()
            }),
        ];
        for (i, (what, change)) in changes.iter().enumerate() {
            let dir = tmp.path().join(format!("t{i}-1"));
            pool.take(&dir).await.unwrap();
            change(&TaskPaths::new(&dir));
            pool.give_back(&dir).await.unwrap();
            assert!(!dir.exists(), "{what}");
            assert_eq!(pool.spares(), 0, "{what}");
        }
    }

    #[tokio::test]
    async fn a_spare_written_to_after_its_task_is_not_taken() {
        let (tmp, pool, a) = pool_with_one().await;
        pool.give_back(&a).await.unwrap();
        // A process that escaped its task's group writes into its old cwd.
        let spare = std::fs::read_dir(tmp.path())
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with(".spare-"))
            .unwrap()
            .path();
        std::fs::write(spare.join("work/late"), b"x").unwrap();

        let b = tmp.path().join("b-1");
        pool.take(&b).await.unwrap();
        assert!(std::fs::read_dir(b.join("work")).unwrap().next().is_none());
        assert!(!spare.exists(), "the dirty spare was removed");
    }

    #[tokio::test]
    async fn spares_are_capped_and_a_restart_removes_them() {
        let tmp = tempfile::tempdir().unwrap();
        let pool = DirPool::new(tmp.path(), "w1");
        let dirs: Vec<PathBuf> = (0..MAX_SPARES + 3)
            .map(|i| tmp.path().join(format!("t{i}-1")))
            .collect();
        for d in &dirs {
            pool.take(d).await.unwrap();
        }
        for d in &dirs {
            pool.give_back(d).await.unwrap();
            assert!(!d.exists());
        }
        assert_eq!(pool.spares(), MAX_SPARES);
        let left = std::fs::read_dir(tmp.path()).unwrap().count();
        assert_eq!(left, MAX_SPARES, "the rest were removed");

        let cleaned = super::super::clean_up_earlier_run(tmp.path(), "w1", true).await;
        assert_eq!(cleaned.removed, MAX_SPARES);
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }
}
