//! "Work the coordinator places is never refused", on random fleets: every
//! grant `place` and `place_gang` return for random adverts and requests is
//! accepted by the ledger of the worker that sent the advert, also next to
//! leases placed earlier. The coordinator's side is built as its snapshot
//! is (`WorkerCapacity::from_advert`, then every live lease held); the
//! worker's side from the same advert, as its heartbeat wrote it.

use std::collections::{BTreeMap, HashMap};

use gpufleet_coordinator::placement::{place, place_gang, LoadAsk, TaskRequest, WorkerView};
use gpufleet_schema::capacity::WorkerCapacity;
use gpufleet_schema::{
    subjects, ByteSize, Dur, GpuAdvert, GpuRequest, GpuUuid, Grant, LeaseKey, TaskId, WorkerAdvert,
    WorkerId,
};
use gpufleet_worker::ledger::{Capacity, Ledger};
use proptest::prelude::*;
use time::OffsetDateTime;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn advert(i: usize, cpus_milli: u64, memory: u64, gpus: Vec<(u64, u64)>) -> WorkerAdvert {
    let name = WorkerId::new(format!("w{i}")).unwrap();
    WorkerAdvert {
        instance: format!("i-{name}"),
        version: "test".into(),
        labels: BTreeMap::new(),
        addr: None,
        cpus_milli,
        memory_total: ByteSize(memory),
        memory_available: ByteSize(memory),
        // Half for load phases, as a worker offers by default.
        load_memory_cap: Some(ByteSize(memory / 2)),
        load_avg: None,
        driver_version: None,
        gpus: gpus
            .into_iter()
            .enumerate()
            .map(|(g, (total, unmanaged))| GpuAdvert {
                index: g as u32,
                uuid: format!("GPU-{name}-{g}").into(),
                model: "T".into(),
                memory_total: ByteSize(total),
                memory_used: ByteSize(unmanaged.min(total)),
                memory_free: ByteSize(total.saturating_sub(unmanaged)),
                memory_unmanaged: ByteSize(unmanaged),
                utilization: None,
                temperature: None,
                simulated: false,
                held_by: vec![],
            })
            .collect(),
        running: vec![],
        rendezvous_ports: None,
        draining: false,
        held: false,
        usage: Default::default(),
        metrics_addr: None,
        ttl: Dur::secs(10),
        started_at: OffsetDateTime::UNIX_EPOCH,
        sent_at: OffsetDateTime::UNIX_EPOCH,
        name,
    }
}

/// What the worker that sent `a` checks with: the capacity it advertises
/// and the GPU memory it saw other processes use.
fn ledger_inputs(a: &WorkerAdvert) -> (Capacity, HashMap<GpuUuid, u64>) {
    let cap = Capacity {
        cpus_milli: a.cpus_milli,
        memory: a.memory_total.0,
        load_memory_cap: a.load_memory_cap.map_or(a.memory_total.0, |c| c.0),
        gpus: a
            .gpus
            .iter()
            .map(|g| (g.uuid.clone(), g.memory_total.0))
            .collect(),
    };
    let unmanaged = a
        .gpus
        .iter()
        .map(|g| (g.uuid.clone(), g.memory_unmanaged.0))
        .collect();
    (cap, unmanaged)
}

/// The key of the `k`th lease the test holds.
fn lease(k: usize) -> LeaseKey {
    let task = TaskId::new(format!("lease-{k}")).unwrap();
    subjects::lease_key(&WorkerId::new("w").unwrap(), &task, 1)
}

/// The coordinator's snapshot: each advert, less every live grant on it.
fn snapshot(adverts: &[WorkerAdvert], live: &[(usize, Grant)]) -> Vec<WorkerView> {
    let mut views: Vec<WorkerView> = adverts
        .iter()
        .map(|a| WorkerView {
            name: a.name.clone(),
            labels: a.labels.clone(),
            draining: false,
            capacity: WorkerCapacity::from_advert(a),
        })
        .collect();
    for (w, g) in live {
        views[*w].capacity.hold(g);
    }
    views
}

fn arb_gpu() -> impl Strategy<Value = (u64, u64)> {
    prop::sample::select(vec![16u64, 24, 40, 80]).prop_flat_map(|gib| {
        // Other processes use anything from nothing to more than the card
        // has (drivers round, and a busy card may report so).
        (Just(gib * GIB), 0..=(gib * GIB + gib * GIB / 4) / MIB).prop_map(|(t, u)| (t, u * MIB))
    })
}

fn arb_adverts() -> impl Strategy<Value = Vec<WorkerAdvert>> {
    prop::collection::vec(
        (
            500u64..16_000,
            0u64..64,
            prop::collection::vec(arb_gpu(), 0..8),
        ),
        1..5,
    )
    .prop_map(|ws| {
        ws.into_iter()
            .enumerate()
            .map(|(i, (cpus, mem, gpus))| advert(i, cpus, mem * GIB, gpus))
            .collect()
    })
}

fn arb_task() -> impl Strategy<Value = TaskRequest> {
    (
        0u64..4000,
        0u64..16,
        prop_oneof![
            Just(GpuRequest::None),
            // Most whole-GPU tasks name no memory.
            (1u32..4, prop_oneof![Just(0u64), 1u64..40 * 1024]).prop_map(|(count, mib)| {
                GpuRequest::Whole {
                    count,
                    memory: mib * MIB,
                }
            }),
            (1u64..40 * 1024).prop_map(|mib| GpuRequest::Share { memory: mib * MIB }),
        ],
        prop::option::of((0u64..=100, 0u64..=100)),
    )
        .prop_map(|(cpus_milli, mem, gpu, load)| TaskRequest {
            cpus_milli,
            memory: mem * GIB,
            gpu,
            labels: BTreeMap::new(),
            workers: vec![],
            avoid: vec![],
            // A two-phase task's load phase, under the load-phase cap.
            load: load
                .filter(|_| gpu != GpuRequest::None)
                .map(|(c, m)| LoadAsk {
                    cpus_milli: cpus_milli * c / 100,
                    memory: mem * GIB * m / 100,
                }),
        })
}

/// Holds every grant in the ledger of the worker it went to; fails the
/// case on the first refusal.
fn worker_accepts(
    ledgers: &mut [Ledger],
    adverts: &[WorkerAdvert],
    grants: &[(usize, Grant)],
    first_key: usize,
) -> Result<(), TestCaseError> {
    for (k, (w, grant)) in grants.iter().enumerate() {
        let (cap, unmanaged) = ledger_inputs(&adverts[*w]);
        if let Err(reason) = ledgers[*w].try_hold(&lease(first_key + k), grant, &cap, &unmanaged) {
            return Err(TestCaseError::fail(format!(
                "worker {w} refused {grant:?} that placement granted: {reason}"
            )));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn every_grant_placement_makes_is_accepted_by_the_workers_ledger(
        adverts in arb_adverts(),
        earlier in prop::collection::vec(arb_task(), 0..20),
        gang in prop::collection::vec(arb_task(), 1..8),
        min in 1usize..8,
        later in prop::collection::vec(arb_task(), 0..20),
    ) {
        let mut ledgers: Vec<Ledger> = adverts.iter().map(|_| Ledger::default()).collect();

        // One pass places single tasks...
        let mut views = snapshot(&adverts, &[]);
        let p = place(&earlier, &mut views);
        let mut live: Vec<(usize, Grant)> =
            p.assigned.iter().map(|a| (a.worker, a.grant.clone())).collect();
        worker_accepts(&mut ledgers, &adverts, &live, 0)?;
        // ...and the next pass's snapshot, rebuilt from the adverts and the
        // leases, is what placement left: both count grants alike.
        prop_assert_eq!(&snapshot(&adverts, &live), &views);

        // A gang next to them.
        let p = place_gang(&gang, min.min(gang.len()), &mut views);
        let gang_grants: Vec<(usize, Grant)> =
            p.assigned.iter().map(|a| (a.worker, a.grant.clone())).collect();
        worker_accepts(&mut ledgers, &adverts, &gang_grants, live.len())?;
        live.extend(gang_grants);
        prop_assert_eq!(&snapshot(&adverts, &live), &views);

        // Some tasks end; the next pass places on what they freed.
        let ended: Vec<usize> = (0..live.len()).step_by(2).collect();
        for &k in &ended {
            ledgers[live[k].0].release(&lease(k));
        }
        let still: Vec<(usize, Grant)> = live
            .iter()
            .enumerate()
            .filter(|(k, _)| !ended.contains(k))
            .map(|(_, g)| g.clone())
            .collect();
        let mut views = snapshot(&adverts, &still);
        let p = place(&later, &mut views);
        let later_grants: Vec<(usize, Grant)> =
            p.assigned.iter().map(|a| (a.worker, a.grant.clone())).collect();
        worker_accepts(&mut ledgers, &adverts, &later_grants, 1000)?;
    }
}

#[test]
fn a_whole_gpu_others_report_more_memory_on_than_it_has_is_placed_and_accepted() {
    // The case that once split the two: placement gave such a GPU whole
    // (nothing free, nothing asked), the ledger refused it.
    let adverts = vec![advert(0, 4000, 8 * GIB, vec![(24 * GIB, 25 * GIB)])];
    let task = TaskRequest {
        cpus_milli: 1000,
        memory: 0,
        gpu: GpuRequest::Whole {
            count: 1,
            memory: 0,
        },
        labels: BTreeMap::new(),
        workers: vec![],
        avoid: vec![],
        load: None,
    };
    let mut views = snapshot(&adverts, &[]);
    let p = place(&[task], &mut views);
    assert_eq!(p.assigned.len(), 1, "{p:?}");
    let grants = vec![(0, p.assigned[0].grant.clone())];
    let mut ledgers = vec![Ledger::default()];
    worker_accepts(&mut ledgers, &adverts, &grants, 0).unwrap();
}
