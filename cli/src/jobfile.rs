//! Reading job files (JSON or TOML, `-` for stdin) and one-off commands.

use std::io::Read;
use std::path::Path;

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use gpufleet_schema::array::ArraySpec;
use gpufleet_schema::{Constraints, Encoding, JobId, JobSpec, Resources, TaskSpec, WorkerId};

/// Parses a job file; the error names the file and the field.
pub fn read(path: &str) -> anyhow::Result<JobSpec> {
    let (text, name) = if path == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the job from stdin")?;
        (s, "stdin".to_string())
    } else {
        let s = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        (s, path.to_string())
    };
    parse(&text, &name)
}

/// Parses a job in JSON or TOML. A `.json` or `.toml` file name decides;
/// otherwise a job that starts with `{` is JSON and anything else TOML (a
/// TOML job may well start with `[[tasks]]`, so `[` says nothing).
pub fn parse(text: &str, name: &str) -> anyhow::Result<JobSpec> {
    let ext = Path::new(name)
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    let is_json = match ext.as_deref() {
        Some("json") => true,
        Some("toml") => false,
        _ => text.trim_start().starts_with('{'),
    };
    let spec: JobSpec = if is_json {
        Encoding::Json
            .decode(text.as_bytes())
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?
    } else {
        parse_toml(text).map_err(|e| anyhow::anyhow!("{name}{e}"))?
    };
    spec.validate()
        .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    Ok(spec)
}

/// TOML with the path of the failing field, as JSON errors have it:
/// `:3: tasks[0].timeout: invalid duration "soon"`.
fn parse_toml(text: &str) -> Result<JobSpec, String> {
    let line_of = |span: Option<std::ops::Range<usize>>| {
        span.map(|s| {
            let before = text.get(..s.start).unwrap_or(text);
            format!(":{}", before.matches('\n').count() + 1)
        })
        .unwrap_or_default()
    };
    let de = toml::Deserializer::parse(text)
        .map_err(|e| format!("{}: {}", line_of(e.span()), e.message().trim()))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let at = line_of(inner.span());
        let message = inner.message().trim().to_string();
        if path.is_empty() || path == "." {
            format!("{at}: {message}")
        } else {
            format!("{at}: {path}: {message}")
        }
    })
}

/// What `gpufleet run` asks for.
pub struct OneOff {
    pub command: Vec<String>,
    pub name: Option<String>,
    pub gpus: u32,
    pub gpu_memory: Option<String>,
    pub cpus: Option<f64>,
    pub memory: Option<String>,
    pub timeout: Option<String>,
    pub env: Vec<String>,
    pub artifacts: Vec<String>,
    pub max_retries: Option<u32>,
    pub priority: i32,
    pub labels: Vec<String>,
    pub workers: Vec<String>,
    /// `NAME=V1,V2,…`: one task per combination of the values.
    pub array: Vec<String>,
    pub max_parallel: Option<u32>,
    /// Jobs that must complete first, and jobs that must finish first.
    pub after_ok: Vec<String>,
    pub after_any: Vec<String>,
    /// Its running task may be preempted by higher-priority work.
    pub preemptible: bool,
}

fn job_ids(flag: &str, ids: Vec<String>) -> anyhow::Result<Vec<JobId>> {
    ids.into_iter()
        .map(|id| JobId::new(id.clone()).map_err(|e| anyhow::anyhow!("{flag} {id:?}: {e}")))
        .collect()
}

/// The product of `--array NAME=V1,V2,…` flags; values stay the text
/// typed (`1e-3` is not made `0.001`).
fn array_flags(flags: Vec<String>) -> anyhow::Result<Option<ArraySpec>> {
    if flags.is_empty() {
        return Ok(None);
    }
    let mut params = BTreeMap::new();
    for f in flags {
        let (name, values) = f
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--array {f:?}: expected NAME=V1,V2,..."))?;
        let values = values
            .split(',')
            .map(|v| serde_json::Value::String(v.to_string()))
            .collect();
        if params.insert(name.to_string(), values).is_some() {
            bail!("--array {name}: given twice");
        }
    }
    Ok(Some(ArraySpec::Product(params)))
}

/// A one-task job (or one array) for `gpufleet run`; errors name the flag.
pub fn one_off(o: OneOff) -> anyhow::Result<JobSpec> {
    if o.command.is_empty() {
        bail!("give the command after --, e.g. gpufleet run -- python3 train.py");
    }
    let mut resources = Resources {
        gpus: o.gpus,
        ..Resources::default()
    };
    if let Some(m) = o.gpu_memory {
        resources.gpu_memory = Some(
            m.parse()
                .map_err(|e| anyhow::anyhow!("--gpu-memory {m:?}: {e}"))?,
        );
    }
    if let Some(c) = o.cpus {
        resources.cpus = c;
    }
    if let Some(m) = o.memory {
        resources.memory = Some(
            m.parse()
                .map_err(|e| anyhow::anyhow!("--memory {m:?}: {e}"))?,
        );
    }
    let timeout = match o.timeout {
        Some(t) => Some(
            t.parse()
                .map_err(|e| anyhow::anyhow!("--timeout {t:?}: {e}"))?,
        ),
        None => None,
    };
    let mut env = BTreeMap::new();
    for kv in o.env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--env {kv:?}: expected NAME=VALUE"))?;
        env.insert(k.to_string(), v.to_string());
    }
    let mut constraints = Constraints::default();
    for kv in o.labels {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--label {kv:?}: expected KEY=VALUE"))?;
        constraints.labels.insert(k.to_string(), v.to_string());
    }
    for w in o.workers {
        constraints
            .workers
            .push(WorkerId::new(w.clone()).map_err(|e| anyhow::anyhow!("--worker: {e}"))?);
    }
    // Without --name, the job is named after its command line and the task
    // after its program, so that `list` and the progress bars say something.
    let program = Path::new(&o.command[0])
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| o.command[0].clone());
    let job_name = o
        .name
        .clone()
        .unwrap_or_else(|| shorten(&o.command.join(" "), 64));
    let array = array_flags(o.array)?;
    // Each task of an array is told apart by its index.
    let task_name = match (o.name, &array) {
        (Some(n), _) => n,
        (None, None) => program,
        (None, Some(_)) => format!("{program}[{{index}}]"),
    };
    let spec = JobSpec {
        id: None,
        name: Some(job_name),
        priority: o.priority,
        max_retries: o.max_retries.unwrap_or(2),
        gang: false,
        min_tasks: None,
        max_parallel: o.max_parallel,
        after_ok: job_ids("--after-ok", o.after_ok)?,
        after_any: job_ids("--after-any", o.after_any)?,
        unschedulable_after: None,
        preemptible: o.preemptible,
        constraints,
        tasks: vec![TaskSpec {
            name: Some(task_name),
            command: o.command,
            env,
            resources,
            timeout,
            artifacts: o.artifacts,
            array,
            load: None,
        }],
    };
    // Field paths mean little to someone who typed flags: say which flag.
    spec.validate().map_err(|e| {
        let field = e.field.strip_prefix("tasks[0].").unwrap_or(&e.field);
        let flag = if let Some(k) = field.strip_prefix("env.") {
            format!("--env {k}")
        } else if let Some(r) = field.strip_prefix("resources.") {
            format!("--{}", r.replace('_', "-"))
        } else if field.starts_with("artifacts") {
            "--artifact".into()
        } else if let Some(l) = field.strip_prefix("constraints.labels.") {
            format!("--label {l}")
        } else if field.starts_with("command") {
            "the command".into()
        } else if let Some(a) = field.strip_prefix("array") {
            format!("--array {}", a.trim_start_matches('.'))
                .trim_end()
                .to_string()
        } else {
            format!("--{}", field.replace('_', "-"))
        };
        anyhow::anyhow!("{flag}: {}", e.message)
    })?;
    Ok(spec)
}

fn shorten(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_and_json_jobs() {
        let toml_job = r#"
name = "sweep"
[[tasks]]
command = ["python3", "train.py"]
resources = { gpus = 1, gpu_memory = "20GiB" }
timeout = "2h"
"#;
        let spec = parse(toml_job, "job.toml").unwrap();
        assert_eq!(spec.tasks[0].resources.gpu_memory.unwrap().0, 20 << 30);
        let spec = parse(r#"{"tasks": [{"command": ["true"]}]}"#, "job.json").unwrap();
        assert_eq!(spec.tasks.len(), 1);
    }

    #[test]
    fn toml_from_stdin_may_start_with_a_table_header() {
        // A regression: `[` was taken for JSON, so `[[tasks]]` on stdin failed.
        let spec = parse("[[tasks]]\ncommand = [\"true\"]\n", "stdin").unwrap();
        assert_eq!(spec.tasks[0].command, ["true"]);
        let spec = parse("  {\"tasks\": [{\"command\": [\"true\"]}]}", "stdin").unwrap();
        assert_eq!(spec.tasks.len(), 1);
    }

    #[test]
    fn toml_errors_carry_the_line_and_the_field_path() {
        let err = parse(
            "name = \"x\"\n[[tasks]]\ncommand = [\"a\"]\n[[tasks]]\ncommand = [\"b\"]\nresources = { gpus = \"two\" }\n",
            "j.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("j.toml:6: tasks[1].resources.gpus: "),
            "{err}"
        );
    }

    #[test]
    fn one_off_errors_name_the_flag() {
        let base = || OneOff {
            command: vec!["true".into()],
            name: None,
            gpus: 0,
            gpu_memory: None,
            cpus: None,
            memory: None,
            timeout: None,
            env: vec![],
            artifacts: vec![],
            max_retries: None,
            priority: 0,
            labels: vec![],
            workers: vec![],
            array: vec![],
            max_parallel: None,
            after_ok: vec![],
            after_any: vec![],
            preemptible: false,
        };
        let spec = one_off(OneOff {
            command: vec!["/usr/bin/python3".into(), "train.py".into()],
            ..base()
        })
        .unwrap();
        assert_eq!(spec.name.as_deref(), Some("/usr/bin/python3 train.py"));
        assert_eq!(spec.tasks[0].name.as_deref(), Some("python3"));
        let err = |o: OneOff| one_off(o).unwrap_err().to_string();
        // A sweep from flags: one task per combination, told apart by index.
        let sweep = one_off(OneOff {
            array: vec!["lr=0.1,1e-3".into(), "seed=1,2,3".into()],
            max_parallel: Some(2),
            ..base()
        })
        .unwrap()
        .expand()
        .unwrap();
        assert_eq!(sweep.tasks.len(), 6);
        assert_eq!(sweep.tasks[3].env["lr"], "1e-3");
        assert_eq!(sweep.tasks[3].name.as_deref(), Some("true[3]"));
        assert_eq!(sweep.max_parallel, Some(2));
        assert!(err(OneOff {
            array: vec!["1x=a".into()],
            ..base()
        })
        .starts_with("--array 1x: "));
        assert!(err(OneOff {
            max_parallel: Some(0),
            ..base()
        })
        .starts_with("--max-parallel: "));
        assert!(err(OneOff {
            cpus: Some(-1.0),
            ..base()
        })
        .starts_with("--cpus: "));
        assert!(err(OneOff {
            timeout: Some("0s".into()),
            ..base()
        })
        .starts_with("--timeout: "));
        assert!(err(OneOff {
            artifacts: vec!["../x".into()],
            ..base()
        })
        .starts_with("--artifact: "));
        assert!(err(OneOff {
            env: vec!["NOEQUALS".into()],
            ..base()
        })
        .starts_with("--env \"NOEQUALS\""));
        assert!(err(OneOff {
            workers: vec!["a.b".into()],
            ..base()
        })
        .starts_with("--worker: "));
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let err = parse(
            r#"{"tasks": [{"command": ["true"], "resources": {"gpus": -1}}]}"#,
            "j.json",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("j.json: tasks[0].resources.gpus"), "{err}");
        let err = parse("[[tasks]]\ncomand = [\"x\"]\n", "j.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("comand"), "{err}");
        let err = parse(r#"{"tasks": []}"#, "j.json").unwrap_err().to_string();
        assert!(
            err.contains("tasks: a job needs at least one task"),
            "{err}"
        );
    }
}
