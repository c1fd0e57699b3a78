//! Placement alone: 1,000 workers with 8 GPUs each and a mix of requests
//! (whole GPUs, GPU shares, CPU-only), placed one after another on a
//! snapshot that fills up, as the coordinator does in one pass.
//!
//! `cargo bench -p gpufleet-coordinator --bench placement`

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use gpufleet_coordinator::placement::{place, TaskRequest, WorkerView};
use gpufleet_schema::capacity::{GpuCapacity, WorkerCapacity};
use gpufleet_schema::{GpuRequest, WorkerId};

const GIB: u64 = 1 << 30;

fn fleet(n: usize) -> Vec<WorkerView> {
    (0..n)
        .map(|i| WorkerView {
            name: WorkerId::new(format!("w{i:04}")).unwrap(),
            labels: BTreeMap::from([("zone".to_string(), format!("z{}", i % 4))]),
            draining: false,
            capacity: WorkerCapacity::new(
                64_000,
                512 * GIB,
                (0..8)
                    .map(|g| {
                        let size = if i % 3 == 0 { 80 * GIB } else { 24 * GIB };
                        GpuCapacity::new(g, format!("GPU-{i}-{g}").into(), size, 0)
                    })
                    .collect(),
            ),
        })
        .collect()
}

fn requests(n: usize) -> Vec<TaskRequest> {
    (0..n)
        .map(|i| {
            let gpu = match i % 4 {
                0 => GpuRequest::Whole {
                    count: 1,
                    memory: 20 * GIB,
                },
                1 => GpuRequest::Whole {
                    count: 4,
                    memory: 40 * GIB,
                },
                2 => GpuRequest::Share { memory: 8 * GIB },
                _ => GpuRequest::None,
            };
            let mut labels = BTreeMap::new();
            if i % 10 == 0 {
                labels.insert("zone".to_string(), "z1".to_string());
            }
            TaskRequest {
                cpus_milli: 2000,
                memory: 8 * GIB,
                gpu,
                labels,
                workers: vec![],
                avoid: vec![],
                load: None,
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let workers = fleet(1000);
    let mut group = c.benchmark_group("placement");
    for tasks in [1usize, 1000] {
        let reqs = requests(tasks);
        group.throughput(Throughput::Elements(tasks as u64));
        group.bench_function(format!("1000 workers x 8 GPUs, {tasks} mixed tasks"), |b| {
            b.iter_batched(
                || workers.clone(),
                |mut ws| black_box(place(&reqs, &mut ws)),
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
