//! The lease book: what each worker offers (its advert), what the live
//! leases hold of it, and the attempts whose lease was released before
//! their result came. From these it builds the snapshot placement works on.
//!
//! A reservation counts as live from the moment the engine decides it,
//! before its write is acknowledged ("in flight", revision 0), so that the
//! next pass never places on capacity it already holds; the lease watch
//! then confirms it with its real revision.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use gpufleet_schema::capacity::{WorkerCapacity, DEFAULT_RENDEZVOUS_PORTS};
use gpufleet_schema::{GpuUuid, Lease, LeaseKey, LeaseState, TaskId, WorkerAdvert, WorkerId};

use crate::placement::WorkerView;

/// A live key in `gpufleet-leases`, as we last saw or wrote it.
#[derive(Debug, Clone)]
pub struct LiveLease {
    /// 0 while our own reservation is in flight.
    pub rev: u64,
    pub lease: Lease,
}

impl LiveLease {
    /// The CANCELLING value to compare-and-set over this revision.
    pub fn cancelling(&self, reason: String) -> (Lease, u64) {
        let mut lease = self.lease.clone();
        lease.state = LeaseState::Cancelling;
        lease.reason = Some(reason);
        (lease, self.rev)
    }
}

/// How much later than its TTL an advert's expiry may reach us and still
/// be taken for a worker that died, rather than for servers that could not
/// take its heartbeats (see `health.rs`).
pub const EXPIRY_SLACK: Duration = Duration::from_secs(2);

#[derive(Default)]
pub struct LeaseBook {
    workers: BTreeMap<WorkerId, WorkerAdvert>,
    /// When each worker's last advert reached us.
    seen: HashMap<WorkerId, Instant>,
    live: HashMap<LeaseKey, LiveLease>,
    /// Tasks whose lease was released before their result came, and when.
    released: HashMap<TaskId, Instant>,
    /// Lease keys whose attempt has ended, until the key expires: their
    /// worker does not remove them (one write less per task), so what the
    /// watch still shows of them is no live lease and holds nothing.
    finished: HashMap<LeaseKey, Finished>,
}

/// A lease key whose attempt has ended.
#[derive(Debug, Clone, Copy)]
struct Finished {
    /// A RUNNING value written after this revision means something still
    /// runs under the key; `u64::MAX` when its holder's own result ended
    /// it (sent once its process was gone).
    after: u64,
    /// When it is forgotten, should its expiry never reach us.
    until: Instant,
}

/// How a lease key that outlives its attempt is answered when the watch
/// shows it again ([`LeaseBook::finished_put`]).
#[derive(Debug, PartialEq, Eq)]
pub enum FinishedPut {
    /// Not a finished key: take it as usual.
    Live,
    /// A value of the ended attempt (its claim, a renewal sent before its
    /// result, our own cancel, a restarted worker's ABANDONED): nothing.
    Ignore,
    /// Renewed after it was taken for ended: ask what runs there to stop.
    StillRuns,
}

impl LeaseBook {
    // ----- workers -----

    /// Takes a worker's advert; returns whether placement sees it change
    /// (a new worker, or one whose capacity moved).
    pub fn advert(&mut self, advert: WorkerAdvert, at: Instant) -> bool {
        let changed = self
            .workers
            .get(&advert.name)
            .is_none_or(|old| capacity_changed(old, &advert));
        self.seen.insert(advert.name.clone(), at);
        self.workers.insert(advert.name.clone(), advert);
        changed
    }

    /// Whether an expiry of `name`'s advert seen at `now` came when its TTL
    /// said (a worker that stopped heartbeating) rather than late (the
    /// servers could not store, or expire, anything for a while).
    pub fn expired_on_time(&self, name: &WorkerId, now: Instant) -> bool {
        match (self.workers.get(name), self.seen.get(name)) {
            (Some(a), Some(&seen)) => {
                now.saturating_duration_since(seen) <= a.ttl.0.saturating_add(EXPIRY_SLACK)
            }
            _ => false,
        }
    }

    pub fn worker_gone(&mut self, name: &WorkerId) {
        self.workers.remove(name);
        self.seen.remove(name);
    }

    /// The live leases a worker holds.
    pub fn leases_of(&self, worker: &WorkerId) -> Vec<(LeaseKey, LiveLease)> {
        self.live
            .iter()
            .filter(|(_, l)| &l.lease.worker == worker)
            .map(|(k, l)| (k.clone(), l.clone()))
            .collect()
    }

    pub fn worker(&self, name: &WorkerId) -> Option<&WorkerAdvert> {
        self.workers.get(name)
    }

    pub fn workers(&self) -> impl Iterator<Item = &WorkerAdvert> {
        self.workers.values()
    }

    /// Up to `limit` adverts in name order, after `after` if given.
    pub fn workers_page(&self, after: Option<WorkerId>, limit: usize) -> Vec<WorkerAdvert> {
        match after {
            Some(a) => self
                .workers
                .range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
                .take(limit)
                .map(|(_, w)| w.clone())
                .collect(),
            None => self.workers.values().take(limit).cloned().collect(),
        }
    }

    /// The tasks whose live lease holds each GPU of `workers`, keyed by
    /// (worker, GPU uuid): one pass over the leases.
    pub fn gpu_holders(
        &self,
        workers: &HashSet<&WorkerId>,
    ) -> HashMap<(WorkerId, GpuUuid), Vec<TaskId>> {
        let mut held: HashMap<(WorkerId, GpuUuid), Vec<TaskId>> = HashMap::new();
        for l in self.live.values().map(|l| &l.lease) {
            if !workers.contains(&l.worker)
                || matches!(l.state, LeaseState::Rejected | LeaseState::Abandoned)
            {
                continue;
            }
            for g in &l.held().gpus {
                held.entry((l.worker.clone(), g.uuid.clone()))
                    .or_default()
                    .push(l.task_id.clone());
            }
        }
        for tasks in held.values_mut() {
            tasks.sort();
        }
        held
    }

    // ----- leases -----

    pub fn get(&self, key: &LeaseKey) -> Option<&LiveLease> {
        self.live.get(key)
    }

    pub fn contains(&self, key: &LeaseKey) -> bool {
        self.live.contains_key(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&LeaseKey, &LiveLease)> {
        self.live.iter()
    }

    /// Takes a lease as the watch saw it; returns false (and keeps what it
    /// had) for an older revision redelivered.
    pub fn put(&mut self, key: &LeaseKey, rev: u64, lease: Lease) -> bool {
        match self.live.get_mut(key) {
            Some(known) if known.rev > rev => false,
            Some(known) => {
                *known = LiveLease { rev, lease };
                true
            }
            None => {
                self.live.insert(key.clone(), LiveLease { rev, lease });
                true
            }
        }
    }

    /// A reservation we are about to write: live at once (in flight).
    pub fn reserve(&mut self, key: LeaseKey, lease: Lease) {
        self.live.insert(key, LiveLease { rev: 0, lease });
    }

    pub fn remove(&mut self, key: &LeaseKey) -> Option<LiveLease> {
        self.live.remove(key)
    }

    // ----- finished: ended attempts whose key has not expired -----

    /// The attempt under `key` has ended: it holds nothing from now on,
    /// and the watch's later values of the key are not taken as live (see
    /// [`FinishedPut`]). `after`: the revision past which a RUNNING value
    /// means the attempt still runs (`u64::MAX`: never, for an attempt
    /// ended by its holder's result). Forgotten when the key expires or
    /// is removed, or at `now + ttl` at the latest.
    pub fn finish(&mut self, key: &LeaseKey, after: u64, now: Instant, ttl: Duration) {
        self.live.remove(key);
        self.finished.insert(
            key.clone(),
            Finished {
                after,
                until: now + ttl,
            },
        );
    }

    /// What to make of a value written under `key` at `rev`.
    pub fn finished_put(&self, key: &LeaseKey, rev: u64, state: LeaseState) -> FinishedPut {
        match self.finished.get(key) {
            None => FinishedPut::Live,
            Some(f) if rev > f.after && state == LeaseState::Running => FinishedPut::StillRuns,
            Some(_) => FinishedPut::Ignore,
        }
    }

    /// The key expired or was removed.
    pub fn forget_finished(&mut self, key: &LeaseKey) {
        self.finished.remove(key);
    }

    /// Forgets the finished keys whose expiry is overdue (a watch that
    /// missed it), so that the set stays bounded.
    pub fn expire_finished(&mut self, now: Instant) {
        self.finished.retain(|_, f| f.until > now);
    }

    /// How many keys are finished but not yet expired.
    #[cfg(test)]
    pub fn finished_len(&self) -> usize {
        self.finished.len()
    }

    // ----- released, awaiting the result -----

    pub fn released(&mut self, task: TaskId, at: Instant) {
        self.released.insert(task, at);
    }

    /// The attempt ended (its result came, or it was given up on).
    pub fn settled(&mut self, task: &TaskId) {
        self.released.remove(task);
    }

    /// Results could not arrive until `now`: the wait for each released
    /// lease's result starts again from here.
    pub fn restart_released_clocks(&mut self, now: Instant) {
        for at in self.released.values_mut() {
            *at = (*at).max(now);
        }
    }

    /// Forgets and returns the released tasks whose result is overdue.
    pub fn take_overdue(&mut self, now: Instant, grace: Duration) -> Vec<TaskId> {
        let overdue: Vec<TaskId> = self
            .released
            .iter()
            .filter(|(_, at)| now.duration_since(**at) > grace)
            .map(|(t, _)| t.clone())
            .collect();
        for t in &overdue {
            self.released.remove(t);
        }
        overdue
    }

    // ----- what placement sees -----

    /// The snapshot placement works on: adverts, less what every live
    /// lease holds.
    pub fn snapshot(&self) -> Vec<WorkerView> {
        self.snapshot_without(&HashSet::new())
    }

    /// The snapshot as it would be without the leases `gone`.
    pub fn snapshot_without(&self, gone: &HashSet<&LeaseKey>) -> Vec<WorkerView> {
        let mut views: Vec<WorkerView> = self
            .workers
            .values()
            .map(|a| WorkerView {
                name: a.name.clone(),
                labels: a.labels.clone(),
                draining: a.draining,
                capacity: WorkerCapacity::from_advert(a),
            })
            .collect();
        let index: HashMap<WorkerId, usize> = views
            .iter()
            .enumerate()
            .map(|(i, v)| (v.name.clone(), i))
            .collect();
        for (key, live) in &self.live {
            let l = &live.lease;
            if matches!(l.state, LeaseState::Rejected | LeaseState::Abandoned) || gone.contains(key)
            {
                continue;
            }
            let Some(&w) = index.get(&l.worker) else {
                continue;
            };
            views[w].capacity.hold(l.held());
        }
        views
    }

    /// A port from the master worker's rendezvous range that no live gang
    /// with its rank 0 there uses, searching from `start` (any number: it
    /// is taken modulo the range).
    pub fn free_rendezvous_port(&self, master: &WorkerId, start: u64) -> u16 {
        let (lo, hi) = self
            .workers
            .get(master)
            .and_then(|a| a.rendezvous_ports)
            .unwrap_or(DEFAULT_RENDEZVOUS_PORTS);
        let used: HashSet<u16> = self
            .live
            .values()
            .filter(|l| &l.lease.worker == master)
            .filter_map(|l| l.lease.rendezvous.as_ref())
            .filter(|r| r.rank == 0)
            .map(|r| r.master_port)
            .collect();
        let span = u32::from(hi - lo) + 1;
        let start = (start % u64::from(span)) as u32;
        (0..span)
            .map(|k| lo + ((start + k) % span) as u16)
            .find(|p| !used.contains(p))
            .unwrap_or(lo)
    }
}

/// Whether a new advert changes what placement sees of a worker. Small
/// swings in other processes' GPU memory (under 256 MiB) are ignored.
fn capacity_changed(old: &WorkerAdvert, new: &WorkerAdvert) -> bool {
    const NOISE: u64 = 256 << 20;
    old.instance != new.instance
        || old.draining != new.draining
        || old.cpus_milli != new.cpus_milli
        || old.memory_total != new.memory_total
        || old.labels != new.labels
        || old.gpus.len() != new.gpus.len()
        || old.gpus.iter().zip(&new.gpus).any(|(a, b)| {
            a.uuid != b.uuid
                || a.memory_total != b.memory_total
                || a.memory_unmanaged.0.abs_diff(b.memory_unmanaged.0) > NOISE
        })
}
