//! Fair share and quotas: which user's work a scheduling pass tries next,
//! and what a user (or its group) may not exceed.
//!
//! - **Usage** is what a task asks for (whole GPUs, GPU memory, CPUs, host
//!   memory, one task), counted while it is reserved or running. It is
//!   read from the task's spec, not from its grant, so that a quota means
//!   the same whichever worker a task lands on.
//! - **Fair share** is weighted dominant-resource fairness: a user's share
//!   is the largest fraction of any one of the fleet's resources (GPUs,
//!   GPU memory, CPUs, memory) its work holds, divided by its weight.
//!   Among users with waiting work, the next placement goes to the one
//!   with the smallest share (ties: the older waiting job). Within a user,
//!   priority then submission order decide.
//! - **Quotas** cap what a user, and all the members of a group together,
//!   hold at once; work that would exceed one waits, with a reason naming
//!   the quota.
//!
//! No clock, no NATS: the engine gives it usage and capacity, and asks.

use std::collections::HashMap;

use gpufleet_schema::policy::{Quota, SchedPolicy};
use gpufleet_schema::{GpuRequest, Resources, UserId};

use crate::placement::WorkerView;

/// What work holds (or asks for), in the units quotas count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub gpus: u64,
    pub gpu_memory: u64,
    pub cpus_milli: u64,
    pub memory: u64,
    pub tasks: u64,
}

impl Usage {
    /// What one task of these resources holds.
    pub fn of(r: &Resources) -> Usage {
        let (gpus, gpu_memory) = match r.gpu_request() {
            GpuRequest::None => (0, 0),
            GpuRequest::Whole { count, memory } => {
                (u64::from(count), u64::from(count).saturating_mul(memory))
            }
            GpuRequest::Share { memory } => (0, memory),
        };
        Usage {
            gpus,
            gpu_memory,
            cpus_milli: r.cpus_milli(),
            memory: r.memory_bytes(),
            tasks: 1,
        }
    }

    pub fn add(&mut self, o: &Usage) {
        self.gpus = self.gpus.saturating_add(o.gpus);
        self.gpu_memory = self.gpu_memory.saturating_add(o.gpu_memory);
        self.cpus_milli = self.cpus_milli.saturating_add(o.cpus_milli);
        self.memory = self.memory.saturating_add(o.memory);
        self.tasks = self.tasks.saturating_add(o.tasks);
    }

    /// The fleet's capacity: every worker that takes work, as if empty.
    pub fn capacity(views: &[WorkerView]) -> Usage {
        let mut c = Usage::default();
        for v in views.iter().filter(|v| !v.draining) {
            c.add(&Usage {
                gpus: v.gpus.len() as u64,
                gpu_memory: v.gpus.iter().map(|g| g.memory_total).sum(),
                cpus_milli: v.cpus_total_milli,
                memory: v.memory_total,
                tasks: 0,
            });
        }
        c
    }

    /// The largest fraction of `capacity` this is, over the resources the
    /// fleet has.
    pub fn dominant(&self, capacity: &Usage) -> f64 {
        let frac = |used: u64, total: u64| {
            if total == 0 {
                0.0
            } else {
                used as f64 / total as f64
            }
        };
        frac(self.gpus, capacity.gpus)
            .max(frac(self.gpu_memory, capacity.gpu_memory))
            .max(frac(self.cpus_milli, capacity.cpus_milli))
            .max(frac(self.memory, capacity.memory))
    }
}

/// The policy in force, with each user's groups looked up once.
#[derive(Debug, Clone)]
pub struct Shares {
    policy: SchedPolicy,
    /// Group names, in the policy's order; indexes below are into this.
    groups: Vec<String>,
    groups_of: HashMap<UserId, Vec<usize>>,
}

impl Shares {
    pub fn new(policy: SchedPolicy) -> Shares {
        let groups: Vec<String> = policy.groups.keys().cloned().collect();
        let mut groups_of: HashMap<UserId, Vec<usize>> = HashMap::new();
        for (i, g) in policy.groups.values().enumerate() {
            for m in &g.members {
                let of = groups_of.entry(m.clone()).or_default();
                if !of.contains(&i) {
                    of.push(i);
                }
            }
        }
        Shares {
            policy,
            groups,
            groups_of,
        }
    }

    pub fn policy(&self) -> &SchedPolicy {
        &self.policy
    }

    pub fn weight(&self, user: &UserId) -> f64 {
        self.policy.weight(user)
    }

    /// An empty ledger for this policy's groups.
    pub fn ledger(&self) -> Ledger {
        Ledger {
            users: HashMap::new(),
            groups: vec![Usage::default(); self.groups.len()],
        }
    }

    /// Why `user` may not take `ask` more on top of what `ledger` says it
    /// (and its groups) hold; `None` if it may.
    pub fn over_quota(&self, user: &UserId, ledger: &Ledger, ask: &Usage) -> Option<String> {
        if let Some(p) = self.policy.users.get(user) {
            let held = ledger.users.get(user).copied().unwrap_or_default();
            if let Some(why) = exceeds(&p.quota, &held, ask) {
                return Some(format!("over quota: user {user} {why}"));
            }
        }
        if self.groups_of.is_empty() {
            return None;
        }
        for &g in self.groups_of.get(user).map_or(&[][..], Vec::as_slice) {
            let quota = &self.policy.groups[&self.groups[g]].quota;
            if let Some(why) = exceeds(quota, &ledger.groups[g], ask) {
                return Some(format!(
                    "over quota: group {} (of user {user}) {why}",
                    self.groups[g]
                ));
            }
        }
        None
    }

    /// `user`'s weighted dominant share of `capacity`.
    pub fn share(&self, user: &UserId, ledger: &Ledger, capacity: &Usage) -> f64 {
        let held = ledger.users.get(user).copied().unwrap_or_default();
        held.dominant(capacity) / self.weight(user)
    }
}

/// Which limit of `q` holding `held` plus `ask` would break, said for a
/// reason.
fn exceeds(q: &Quota, held: &Usage, ask: &Usage) -> Option<String> {
    let over = |max: Option<u64>, held: u64, ask: u64| {
        max.filter(|&m| ask > 0 && held.saturating_add(ask) > m)
    };
    if let Some(m) = over(q.max_gpus, held.gpus, ask.gpus) {
        return Some(format!(
            "max_gpus {m} (holds {}, asks {})",
            held.gpus, ask.gpus
        ));
    }
    let gpu_mem = q.max_gpu_memory.map(|b| b.0);
    if let Some(m) = over(gpu_mem, held.gpu_memory, ask.gpu_memory) {
        return Some(format!(
            "max_gpu_memory {} (holds {}, asks {})",
            gpufleet_schema::ByteSize(m),
            gpufleet_schema::ByteSize(held.gpu_memory),
            gpufleet_schema::ByteSize(ask.gpu_memory)
        ));
    }
    let cpus = q.max_cpus.map(|c| (c * 1000.0).round() as u64);
    if let Some(m) = over(cpus, held.cpus_milli, ask.cpus_milli) {
        return Some(format!(
            "max_cpus {} (holds {}, asks {})",
            m as f64 / 1000.0,
            held.cpus_milli as f64 / 1000.0,
            ask.cpus_milli as f64 / 1000.0
        ));
    }
    if let Some(m) = over(q.max_running, held.tasks, ask.tasks) {
        return Some(format!(
            "max_running {m} (runs {}, asks {})",
            held.tasks, ask.tasks
        ));
    }
    None
}

/// What each user, and each group, holds: built from the live leases at
/// the start of a pass and added to as the pass places.
#[derive(Debug, Clone)]
pub struct Ledger {
    users: HashMap<UserId, Usage>,
    groups: Vec<Usage>,
}

impl Ledger {
    pub fn add(&mut self, shares: &Shares, user: &UserId, u: &Usage) {
        match self.users.get_mut(user) {
            Some(held) => held.add(u),
            None => {
                self.users.insert(user.clone(), *u);
            }
        }
        if shares.groups_of.is_empty() {
            return;
        }
        for &g in shares.groups_of.get(user).map_or(&[][..], Vec::as_slice) {
            self.groups[g].add(u);
        }
    }

    #[cfg(test)]
    pub fn user(&self, user: &UserId) -> Usage {
        self.users.get(user).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_schema::policy::{GroupPolicy, UserPolicy};
    use gpufleet_schema::Encoding;
    use proptest::prelude::*;

    fn user(n: &str) -> UserId {
        UserId::new(n).unwrap()
    }

    fn gpus(n: u32) -> Usage {
        Usage::of(
            &Encoding::Json
                .decode(format!(r#"{{"gpus": {n}, "cpus": 1}}"#).as_bytes())
                .unwrap(),
        )
    }

    fn policy(json: &str) -> Shares {
        let p: SchedPolicy = Encoding::Json.decode(json.as_bytes()).unwrap();
        p.validate().unwrap();
        Shares::new(p)
    }

    #[test]
    fn a_quota_names_itself_and_a_group_sums_its_members() {
        let s = policy(
            r#"{"users": {"alice": {"quota": {"max_gpus": 2}}},
                "groups": {"ml": {"members": ["alice", "bob"], "quota": {"max_running": 3}}}}"#,
        );
        let mut l = s.ledger();
        assert_eq!(s.over_quota(&user("alice"), &l, &gpus(2)), None);
        l.add(&s, &user("alice"), &gpus(2));
        let why = s.over_quota(&user("alice"), &l, &gpus(1)).unwrap();
        assert_eq!(why, "over quota: user alice max_gpus 2 (holds 2, asks 1)");
        // CPU-only work is not held back by a GPU quota.
        assert_eq!(s.over_quota(&user("alice"), &l, &gpus(0)), None);
        l.add(&s, &user("bob"), &gpus(0));
        l.add(&s, &user("bob"), &gpus(0));
        let why = s.over_quota(&user("bob"), &l, &gpus(0)).unwrap();
        assert!(why.starts_with("over quota: group ml (of user bob) max_running 3"));
        // Carol is in no group and has no quota.
        assert_eq!(s.over_quota(&user("carol"), &l, &gpus(8)), None);
    }

    #[test]
    fn a_share_is_the_dominant_fraction_over_the_weight() {
        let s = policy(r#"{"users": {"alice": {"weight": 2}}}"#);
        let cap = Usage {
            gpus: 8,
            gpu_memory: 0,
            cpus_milli: 64_000,
            memory: 1 << 40,
            tasks: 0,
        };
        let mut l = s.ledger();
        l.add(&s, &user("alice"), &gpus(4));
        // 32 CPUs of 64 dominate 1 GPU of 8.
        let mut cpu_heavy = gpus(1);
        cpu_heavy.cpus_milli = 32_000;
        l.add(&s, &user("bob"), &cpu_heavy);
        assert_eq!(s.share(&user("alice"), &l, &cap), 0.25);
        assert_eq!(s.share(&user("bob"), &l, &cap), 0.5);
    }

    /// A fleet of `gpus` one-GPU slots, users with `weights` and always
    /// more work than fits; every step one task ends (the oldest) and the
    /// freed slot goes to the user with the smallest share, as a pass
    /// gives it. Returns each user's slots at the end.
    fn churn(gpus_total: u64, weights: &[f64], steps: usize) -> Vec<u64> {
        let users: Vec<UserId> = (0..weights.len()).map(|i| user(&format!("u{i}"))).collect();
        let mut p = SchedPolicy::default();
        for (u, w) in users.iter().zip(weights) {
            p.users.insert(
                u.clone(),
                UserPolicy {
                    weight: Some(*w),
                    quota: Quota::default(),
                    preempt_priority: None,
                },
            );
        }
        let s = Shares::new(p);
        let cap = Usage {
            gpus: gpus_total,
            ..Default::default()
        };
        // User 0 got there first and holds everything.
        let mut running: std::collections::VecDeque<usize> =
            std::iter::repeat_n(0, gpus_total as usize).collect();
        let mut held = vec![0u64; users.len()];
        held[0] = gpus_total;
        for _ in 0..steps {
            let done = running.pop_front().unwrap();
            held[done] -= 1;
            let mut l = s.ledger();
            for (u, &h) in users.iter().zip(&held) {
                l.add(
                    &s,
                    u,
                    &Usage {
                        gpus: h,
                        ..Default::default()
                    },
                );
            }
            let next = (0..users.len())
                .min_by(|&a, &b| {
                    s.share(&users[a], &l, &cap)
                        .total_cmp(&s.share(&users[b], &l, &cap))
                })
                .unwrap();
            held[next] += 1;
            running.push_back(next);
        }
        held
    }

    #[test]
    fn two_equal_users_end_with_half_each() {
        assert_eq!(churn(16, &[1.0, 1.0], 16), vec![8, 8]);
    }

    proptest! {
        /// Whatever the weights, once every slot has turned over a few
        /// times (starting from one user holding everything), the split
        /// is the weighted one as closely as whole slots allow: nobody's
        /// weighted share is above another's but for its last slot, so
        /// each user is within a slot per other user of its exact part.
        #[test]
        fn fair_share_converges_to_the_weights(
            gpus_total in 4u64..64,
            weights in proptest::collection::vec(1u32..5, 2..5),
        ) {
            let w: Vec<f64> = weights.iter().map(|&w| f64::from(w)).collect();
            let held = churn(gpus_total, &w, gpus_total as usize * 4);
            let sum: f64 = w.iter().sum();
            for i in 0..w.len() {
                let want = gpus_total as f64 * w[i] / sum;
                let off = (held[i] as f64 - want).abs();
                prop_assert!(off <= (w.len() - 1) as f64, "held {held:?}, weights {w:?}");
                for j in 0..w.len() {
                    let over = (held[i] as f64 - 1.0) / w[i] - held[j] as f64 / w[j];
                    prop_assert!(over <= 1e-9, "held {held:?}, weights {w:?}");
                }
            }
        }

        /// Adding work one task at a time, always asking first, never
        /// takes a user or a group past any of its limits.
        #[test]
        fn quotas_are_never_exceeded(
            asks in proptest::collection::vec((0usize..3, 0u32..4, 1u32..4), 1..200),
            max_gpus in 0u64..8,
            max_running in 0u64..10,
            group_cpus in 1u32..20,
        ) {
            let users = [user("a"), user("b"), user("c")];
            let mut p = SchedPolicy::default();
            p.users.insert(users[0].clone(), UserPolicy {
                weight: None,
                quota: Quota { max_gpus: Some(max_gpus), max_running: Some(max_running), ..Default::default() },
                preempt_priority: None,
            });
            p.groups.insert("g".into(), GroupPolicy {
                members: vec![users[1].clone(), users[2].clone()],
                quota: Quota { max_cpus: Some(f64::from(group_cpus)), ..Default::default() },
                preempt_priority: None,
            });
            let s = Shares::new(p);
            let mut l = s.ledger();
            for (u, g, c) in asks {
                let mut ask = gpus(g);
                ask.cpus_milli = u64::from(c) * 1000;
                if s.over_quota(&users[u], &l, &ask).is_none() {
                    l.add(&s, &users[u], &ask);
                }
                let a = l.user(&users[0]);
                prop_assert!(a.gpus <= max_gpus && a.tasks <= max_running);
                let g = l.user(&users[1]).cpus_milli + l.user(&users[2]).cpus_milli;
                prop_assert!(g <= u64::from(group_cpus) * 1000);
            }
        }
    }
}
