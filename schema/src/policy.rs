//! The scheduling policy: fair-share weights and quotas, per user and per
//! group of users.
//!
//! It is set in the coordinator's settings (`[scheduling]`) and may be
//! replaced without a restart by writing the same shape, as JSON, to the
//! key [`crate::subjects::POLICY_KEY`] of the jobs bucket (only
//! coordinators and admins may write it); removing the key goes back to
//! the settings. See the README's "Fair share and quotas".

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::UserId;
use crate::spec::{err, SpecError, MAX_CPUS, MAX_LIST, MAX_NAME_BYTES};
use crate::units::ByteSize;

/// The largest weight: shares divided by it stay well away from zero.
pub const MAX_WEIGHT: f64 = 1e6;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedPolicy {
    /// The weight of a user the policy does not list.
    pub default_weight: f64,
    /// Per user: its weight and its own quota.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub users: BTreeMap<UserId, UserPolicy>,
    /// Groups of users, each with a quota over all of its members.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<String, GroupPolicy>,
}

impl Default for SchedPolicy {
    fn default() -> Self {
        SchedPolicy {
            default_weight: 1.0,
            users: BTreeMap::new(),
            groups: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserPolicy {
    /// Its share of the fleet relative to others' (default: the policy's
    /// `default_weight`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    #[serde(default, skip_serializing_if = "Quota::is_empty")]
    pub quota: Quota,
    /// The highest priority at which the user's jobs may preempt
    /// (`preemptible` work of a lower priority); none: they never do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preempt_priority: Option<i32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupPolicy {
    pub members: Vec<UserId>,
    #[serde(default, skip_serializing_if = "Quota::is_empty")]
    pub quota: Quota,
    /// As [`UserPolicy::preempt_priority`], for every member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preempt_priority: Option<i32>,
}

/// The most that running (and reserved) work may hold at once; a limit
/// left out is no limit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Whole GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_gpus: Option<u64>,
    /// GPU memory its tasks ask for (`gpu_memory`, times `gpus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_gpu_memory: Option<ByteSize>,
    /// Logical CPUs its tasks ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cpus: Option<f64>,
    /// Tasks reserved or running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_running: Option<u64>,
}

impl Quota {
    pub fn is_empty(&self) -> bool {
        *self == Quota::default()
    }

    fn validate(&self, field: &str) -> Result<(), SpecError> {
        if let Some(c) = self.max_cpus {
            if !(c.is_finite() && (0.0..=MAX_CPUS * 1e6).contains(&c)) {
                return Err(err(
                    format!("{field}.max_cpus"),
                    "must be a number from 0 up",
                ));
            }
        }
        Ok(())
    }
}

impl SchedPolicy {
    /// Checks what types cannot; the error names the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        let weight = |field: String, w: f64| {
            if w.is_finite() && w > 0.0 && w <= MAX_WEIGHT {
                Ok(())
            } else {
                Err(err(
                    field,
                    format!("a weight is a number above 0, at most {MAX_WEIGHT}"),
                ))
            }
        };
        weight("default_weight".into(), self.default_weight)?;
        if self.users.len() > MAX_LIST || self.groups.len() > MAX_LIST {
            return Err(err(
                "users",
                format!("at most {MAX_LIST} users and {MAX_LIST} groups"),
            ));
        }
        for (u, p) in &self.users {
            if let Some(w) = p.weight {
                weight(format!("users.{u}.weight"), w)?;
            }
            p.quota.validate(&format!("users.{u}.quota"))?;
        }
        for (g, p) in &self.groups {
            if g.is_empty() || g.len() > MAX_NAME_BYTES {
                return Err(err(
                    "groups",
                    format!("a group's name is 1 to {MAX_NAME_BYTES} bytes"),
                ));
            }
            if p.members.len() > MAX_LIST {
                return Err(err(
                    format!("groups.{g}.members"),
                    format!("at most {MAX_LIST}"),
                ));
            }
            p.quota.validate(&format!("groups.{g}.quota"))?;
        }
        Ok(())
    }

    /// A user's weight.
    /// The highest priority at which `user`'s jobs may preempt: the
    /// highest its own entry or any of its groups allows; none if none
    /// does. Set by admins only (the policy is theirs), so that nobody
    /// stops others' work by declaring its own job urgent.
    pub fn preempt_priority(&self, user: &UserId) -> Option<i32> {
        let own = self.users.get(user).and_then(|p| p.preempt_priority);
        let groups = self
            .groups
            .values()
            .filter(|g| g.members.contains(user))
            .filter_map(|g| g.preempt_priority);
        own.into_iter().chain(groups).max()
    }

    /// Whether anybody may preempt at all.
    pub fn preempts(&self) -> bool {
        self.users.values().any(|p| p.preempt_priority.is_some())
            || self.groups.values().any(|g| g.preempt_priority.is_some())
    }

    pub fn weight(&self, user: &UserId) -> f64 {
        self.users
            .get(user)
            .and_then(|p| p.weight)
            .unwrap_or(self.default_weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Encoding;

    #[test]
    fn a_policy_reads_from_json_and_names_a_bad_field() {
        let p: SchedPolicy = Encoding::Json
            .decode(
                br#"{"users": {"alice": {"weight": 2, "quota": {"max_gpus": 4}}},
                     "groups": {"ml": {"members": ["alice", "bob"], "quota": {"max_running": 10}}}}"#,
            )
            .unwrap();
        p.validate().unwrap();
        let alice = UserId::new("alice").unwrap();
        assert_eq!(p.weight(&alice), 2.0);
        assert_eq!(p.weight(&UserId::new("carol").unwrap()), 1.0);
        assert_eq!(p.users[&alice].quota.max_gpus, Some(4));

        let bad: SchedPolicy = Encoding::Json
            .decode(br#"{"users": {"bob": {"weight": 0}}}"#)
            .unwrap();
        let e = bad.validate().unwrap_err();
        assert_eq!(e.field, "users.bob.weight");
        // A typo is refused, not ignored.
        assert!(Encoding::Json
            .decode::<SchedPolicy>(br#"{"users": {"bob": {"quota": {"max_gpu": 1}}}}"#)
            .is_err());
    }
}
