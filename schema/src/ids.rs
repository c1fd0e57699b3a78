//! Identifier newtypes, so that a task id can never be passed where a job id
//! is wanted. Every id ends up as a NATS subject token or a KV key segment,
//! so the allowed alphabet is the one both accept without escaping.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

/// The longest id we accept; keeps subjects and keys well under NATS limits.
pub const MAX_ID_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: use 1 to {MAX_ID_LEN} characters from A-Z a-z 0-9 _ -")]
pub struct IdError {
    pub kind: &'static str,
    pub value: String,
}

/// Whether `s` is usable as one subject token and one KV key segment.
pub fn is_valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                if is_valid_token(&s) {
                    Ok(Self(s))
                } else {
                    Err(IdError { kind: $kind, value: s })
                }
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A job's id: chosen by the client (idempotent resubmit) or generated.
    JobId,
    "job id"
);
id_type!(
    /// A task's id, unique across the fleet: `<job id>-<index>`.
    TaskId,
    "task id"
);
id_type!(
    /// A worker's name, unique in the fleet; it is also its advert's key.
    WorkerId,
    "worker name"
);

impl JobId {
    /// A fresh, time-ordered id (UUIDv7 without dashes), so that listings
    /// sort by submission.
    pub fn generate() -> Self {
        JobId(uuid::Uuid::now_v7().simple().to_string())
    }
}

impl TaskId {
    pub fn for_index(job: &JobId, index: usize) -> Self {
        // Job ids are at most MAX_ID_LEN; the suffix may push past it, which
        // is harmless for subjects, so the length check is not applied here.
        TaskId(format!("{job}-{index}"))
    }

    /// The job and index a task id was made from by [`TaskId::for_index`];
    /// `None` for an id not of that form. The job id may itself hold `-`.
    pub fn job_and_index(&self) -> Option<(JobId, usize)> {
        let (job, index) = self.0.rsplit_once('-')?;
        Some((JobId::new(job).ok()?, index.parse().ok()?))
    }
}

/// A GPU's UUID as NVML reports it (`GPU-8f2c...`), or a simulated GPU's
/// made-up one. It names a GPU in adverts, grants and the capacity model;
/// it never becomes a subject token, so any text is accepted as it comes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GpuUuid(String);

impl GpuUuid {
    pub fn new(s: impl Into<String>) -> Self {
        GpuUuid(s.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for GpuUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for GpuUuid {
    fn from(s: String) -> Self {
        GpuUuid(s)
    }
}

impl From<&str> for GpuUuid {
    fn from(s: &str) -> Self {
        GpuUuid(s.to_string())
    }
}

impl AsRef<str> for GpuUuid {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for GpuUuid {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for GpuUuid {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<String> for GpuUuid {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl PartialEq<&str> for GpuUuid {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_reject_subject_breaking_characters() {
        for bad in ["", "a.b", "a b", "a*", "a>", "é", &"x".repeat(129)] {
            let err = JobId::new(bad).unwrap_err();
            assert_eq!(err.kind, "job id");
        }
        assert!(JobId::new("sweep-lr_01").is_ok());
        let err = serde_json::from_str::<WorkerId>("\"gpu.node\"").unwrap_err();
        assert!(err.to_string().contains("invalid worker name \"gpu.node\""));
    }

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = JobId::generate();
        let b = JobId::generate();
        assert_ne!(a, b);
        assert!(is_valid_token(a.as_str()));
        let t = TaskId::for_index(&a, 3);
        assert!(t.as_str().ends_with("-3"));
    }

    #[test]
    fn a_gpu_uuid_is_a_plain_string_on_the_wire() {
        let u = GpuUuid::new("GPU-8f2c.a b");
        assert_eq!(serde_json::to_string(&u).unwrap(), "\"GPU-8f2c.a b\"");
        assert_eq!(
            serde_json::from_str::<GpuUuid>("\"GPU-1\"").unwrap(),
            "GPU-1"
        );
    }

    #[test]
    fn a_task_id_splits_into_its_job_and_index() {
        let job = JobId::new("sweep-lr-2").unwrap();
        let task = TaskId::for_index(&job, 17);
        assert_eq!(task.job_and_index(), Some((job, 17)));
        for bad in ["nodash", "j-", "-3", "j-x", "j-1x"] {
            assert_eq!(TaskId::new(bad).unwrap().job_and_index(), None, "{bad}");
        }
    }
}
