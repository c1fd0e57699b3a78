//! Artifacts through the stream, against a real nats-server: a file of
//! several chunks, an empty one and an awkward path come back as they
//! went, each listed once with its uploader, and a file whose chunks are
//! not all there is refused rather than handed out short.

use async_nats::jetstream;
use gpufleet_natsutil::artifacts::{self, Attempt};
use gpufleet_natsutil::{create_stores, Setup};
use gpufleet_schema::artifact::CHUNK_SIZE;
use gpufleet_schema::{subjects, JobId, TaskId, UserId, WorkerId};
use gpufleet_testkit::NatsServer;
use sha2::{Digest, Sha256};

fn attempt(job: &JobId) -> Attempt {
    Attempt {
        owner: UserId::new("alice").unwrap(),
        job: job.clone(),
        task: TaskId::for_index(job, 0),
        attempt: 2,
        worker: WorkerId::new("w1").unwrap(),
        token: "tok".into(),
    }
}

#[tokio::test]
async fn files_come_back_whole_and_short_ones_are_refused() {
    let server = NatsServer::start();
    let js = jetstream::new(async_nats::connect(server.url()).await.unwrap());
    create_stores(&js, &Setup::default()).await.unwrap();
    let job = JobId::new("j1").unwrap();
    let at = attempt(&job);
    let big: Vec<u8> = (0..(CHUNK_SIZE * 2 + 17))
        .map(|i| (i % 251) as u8)
        .collect();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("out/model.pt", big.clone()),
        ("empty", vec![]),
        ("a b/ü.*>.txt", b"odd".to_vec()),
    ];
    for (name, bytes) in &files {
        let meta = artifacts::upload(&js, &at, name, bytes.as_slice())
            .await
            .unwrap();
        assert_eq!(meta.size.0, bytes.len() as u64);
        assert_eq!(meta.sha256, artifacts::hex(&Sha256::digest(bytes)));
    }
    // Another job's upload is not listed with this one.
    let other = JobId::new("j2").unwrap();
    artifacts::upload(&js, &attempt(&other), "x", &b"x"[..])
        .await
        .unwrap();

    let listed = artifacts::list(&js, &at.owner, &job).await.unwrap();
    let names: Vec<&str> = listed.iter().map(|s| s.meta.name.as_str()).collect();
    assert_eq!(names, vec!["out/model.pt", "empty", "a b/ü.*>.txt"]);
    for (stored, (_, bytes)) in listed.iter().zip(&files) {
        assert_eq!(stored.at.worker.as_str(), "w1");
        assert_eq!(stored.at.attempt, 2);
        let mut out = Vec::new();
        let n = artifacts::download(&js, stored, &mut out).await.unwrap();
        assert_eq!((n, &out), (bytes.len() as u64, bytes));
    }

    // Its chunks gone (purged here; expired in life): refused, not short.
    let stream = js.get_stream(subjects::ARTIFACTS_STREAM).await.unwrap();
    let data = subjects::artifact(
        &at.owner,
        &job,
        &at.task,
        at.attempt,
        &at.worker,
        "out/model.pt",
        subjects::ArtifactPart::Data,
    );
    stream.purge().filter(data).await.unwrap();
    let err = artifacts::download(&js, &listed[0], &mut Vec::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("out/model.pt") && err.contains("chunks"),
        "{err}"
    );
}
