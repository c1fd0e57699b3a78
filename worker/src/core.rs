//! The worker's decisions, apart from its IO: what to do with a lease that
//! appears (claim it, refuse it, note a cancel), what a claim and a
//! renewal write, what a lost renewal race means, and whether a finished
//! attempt reports. Everything here is a pure function of the worker's
//! state and its inputs; [`crate::agent`] and `attempt` do the
//! reading and writing around it. The one probe a decision needs (is a
//! port free?) is passed in.

use std::collections::HashMap;
use std::time::Duration;

use gpufleet_natsutil::kv::Entry;
use gpufleet_natsutil::KvOp;
use gpufleet_schema::{codec, GpuUuid, Grant, Lease, LeaseKey, LeaseState};

use crate::advert::AdvertInputs;
use crate::ledger::{Capacity, Ledger};
use crate::supervisor::StopReason;

/// How long a refusal lives: if the coordinator is away, it still clears.
pub const REFUSAL_TTL: Duration = Duration::from_secs(10);

/// What to do about a lease that was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnLease {
    /// One of ours: note its revision, and stop the task if `cancel`.
    /// `upgrade`: it carries a two-phase task's GPU grant, held in the
    /// ledger, or why it is refused (see [`WorkerState::upgrade`]).
    Ours {
        cancel: bool,
        upgrade: Option<Result<Grant, String>>,
    },
    /// Claim it. Its resources are held; start the attempt and
    /// [`WorkerState::admit`] it.
    Claim,
    /// Answer it with `state` and `reason` (see [`refusal`]).
    Refuse { state: LeaseState, reason: String },
    /// Not ours to act on.
    Ignore,
}

/// What the main loop decides by: what the worker offers, what its leases
/// hold, and the attempts it runs (`H`: whatever the caller keeps to reach
/// one).
pub struct WorkerState<H> {
    instance: String,
    /// Public keys a reservation's signature must check against; none: any
    /// reservation is run (a fleet without roles).
    trusted: Vec<nkeys::KeyPair>,
    capacity: Capacity,
    ledger: Ledger,
    draining: bool,
    attempts: HashMap<LeaseKey, H>,
}

impl<H> WorkerState<H> {
    pub fn new(instance: String, capacity: Capacity) -> Self {
        WorkerState {
            instance,
            trusted: Vec::new(),
            capacity,
            ledger: Ledger::default(),
            draining: false,
            attempts: HashMap::new(),
        }
    }

    /// Runs only reservations signed by one of `keys`.
    pub fn trusting(mut self, keys: Vec<nkeys::KeyPair>) -> Self {
        self.trusted = keys;
        self
    }

    /// Decides about `lease`, just written under `key`. `unmanaged` is GPU
    /// memory that processes not ours use now; `port_free` says whether
    /// this machine can listen on a port (asked only of a gang's rank 0).
    pub fn on_lease(
        &mut self,
        key: &LeaseKey,
        lease: &Lease,
        unmanaged: &HashMap<GpuUuid, u64>,
        port_free: impl FnOnce(u16) -> bool,
    ) -> OnLease {
        if self.attempts.contains_key(key) {
            return OnLease::Ours {
                cancel: lease.state == LeaseState::Cancelling,
                upgrade: lease
                    .gpu_grant
                    .is_some()
                    .then(|| self.upgrade(key, lease, unmanaged)),
            };
        }
        match lease.state {
            LeaseState::Reserved => match self.accept(key, lease, unmanaged, port_free) {
                Ok(()) => OnLease::Claim,
                Err(reason) => OnLease::Refuse {
                    state: LeaseState::Rejected,
                    reason,
                },
            },
            // A lease of this worker's previous life: that process is gone
            // (its child died with it), so the attempt is lost.
            LeaseState::Running | LeaseState::Cancelling
                if lease.instance.as_deref() != Some(self.instance.as_str()) =>
            {
                OnLease::Refuse {
                    state: LeaseState::Abandoned,
                    reason: "the worker restarted while the task ran".into(),
                }
            }
            _ => OnLease::Ignore,
        }
    }

    /// Holds a reservation's grant, or says why not.
    fn accept(
        &mut self,
        key: &LeaseKey,
        lease: &Lease,
        unmanaged: &HashMap<GpuUuid, u64>,
        port_free: impl FnOnce(u16) -> bool,
    ) -> Result<(), String> {
        // Before anything else: nothing of a reservation this worker cannot
        // trust is looked at, let alone held or run.
        if !self.trusted.is_empty() {
            lease.verify(&self.trusted).map_err(|e| e.to_string())?;
        }
        if self.draining {
            return Err("the worker is draining".into());
        }
        if let Some(port) = master_port(lease) {
            // Rank 0 listens there; the others would never meet it.
            if !port_free(port) {
                return Err(format!("MASTER_PORT {port} is in use on this worker"));
            }
        }
        self.ledger
            .try_hold(key, &lease.grant, &self.capacity, unmanaged)
    }

    /// Holds a two-phase task's GPU grant in place of its load phase: only
    /// one signed by a trusted coordinator for this very attempt (a worker
    /// cannot give itself a GPU), for a running task, that fits beside what
    /// else is held here. Asked again with the same grant, it changes
    /// nothing.
    fn upgrade(
        &mut self,
        key: &LeaseKey,
        lease: &Lease,
        unmanaged: &HashMap<GpuUuid, u64>,
    ) -> Result<Grant, String> {
        let Some(u) = &lease.gpu_grant else {
            return Err("no GPU grant".into());
        };
        if !self.trusted.is_empty() {
            lease
                .verify_upgrade(&self.trusted)
                .map_err(|e| format!("GPU grant: {e}"))?;
        }
        if lease.state != LeaseState::Running || lease.task.load.is_none() {
            return Err("a GPU grant is only for a two-phase task that runs".into());
        }
        self.ledger
            .try_upgrade(key, &u.grant, &self.capacity, unmanaged)
            .map_err(|e| format!("GPU grant: {e}"))?;
        Ok(u.grant.clone())
    }

    /// Registers the attempt started for a lease [`OnLease::Claim`] took.
    pub fn admit(&mut self, key: LeaseKey, attempt: H) {
        self.attempts.insert(key, attempt);
    }

    pub fn attempt(&self, key: &LeaseKey) -> Option<&H> {
        self.attempts.get(key)
    }

    pub fn attempts(&self) -> impl Iterator<Item = &H> {
        self.attempts.values()
    }

    pub fn running(&self) -> usize {
        self.attempts.len()
    }

    /// An attempt is about to let its lease go: its resources are free
    /// from now on, so that work placed here at once finds them.
    pub fn releasing(&mut self, key: &LeaseKey) {
        self.ledger.release(key);
    }

    /// An attempt is over. True when the worker, draining, has nothing
    /// left to run and may stop.
    pub fn done(&mut self, key: &LeaseKey) -> bool {
        self.attempts.remove(key);
        self.ledger.release(key);
        self.draining && self.attempts.is_empty()
    }

    /// Takes no new work from now on. True when nothing runs, so the
    /// worker may stop at once.
    pub fn drain(&mut self) -> bool {
        self.draining = true;
        self.attempts.is_empty()
    }

    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// What the advert says about the work here.
    pub fn advert_inputs(&self) -> AdvertInputs {
        AdvertInputs {
            running: self.attempts.keys().map(|k| k.task().clone()).collect(),
            draining: self.draining,
            reserved_gpu: self.ledger.reserved_gpu_memory(&self.capacity),
            held_cpus_milli: self.ledger.held().0,
            held_memory: self.ledger.held().1,
        }
    }
}

/// The port a gang's rank 0 listens on, when `lease` is for one.
pub fn master_port(lease: &Lease) -> Option<u16> {
    lease
        .rendezvous
        .as_ref()
        .filter(|r| r.rank == 0)
        .map(|r| r.master_port)
}

/// A lease answered with `state` and `reason`, to write with
/// [`REFUSAL_TTL`].
pub fn refusal(mut lease: Lease, state: LeaseState, reason: String) -> Lease {
    lease.state = state;
    lease.reason = Some(reason);
    lease
}

/// How long a claimed lease lives between renewals.
pub fn lease_ttl(lease: &Lease) -> Duration {
    lease.lease_ttl.0.max(Duration::from_secs(1))
}

/// What the claim writes: the reservation, RUNNING, by this process.
pub fn claimed(lease: &Lease, instance: &str) -> Lease {
    let mut claimed = lease.clone();
    claimed.state = LeaseState::Running;
    claimed.instance = Some(instance.to_string());
    claimed
}

/// The claimed lease as its renewals write it: naming the claim's revision.
pub fn with_claim_rev(mut claimed: Lease, claim_rev: u64) -> Lease {
    claimed.claim_rev = Some(claim_rev);
    claimed
}

/// What a renewal writes: the lease as last seen, CANCELLING once a
/// cancel was seen, so that the request stays visible (to a coordinator
/// that restarts meanwhile, say) until the worker releases the lease.
pub fn renewal(current: &mut Lease, stop: Option<StopReason>) {
    if matches!(stop, Some(StopReason::Cancel | StopReason::Preempt { .. })) {
        current.state = LeaseState::Cancelling;
    }
}

/// How to stop an attempt whose lease says CANCELLING: as a preemption,
/// with its grace, when the lease notes one; else as a cancel.
pub fn stop_asked(lease: &Lease) -> StopReason {
    match &lease.preempt {
        Some(p) => StopReason::Preempt { grace: p.grace.0 },
        None => StopReason::Cancel,
    }
}

/// The lease in `latest` (a key's last entry), if it is still the one
/// `attempt` claimed in this process: a value, not an expiry or purge
/// marker, and not someone else's.
pub fn still_ours(latest: Option<&Entry>, attempt: u32, instance: &str) -> Option<Lease> {
    let e = latest.filter(|e| e.op == KvOp::Put)?;
    codec::decode::<Lease>(&e.value)
        .ok()
        .filter(|l| l.instance.as_deref() == Some(instance) && l.attempt == attempt)
}

/// What a renewal that lost its compare-and-set does next.
#[derive(Debug, Clone, PartialEq)]
pub enum AfterConflict {
    /// The coordinator wrote the lease (a cancel, say): carry on from its
    /// value and revision, renewing at once; stop the task if `cancel`.
    Adopt {
        lease: Box<Lease>,
        revision: u64,
        cancel: bool,
    },
    /// The lease is no longer ours: stop the task without reporting.
    Fenced,
}

/// Reads a lost renewal race from the key's last entry.
pub fn after_conflict(latest: Option<&Entry>, attempt: u32, instance: &str) -> AfterConflict {
    match still_ours(latest, attempt, instance) {
        Some(lease) => AfterConflict::Adopt {
            cancel: lease.state == LeaseState::Cancelling,
            revision: latest.map_or(0, |e| e.revision),
            lease: Box::new(lease),
        },
        None => AfterConflict::Fenced,
    }
}

/// How far ahead of the lease's lapse a task stopped for lost contact is
/// gone: room for the lease's clock (the server's) starting a little
/// after ours, and for the kill itself.
pub fn fence_margin(ttl: Duration) -> Duration {
    (ttl / 10).max(Duration::from_millis(250)).min(ttl / 4)
}

/// The SIGTERM-to-SIGKILL grace of a task stopped for lost contact: the
/// worker's `kill_grace`, but at most a sixth of the shortest TTL it must
/// beat, so that writes keep several chances before the stop must begin.
pub fn fence_grace(ttl: Duration, kill_grace: Duration) -> Duration {
    kill_grace.min(ttl / 6)
}

/// How long after the last write of an entry with `ttl` (a lease, the
/// advert) that the server confirmed a worker that cannot write begins to
/// stop the task: then, with `grace`, it is gone [`fence_margin`] before
/// the entry can lapse, and no newer attempt can run while it still does.
pub fn fence_after(ttl: Duration, grace: Duration) -> Duration {
    ttl.saturating_sub(fence_margin(ttl)).saturating_sub(grace)
}

/// How long after a failed renewal the next try goes out (rather than a
/// whole renewal period later).
pub fn renewal_retry(ttl: Duration) -> Duration {
    (ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// How long an attempt that lost contact keeps trying to learn whether its
/// lease is still its own (to report what it could not) before it gives
/// up: by then the lease has lapsed unless the server itself was gone
/// that long, and the coordinator runs the task again either way.
pub fn reconcile_for(ttl: Duration) -> Duration {
    ttl.saturating_mul(3)
}

/// Whether a finished attempt reports its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Report, then free its resources and release the lease.
    Report,
    /// Look at the lease first ([`still_ours`]): report if it is ours,
    /// else it is fenced.
    CheckLease,
    /// Its lease is gone: a newer attempt may run elsewhere. Report
    /// nothing and leave the lease alone.
    Fenced,
}

/// Decides how an attempt ends, from why it was stopped (if it was) and
/// how long ago its lease was last confirmed ours.
pub fn finish(stop: Option<StopReason>, confirmed_ago: Duration, ttl: Duration) -> Finish {
    if stop == Some(StopReason::Fenced) {
        Finish::Fenced
    } else if stop == Some(StopReason::LostContact) || confirmed_ago >= ttl / 2 {
        // The worker may have been frozen past the lease's TTL.
        Finish::CheckLease
    } else {
        // Confirmed within half its TTL: it cannot have lapsed yet.
        Finish::Report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use gpufleet_schema::{
        subjects, ByteSize, Dur, GpuGrant, Grant, JobId, Rendezvous, TaskId, TaskSpec, WorkerId,
    };
    use time::OffsetDateTime;

    const GIB: u64 = 1 << 30;
    const ME: &str = "instance-now";

    fn capacity() -> Capacity {
        Capacity {
            cpus_milli: 4000,
            memory: 16 * GIB,
            load_memory_cap: 8 * GIB,
            gpus: vec![("GPU-0".into(), 24 * GIB)],
        }
    }

    fn state() -> WorkerState<()> {
        WorkerState::new(ME.into(), capacity())
    }

    fn lease(task: usize, cpus_milli: u64, gpu_share: Option<u64>) -> (LeaseKey, Lease) {
        let job = JobId::new("job").unwrap();
        let task_id = TaskId::for_index(&job, task);
        let worker = WorkerId::new("w").unwrap();
        let key = subjects::lease_key(&worker, &task_id, 1);
        let lease = Lease {
            job_id: job,
            task_id,
            attempt: 1,
            worker,
            state: LeaseState::Reserved,
            reason: None,
            task: TaskSpec {
                name: None,
                command: vec!["true".into()],
                env: Default::default(),
                resources: Default::default(),
                timeout: None,
                artifacts: vec![],
                array: None,
                load: None,
            },
            grant: Grant {
                gpus: gpu_share
                    .map(|m| GpuGrant {
                        index: 0,
                        uuid: "GPU-0".into(),
                        memory: ByteSize(m),
                    })
                    .into_iter()
                    .collect(),
                exclusive: false,
                cpus_milli,
                memory: ByteSize(0),
                loading: false,
            },
            rendezvous: None,
            lease_ttl: Dur::secs(30),
            instance: None,
            reserved_at: OffsetDateTime::now_utc(),
            owner: gpufleet_schema::UserId::default_user(),
            token: "tok".into(),
            signer: None,
            signature: None,
            claim_rev: None,
            ready: false,
            gpu_grant: None,
            preempt: None,
        };
        (key, lease)
    }

    fn no_port_check(port: u16) -> bool {
        panic!("port {port} checked for a lease that is not a gang's rank 0")
    }

    fn claim(s: &mut WorkerState<()>, key: &LeaseKey, lease: &Lease) -> OnLease {
        let d = s.on_lease(key, lease, &HashMap::new(), no_port_check);
        if d == OnLease::Claim {
            s.admit(key.clone(), ());
        }
        d
    }

    /// A two-phase task's lease as the coordinator grants its GPU: the
    /// load phase (1 CPU, no GPU) grown by `more`, signed by `key`.
    fn granted(lease: &Lease, more: &Grant, key: Option<&nkeys::KeyPair>) -> Lease {
        let mut l = lease.clone();
        l.state = LeaseState::Running;
        l.instance = Some(ME.into());
        l.ready = true;
        l.gpu_grant = Some(gpufleet_schema::GpuUpgrade {
            grant: l.grant.upgraded(more),
            signer: None,
            signature: None,
        });
        if let Some(k) = key {
            l.sign_upgrade(k).unwrap();
        }
        l
    }

    #[test]
    fn only_a_coordinators_gpu_grant_that_fits_is_held() {
        let coordinator = nkeys::KeyPair::new_account();
        let trusted = nkeys::KeyPair::from_public_key(&coordinator.public_key()).unwrap();
        let mut s = state().trusting(vec![trusted]);
        let (a, mut la) = lease(0, 1000, None);
        la.task.resources.gpus = 1;
        la.task.load = Some(gpufleet_schema::LoadSpec {
            cpus: 1.0,
            memory: None,
        });
        la.grant.loading = true;
        la.sign(&coordinator).unwrap();
        assert_eq!(claim(&mut s, &a, &la), OnLease::Claim);
        let whole = Grant {
            gpus: vec![GpuGrant {
                index: 0,
                uuid: "GPU-0".into(),
                memory: ByteSize(24 * GIB),
            }],
            exclusive: true,
            cpus_milli: 1000,
            ..Grant::default()
        };
        let upgrade = |s: &mut WorkerState<()>, l: &Lease| match claim(s, &a, l) {
            OnLease::Ours { upgrade, .. } => upgrade.expect("a grant was looked at"),
            other => panic!("{other:?}"),
        };
        // The worker (or anyone but the coordinator) cannot grant it.
        let err = upgrade(&mut s, &granted(&la, &whole, None)).unwrap_err();
        assert!(err.contains("not signed"), "{err}");
        let stranger = nkeys::KeyPair::new_account();
        let err = upgrade(&mut s, &granted(&la, &whole, Some(&stranger))).unwrap_err();
        assert!(err.contains("does not trust"), "{err}");
        assert_eq!(s.advert_inputs().reserved_gpu, vec![], "nothing held");
        // The coordinator's is held, in place of the load phase.
        let good = granted(&la, &whole, Some(&coordinator));
        assert_eq!(upgrade(&mut s, &good), Ok(good.held().clone()));
        assert_eq!(s.advert_inputs().held_cpus_milli, 2000);
        assert_eq!(s.advert_inputs().reserved_gpu.len(), 1);
        // Seen again (its own renewal): the same, nothing more held.
        assert_eq!(upgrade(&mut s, &good), Ok(good.held().clone()));
        assert_eq!(s.advert_inputs().held_cpus_milli, 2000);
        // A grant past what the worker has is refused; the first stays.
        let too_much = Grant {
            cpus_milli: 9000,
            ..whole.clone()
        };
        let err = upgrade(&mut s, &granted(&la, &too_much, Some(&coordinator))).unwrap_err();
        assert!(err.contains("not enough CPUs"), "{err}");
        assert_eq!(s.advert_inputs().held_cpus_milli, 2000);
    }

    #[test]
    fn with_trusted_keys_only_a_reservation_they_signed_is_claimed() {
        let coordinator = nkeys::KeyPair::new_account();
        let trusted = nkeys::KeyPair::from_public_key(&coordinator.public_key()).unwrap();
        let mut s = state().trusting(vec![trusted]);
        let (a, mut la) = lease(0, 1000, None);
        // Unsigned, signed by a stranger, changed after signing: refused,
        // before anything else is looked at (the worker is draining here
        // too, yet the signature is what the refusal names).
        s.drain();
        let mut refusals = vec![];
        let OnLease::Refuse { reason, .. } = claim(&mut s, &a, &la) else {
            panic!("an unsigned reservation was not refused");
        };
        refusals.push(reason);
        la.sign(&nkeys::KeyPair::new_account()).unwrap();
        let OnLease::Refuse { reason, .. } = claim(&mut s, &a, &la) else {
            panic!("a stranger's reservation was not refused");
        };
        refusals.push(reason);
        la.sign(&coordinator).unwrap();
        la.task.command = vec!["rm".into(), "-rf".into(), "/".into()];
        let OnLease::Refuse { reason, .. } = claim(&mut s, &a, &la) else {
            panic!("a changed reservation was not refused");
        };
        refusals.push(reason);
        assert!(refusals[0].contains("not signed"), "{refusals:?}");
        assert!(refusals[1].contains("does not trust"), "{refusals:?}");
        assert!(refusals[2].contains("does not match"), "{refusals:?}");
        // Signed as placed: claimed.
        let mut s = state().trusting(vec![nkeys::KeyPair::from_public_key(
            &coordinator.public_key(),
        )
        .unwrap()]);
        let (b, mut lb) = lease(1, 1000, None);
        lb.sign(&coordinator).unwrap();
        assert_eq!(claim(&mut s, &b, &lb), OnLease::Claim);
    }

    #[test]
    fn a_reservation_that_fits_is_claimed_and_one_that_does_not_is_refused() {
        let mut s = state();
        let (a, la) = lease(0, 3000, Some(10 * GIB));
        assert_eq!(claim(&mut s, &a, &la), OnLease::Claim);
        // The same lease again (a renewal, say) is ours, not a new claim.
        assert_eq!(
            claim(&mut s, &a, &la),
            OnLease::Ours {
                cancel: false,
                upgrade: None
            }
        );
        let (b, lb) = lease(1, 2000, None);
        let OnLease::Refuse { state, reason } = claim(&mut s, &b, &lb) else {
            panic!("an overcommit was not refused");
        };
        assert_eq!(state, LeaseState::Rejected);
        assert!(reason.starts_with("not enough CPUs"), "{reason}");
        let (c, lc) = lease(2, 0, Some(15 * GIB));
        let OnLease::Refuse { reason, .. } = claim(&mut s, &c, &lc) else {
            panic!("GPU memory was overcommitted");
        };
        assert!(reason.contains("14GiB free"), "{reason}");
        // Memory other processes use counts as taken.
        let (d, ld) = lease(3, 0, Some(10 * GIB));
        let busy: HashMap<GpuUuid, u64> = [("GPU-0".into(), 5 * GIB)].into();
        let OnLease::Refuse { reason, .. } = s.on_lease(&d, &ld, &busy, no_port_check) else {
            panic!("memory in use by others was given out");
        };
        assert!(reason.contains("5GiB by other processes"), "{reason}");
        assert_eq!(s.running(), 1);
    }

    #[test]
    fn resources_are_free_again_once_an_attempt_releases_them() {
        let mut s = state();
        let (a, la) = lease(0, 4000, None);
        let (b, lb) = lease(1, 4000, None);
        assert_eq!(claim(&mut s, &a, &la), OnLease::Claim);
        assert!(matches!(claim(&mut s, &b, &lb), OnLease::Refuse { .. }));
        // Released before its lease goes, while its task still finishes.
        s.releasing(&a);
        assert_eq!(s.running(), 1);
        assert_eq!(claim(&mut s, &b, &lb), OnLease::Claim);
        assert!(!s.done(&a), "not draining: the worker goes on");
        assert_eq!(s.running(), 1);
    }

    #[test]
    fn a_cancel_of_a_running_attempt_is_passed_on() {
        let mut s = state();
        let (a, mut la) = lease(0, 1000, None);
        assert_eq!(claim(&mut s, &a, &la), OnLease::Claim);
        la.state = LeaseState::Cancelling;
        la.instance = Some(ME.into());
        assert_eq!(
            claim(&mut s, &a, &la),
            OnLease::Ours {
                cancel: true,
                upgrade: None
            }
        );
    }

    #[test]
    fn a_draining_worker_refuses_new_work_and_stops_when_the_last_attempt_ends() {
        let mut s = state();
        let (a, la) = lease(0, 1000, None);
        assert_eq!(claim(&mut s, &a, &la), OnLease::Claim);
        assert!(!s.drain(), "an attempt still runs");
        assert!(s.advert_inputs().draining);
        let (b, lb) = lease(1, 1000, None);
        assert_eq!(
            claim(&mut s, &b, &lb),
            OnLease::Refuse {
                state: LeaseState::Rejected,
                reason: "the worker is draining".into()
            }
        );
        assert!(s.done(&a));
        assert!(state().drain(), "an idle worker stops at once");
    }

    #[test]
    fn a_gang_rank_0_is_refused_when_its_port_is_taken() {
        let mut s = state();
        let (a, mut la) = lease(0, 1000, None);
        la.rendezvous = Some(Rendezvous {
            rank: 0,
            world_size: 2,
            master_addr: "10.0.0.1".into(),
            master_port: 29501,
        });
        let mut asked = None;
        let d = s.on_lease(&a, &la, &HashMap::new(), |p| {
            asked = Some(p);
            false
        });
        assert_eq!(asked, Some(29501));
        assert_eq!(
            d,
            OnLease::Refuse {
                state: LeaseState::Rejected,
                reason: "MASTER_PORT 29501 is in use on this worker".into()
            }
        );
        assert_eq!(
            s.on_lease(&a, &la, &HashMap::new(), |_| true),
            OnLease::Claim
        );
        // Other ranks connect to it; they listen on nothing here.
        let (b, mut lb) = lease(1, 1000, None);
        lb.rendezvous = la.rendezvous.clone().map(|r| Rendezvous { rank: 1, ..r });
        assert_eq!(claim(&mut s, &b, &lb), OnLease::Claim);
    }

    #[test]
    fn a_lease_of_an_earlier_life_is_abandoned_and_answers_are_ignored() {
        let mut s = state();
        let (a, mut la) = lease(0, 1000, None);
        la.state = LeaseState::Running;
        la.instance = Some("instance-before".into());
        assert_eq!(
            claim(&mut s, &a, &la),
            OnLease::Refuse {
                state: LeaseState::Abandoned,
                reason: "the worker restarted while the task ran".into()
            }
        );
        la.state = LeaseState::Cancelling;
        assert!(matches!(
            claim(&mut s, &a, &la),
            OnLease::Refuse {
                state: LeaseState::Abandoned,
                ..
            }
        ));
        // This process's own lease, no longer in the table (it just ended).
        la.instance = Some(ME.into());
        assert_eq!(claim(&mut s, &a, &la), OnLease::Ignore);
        for answered in [LeaseState::Rejected, LeaseState::Abandoned] {
            la.state = answered;
            assert_eq!(claim(&mut s, &a, &la), OnLease::Ignore);
        }
        assert_eq!(s.running(), 0);
    }

    /// The coordinator frees an attempt's share as soon as it takes its
    /// result, and may place new work here at once: the attempt frees it
    /// here first (before its result goes). Its key, left to expire, is
    /// then neither run again nor counted.
    #[test]
    fn an_attempt_frees_its_share_before_its_result_and_its_lingering_key_holds_nothing() {
        let mut s = state();
        let (a, la) = lease(0, 4000, None);
        assert_eq!(claim(&mut s, &a, &la), OnLease::Claim);
        let (b, lb) = lease(1, 4000, None);
        assert!(
            matches!(claim(&mut s, &b, &lb), OnLease::Refuse { .. }),
            "every CPU is held"
        );
        // The task is over: freed, then its result goes out.
        s.releasing(&a);
        let (c, lc) = lease(2, 4000, None);
        assert_eq!(claim(&mut s, &c, &lc), OnLease::Claim, "placed at once");
        assert!(!s.done(&a));
        // The key of the ended attempt, seen again (a late renewal in the
        // watch), is neither claimed nor held.
        let mut again = claimed(&la, ME);
        again.claim_rev = Some(3);
        assert_eq!(claim(&mut s, &a, &again), OnLease::Ignore);
        assert_eq!(s.running(), 1);
        assert_eq!(s.advert_inputs().held_cpus_milli, 4000, "only task 2's");
    }

    #[test]
    fn the_advert_lists_running_tasks_and_gpu_memory_set_aside() {
        let mut s = state();
        let (a, la) = lease(7, 1000, Some(6 * GIB));
        assert_eq!(claim(&mut s, &a, &la), OnLease::Claim);
        let inputs = s.advert_inputs();
        assert_eq!(inputs.running, vec![la.task_id.clone()]);
        assert_eq!(inputs.reserved_gpu, vec![("GPU-0".into(), 6 * GIB)]);
        assert!(!inputs.draining);
    }

    #[test]
    fn claims_refusals_and_renewals_write_what_the_coordinator_reads() {
        let (_, la) = lease(0, 1000, None);
        let c = claimed(&la, ME);
        assert_eq!(c.state, LeaseState::Running);
        assert_eq!(c.instance.as_deref(), Some(ME));
        let r = refusal(la.clone(), LeaseState::Rejected, "full".into());
        assert_eq!(
            (r.state, r.reason.as_deref()),
            (LeaseState::Rejected, Some("full"))
        );
        let mut short = la.clone();
        short.lease_ttl = Dur::secs(0);
        assert_eq!(lease_ttl(&short), Duration::from_secs(1));
        assert_eq!(lease_ttl(&la), Duration::from_secs(30));

        let mut current = c.clone();
        renewal(&mut current, Some(StopReason::Drain));
        assert_eq!(current.state, LeaseState::Running);
        renewal(&mut current, Some(StopReason::Cancel));
        assert_eq!(current.state, LeaseState::Cancelling);
    }

    #[test]
    fn a_cancelling_lease_that_notes_a_preemption_stops_with_its_grace() {
        let (_, mut l) = lease(0, 1000, None);
        l.state = LeaseState::Cancelling;
        assert_eq!(stop_asked(&l), StopReason::Cancel);
        l.preempt = Some(gpufleet_schema::lease::Preempt {
            by: gpufleet_schema::JobId::new("urgent").unwrap(),
            grace: gpufleet_schema::Dur::secs(30),
        });
        let asked = stop_asked(&l);
        assert_eq!(
            asked,
            StopReason::Preempt {
                grace: std::time::Duration::from_secs(30)
            }
        );
        // Renewals keep saying CANCELLING, so the request stays visible.
        let mut current = l.clone();
        current.state = LeaseState::Running;
        renewal(&mut current, Some(asked));
        assert_eq!(current.state, LeaseState::Cancelling);
    }

    fn entry(op: KvOp, revision: u64, lease: &Lease) -> Entry {
        Entry {
            key: "k".into(),
            revision,
            op,
            value: Bytes::from(codec::encode(lease).unwrap()),
        }
    }

    #[test]
    fn a_lost_renewal_race_is_a_cancel_to_obey_or_a_lease_no_longer_ours() {
        let (_, la) = lease(0, 1000, None);
        let mut ours = claimed(&la, ME);
        ours.state = LeaseState::Cancelling;
        assert_eq!(
            after_conflict(Some(&entry(KvOp::Put, 42, &ours)), 1, ME),
            AfterConflict::Adopt {
                lease: Box::new(ours.clone()),
                revision: 42,
                cancel: true
            }
        );
        let theirs = claimed(&la, "another-instance");
        let newer = Lease {
            attempt: 2,
            ..ours.clone()
        };
        let expired = entry(KvOp::Expired, 43, &ours);
        let garbage = Entry {
            value: Bytes::from_static(b"\xc1"),
            ..entry(KvOp::Put, 44, &ours)
        };
        for e in [
            Some(entry(KvOp::Put, 42, &theirs)),
            Some(entry(KvOp::Put, 42, &newer)),
            Some(expired),
            Some(garbage),
            None,
        ] {
            assert_eq!(
                after_conflict(e.as_ref(), 1, ME),
                AfterConflict::Fenced,
                "{e:?}"
            );
            assert!(still_ours(e.as_ref(), 1, ME).is_none());
        }
        assert!(still_ours(Some(&entry(KvOp::Put, 42, &ours)), 1, ME).is_some());
    }

    #[test]
    fn an_attempt_reports_unless_its_lease_may_have_lapsed() {
        let ttl = Duration::from_secs(30);
        let fresh = Duration::from_secs(1);
        let old = Duration::from_secs(15);
        assert_eq!(finish(None, fresh, ttl), Finish::Report);
        assert_eq!(finish(Some(StopReason::Cancel), fresh, ttl), Finish::Report);
        assert_eq!(finish(None, old, ttl), Finish::CheckLease);
        assert_eq!(finish(Some(StopReason::Fenced), fresh, ttl), Finish::Fenced);
        assert_eq!(finish(Some(StopReason::Fenced), old, ttl), Finish::Fenced);
        // Stopped for lost contact: report only once the lease is known
        // to be still ours.
        assert_eq!(
            finish(Some(StopReason::LostContact), fresh, ttl),
            Finish::CheckLease
        );
    }

    #[test]
    fn a_task_cut_off_from_nats_is_gone_before_its_lease_can_lapse() {
        for (ttl, kill_grace) in [
            (Duration::from_secs(30), Duration::from_secs(10)),
            (Duration::from_secs(10), Duration::from_secs(10)),
            (Duration::from_secs(3), Duration::from_secs(1)),
            (Duration::from_secs(2), Duration::from_secs(1)),
            (Duration::from_secs(1), Duration::ZERO),
            (Duration::from_secs(600), Duration::from_secs(3600)),
        ] {
            let grace = fence_grace(ttl, kill_grace);
            let start = fence_after(ttl, grace);
            assert!(
                start + grace + fence_margin(ttl) <= ttl,
                "{ttl:?} {kill_grace:?}"
            );
            // Well over a renewal period (a third of the TTL) passes before
            // the stop begins: one lost renewal is not enough.
            assert!(start >= ttl / 2, "{ttl:?} {kill_grace:?}: {start:?}");
            assert!(renewal_retry(ttl) < start / 4);
        }
        // The defaults: a 30 s lease, 10 s of kill grace.
        let grace = fence_grace(Duration::from_secs(30), Duration::from_secs(10));
        assert_eq!(
            fence_after(Duration::from_secs(30), grace),
            Duration::from_secs(22)
        );
    }
}
