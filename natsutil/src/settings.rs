//! Configuration for every program: defaults < TOML file < `GPUFLEET_*`
//! environment < command-line flags, through the `config` crate.
//!
//! Only the environment variables that name a known setting are read
//! (`GPUFLEET_NATS_URL` for `nats_url`), so that a task's own `GPUFLEET_*`
//! variables never leak into a `gpufleet` command it runs. Unknown keys in a
//! file are refused with their name, by the config struct's
//! `deny_unknown_fields`.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("configuration file {path}: {message}")]
    File { path: String, message: String },
    #[error("configuration: {0}")]
    Invalid(String),
}

/// The environment variable for a setting: `nats_url` -> `GPUFLEET_NATS_URL`.
pub fn env_name(key: &str) -> String {
    format!("GPUFLEET_{}", key.to_ascii_uppercase())
}

/// A flag's value to lay over everything else; `None` when not given.
pub type Override = (&'static str, Option<config::Value>);

/// Builds `T` from its defaults, an optional file, the environment and
/// flag overrides, in that order of precedence.
pub fn load<T>(defaults: &T, file: Option<&Path>, flags: Vec<Override>) -> Result<T, SettingsError>
where
    T: Serialize + DeserializeOwned,
{
    let defaults_value = config::Config::try_from(defaults)
        .map_err(|e| SettingsError::Invalid(format!("defaults: {e}")))?;
    let keys: Vec<String> = match serde_json::to_value(defaults) {
        Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
        _ => vec![],
    };
    let mut builder = config::Config::builder().add_source(defaults_value);
    if let Some(path) = file {
        if !path.exists() {
            return Err(SettingsError::File {
                path: path.display().to_string(),
                message: "no such file".into(),
            });
        }
        builder = builder.add_source(
            config::File::from(path)
                .format(config::FileFormat::Toml)
                .required(true),
        );
    }
    for key in &keys {
        if let Ok(value) = std::env::var(env_name(key)) {
            builder = builder
                .set_override(key.as_str(), value)
                .map_err(|e| SettingsError::Invalid(e.to_string()))?;
        }
    }
    for (key, value) in flags {
        if let Some(value) = value {
            builder = builder
                .set_override(key, value)
                .map_err(|e| SettingsError::Invalid(e.to_string()))?;
        }
    }
    let built = builder.build().map_err(|e| match file {
        Some(p) => SettingsError::File {
            path: p.display().to_string(),
            message: e.to_string(),
        },
        None => SettingsError::Invalid(e.to_string()),
    })?;
    built.try_deserialize().map_err(|e| match file {
        // The unknown or bad key may come from the file: name it.
        Some(p) => SettingsError::File {
            path: p.display().to_string(),
            message: e.to_string(),
        },
        None => SettingsError::Invalid(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_schema::Dur;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Conf {
        nats_url: String,
        lease_ttl: Dur,
        replicas: usize,
        labels: BTreeMap<String, String>,
    }

    impl Default for Conf {
        fn default() -> Self {
            Conf {
                nats_url: "nats://127.0.0.1:4222".into(),
                lease_ttl: Dur::secs(30),
                replicas: 1,
                labels: BTreeMap::new(),
            }
        }
    }

    #[test]
    fn precedence_defaults_file_env_flags() {
        let dir = tempfile_dir();
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            "nats_url = \"nats://file:1\"\nlease_ttl = \"2m\"\nreplicas = 3\n[labels]\nZone = \"A\"\n",
        )
        .unwrap();
        let c: Conf = load(&Conf::default(), Some(&path), vec![]).unwrap();
        assert_eq!(c.nats_url, "nats://file:1");
        assert_eq!(c.lease_ttl, Dur::secs(120));
        assert_eq!(c.replicas, 3);
        assert_eq!(c.labels.get("Zone").map(String::as_str), Some("A"));
        // A flag beats the file.
        let c: Conf = load(
            &Conf::default(),
            Some(&path),
            vec![("replicas", Some("5".into())), ("nats_url", None)],
        )
        .unwrap();
        assert_eq!((c.replicas, c.nats_url.as_str()), (5, "nats://file:1"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let dir = tempfile_dir();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "nats_ulr = \"x\"\n").unwrap();
        let err = load(&Conf::default(), Some(&path), vec![])
            .unwrap_err()
            .to_string();
        assert!(err.contains("nats_ulr"), "{err}");
        std::fs::write(&path, "lease_ttl = \"soon\"\n").unwrap();
        let err = load(&Conf::default(), Some(&path), vec![])
            .unwrap_err()
            .to_string();
        assert!(err.contains("soon"), "{err}");
        let err = load(&Conf::default(), Some(&dir.join("missing.toml")), vec![])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such file"), "{err}");
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("gpufleet-settings-{}", uuid_like()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn uuid_like() -> String {
        format!(
            "{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        )
    }
}
