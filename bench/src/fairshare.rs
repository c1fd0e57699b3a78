//! Fair share over time: the coordinator's own engine (its real queue
//! policy and placement) on simulated time, with workers simulated at its
//! inputs: each reservation is claimed at once and ends after the task's
//! run time. Two users share the GPUs: alice fills the fleet with many
//! tasks first, bob comes later with fewer, which end before alice's; the
//! scenario samples how many GPUs each holds, against what their weights
//! say.
//!
//! No NATS, no processes: what this measures is the policy, not the
//! plumbing (the end-to-end test `tests/tests/scheduling.rs` covers that).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use gpufleet_coordinator::engine::{ApiCall, Caller, Engine, Feed, Input, LeaseChange, Now, Reply};
use gpufleet_coordinator::CoordinatorConfig;
use gpufleet_schema::policy::{SchedPolicy, UserPolicy};
use gpufleet_schema::{
    Encoding, Event, EventBody, JobId, JobSpec, Lease, LeaseState, Sender, TaskOutcome, TaskState,
    UserId,
};
use time::OffsetDateTime;

pub struct Settings {
    /// Workers of 8 GPUs each (as the scale scenario's).
    pub workers: usize,
    /// alice's weight, bob's.
    pub weights: (f64, f64),
    /// Each task runs this long, give or take a third (so that they do
    /// not all end together).
    pub task: Duration,
    /// When bob submits.
    pub bob_at: Duration,
    /// How many tasks alice submits, and bob.
    pub tasks: (usize, usize),
    pub until: Duration,
    pub sample_every: Duration,
}

/// One sample: seconds since the start, GPUs alice and bob hold.
pub struct Sample {
    pub at: u64,
    pub alice: u64,
    pub bob: u64,
}

pub struct Outcome {
    pub samples: Vec<Sample>,
    pub gpus: u64,
    /// The GPUs each would hold by the weights, while both wait.
    pub fair: (f64, f64),
}

/// `n` one-GPU tasks as one job, from `who`.
fn submit(engine: &mut Engine, now: Now, who: &str, n: usize) -> anyhow::Result<JobId> {
    let task = r#"{"command": ["train"], "resources": {"gpus": 1}}"#;
    let json = format!(
        r#"{{"max_retries": 0, "tasks": [{}]}}"#,
        vec![task; n].join(",")
    );
    let spec: JobSpec = Encoding::Json.decode(json.as_bytes())?;
    let caller = Caller {
        user: UserId::new(who)?,
        admin: false,
    };
    let (tx, _rx) = tokio::sync::oneshot::channel();
    engine.handle(Input::Api(ApiCall::Submit(Box::new(spec)), caller, tx), now);
    let fx = engine.take_effects();
    let id = fx
        .replies
        .into_iter()
        .find_map(|(_, r, _)| match r {
            Reply::Submit(s) => Some(s.job_id),
            _ => None,
        })
        .ok_or_else(|| anyhow::anyhow!("the submit was refused"))?;
    engine.handle(Input::Stored(id.clone()), now);
    Ok(id)
}

pub fn run(s: &Settings) -> anyhow::Result<Outcome> {
    let start = Now {
        mono: Instant::now(),
        wall: OffsetDateTime::now_utc(),
    };
    let mut policy = SchedPolicy::default();
    for (who, w) in [("alice", s.weights.0), ("bob", s.weights.1)] {
        policy.users.insert(
            UserId::new(who)?,
            UserPolicy {
                weight: Some(w),
                quota: Default::default(),
                preempt_priority: None,
            },
        );
    }
    let cfg = CoordinatorConfig {
        scheduling: policy,
        ..Default::default()
    };
    let mut engine = Engine::new(cfg, start, 7);
    let mut gpus = 0;
    for i in 0..s.workers {
        let a = crate::scale::advert(i, start.wall);
        gpus += a.gpus.len() as u64;
        engine.handle(Input::Advert(Box::new(a)), start);
    }
    for f in [Feed::Workers, Feed::Leases, Feed::Events] {
        engine.handle(Input::Synced(f), start);
    }
    submit(&mut engine, start, "alice", s.tasks.0)?;
    let mut bob_submitted = false;
    // Running tasks: when each ends, with its lease.
    let mut running: BTreeMap<(Duration, u64), (String, Lease)> = BTreeMap::new();
    let mut rev = 0u64;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut samples = Vec::new();
    let step = Duration::from_millis(500);
    let mut t = Duration::ZERO;
    let mut next_sample = Duration::ZERO;
    while t <= s.until {
        let now = start.after(t);
        if !bob_submitted && t >= s.bob_at {
            submit(&mut engine, now, "bob", s.tasks.1)?;
            bob_submitted = true;
        }
        // What ends by now: its result, then the release of its lease.
        while let Some((&(end, k), _)) = running.iter().next() {
            if end > t {
                break;
            }
            let (key, lease) = running.remove(&(end, k)).expect("just seen");
            let event = Event {
                job_id: lease.job_id.clone(),
                task_id: lease.task_id.clone(),
                attempt: lease.attempt,
                worker: Some(lease.worker.clone()),
                lease_rev: Some(k),
                token: Some(lease.token.clone()),
                at: now.wall,
                body: EventBody::Result(TaskOutcome {
                    state: TaskState::Succeeded,
                    exit_code: Some(0),
                    signal: None,
                    result: None,
                    error: None,
                    artifacts: vec![],
                    started_at: Some(now.wall),
                    finished_at: now.wall,
                    usage: None,
                }),
            };
            rev += 1;
            engine.handle(
                Input::Result {
                    seq: rev,
                    event: Box::new(event),
                    sender: Sender::Worker(lease.worker.clone()),
                },
                now,
            );
            engine.handle(Input::Lease(LeaseChange::Released { key }), now);
        }
        engine.handle(Input::Tick, now);
        engine.schedule_if_needed(now);
        // Every reservation is claimed at once.
        for (key, mut lease) in engine.take_effects().create_leases {
            rev += 1;
            lease.state = LeaseState::Running;
            lease.instance = Some("sim".into());
            engine.handle(
                Input::Lease(LeaseChange::Put {
                    key: key.clone(),
                    rev,
                    lease: Box::new(lease.clone()),
                }),
                now,
            );
            // SplitMix64 steps: run times spread over ±1/3.
            rng = rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let spread = (rng >> 40) as f64 / (1u64 << 24) as f64;
            let run = s.task.mul_f64(2.0 / 3.0 + spread * 2.0 / 3.0);
            running.insert((t + run, rev), (key, lease));
        }
        if t >= next_sample {
            let (mut alice, mut bob) = (0, 0);
            for (_, l) in running.values() {
                match l.owner.as_str() {
                    "alice" => alice += 1,
                    _ => bob += 1,
                }
            }
            samples.push(Sample {
                at: t.as_secs(),
                alice,
                bob,
            });
            next_sample += s.sample_every;
        }
        t += step;
    }
    let sum = s.weights.0 + s.weights.1;
    Ok(Outcome {
        samples,
        gpus,
        fair: (
            gpus as f64 * s.weights.0 / sum,
            gpus as f64 * s.weights.1 / sum,
        ),
    })
}

/// The samples as an ASCII chart: one line per sample, `a` for each GPU
/// alice holds, `b` for bob's, `|` where the weights put the split.
pub fn chart(o: &Outcome) -> String {
    let split = o.fair.0.round() as usize;
    let mut out = String::new();
    for s in &o.samples {
        let mut bar: Vec<char> = std::iter::repeat_n('a', s.alice as usize)
            .chain(std::iter::repeat_n('b', s.bob as usize))
            .chain(std::iter::repeat_n(
                '.',
                (o.gpus - s.alice - s.bob) as usize,
            ))
            .collect();
        bar.insert(split.min(bar.len()), '|');
        out.push_str(&format!(
            "{:>5}s {} alice {:>2} bob {:>2}\n",
            s.at,
            bar.into_iter().collect::<String>(),
            s.alice,
            s.bob
        ));
    }
    out
}
