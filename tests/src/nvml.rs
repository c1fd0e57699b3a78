//! A stand-in NVML for machines without a GPU: `tests/nvml-stub/nvml_stub.c`
//! built into a `libnvidia-ml.so.1` that a worker loads through
//! nvml-wrapper exactly as on a GPU machine (`LD_LIBRARY_PATH`), answering
//! from a table file the test rewrites while the worker runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::server::workspace_root;

/// The environment variable naming the stub's table (read by the C code).
pub const TABLE_ENV: &str = "NVML_STUB_TABLE";

/// `target/nvml-stub`, beside the profiles cargo builds into.
fn out_dir() -> PathBuf {
    let profile = crate::procs::profile_dir();
    profile
        .parent()
        .expect("the profile directory is inside target/")
        .join("nvml-stub")
}

/// Compiles `source` (a C file, or none for an empty library) into
/// `<out_dir>/<variant>/libnvidia-ml.so.1`, once per test process. The
/// library is written under a temporary name and renamed, so that test
/// binaries building it at the same time never load a half-written one.
fn build(variant: &str, source: Option<&Path>) -> PathBuf {
    let dir = out_dir().join(variant);
    std::fs::create_dir_all(&dir).expect("create the stub's directory");
    let lib = dir.join("libnvidia-ml.so.1");
    let tmp = dir.join(format!(".libnvidia-ml.so.1.{}", std::process::id()));
    let mut cc = Command::new(std::env::var("CC").unwrap_or_else(|_| "gcc".into()));
    cc.args([
        "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror", "-o",
    ])
    .arg(&tmp);
    match source {
        Some(src) => cc.arg(src),
        None => cc.args(["-x", "c", "/dev/null"]),
    };
    let status = cc
        .status()
        .unwrap_or_else(|e| panic!("run the C compiler (gcc) for the NVML stub: {e}"));
    assert!(
        status.success(),
        "the NVML stub ({variant}) did not compile"
    );
    std::fs::rename(&tmp, &lib).expect("move the stub into place");
    dir
}

/// A directory holding the stand-in `libnvidia-ml.so.1`: put it on a
/// worker's `LD_LIBRARY_PATH`.
pub fn stub_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let src = workspace_root().join("tests/nvml-stub/nvml_stub.c");
        build("stub", Some(&src))
    })
}

/// A directory holding a `libnvidia-ml.so.1` that loads but has none of
/// NVML's functions (a broken or foreign library under NVML's name).
pub fn broken_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| build("broken", None))
}

/// One GPU of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct StubGpu {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub total: u64,
    pub utilization: u32,
    pub temperature: u32,
    /// Memory used by no listed process.
    pub used_other: u64,
    /// The driver does not list this GPU's processes.
    pub no_processes: bool,
    /// Fallen off the bus: counted, but every query of it fails.
    pub lost: bool,
}

impl StubGpu {
    pub fn new(index: u32, uuid: &str, name: &str, total: u64) -> StubGpu {
        StubGpu {
            index,
            uuid: uuid.into(),
            name: name.into(),
            total,
            utilization: 0,
            temperature: 40,
            used_other: 0,
            no_processes: false,
            lost: false,
        }
    }
}

/// A compute process on a GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct StubProcess {
    pub gpu: u32,
    pub pid: u32,
    pub memory: u64,
    /// The driver lists the process but gives its memory as not available
    /// (it still counts in the GPU's used memory).
    pub memory_hidden: bool,
}

impl StubProcess {
    pub fn new(gpu: u32, pid: u32, memory: u64) -> StubProcess {
        StubProcess {
            gpu,
            pid,
            memory,
            memory_hidden: false,
        }
    }
}

/// What the stand-in NVML reports. Change it and [`NvmlTable::write`] it:
/// the stub re-reads the file on every call.
#[derive(Debug, Clone, PartialEq)]
pub struct NvmlTable {
    path: PathBuf,
    pub driver: String,
    /// What `nvmlInit_v2` returns; 0 is success (9: driver not loaded).
    pub init_code: i32,
    pub gpus: Vec<StubGpu>,
    pub processes: Vec<StubProcess>,
}

impl NvmlTable {
    /// A table at `path` (written by [`NvmlTable::write`]).
    pub fn new(path: &Path, gpus: Vec<StubGpu>) -> NvmlTable {
        NvmlTable {
            path: path.to_path_buf(),
            driver: "550.54.15".into(),
            init_code: 0,
            gpus,
            processes: vec![],
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The environment a worker needs to load the stub with this table.
    pub fn worker_env(&self) -> Vec<(String, String)> {
        vec![
            ("LD_LIBRARY_PATH".into(), stub_dir().display().to_string()),
            (TABLE_ENV.into(), self.path.display().to_string()),
        ]
    }

    fn render(&self) -> String {
        let mut out = format!("driver {}\ninit {}\n", self.driver, self.init_code);
        for g in &self.gpus {
            out.push_str(&format!(
                "gpu {} {} {} {} {} {}\nused {} {}\n",
                g.index,
                g.uuid,
                g.total,
                g.utilization,
                g.temperature,
                g.name,
                g.index,
                g.used_other
            ));
            if g.no_processes {
                out.push_str(&format!("noprocs {}\n", g.index));
            }
            if g.lost {
                out.push_str(&format!("lost {}\n", g.index));
            }
        }
        for p in &self.processes {
            let hidden = if p.memory_hidden { " hidden" } else { "" };
            out.push_str(&format!("proc {} {} {}{hidden}\n", p.gpu, p.pid, p.memory));
        }
        out
    }

    /// Writes the table whole (temporary file, then rename), so that the
    /// stub never reads half of it.
    pub fn write(&self) {
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, self.render()).expect("write the NVML table");
        std::fs::rename(&tmp, &self.path).expect("move the NVML table into place");
    }
}
