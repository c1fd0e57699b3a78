use super::*;
use gpufleet_schema::capacity::GpuCapacity;
use proptest::prelude::*;

const GIB: u64 = 1 << 30;

fn worker(name: &str, cpus: u64, gpus: &[u64]) -> WorkerView {
    WorkerView {
        name: WorkerId::new(name).unwrap(),
        labels: BTreeMap::new(),
        draining: false,
        capacity: WorkerCapacity::new(
            cpus * 1000,
            64 * GIB,
            gpus.iter()
                .enumerate()
                .map(|(i, &m)| {
                    GpuCapacity::new(i as u32, format!("GPU-{name}-{i}").into(), m * GIB, 0)
                })
                .collect(),
        ),
    }
}

fn task(gpu: GpuRequest) -> TaskRequest {
    TaskRequest {
        cpus_milli: 1000,
        memory: 0,
        gpu,
        labels: BTreeMap::new(),
        workers: vec![],
        avoid: vec![],
        load: None,
    }
}

fn whole(count: u32, gib: u64) -> TaskRequest {
    task(GpuRequest::Whole {
        count,
        memory: gib * GIB,
    })
}

fn share(gib: u64) -> TaskRequest {
    task(GpuRequest::Share { memory: gib * GIB })
}

#[test]
fn reason_names_the_gpu_shortfall() {
    let mut ws = vec![worker("a", 8, &[24, 24]), worker("b", 8, &[80])];
    let p = place(&[whole(4, 0)], &mut ws);
    assert!(p.assigned.is_empty());
    assert_eq!(
        p.unplaced[0].reason,
        "no worker has 4 GPUs; the largest has 2"
    );
    assert!(p.unplaced[0].never_fits);
}

#[test]
fn reason_for_no_workers_and_busy_workers() {
    let p = place(&[whole(1, 0)], &mut []);
    assert_eq!(p.unplaced[0].reason, "no workers are online");
    let mut ws = vec![worker("a", 8, &[24])];
    let p = place(&[whole(1, 0), whole(1, 0)], &mut ws);
    assert_eq!(p.assigned.len(), 1);
    assert!(!p.unplaced[0].never_fits);
    assert!(
        p.unplaced[0].reason.starts_with("waiting for free GPUs"),
        "{}",
        p.unplaced[0].reason
    );
}

#[test]
fn whole_gpus_go_to_the_smallest_that_fits() {
    // Keep the 80 GiB card whole for work that needs it.
    let mut ws = vec![worker("a", 8, &[80, 24, 40])];
    let p = place(&[whole(1, 20)], &mut ws);
    assert_eq!(p.assigned[0].grant.gpus[0].index, 1);
    let p = place(&[whole(1, 30)], &mut ws);
    assert_eq!(p.assigned[0].grant.gpus[0].index, 2);
    let p = place(&[whole(1, 30)], &mut ws);
    assert_eq!(p.assigned[0].grant.gpus[0].index, 0);
    let p = place(&[whole(1, 1)], &mut ws);
    assert!(p.assigned.is_empty());
}

#[test]
fn shares_stack_on_a_shared_gpu_before_touching_an_idle_one() {
    let mut ws = vec![worker("a", 8, &[24, 24])];
    let p = place(&[share(8), share(8), share(8)], &mut ws);
    let gpus: Vec<u32> = p.assigned.iter().map(|a| a.grant.gpus[0].index).collect();
    assert_eq!(gpus, vec![0, 0, 0]);
    // GPU 1 is still whole.
    let p = place(&[whole(1, 20)], &mut ws);
    assert_eq!(p.assigned[0].grant.gpus[0].index, 1);
    // GPU 0 has nothing left for another 8 GiB share and GPU 1 is held whole.
    let p = place(&[share(8)], &mut ws);
    assert!(p.unplaced[0].reason.contains("free GPU memory"), "{:?}", p);
}

#[test]
fn unmanaged_gpu_memory_is_respected() {
    // Someone else's process fills 20 GiB of the first card.
    let mut ws = vec![worker("a", 8, &[24, 24])];
    ws[0].gpus[0].memory_free = 4 * GIB;
    let p = place(&[whole(1, 10)], &mut ws);
    assert_eq!(p.assigned[0].grant.gpus[0].index, 1);
}

#[test]
fn cpu_work_prefers_machines_without_gpus() {
    let mut ws = vec![worker("gpu", 8, &[24]), worker("cpu", 8, &[])];
    let p = place(&[task(GpuRequest::None)], &mut ws);
    assert_eq!(p.assigned[0].worker, 1);
}

#[test]
fn labels_named_workers_draining_and_avoided() {
    let mut ws = vec![worker("a", 8, &[24]), worker("b", 8, &[24])];
    ws[1].labels.insert("zone".into(), "x".into());
    let mut t = whole(1, 0);
    t.labels.insert("zone".into(), "x".into());
    assert_eq!(place(&[t.clone()], &mut ws.clone()).assigned[0].worker, 1);
    t.labels.insert("zone".into(), "y".into());
    let p = place(&[t], &mut ws.clone());
    assert_eq!(p.unplaced[0].reason, "no worker has the labels zone=y");

    let mut t = whole(1, 0);
    t.workers = vec![WorkerId::new("b").unwrap()];
    assert_eq!(place(&[t.clone()], &mut ws.clone()).assigned[0].worker, 1);
    t.workers = vec![WorkerId::new("zz").unwrap()];
    let p = place(&[t], &mut ws.clone());
    assert_eq!(
        p.unplaced[0].reason,
        "none of the named workers (zz) is online"
    );

    ws[0].draining = true;
    let mut t = whole(1, 0);
    t.avoid = vec![WorkerId::new("b").unwrap()];
    let p = place(&[t], &mut ws);
    assert!(p.assigned.is_empty());
    assert!(!p.unplaced[0].never_fits);
}

#[test]
fn gang_is_all_or_nothing() {
    let mut ws = vec![worker("a", 8, &[24, 24]), worker("b", 8, &[24, 24])];
    let before = ws.clone();
    let five: Vec<TaskRequest> = (0..5).map(|_| whole(1, 0)).collect();
    let p = place_gang(&five, 5, &mut ws);
    assert!(p.assigned.is_empty());
    assert_eq!(p.unplaced.len(), 5);
    assert_eq!(
        ws, before,
        "a failed gang must leave the snapshot untouched"
    );
    let p = place_gang(&five[..4], 4, &mut ws);
    assert_eq!(p.assigned.len(), 4);
    assert!(ws.iter().all(|w| w.gpus.iter().all(|g| g.exclusive)));
}

#[test]
fn gang_with_min_tasks_takes_what_fits() {
    let mut ws = vec![worker("a", 8, &[24, 24, 24])];
    let five: Vec<TaskRequest> = (0..5).map(|_| whole(1, 0)).collect();
    let p = place_gang(&five, 3, &mut ws);
    assert_eq!(p.assigned.len(), 3);
    assert_eq!(p.unplaced.len(), 2);
}

#[test]
fn a_load_phase_takes_no_gpu_where_its_gpu_phase_could_run() {
    let mut ws = vec![worker("small", 8, &[16]), worker("big", 8, &[80])];
    for w in &mut ws {
        w.capacity = w.capacity.clone().with_load_cap(10 * GIB);
    }
    let mut t = whole(1, 40);
    t.cpus_milli = 4000;
    t.memory = 16 * GIB;
    t.load = Some(LoadAsk {
        cpus_milli: 1000,
        memory: 6 * GIB,
    });
    let p = place(std::slice::from_ref(&t), &mut ws);
    let a = &p.assigned[0];
    assert_eq!(ws[a.worker].name.as_str(), "big", "only there can it train");
    assert!(a.grant.loading && a.grant.gpus.is_empty());
    assert_eq!((a.grant.cpus_milli, a.grant.memory.0), (1000, 6 * GIB));
    assert!(ws[1].gpus[0].is_idle(), "its GPU stays free while it loads");
    assert_eq!(ws[1].load_memory_free, 4 * GIB);
    // The cap holds: a second load of 6 GiB waits, saying why.
    let p = place(std::slice::from_ref(&t), &mut ws);
    assert!(p.assigned.is_empty());
    assert_eq!(
        p.unplaced[0].reason,
        "waiting for room under the load-phase memory cap: 1 of 2 workers could run it once busy resources free up"
    );
    // A load larger than any cap never fits.
    t.load = Some(LoadAsk {
        cpus_milli: 1000,
        memory: 12 * GIB,
    });
    t.memory = 16 * GIB;
    let p = place(std::slice::from_ref(&t), &mut ws);
    assert!(p.unplaced[0].never_fits);
    assert_eq!(
        p.unplaced[0].reason,
        "no worker lets a load phase hold 12GiB (load_memory_cap); the largest cap is 10GiB"
    );
}

fn arb_worker() -> impl Strategy<Value = WorkerView> {
    (
        1u64..16,
        prop::collection::vec(prop::sample::select(vec![16u64, 24, 40, 80]), 0..8),
        0u64..64,
        0u64..64,
    )
        .prop_map(|(cpus, gpus, mem, cap)| {
            let mut w = worker("w", cpus, &gpus);
            w.memory_total = mem * GIB;
            w.memory_free = mem * GIB;
            w.capacity = w.capacity.clone().with_load_cap(cap.min(mem) * GIB);
            w
        })
}

fn arb_task() -> impl Strategy<Value = TaskRequest> {
    (
        0u64..4000,
        0u64..16,
        prop_oneof![
            Just(GpuRequest::None),
            (1u32..4, 0u64..40).prop_map(|(c, m)| GpuRequest::Whole {
                count: c,
                memory: m * GIB
            }),
            (1u64..40).prop_map(|m| GpuRequest::Share { memory: m * GIB }),
        ],
        prop::option::of((0u64..=100, 0u64..=100)),
    )
        .prop_map(|(cpus, mem, gpu, load)| TaskRequest {
            cpus_milli: cpus,
            memory: mem * GIB,
            gpu,
            labels: BTreeMap::new(),
            workers: vec![],
            avoid: vec![],
            // A load phase: a part of the whole task's CPUs and memory.
            load: load
                .filter(|_| gpu != GpuRequest::None)
                .map(|(c, m)| LoadAsk {
                    cpus_milli: cpus * c / 100,
                    memory: mem * GIB * m / 100,
                }),
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// No worker or GPU is ever overcommitted, however the tasks come.
    #[test]
    fn never_overcommits(
        mut workers in prop::collection::vec(arb_worker(), 1..6),
        tasks in prop::collection::vec(arb_task(), 0..60),
    ) {
        for (i, w) in workers.iter_mut().enumerate() {
            w.name = WorkerId::new(format!("w{i}")).unwrap();
        }
        let original = workers.clone();
        let p = place(&tasks, &mut workers.clone());
        let mut cpus = vec![0u64; original.len()];
        let mut mem = vec![0u64; original.len()];
        let mut gpu_mem: BTreeMap<(usize, u32), u64> = BTreeMap::new();
        let mut gpu_excl: BTreeMap<(usize, u32), u32> = BTreeMap::new();
        let mut gpu_users: BTreeMap<(usize, u32), u32> = BTreeMap::new();
        let mut loading = vec![0u64; original.len()];
        for a in &p.assigned {
            let t = &tasks[a.task];
            cpus[a.worker] += a.grant.cpus_milli;
            mem[a.worker] += a.grant.memory.0;
            if let Some(load) = t.load {
                // A load phase holds its own part, no GPU, on a worker
                // whose totals could hold the whole task.
                prop_assert!(a.grant.loading && a.grant.gpus.is_empty());
                prop_assert_eq!((a.grant.cpus_milli, a.grant.memory.0), (load.cpus_milli, load.memory));
                prop_assert!(original[a.worker].cpus_total_milli >= t.cpus_milli);
                prop_assert!(original[a.worker].memory_total >= t.memory);
                loading[a.worker] += load.memory;
                continue;
            }
            prop_assert!(!a.grant.loading);
            prop_assert_eq!(a.grant.cpus_milli, t.cpus_milli);
            match t.gpu {
                GpuRequest::None => prop_assert!(a.grant.gpus.is_empty()),
                GpuRequest::Whole { count, memory } => {
                    prop_assert_eq!(a.grant.gpus.len(), count as usize);
                    for g in &a.grant.gpus {
                        prop_assert!(original[a.worker].gpus[g.index as usize].memory_free >= memory);
                        *gpu_excl.entry((a.worker, g.index)).or_default() += 1;
                        *gpu_users.entry((a.worker, g.index)).or_default() += 1;
                    }
                }
                GpuRequest::Share { memory } => {
                    prop_assert_eq!(a.grant.gpus.len(), 1);
                    let g = &a.grant.gpus[0];
                    *gpu_mem.entry((a.worker, g.index)).or_default() += memory;
                    *gpu_users.entry((a.worker, g.index)).or_default() += 1;
                }
            }
        }
        for (i, w) in original.iter().enumerate() {
            prop_assert!(cpus[i] <= w.cpus_total_milli);
            prop_assert!(mem[i] <= w.memory_total);
            prop_assert!(loading[i] <= w.load_memory_cap, "the load-phase cap holds");
        }
        for ((w, g), used) in &gpu_mem {
            prop_assert!(*used <= original[*w].gpus[*g as usize].memory_free);
        }
        for (key, n) in &gpu_excl {
            // A whole GPU has exactly one user.
            prop_assert_eq!(*n, 1);
            prop_assert_eq!(gpu_users[key], 1);
        }
        prop_assert_eq!(p.assigned.len() + p.unplaced.len(), tasks.len());
    }

    /// The leftovers are a fixed point for the tasks that were not placed.
    #[test]
    fn unplaced_tasks_stay_unplaced_on_the_leftovers(
        workers in prop::collection::vec(arb_worker(), 1..4),
        tasks in prop::collection::vec(arb_task(), 0..30),
    ) {
        let mut ws = workers;
        let p = place(&tasks, &mut ws);
        let unplaced: Vec<TaskRequest> = p.unplaced.iter().map(|u| tasks[u.task].clone()).collect();
        // Greedy placement only ever shrinks what is free, so a task that
        // did not fit when its turn came cannot fit on what is left.
        for t in &unplaced {
            let alone = place(std::slice::from_ref(t), &mut ws.clone());
            prop_assert!(alone.assigned.is_empty(), "a task that did not fit fits on the leftovers alone");
        }
    }

    /// The pass's index places as the plain scan does, task after task:
    /// the same worker, grant and reason, and the same leftovers, with
    /// shapes that repeat, labels, named and avoided workers, and workers
    /// masked as draining for one placement (as held workers are).
    #[test]
    fn candidates_place_as_the_plain_scan(
        workers in prop::collection::vec((arb_worker(), any::<bool>()), 1..12),
        pool in prop::collection::vec(arb_task(), 1..4),
        steps in prop::collection::vec(
            (0usize..4, any::<bool>(), prop::option::of(0usize..12), prop::option::of(0usize..12), prop::option::of(0usize..12)),
            0..60,
        ),
    ) {
        let mut plain: Vec<WorkerView> = workers
            .into_iter()
            .enumerate()
            .map(|(i, (mut w, labelled))| {
                w.name = WorkerId::new(format!("w{i}")).unwrap();
                if labelled {
                    w.labels.insert("zone".into(), "a".into());
                }
                w
            })
            .collect();
        let mut indexed = plain.clone();
        let mut candidates = Candidates::default();
        let name = |i: usize| WorkerId::new(format!("w{i}")).unwrap();
        for (pick, labelled, named, avoided, masked) in steps {
            let mut t = pool[pick % pool.len()].clone();
            if labelled {
                t.labels.insert("zone".into(), "a".into());
            }
            t.workers.extend(named.map(name));
            t.avoid.extend(avoided.map(name));
            let masked = masked.filter(|&m| m < plain.len());
            for ws in [&mut plain, &mut indexed] {
                if let Some(m) = masked {
                    ws[m].draining = true;
                }
            }
            let want = place(std::slice::from_ref(&t), &mut plain);
            let got = candidates.place(&t, &mut indexed);
            for ws in [&mut plain, &mut indexed] {
                if let Some(m) = masked {
                    ws[m].draining = false;
                }
            }
            prop_assert_eq!(&got, &want);
            prop_assert_eq!(&indexed, &plain);
        }
    }
}
