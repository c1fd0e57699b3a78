//! Uploads a task's output files that match its `artifacts` globs to the
//! artifacts stream (`natsutil::artifacts`), under the attempt and this
//! worker's name.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use async_nats::jetstream;
use gpufleet_natsutil::artifacts::{self, Attempt};
use gpufleet_schema::{subjects, Artifact, ByteSize};

/// What an upload pass did: the files stored, and what went wrong.
#[derive(Debug, Default)]
pub struct Uploaded {
    pub artifacts: Vec<Artifact>,
    pub errors: Vec<String>,
}

/// Files under `root` matching `patterns`, as paths relative to `root`.
/// Links and anything resolving outside `root` are left out, and so is a
/// file with other hard links (a hard link to a file elsewhere looks like
/// any other file): a task must not be able to upload the worker's own
/// files. Each is opened again at upload time without following any link
/// ([`open_beneath`]), so swapping a file for a link meanwhile does not
/// help either.
pub fn matching_files(root: &Path, patterns: &[String]) -> (Vec<PathBuf>, Vec<String>) {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    let Ok(root_real) = root.canonicalize() else {
        return (
            files,
            vec![format!("output directory {} is missing", root.display())],
        );
    };
    for pattern in patterns {
        let full = root.join(pattern);
        let Some(full) = full.to_str() else {
            errors.push(format!("artifact pattern {pattern:?} is not valid UTF-8"));
            continue;
        };
        let paths = match glob::glob(full) {
            Ok(p) => p,
            Err(e) => {
                errors.push(format!("artifact pattern {pattern:?}: {e}"));
                continue;
            }
        };
        let mut matched = false;
        for path in paths.flatten() {
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            if meta.nlink() > 1 {
                let shown = path.strip_prefix(root).unwrap_or(&path).display();
                errors.push(format!(
                    "artifact {shown} has other hard links (to a file elsewhere, maybe); not uploaded"
                ));
                continue;
            }
            let Ok(real) = path.canonicalize() else {
                continue;
            };
            let Ok(rel) = real.strip_prefix(&root_real) else {
                continue;
            };
            matched = true;
            let rel = rel.to_path_buf();
            if !files.contains(&rel) {
                files.push(rel);
            }
        }
        if !matched {
            errors.push(format!("artifact pattern {pattern:?} matched no file"));
        }
    }
    (files, errors)
}

/// Uploads the matching files of `root` as artifacts of `at`.
pub async fn upload(
    js: &jetstream::Context,
    at: &Attempt,
    root: &Path,
    patterns: &[String],
    max_size: u64,
) -> Uploaded {
    let mut out = Uploaded::default();
    if patterns.is_empty() {
        return out;
    }
    let (root2, patterns2) = (root.to_path_buf(), patterns.to_vec());
    let (files, errors) = tokio::task::spawn_blocking(move || matching_files(&root2, &patterns2))
        .await
        .unwrap_or_else(|e| (vec![], vec![format!("artifact scan failed: {e}")]));
    out.errors = errors;
    for rel in files {
        let name = rel.to_string_lossy().to_string();
        let path = root.join(&rel);
        let size = match tokio::fs::metadata(&path).await {
            Ok(m) => m.len(),
            Err(e) => {
                out.errors.push(format!("artifact {name}: {e}"));
                continue;
            }
        };
        if size > max_size {
            out.errors.push(format!(
                "artifact {name} is {}, more than the limit of {}; not uploaded",
                ByteSize(size),
                ByteSize(max_size)
            ));
            continue;
        }
        let (root2, rel2) = (root.to_path_buf(), rel.clone());
        let opened = tokio::task::spawn_blocking(move || open_beneath(&root2, &rel2))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)));
        let file = match opened {
            Ok(f) => tokio::fs::File::from_std(f),
            Err(e) => {
                out.errors
                    .push(format!("artifact {name}: {e}; not uploaded"));
                continue;
            }
        };
        // A stray process may still be growing it.
        let file = tokio::io::AsyncReadExt::take(file, max_size);
        match artifacts::upload(js, at, &name, file).await {
            Ok(meta) => out.artifacts.push(Artifact {
                object: subjects::artifact_object(&at.job, &at.task, at.attempt, &name),
                name,
                size: meta.size,
                sha256: meta.sha256,
            }),
            Err(e) => out.errors.push(format!("upload failed: {e}")),
        }
    }
    out
}

/// Opens `rel` under `root` without following any symbolic link on the
/// way (Linux 5.6's `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`;
/// on older kernels only the last component is checked), refusing what is
/// not a regular file with no other hard link. Blocking.
pub fn open_beneath(root: &Path, rel: &Path) -> io::Result<std::fs::File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::ffi::OsStrExt;
    let dir = std::fs::File::open(root)?;
    let name = std::ffi::CString::new(rel.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in its name"))?;
    // SAFETY: zeroed is a valid open_how (no flags, no mode, no resolve).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: a plain system call on a live directory fd, a NUL-ended
    // name and an open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            name.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOSYS) => crate::supervisor::open_task_file(&root.join(rel)),
            Some(libc::ELOOP) | Some(libc::EXDEV) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "its path goes through a symbolic link",
            )),
            _ => Err(e),
        };
    }
    // SAFETY: just opened, owned by nobody else.
    let file = unsafe { std::fs::File::from_raw_fd(fd as i32) };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "it is not a regular file",
        ));
    }
    if meta.nlink() > 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "it has other hard links",
        ));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_stay_inside_the_output_dir() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("out/sub")).unwrap();
        std::fs::write(root.join("out/a.pt"), b"a").unwrap();
        std::fs::write(root.join("out/sub/b.pt"), b"b").unwrap();
        std::fs::write(root.join("out/c.txt"), b"c").unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.join("out/link.pt"))
            .unwrap();
        let (files, errors) = matching_files(
            root,
            &["out/*.pt".into(), "out/**/*.pt".into(), "nothing/*".into()],
        );
        let mut names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
        names.sort();
        assert_eq!(names, vec!["out/a.pt", "out/sub/b.pt"]);
        assert_eq!(
            errors,
            vec!["artifact pattern \"nothing/*\" matched no file"]
        );
    }

    #[test]
    fn a_hard_link_to_a_file_elsewhere_is_not_an_artifact() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("out")).unwrap();
        std::fs::write(root.join("secret"), b"the worker's").unwrap();
        std::fs::hard_link(root.join("secret"), root.join("out/x.pt")).unwrap();
        std::fs::write(root.join("out/y.pt"), b"y").unwrap();
        let out = root.join("out");
        let (files, errors) = matching_files(&out, &["*.pt".into()]);
        assert_eq!(files, vec![PathBuf::from("y.pt")]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("x.pt has other hard links"),
            "{errors:?}"
        );
        // And at upload time, should it have been swapped in meanwhile.
        let e = open_beneath(&out, Path::new("x.pt")).unwrap_err();
        assert!(e.to_string().contains("hard links"), "{e}");
    }

    #[test]
    fn opening_beneath_the_output_dir_follows_no_link() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/ok"), b"ok").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("linked")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.join("file")).unwrap();
        assert!(open_beneath(root, Path::new("sub/ok")).is_ok());
        for bad in ["linked/secret", "file", "../secret", "sub/../../x"] {
            assert!(open_beneath(root, Path::new(bad)).is_err(), "{bad}");
        }
    }
}
