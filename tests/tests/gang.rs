//! Gangs: every rank at once or none, a rendezvous where the ranks really
//! meet over TCP, failure of one rank restarting the whole gang, min_tasks
//! and named workers.

use std::time::Duration;

use gpufleet_testkit::{pids, Fleet, WorkerSpec};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(120);

/// Rank 0 listens on MASTER_PORT; every other rank connects (retrying until
/// rank 0 is up), sends its rank, and gets back the sorted list of ranks
/// rank 0 has met. Each writes what it saw as its result. With HOLD set to
/// a file, each rank then waits for that file before exiting on its first
/// attempt.
const RENDEZVOUS: &str = r#"
import json, os, socket, sys, time
rank = int(os.environ["GPUFLEET_RANK"]); world = int(os.environ["GPUFLEET_WORLD_SIZE"])
addr = os.environ["MASTER_ADDR"]; port = int(os.environ["MASTER_PORT"])
env = {k: os.environ[k] for k in ["GPUFLEET_RANK", "GPUFLEET_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "GPUFLEET_ATTEMPT"]}
if rank == 0:
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port)); srv.listen(world); srv.settimeout(60)
    conns = [srv.accept()[0] for _ in range(world - 1)]
    met = sorted([0] + [int(c.recv(16).decode()) for c in conns])
    for c in conns: c.sendall(json.dumps(met).encode()); c.close()
else:
    deadline = time.time() + 60
    while True:
        try:
            c = socket.create_connection((addr, port), timeout=5); break
        except OSError:
            if time.time() > deadline: raise
            time.sleep(0.05)
    c.sendall(str(rank).encode()); met = json.loads(c.recv(1024).decode()); c.close()
json.dump({"rank": rank, "world": world, "met": met, "env": env}, open(os.environ["GPUFLEET_RESULT"], "w"))
print("rank", rank, "met", met, flush=True)
hold = os.environ.get("HOLD")
if hold and os.environ["GPUFLEET_ATTEMPT"] == "1":
    open(hold + "." + str(rank), "w").write(str(os.getpid()))
    while True: time.sleep(0.1)
"#;

fn gang(n: usize, extra: Value) -> Value {
    let tasks: Vec<Value> = (0..n)
        .map(|r| {
            let mut t = json!({
                "name": format!("rank-{r}"),
                "command": ["python3", "-c", RENDEZVOUS],
                "resources": {"gpus": 1, "cpus": 0.5},
            });
            if let Some(env) = extra.get("env") {
                t["env"] = env.clone();
            }
            t
        })
        .collect();
    let mut job = json!({"name": "ddp", "gang": true, "tasks": tasks});
    if let Some(obj) = extra.as_object() {
        for (k, v) in obj {
            if k != "env" {
                job[k] = v.clone();
            }
        }
    }
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_ranks_on_two_workers_meet_at_the_master() {
    let mut fleet = Fleet::start().await;
    fleet
        .add_worker(WorkerSpec::new("node-a").gpus("2x24GiB"))
        .await;
    fleet
        .add_worker(WorkerSpec::new("node-b").gpus("2x24GiB"))
        .await;
    let id = fleet.submit(&gang(4, json!({}))).await;
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    let tasks = status["tasks"].as_array().unwrap();
    let master_worker = tasks[0]["worker"].clone();
    let mut workers = std::collections::BTreeSet::new();
    for (r, t) in tasks.iter().enumerate() {
        let res = &t["result"];
        assert_eq!(res["rank"], r);
        assert_eq!(res["world"], 4);
        assert_eq!(res["met"], json!([0, 1, 2, 3]));
        assert_eq!(res["env"]["MASTER_ADDR"], "127.0.0.1");
        assert_eq!(
            res["env"]["MASTER_PORT"],
            tasks[0]["result"]["env"]["MASTER_PORT"]
        );
        assert_eq!(
            res["env"]["CUDA_VISIBLE_DEVICES"].as_str().unwrap().len(),
            1
        );
        workers.insert(t["worker"].as_str().unwrap().to_string());
        assert_eq!(t["attempt"], 1);
    }
    assert_eq!(workers.len(), 2, "four ranks need both two-GPU workers");
    assert!(master_worker.is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gang_never_starts_partially_under_contention_and_does_start() {
    let mut fleet = Fleet::start().await;
    fleet
        .add_worker(WorkerSpec::new("node-a").gpus("2x24GiB"))
        .await;
    fleet
        .add_worker(WorkerSpec::new("node-b").gpus("2x24GiB"))
        .await;
    // Small one-GPU jobs first, more than the fleet holds at once.
    let mut small = Vec::new();
    for _ in 0..6 {
        let tasks: Vec<Value> = (0..4)
            .map(|_| json!({"command": ["sleep", "0.4"], "resources": {"gpus": 1}}))
            .collect();
        small.push(fleet.submit(&json!({"tasks": tasks})).await);
    }
    let id = fleet.submit(&gang(4, json!({}))).await;
    // More small work keeps coming after the gang.
    for _ in 0..6 {
        let tasks: Vec<Value> = (0..4)
            .map(|_| json!({"command": ["sleep", "0.4"], "resources": {"gpus": 1}}))
            .collect();
        small.push(fleet.submit(&json!({"tasks": tasks})).await);
    }
    let status = fleet.wait_finished(&id, T).await;
    // Had any rank started without the others, the rendezvous could not
    // have met all four, and a refused or lost rank would show as a retry.
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    for t in status["tasks"].as_array().unwrap() {
        assert_eq!(t["result"]["met"], json!([0, 1, 2, 3]));
        assert_eq!(t["attempt"], 1, "{t}");
    }
    for s in small {
        let st = fleet.wait_finished(&s, T).await;
        assert_eq!(st["status"], "FINISHED:COMPLETED");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_ranks_worker_stops_the_others_and_reruns_the_gang() {
    let mut fleet = Fleet::start().await;
    fleet
        .add_worker(WorkerSpec::new("node-a").gpus("1x24GiB"))
        .await;
    fleet
        .add_worker(WorkerSpec::new("node-b").gpus("1x24GiB"))
        .await;
    let hold = fleet.dir().join("hold");
    let id = fleet
        .submit(&gang(
            2,
            json!({"max_retries": 1, "env": {"HOLD": hold.display().to_string()}}),
        ))
        .await;
    // Both ranks met and now wait: find which worker runs rank 1.
    let pid0: i32 = gpufleet_testkit::eventually(T, "both ranks to be up", || {
        let h = hold.clone();
        async move {
            let p0 = std::fs::read_to_string(format!("{}.0", h.display())).ok()?;
            std::fs::read_to_string(format!("{}.1", h.display())).ok()?;
            p0.trim().parse().ok()
        }
    })
    .await;
    let status = fleet.get(&id).await;
    let rank1_worker = status["tasks"][1]["worker"].as_str().unwrap().to_string();
    fleet
        .add_worker(WorkerSpec::new("spare").gpus("1x24GiB"))
        .await;
    fleet.worker(&rank1_worker).kill9();

    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    for t in status["tasks"].as_array().unwrap() {
        assert_eq!(t["attempt"], 2, "the whole gang ran again: {t}");
        assert_eq!(t["result"]["met"], json!([0, 1]));
        assert_ne!(t["worker"], rank1_worker.as_str());
    }
    // Rank 0's first attempt was stopped, not left running.
    assert!(
        !pids::exists(pid0),
        "rank 0 of the broken run ({pid0}) still runs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_tasks_starts_with_what_fits_and_drops_the_rest() {
    let mut fleet = Fleet::start().await;
    fleet
        .add_worker(WorkerSpec::new("only").gpus("2x24GiB"))
        .await;
    let id = fleet.submit(&gang(4, json!({"min_tasks": 2}))).await;
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    let tasks = status["tasks"].as_array().unwrap();
    let ran: Vec<&Value> = tasks.iter().filter(|t| t["state"] == "SUCCEEDED").collect();
    let dropped: Vec<&Value> = tasks.iter().filter(|t| t["state"] == "CANCELLED").collect();
    assert_eq!(ran.len(), 2);
    assert_eq!(dropped.len(), 2);
    for t in ran {
        assert_eq!(t["result"]["world"], 2);
        assert_eq!(t["result"]["met"], json!([0, 1]));
    }
    for t in dropped {
        assert!(
            t["reason"]
                .as_str()
                .unwrap()
                .contains("dropped from this run"),
            "{t}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_workers_are_used_and_an_impossible_one_waits_with_its_reason() {
    let mut fleet = Fleet::start().await;
    fleet
        .add_worker(WorkerSpec::new("site-a").gpus("1x24GiB"))
        .await;
    fleet
        .add_worker(WorkerSpec::new("site-b").gpus("1x24GiB"))
        .await;
    fleet
        .add_worker(WorkerSpec::new("site-c").gpus("1x24GiB"))
        .await;
    let id = fleet
        .submit(&gang(
            2,
            json!({"constraints": {"workers": ["site-a", "site-c"]}}),
        ))
        .await;
    let status = fleet.wait_finished(&id, T).await;
    assert_eq!(status["status"], "FINISHED:COMPLETED", "{status:#}");
    let mut used: Vec<&str> = status["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["worker"].as_str().unwrap())
        .collect();
    used.sort();
    assert_eq!(used, vec!["site-a", "site-c"]);

    let id = fleet
        .submit(&gang(
            2,
            json!({"constraints": {"workers": ["site-a", "site-z"]}}),
        ))
        .await;
    let waiting = fleet
        .wait_job(&id, T, "a reason", |s| s["reason"].is_string())
        .await;
    assert_eq!(waiting["status"], "QUEUED");
    let reason = waiting["reason"].as_str().unwrap();
    assert!(
        reason.contains("gang needs 2 tasks placed together, only 1 fit now"),
        "{reason}"
    );
    let id2 = fleet
        .submit(&gang(1, json!({"constraints": {"workers": ["site-z"]}})))
        .await;
    let waiting = fleet
        .wait_job(&id2, T, "a reason", |s| s["reason"].is_string())
        .await;
    assert!(
        waiting["reason"]
            .as_str()
            .unwrap()
            .contains("none of the named workers (site-z) is online"),
        "{waiting:#}"
    );
}
