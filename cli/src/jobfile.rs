//! Reading job files (JSON or TOML, `-` for stdin) and one-off commands.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context};
use gpufleet_schema::{Encoding, JobSpec, Resources, TaskSpec};

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

pub fn parse(text: &str, name: &str) -> anyhow::Result<JobSpec> {
    let is_toml = Path::new(name)
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("toml"))
        || !text.trim_start().starts_with(['{', '[']);
    let spec: JobSpec = if is_toml {
        toml::from_str(text).map_err(|e| anyhow::anyhow!("{name}: {}", e.to_string().trim()))?
    } else {
        Encoding::Json
            .decode(text.as_bytes())
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?
    };
    spec.validate()
        .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    Ok(spec)
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
}

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
                .map_err(|e| anyhow::anyhow!("--gpu-memory: {e}"))?,
        );
    }
    if let Some(c) = o.cpus {
        resources.cpus = c;
    }
    if let Some(m) = o.memory {
        resources.memory = Some(m.parse().map_err(|e| anyhow::anyhow!("--memory: {e}"))?);
    }
    let timeout = match o.timeout {
        Some(t) => Some(t.parse().map_err(|e| anyhow::anyhow!("--timeout: {e}"))?),
        None => None,
    };
    let mut env = std::collections::BTreeMap::new();
    for kv in o.env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--env {kv:?}: expected NAME=VALUE"))?;
        env.insert(k.to_string(), v.to_string());
    }
    let spec = JobSpec {
        id: None,
        name: o.name.clone(),
        priority: 0,
        max_retries: o.max_retries.unwrap_or(2),
        gang: false,
        min_tasks: None,
        constraints: Default::default(),
        tasks: vec![TaskSpec {
            name: o.name,
            command: o.command,
            env,
            resources,
            timeout,
            artifacts: o.artifacts,
        }],
    };
    spec.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(spec)
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
