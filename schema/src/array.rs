//! Job arrays (sweeps): a task template with parameters stands for one
//! task per combination.
//!
//! `"array": {"lr": [0.1, 0.01], "seed": [1, 2, 3]}` is the cartesian
//! product (parameters in name order, the last changing fastest: `lr=0.1
//! seed=1`, `lr=0.1 seed=2`, …); `"array": [{"lr": 0.1}, {"lr": 0.01,
//! "seed": 7}]` is exactly those combinations. Each task gets its index
//! within the template (`GPUFLEET_ARRAY_INDEX`, from 0) and each parameter
//! in its environment under the parameter's name, and `{name}` in its
//! command and name is replaced by the value (`{index}` by the index).
//! The coordinator expands a job's templates when it takes the job in;
//! the tasks it stores and runs are plain tasks.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::spec::{err, SpecError, TaskSpec, MAX_ARG_BYTES, MAX_TASKS_PER_JOB, RESERVED_ENV};

/// The variable each task of an array finds its index in.
pub const ARRAY_INDEX_ENV: &str = "GPUFLEET_ARRAY_INDEX";

/// A parameter's value: a string, a number or a boolean.
pub type ParamValue = serde_json::Value;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ArraySpec {
    /// Every combination of these values.
    Product(BTreeMap<String, Vec<ParamValue>>),
    /// These combinations.
    List(Vec<BTreeMap<String, ParamValue>>),
}

impl ArraySpec {
    /// How many tasks it stands for; `None` beyond `MAX_TASKS_PER_JOB`.
    pub fn len(&self) -> Option<usize> {
        match self {
            ArraySpec::Product(m) => m.values().try_fold(1usize, |n, v| {
                n.checked_mul(v.len()).filter(|&n| n <= MAX_TASKS_PER_JOB)
            }),
            ArraySpec::List(l) => Some(l.len()).filter(|&n| n <= MAX_TASKS_PER_JOB),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }

    /// Checks names and values; `at` is the array's field path.
    pub fn validate(&self, at: &str) -> Result<(), SpecError> {
        match self.len() {
            None => {
                return Err(err(
                    at,
                    format!("stands for more than the {MAX_TASKS_PER_JOB} tasks one job may hold"),
                ))
            }
            Some(0) => return Err(err(at, "stands for no task: give each parameter a value")),
            Some(_) => {}
        }
        let check = |name: &str, values: &mut dyn Iterator<Item = &ParamValue>, field: String| {
            if !valid_param(name) {
                return Err(err(
                    field,
                    "parameter names are letters, digits and _, not starting with a digit",
                ));
            }
            if name.starts_with(crate::spec::RESERVED_ENV_PREFIX)
                || RESERVED_ENV.contains(&name)
                || name == "index"
            {
                return Err(err(field, "is a name the worker sets"));
            }
            for v in values {
                if !(v.is_string() || v.is_number() || v.is_boolean()) {
                    return Err(err(field, "values are strings, numbers or booleans"));
                }
                if value_text(v).len() > MAX_ARG_BYTES {
                    return Err(err(
                        field,
                        format!("values are at most {MAX_ARG_BYTES} bytes"),
                    ));
                }
            }
            Ok(())
        };
        match self {
            ArraySpec::Product(m) => {
                for (name, values) in m {
                    check(name, &mut values.iter(), format!("{at}.{name}"))?;
                }
            }
            ArraySpec::List(l) => {
                for (i, combo) in l.iter().enumerate() {
                    for (name, v) in combo {
                        check(name, &mut std::iter::once(v), format!("{at}[{i}].{name}"))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The combinations, in index order.
    fn combinations(&self) -> Vec<BTreeMap<String, String>> {
        match self {
            ArraySpec::List(l) => l
                .iter()
                .map(|c| c.iter().map(|(k, v)| (k.clone(), value_text(v))).collect())
                .collect(),
            ArraySpec::Product(m) => {
                let mut out = vec![BTreeMap::new()];
                for (name, values) in m {
                    out = out
                        .into_iter()
                        .flat_map(|combo| {
                            values.iter().map(move |v| {
                                let mut c = combo.clone();
                                c.insert(name.clone(), value_text(v));
                                c
                            })
                        })
                        .collect();
                }
                out
            }
        }
    }
}

fn valid_param(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && name.len() <= 64
}

/// A value as the task sees it: a string as it is, others as JSON.
fn value_text(v: &ParamValue) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `text` with each `{name}` of `params` (and `{index}`) replaced.
fn substitute(text: &str, index: usize, params: &BTreeMap<String, String>) -> String {
    if !text.contains('{') {
        return text.to_string();
    }
    let mut out = text.replace("{index}", &index.to_string());
    for (k, v) in params {
        out = out.replace(&format!("{{{k}}}"), v);
    }
    out
}

/// The tasks a template stands for (itself alone if it has no array);
/// `at` is its field path, for errors.
pub fn expand_task(t: TaskSpec, at: &str) -> Result<Vec<TaskSpec>, SpecError> {
    let Some(array) = t.array.clone() else {
        return Ok(vec![t]);
    };
    let mut out = Vec::new();
    for (i, params) in array.combinations().into_iter().enumerate() {
        let mut task = t.clone();
        task.array = None;
        task.name = t.name.as_ref().map(|n| substitute(n, i, &params));
        task.command = t
            .command
            .iter()
            .map(|a| substitute(a, i, &params))
            .collect();
        if let Some((j, _)) = task
            .command
            .iter()
            .enumerate()
            .find(|(_, a)| a.len() > MAX_ARG_BYTES)
        {
            return Err(err(
                format!("{at}.command[{j}]"),
                format!("at most {MAX_ARG_BYTES} bytes once parameters are put in"),
            ));
        }
        for (k, v) in params {
            task.env.insert(k, v);
        }
        task.env.insert(ARRAY_INDEX_ENV.into(), i.to_string());
        out.push(task);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Encoding, JobSpec};

    fn job(json: &str) -> JobSpec {
        Encoding::Json.decode(json.as_bytes()).unwrap()
    }

    #[test]
    fn a_product_expands_in_name_order_with_env_and_substitution() {
        let j = job(
            r##"{"tasks": [{"name": "lr{lr}-s{seed}", "command": ["train", "--lr={lr}", "--seed", "{seed}", "{other}", "#{index}"],
                "array": {"seed": [1, 2, 3], "lr": [0.1, "1e-3"]}}]}"##,
        );
        j.validate().unwrap();
        let e = j.expand().unwrap();
        assert_eq!(e.tasks.len(), 6);
        let t = &e.tasks[4];
        assert_eq!(t.name.as_deref(), Some("lr1e-3-s2"));
        assert_eq!(
            t.command,
            ["train", "--lr=1e-3", "--seed", "2", "{other}", "#4"]
        );
        assert_eq!(t.env["lr"], "1e-3");
        assert_eq!(t.env["seed"], "2");
        assert_eq!(t.env[ARRAY_INDEX_ENV], "4");
        assert!(e.tasks.iter().all(|t| t.array.is_none()));
    }

    #[test]
    fn a_list_is_those_combinations_beside_plain_tasks() {
        let j = job(r#"{"tasks": [{"command": ["a"]},
                          {"command": ["b", "{x}"], "array": [{"x": "p"}, {"x": true, "y": 2}]}]}"#);
        let e = j.expand().unwrap();
        assert_eq!(e.tasks.len(), 3);
        assert!(e.tasks[0].env.is_empty());
        assert_eq!(e.tasks[2].command, ["b", "true"]);
        assert_eq!(e.tasks[2].env["y"], "2");
        assert_eq!(e.tasks[2].env[ARRAY_INDEX_ENV], "1");
    }

    #[test]
    fn bad_arrays_name_the_field() {
        for (json, field) in [
            (r#"{"array": {"lr": []}}"#, "tasks[0].array"),
            (r#"{"array": {"1x": [1]}}"#, "tasks[0].array.1x"),
            (r#"{"array": {"a": [{"b": 1}]}}"#, "tasks[0].array.a"),
            (r#"{"array": {"index": [1]}}"#, "tasks[0].array.index"),
            (
                r#"{"array": [{"GPUFLEET_X": 1}]}"#,
                "tasks[0].array[0].GPUFLEET_X",
            ),
            (
                r#"{"array": {"a": [1,2,3,4,5,6,7,8,9,10], "b": [1,2,3,4,5,6,7,8,9,10], "c": [1,2,3,4,5,6,7,8,9,10], "d": [1,2,3,4,5,6,7,8,9,10]}}"#,
                "tasks",
            ),
        ] {
            let mut t: serde_json::Value = serde_json::from_str(json).unwrap();
            t["command"] = serde_json::json!(["x"]);
            let j = job(&serde_json::json!({"tasks": [t]}).to_string());
            assert_eq!(j.validate().unwrap_err().field, field, "{json}");
        }
        // Expanded, a job still holds at most MAX_TASKS_PER_JOB tasks.
        let big: Vec<u32> = (0..3000).collect();
        let t = serde_json::json!({"command": ["x"], "array": {"i": big}});
        let j = job(&serde_json::json!({"tasks": [t.clone(), t]}).to_string());
        assert_eq!(j.validate().unwrap_err().field, "tasks");
    }
}
