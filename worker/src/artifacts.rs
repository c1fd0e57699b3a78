//! Uploads a task's output files that match its `artifacts` globs to the
//! artifacts stream (`natsutil::artifacts`), under the attempt and this
//! worker's name.

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
/// Links and anything resolving outside `root` are left out: a task must
/// not be able to upload the worker's own files.
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
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) => {
                out.errors.push(format!("artifact {name}: {e}"));
                continue;
            }
        };
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
}
