//! Promises to workers heard alive over core NATS.
//!
//! While a stream elects a leader (a server node died), no worker can
//! store its advert, and a worker that cannot tell that from being cut off
//! itself would stop its tasks before its advert may expire (see
//! `worker/src/fence.rs`). So a worker whose advert writes fail asks the
//! leader, over core NATS, to hear it alive (`crate::alive`); the leader's
//! answer is a promise: "I heard you at `heard`, and will not take the
//! expiry of your advert for your death before `heard` + your advert's
//! TTL". The worker counts the answer as a stored advert sent when it
//! asked, so its tasks run on while the promise lasts; a worker whose
//! server is cut off from the leader hears nothing and stops its tasks as
//! before.
//!
//! This table keeps those promises. An advert that expires while one runs
//! is not a death yet: the worker waits ([`Promises::wait`]) until its
//! promise has lapsed, and dies then only if no advert came back
//! meanwhile. A new leader does not know what its predecessor promised:
//! an earlier leader answers only until [`crate::leader::promise_reach`]
//! past its leadership's TTL, so from the new leader's start that long
//! plus the worker's TTL covers any promise made before it. A leader that
//! found no trace of an earlier one (the leader key's markers live
//! `MARKER_TTL`) knows that any earlier promise no longer than that life,
//! less the reach, has lapsed: a fresh fleet finds a dead worker at once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use gpufleet_schema::WorkerId;

#[derive(Debug)]
pub struct Promises {
    /// Until when each worker was promised (only those heard recently).
    until: HashMap<WorkerId, Instant>,
    /// What an earlier leader may have promised lasts at most this, plus
    /// the worker's TTL.
    inherited: Instant,
    /// Promises of at most this long cannot have been inherited (no
    /// earlier leader left a trace): zero unless [`Promises::no_predecessor`].
    none_inherited_upto: Duration,
    /// Our start: before any promise of ours.
    start: Instant,
    /// Workers whose advert expired while promised, with their TTL: each
    /// dies when its promise lapses, unless it advertises again.
    waiting: HashMap<WorkerId, Duration>,
}

impl Promises {
    /// The table of a leader that started at `start`, after leaders whose
    /// promises reach `reach` past their leadership.
    pub fn new(start: Instant, reach: Duration) -> Promises {
        Promises {
            until: HashMap::new(),
            inherited: start + reach,
            none_inherited_upto: Duration::ZERO,
            start,
            waiting: HashMap::new(),
        }
    }

    /// No trace of an earlier leader was found: none answered within
    /// `trace_life` (how long the leader key's markers live) before our
    /// start, so its promises, made at most `reach` past its leadership
    /// and lasting the worker's TTL, have lapsed if that TTL is at most
    /// `trace_life - reach`.
    pub fn no_predecessor(&mut self, trace_life: Duration) {
        self.none_inherited_upto = trace_life.saturating_sub(self.inherited - self.start);
    }

    /// `worker` was heard alive at `heard` and promised `ttl`.
    pub fn heard(&mut self, worker: WorkerId, heard: Instant, ttl: Duration) {
        let until = heard + ttl;
        let at = self.until.entry(worker).or_insert(until);
        *at = (*at).max(until);
    }

    /// Until when `worker` (whose advert lives `ttl`) is promised, by us
    /// or by an earlier leader.
    pub fn until(&self, worker: &WorkerId, ttl: Duration) -> Instant {
        let inherited = if ttl <= self.none_inherited_upto {
            self.start
        } else {
            self.inherited + ttl
        };
        self.until
            .get(worker)
            .map_or(inherited, |&u| u.max(inherited))
    }

    /// Whether `worker`'s promise still runs at `now`.
    pub fn holds(&self, worker: &WorkerId, ttl: Duration, now: Instant) -> bool {
        now < self.until(worker, ttl)
    }

    /// `worker`'s advert expired while promised: its death waits.
    pub fn wait(&mut self, worker: WorkerId, ttl: Duration) {
        self.waiting.insert(worker, ttl);
    }

    /// `worker` advertises again: it is not waiting to die.
    pub fn advertised(&mut self, worker: &WorkerId) {
        self.waiting.remove(worker);
    }

    /// The waiting workers whose promise has lapsed by `now` (taken out of
    /// the wait); and forgets promises that ran out.
    pub fn lapsed(&mut self, now: Instant) -> Vec<WorkerId> {
        let mut out: Vec<WorkerId> = self
            .waiting
            .iter()
            .filter(|(w, &ttl)| !self.holds(w, ttl, now))
            .map(|(w, _)| w.clone())
            .collect();
        out.sort();
        for w in &out {
            self.waiting.remove(w);
        }
        self.until.retain(|_, u| *u > now);
        out
    }

    /// How many workers hold a promise or wait (for the tests and metrics).
    #[cfg(test)]
    pub fn len(&self) -> (usize, usize) {
        (self.until.len(), self.waiting.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn w(name: &str) -> WorkerId {
        WorkerId::new(name).unwrap()
    }

    #[test]
    fn a_promise_lasts_the_ttl_from_when_the_worker_was_heard() {
        let t0 = Instant::now();
        let mut p = Promises::new(t0, 6 * S);
        let ttl = 10 * S;
        // Before anything is heard, an earlier leader's promises may run:
        // 6 s of reach past our start, plus the TTL.
        assert!(p.holds(&w("a"), ttl, t0 + 15 * S));
        assert!(!p.holds(&w("a"), ttl, t0 + 16 * S));
        p.heard(w("a"), t0 + 20 * S, ttl);
        assert!(p.holds(&w("a"), ttl, t0 + 29 * S));
        assert!(!p.holds(&w("a"), ttl, t0 + 30 * S));
        // An older hearing arriving late shortens nothing.
        p.heard(w("a"), t0 + 18 * S, ttl);
        assert!(p.holds(&w("a"), ttl, t0 + 29 * S));
        // Another worker was not heard.
        assert!(!p.holds(&w("b"), ttl, t0 + 20 * S));
    }

    #[test]
    fn a_first_leader_inherits_no_promise_that_the_trace_s_life_covers() {
        let t0 = Instant::now();
        let mut p = Promises::new(t0, 10 * S);
        p.no_predecessor(60 * S);
        // 10 s of reach + a 50 s TTL fit in the 60 s trace: nothing inherited.
        assert!(!p.holds(&w("a"), 10 * S, t0));
        assert!(!p.holds(&w("a"), 50 * S, t0));
        // A longer TTL might outlast the trace: kept as before.
        assert!(p.holds(&w("a"), 51 * S, t0 + 60 * S));
        assert!(!p.holds(&w("a"), 51 * S, t0 + 61 * S));
        // Our own promises hold as ever.
        p.heard(w("a"), t0 + 5 * S, 10 * S);
        assert!(p.holds(&w("a"), 10 * S, t0 + 14 * S));
        assert!(!p.holds(&w("a"), 10 * S, t0 + 15 * S));
    }

    #[test]
    fn a_worker_whose_advert_expired_while_promised_dies_when_the_promise_lapses() {
        let t0 = Instant::now();
        let mut p = Promises::new(t0, Duration::ZERO);
        let ttl = 10 * S;
        p.heard(w("a"), t0 + 20 * S, ttl);
        p.heard(w("b"), t0 + 20 * S, ttl);
        p.wait(w("a"), ttl);
        p.wait(w("b"), ttl);
        assert!(p.lapsed(t0 + 25 * S).is_empty());
        // `a` is heard again: it waits longer; `b` advertises again.
        p.heard(w("a"), t0 + 26 * S, ttl);
        p.advertised(&w("b"));
        assert!(p.lapsed(t0 + 30 * S).is_empty());
        assert_eq!(p.lapsed(t0 + 36 * S), vec![w("a")]);
        // Nothing waits, and the promises that ran out are forgotten.
        assert!(p.lapsed(t0 + 100 * S).is_empty());
        assert_eq!(p.len(), (0, 0));
    }
}
