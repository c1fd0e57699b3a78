//! Identifier newtypes, so that a task id can never be passed where a job id
//! is wanted. Every id ends up as a NATS subject token or a KV key segment,
//! so the allowed alphabet is the one both accept without escaping.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

/// The longest id we accept; keeps subjects and keys well under NATS limits.
pub const MAX_ID_LEN: usize = 128;

/// The longest job id: a task id is `<job id>-<index>`, and must itself fit
/// [`MAX_ID_LEN`] for the largest index a job may have.
pub const MAX_JOB_ID_LEN: usize = MAX_ID_LEN - 1 - digits(crate::spec::MAX_TASKS_PER_JOB - 1);

const fn digits(mut n: usize) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdError {
    pub kind: &'static str,
    pub value: String,
    /// The longest this kind of id may be.
    pub max: usize,
    /// What else the kind asks for, e.g. ", not starting with _".
    pub rule: &'static str,
}

impl std::error::Error for IdError {}

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The value may be anything a client sent: show a bounded part.
        write!(
            f,
            "invalid {} {:?}: use 1 to {} characters from A-Z a-z 0-9 _ -{}",
            self.kind,
            crate::text::cut(&self.value, 72),
            self.max,
            self.rule
        )?;
        if self.max == MAX_JOB_ID_LEN {
            write!(
                f,
                " (its task ids, <job id>-<index>, must fit {MAX_ID_LEN})"
            )?;
        }
        Ok(())
    }
}

/// Whether `s` is usable as one subject token and one KV key segment.
pub fn is_valid_token(s: &str) -> bool {
    is_valid_token_of(s, MAX_ID_LEN)
}

fn is_valid_token_of(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether `s` is a valid token that does not start with `_`: names of
/// workers and users, where `_` starts names gpufleet keeps for itself
/// (the coordinator's sender token `_c`, say).
pub fn is_valid_name(s: &str) -> bool {
    is_valid_name_of(s, MAX_ID_LEN)
}

fn is_valid_name_of(s: &str, max: usize) -> bool {
    is_valid_token_of(s, max) && !s.starts_with('_')
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr) => {
        id_type!($(#[$doc])* $name, $kind, $max, is_valid_token_of, "");
    };
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr, $valid:ident, $rule:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                if $valid(&s, $max) {
                    Ok(Self(s))
                } else {
                    Err(IdError { kind: $kind, value: s, max: $max, rule: $rule })
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
    "job id",
    MAX_JOB_ID_LEN
);
id_type!(
    /// A task's id, unique across the fleet: `<job id>-<index>`.
    TaskId,
    "task id",
    MAX_ID_LEN
);
id_type!(
    /// A worker's name, unique in the fleet; it is also its advert's key,
    /// the first token of its lease keys and the sender token of its events.
    WorkerId,
    "worker name",
    MAX_ID_LEN,
    is_valid_name_of,
    ", not starting with _"
);
id_type!(
    /// A user of the API as NATS knows it: the token in
    /// `gpufleet.api.<user>.…` that its permissions allow, and the owner of
    /// the jobs it submits.
    UserId,
    "user name",
    MAX_ID_LEN,
    is_valid_name_of,
    ", not starting with _"
);

impl UserId {
    /// The one user everybody is when roles are off, and the owner of jobs
    /// submitted on the old subjects without a user token.
    pub fn default_user() -> UserId {
        UserId(DEFAULT_USER.to_string())
    }
}

/// See [`UserId::default_user`].
pub const DEFAULT_USER: &str = "default";

impl JobId {
    /// A fresh, time-ordered id (UUIDv7 without dashes), so that listings
    /// sort by submission.
    pub fn generate() -> Self {
        JobId(uuid::Uuid::now_v7().simple().to_string())
    }
}

impl TaskId {
    /// Task `index` of `job`. Job ids are short enough that this fits
    /// [`MAX_ID_LEN`] for every index a job may have
    /// (`MAX_TASKS_PER_JOB`).
    pub fn for_index(job: &JobId, index: usize) -> Self {
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
    fn names_starting_with_an_underscore_are_gpufleets_own() {
        assert!(WorkerId::new("_c").is_err());
        assert!(UserId::new("_admin").is_err());
        assert!(JobId::new("_j").is_ok());
        assert!(WorkerId::new("gpu_07").is_ok());
        assert_eq!(UserId::default_user().as_str(), DEFAULT_USER);
        assert!(UserId::new("_admin")
            .unwrap_err()
            .to_string()
            .contains("not starting with _"));
    }

    #[test]
    fn the_longest_job_id_makes_task_ids_that_fit() {
        let job = JobId::new("j".repeat(MAX_JOB_ID_LEN)).unwrap();
        let last = TaskId::for_index(&job, crate::spec::MAX_TASKS_PER_JOB - 1);
        assert!(TaskId::new(last.as_str()).is_ok(), "{last}");
        let err = JobId::new("j".repeat(MAX_ID_LEN)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("1 to {MAX_JOB_ID_LEN} characters")),
            "{msg}"
        );
        assert!(msg.contains("task ids"), "{msg}");
        assert!(msg.len() < 300, "a long id is not echoed whole: {msg}");
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
