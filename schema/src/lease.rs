//! Reservations and leases, the values in `gpufleet-leases`.
//!
//! The coordinator creates a [`Lease`] in state `RESERVED` under
//! [`crate::subjects::lease_key`] with a TTL; that entry *is* the
//! assignment: it carries everything the worker needs to run the task. The
//! worker claims it by a compare-and-set to `RUNNING` and renews it while the
//! task runs. A lease nobody renews expires on its own. The KV revision of
//! the claim is the fencing token that the worker sends with its results.
//!
//! A reservation is signed by the coordinator (Ed25519, an NKey) over its
//! fixed part: who owns it, what runs, where, with what, and the attempt's
//! random `token`. A worker configured with trusted keys runs nothing whose
//! signature does not check, whoever managed to write it.
//!
//! A two-phase task (one with a `load` phase) is reserved with only its
//! load phase's CPUs and memory (a `loading` grant). The worker marks the
//! lease `ready` once the task says it has loaded; the coordinator then
//! writes a [`GpuUpgrade`] into the same lease: the whole grant, GPUs
//! included, signed over the reservation's identity and token, so that
//! only a coordinator can give an attempt its GPUs.

use data_encoding::BASE64URL_NOPAD;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ids::{GpuUuid, JobId, TaskId, UserId, WorkerId};
use crate::spec::TaskSpec;
use crate::units::{ByteSize, Dur};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LeaseState {
    /// Written by the coordinator; waits for the worker's claim.
    Reserved,
    /// Claimed by the worker, which renews it while the task runs.
    Running,
    /// The coordinator asks the worker to stop the task.
    Cancelling,
    /// The worker refused the reservation (`reason` says why).
    Rejected,
    /// A restarted worker found a lease of its previous life.
    Abandoned,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    /// The job's owner: the user that submitted it.
    #[serde(default = "UserId::default_user")]
    pub owner: UserId,
    pub job_id: JobId,
    pub task_id: TaskId,
    /// 1 for the first try.
    pub attempt: u32,
    pub worker: WorkerId,
    pub state: LeaseState,
    #[serde(default)]
    pub reason: Option<String>,
    pub task: TaskSpec,
    pub grant: Grant,
    #[serde(default)]
    pub rendezvous: Option<Rendezvous>,
    /// How long the lease lives between renewals once claimed.
    pub lease_ttl: Dur,
    /// The worker process that claimed it.
    #[serde(default)]
    pub instance: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub reserved_at: OffsetDateTime,
    /// Random per attempt and secret to those who can read the lease (the
    /// worker and the coordinator): a result must carry it.
    #[serde(default)]
    pub token: String,
    /// The public NKey that signed the reservation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
    /// The signature over [`Lease::signed_bytes`], base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// The revision of the worker's claim, which its renewals carry, so
    /// that whoever reads the lease later knows which revision results
    /// must name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_rev: Option<u64>,
    /// Written by the worker: the task (a two-phase one) has loaded and
    /// waits for its GPUs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ready: bool,
    /// Written by the coordinator: the GPU phase's grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_grant: Option<GpuUpgrade>,
    /// With CANCELLING: the attempt is preempted, not cancelled (see
    /// [`Preempt`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preempt: Option<Preempt>,
}

/// The second phase's grant of a two-phase task: what the attempt holds
/// from then on (its load phase's grant grown by its GPUs, CPUs and
/// memory), with the coordinator's signature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuUpgrade {
    pub grant: Grant,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// What an upgrade's signature covers: which attempt (by its random
/// token too, so that it cannot be moved to another attempt of the same
/// task) and the grant. `purpose` keeps these bytes apart from any
/// reservation's.
#[derive(Serialize)]
struct SignedUpgrade<'a> {
    purpose: &'static str,
    owner: &'a UserId,
    job_id: &'a JobId,
    task_id: &'a TaskId,
    attempt: u32,
    worker: &'a WorkerId,
    token: &'a str,
    grant: &'a Grant,
}

/// A running attempt stopped for waiting work of a higher class: the
/// worker tells the task (a line with topic
/// [`crate::message::PREEMPTED_TOPIC`] in its inbox, then SIGTERM) and
/// gives it `grace` to save its work before SIGKILL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preempt {
    /// The job it makes room for.
    pub by: JobId,
    pub grace: Dur,
}

/// Why a reservation's signature does not check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("the reservation is not signed")]
    Missing,
    #[error("the reservation is signed by {0}, a key this worker does not trust")]
    Untrusted(String),
    #[error("the reservation's signature does not match its content")]
    Mismatch,
    #[error("signing key: {0}")]
    Key(String),
}

/// The part of a reservation the signature covers, in a fixed order.
#[derive(Serialize)]
struct SignedPart<'a> {
    owner: &'a UserId,
    job_id: &'a JobId,
    task_id: &'a TaskId,
    attempt: u32,
    worker: &'a WorkerId,
    task: &'a TaskSpec,
    grant: &'a Grant,
    rendezvous: &'a Option<Rendezvous>,
    lease_ttl: Dur,
    #[serde(with = "time::serde::rfc3339")]
    reserved_at: OffsetDateTime,
    token: &'a str,
}

impl Lease {
    /// The bytes the signature covers: MessagePack of the fixed part, so
    /// that the worker computes the same bytes from what it decoded.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let part = SignedPart {
            owner: &self.owner,
            job_id: &self.job_id,
            task_id: &self.task_id,
            attempt: self.attempt,
            worker: &self.worker,
            task: &self.task,
            grant: &self.grant,
            rendezvous: &self.rendezvous,
            lease_ttl: self.lease_ttl,
            reserved_at: self.reserved_at,
            token: &self.token,
        };
        // Every field is plain data: encoding cannot fail.
        rmp_serde::to_vec_named(&part).unwrap_or_default()
    }

    /// Signs the reservation with `key` (an NKey with its seed).
    pub fn sign(&mut self, key: &nkeys::KeyPair) -> Result<(), SealError> {
        let signature = key
            .sign(&self.signed_bytes())
            .map_err(|e| SealError::Key(e.to_string()))?;
        self.signer = Some(key.public_key());
        self.signature = Some(BASE64URL_NOPAD.encode(&signature));
        Ok(())
    }

    /// Checks the signature against the trusted public keys.
    pub fn verify(&self, trusted: &[nkeys::KeyPair]) -> Result<(), SealError> {
        check_seal(&self.signer, &self.signature, &self.signed_bytes(), trusted)
    }

    /// What the attempt holds now: its GPU phase's grant once it has one,
    /// else its reservation's.
    pub fn held(&self) -> &Grant {
        self.gpu_grant.as_ref().map_or(&self.grant, |u| &u.grant)
    }

    /// The bytes an upgrade to `grant` is signed over.
    fn upgrade_bytes(&self, grant: &Grant) -> Vec<u8> {
        let part = SignedUpgrade {
            purpose: "gpufleet gpu grant",
            owner: &self.owner,
            job_id: &self.job_id,
            task_id: &self.task_id,
            attempt: self.attempt,
            worker: &self.worker,
            token: &self.token,
            grant,
        };
        rmp_serde::to_vec_named(&part).unwrap_or_default()
    }

    /// Signs the GPU grant the lease carries, if any.
    pub fn sign_upgrade(&mut self, key: &nkeys::KeyPair) -> Result<(), SealError> {
        let Some(grant) = self.gpu_grant.as_ref().map(|u| u.grant.clone()) else {
            return Ok(());
        };
        let signature = key
            .sign(&self.upgrade_bytes(&grant))
            .map_err(|e| SealError::Key(e.to_string()))?;
        if let Some(u) = &mut self.gpu_grant {
            u.signer = Some(key.public_key());
            u.signature = Some(BASE64URL_NOPAD.encode(&signature));
        }
        Ok(())
    }

    /// Checks the GPU grant's signature against the trusted public keys
    /// ([`SealError::Missing`] without a grant).
    pub fn verify_upgrade(&self, trusted: &[nkeys::KeyPair]) -> Result<(), SealError> {
        let Some(u) = &self.gpu_grant else {
            return Err(SealError::Missing);
        };
        check_seal(
            &u.signer,
            &u.signature,
            &self.upgrade_bytes(&u.grant),
            trusted,
        )
    }
}

/// Whether `signature`, by `signer`, one of `trusted`, signs `bytes`.
fn check_seal(
    signer: &Option<String>,
    signature: &Option<String>,
    bytes: &[u8],
    trusted: &[nkeys::KeyPair],
) -> Result<(), SealError> {
    let (Some(signer), Some(signature)) = (signer, signature) else {
        return Err(SealError::Missing);
    };
    let key = trusted
        .iter()
        .find(|k| &k.public_key() == signer)
        .ok_or_else(|| SealError::Untrusted(signer.clone()))?;
    let signature = BASE64URL_NOPAD
        .decode(signature.as_bytes())
        .map_err(|_| SealError::Mismatch)?;
    key.verify(bytes, &signature)
        .map_err(|_| SealError::Mismatch)
}

/// A fresh per-attempt token: 128 random bits, base64url.
pub fn new_token() -> String {
    BASE64URL_NOPAD.encode(uuid::Uuid::new_v4().as_bytes())
}

/// What the task was given on its worker.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    #[serde(default)]
    pub gpus: Vec<GpuGrant>,
    /// Whole GPUs are the task's alone; a share leaves room for others.
    #[serde(default)]
    pub exclusive: bool,
    pub cpus_milli: u64,
    pub memory: ByteSize,
    /// A two-phase task's load phase: its memory counts against the
    /// worker's load-phase cap (see [`crate::capacity`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub loading: bool,
}

impl Grant {
    /// The load phase's grant grown by `more` (the GPU phase's GPUs and the
    /// CPUs and memory the whole task holds beyond its load phase's).
    pub fn upgraded(&self, more: &Grant) -> Grant {
        Grant {
            gpus: more.gpus.clone(),
            exclusive: more.exclusive,
            cpus_milli: self.cpus_milli.saturating_add(more.cpus_milli),
            memory: ByteSize(self.memory.0.saturating_add(more.memory.0)),
            loading: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuGrant {
    pub index: u32,
    pub uuid: GpuUuid,
    /// GPU memory set aside for the task.
    pub memory: ByteSize,
}

/// Where the ranks of a gang meet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rendezvous {
    pub rank: u32,
    pub world_size: u32,
    pub master_addr: String,
    pub master_port: u16,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::spec::Resources;
    use crate::units::ByteSize;

    fn reservation(timeout_ns: u64, cpus: f64, env: BTreeMap<String, String>) -> Lease {
        let job = JobId::new("j1").unwrap();
        Lease {
            owner: UserId::new("alice").unwrap(),
            task_id: TaskId::for_index(&job, 0),
            job_id: job,
            attempt: 1,
            worker: WorkerId::new("w1").unwrap(),
            state: LeaseState::Reserved,
            reason: None,
            task: TaskSpec {
                name: Some("t".into()),
                command: vec!["sh".into(), "-c".into(), "id".into()],
                env,
                resources: Resources {
                    cpus,
                    memory: Some(ByteSize::mib(512)),
                    ..Resources::default()
                },
                timeout: Some(Dur(Duration::from_nanos(timeout_ns))),
                artifacts: vec!["out/*".into()],
                array: None,
                load: None,
            },
            grant: Grant {
                gpus: vec![GpuGrant {
                    index: 0,
                    uuid: "GPU-1".into(),
                    memory: ByteSize::gib(8),
                }],
                exclusive: true,
                cpus_milli: 1500,
                memory: ByteSize::mib(512),
                loading: false,
            },
            rendezvous: None,
            lease_ttl: Dur::secs(30),
            instance: None,
            reserved_at: OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_789)
                .unwrap(),
            token: new_token(),
            signer: None,
            signature: None,
            claim_rev: None,
            ready: false,
            gpu_grant: None,
            preempt: None,
        }
    }

    fn decoded(l: &Lease) -> Lease {
        crate::codec::decode(&crate::codec::encode(l).unwrap()).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// What the coordinator signs, the worker checks after the trip
        /// through the wire: the signed bytes survive encoding.
        #[test]
        fn a_signed_reservation_checks_after_the_wire(
            timeout_ns in 0u64..(400 * 24 * 3600 * 1_000_000_000),
            cpus in 0.001f64..512.0,
            env in proptest::collection::btree_map("[A-Z]{1,8}", ".{0,20}", 0..4),
        ) {
            let key = nkeys::KeyPair::new_account();
            let mut l = reservation(timeout_ns, cpus, env);
            l.sign(&key).unwrap();
            let got = decoded(&l);
            prop_assert_eq!(got.signed_bytes(), l.signed_bytes());
            let trusted = nkeys::KeyPair::from_public_key(&key.public_key()).unwrap();
            prop_assert_eq!(got.verify(&[trusted]), Ok(()));
        }
    }

    #[test]
    fn a_changed_forged_or_unsigned_reservation_is_refused() {
        let key = nkeys::KeyPair::new_account();
        let trusted = [nkeys::KeyPair::from_public_key(&key.public_key()).unwrap()];
        let mut l = reservation(1_000_000_000, 1.0, BTreeMap::new());
        assert_eq!(l.verify(&trusted), Err(SealError::Missing));
        l.sign(&key).unwrap();
        assert_eq!(l.verify(&trusted), Ok(()));

        // What the worker may change does not break it.
        let mut claimed = l.clone();
        claimed.state = LeaseState::Running;
        claimed.instance = Some("i".into());
        claimed.claim_rev = Some(7);
        assert_eq!(claimed.verify(&trusted), Ok(()));

        // What it runs, where, or for whom, does.
        let mut changed = l.clone();
        changed.task.command = vec!["rm".into(), "-rf".into(), "/".into()];
        assert_eq!(changed.verify(&trusted), Err(SealError::Mismatch));
        let mut changed = l.clone();
        changed.owner = UserId::new("bob").unwrap();
        assert_eq!(changed.verify(&trusted), Err(SealError::Mismatch));

        // Signed by someone else.
        let mut forged = l.clone();
        forged.sign(&nkeys::KeyPair::new_account()).unwrap();
        assert!(matches!(
            forged.verify(&trusted),
            Err(SealError::Untrusted(_))
        ));
        // Someone else's key under our signer's name.
        let mut forged = l.clone();
        let signer = forged.signer.clone();
        forged.sign(&nkeys::KeyPair::new_account()).unwrap();
        forged.signer = signer;
        assert_eq!(forged.verify(&trusted), Err(SealError::Mismatch));
        forged.signature = Some("not base64!".into());
        assert_eq!(forged.verify(&trusted), Err(SealError::Mismatch));
    }

    /// Only a coordinator's key gives an attempt its GPUs: a grant signed
    /// by anyone else, moved to another attempt, or changed, is refused;
    /// the worker's own marks (ready, its renewals) do not break it.
    #[test]
    fn a_gpu_grant_checks_only_as_signed_for_its_attempt() {
        let key = nkeys::KeyPair::new_account();
        let trusted = [nkeys::KeyPair::from_public_key(&key.public_key()).unwrap()];
        let mut l = reservation(1_000_000_000, 1.0, BTreeMap::new());
        l.sign(&key).unwrap();
        assert_eq!(l.verify_upgrade(&trusted), Err(SealError::Missing));
        let gpus = l.grant.clone();
        l.grant = Grant {
            gpus: vec![],
            exclusive: false,
            loading: true,
            ..gpus.clone()
        };
        l.ready = true;
        l.gpu_grant = Some(GpuUpgrade {
            grant: l.grant.upgraded(&gpus),
            signer: None,
            signature: None,
        });
        assert_eq!(l.verify_upgrade(&trusted), Err(SealError::Missing));
        l.sign_upgrade(&key).unwrap();
        let got = decoded(&l);
        assert_eq!(got.verify_upgrade(&trusted), Ok(()));
        assert_eq!(got.held().gpus, gpus.gpus);
        assert!(!got.held().loading);

        let mut renewed = got.clone();
        renewed.state = LeaseState::Running;
        renewed.claim_rev = Some(9);
        assert_eq!(renewed.verify_upgrade(&trusted), Ok(()));

        // A worker that grants itself more, or the same grant for
        // another attempt.
        let mut more = got.clone();
        more.gpu_grant.as_mut().unwrap().grant.cpus_milli += 1;
        assert_eq!(more.verify_upgrade(&trusted), Err(SealError::Mismatch));
        let mut other = got.clone();
        other.token = new_token();
        assert_eq!(other.verify_upgrade(&trusted), Err(SealError::Mismatch));
        let mut other = got.clone();
        other.attempt = 2;
        assert_eq!(other.verify_upgrade(&trusted), Err(SealError::Mismatch));
        let mut forged = got.clone();
        forged.sign_upgrade(&nkeys::KeyPair::new_account()).unwrap();
        assert!(matches!(
            forged.verify_upgrade(&trusted),
            Err(SealError::Untrusted(_))
        ));
        // A reservation's signature is no grant's.
        let mut copied = got.clone();
        let u = copied.gpu_grant.as_mut().unwrap();
        u.signer = l.signer.clone();
        u.signature = l.signature.clone();
        assert_eq!(copied.verify_upgrade(&trusted), Err(SealError::Mismatch));
    }
}
