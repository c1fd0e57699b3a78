//! Publishing events and replaying them, against a real nats-server:
//! headers and deduplication, a replay that stops where the stream ended
//! when it began, and a live replay that goes on without gaps or repeats
//! when its consumer is deleted or the server restarts.

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use gpufleet_natsutil::events::{self, Replay, Until};
use gpufleet_natsutil::{create_stores, Backoff, Setup};
use gpufleet_schema::{codec, subjects, EventKind, JobId, Sender, TaskId, UserId};
use gpufleet_testkit::{with_deadline, NatsServer};

const T: Duration = Duration::from_secs(30);

async fn setup(server: &NatsServer) -> jetstream::Context {
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    with_deadline(T, "the stores", create_stores(&js, &Setup::default()))
        .await
        .unwrap();
    js
}

fn subject(job: &str, kind: EventKind) -> String {
    let job = JobId::new(job).unwrap();
    let task = TaskId::for_index(&job, 0);
    subjects::events(
        &UserId::default_user(),
        &job,
        &task,
        kind,
        &Sender::Coordinator,
    )
}

fn job_events(job: &str) -> String {
    subjects::job_events(&UserId::default_user(), &JobId::new(job).unwrap())
}

/// Publishes `n` numbered messages; returns their sequences.
async fn publish_n(js: &jetstream::Context, subject: &str, n: u32) -> Vec<u64> {
    let mut seqs = Vec::new();
    for i in 0..n {
        let body = Bytes::from(codec::encode(&i).unwrap());
        let ack = events::publish(js, subject.to_string(), body, None)
            .await
            .unwrap();
        seqs.push(ack.sequence);
    }
    seqs
}

/// The sequences a replay hands out until it ends, failing on any error.
async fn drain(replay: &mut Replay) -> Vec<u64> {
    with_deadline(T, "the replay to catch up", async {
        let mut seqs = Vec::new();
        while let Some(r) = replay.next().await {
            seqs.push(r.unwrap().sequence);
        }
        seqs
    })
    .await
}

/// A live replay of every event of `job` from the start.
async fn live(js: &jetstream::Context, job: &str) -> Replay {
    let filters = vec![job_events(job)];
    Replay::start(js, subjects::EVENTS_STREAM, filters, 1, Until::Live)
        .await
        .unwrap()
}

/// The next `n` sequences a live replay hands out, and how many errors it
/// reported on the way.
async fn take(replay: &mut Replay, n: usize) -> (Vec<u64>, usize) {
    with_deadline(T, "the live replay", async {
        let (mut seqs, mut errors) = (Vec::new(), 0);
        while seqs.len() < n {
            match replay.next().await.expect("a live replay never ends") {
                Ok(r) => seqs.push(r.sequence),
                Err(_) => errors += 1,
            }
        }
        (seqs, errors)
    })
    .await
}

#[tokio::test]
async fn an_event_says_it_is_msgpack_and_a_repeated_message_id_is_stored_once() {
    let server = NatsServer::start();
    let js = setup(&server).await;
    let subject = subject("j1", EventKind::Result);
    let body = Bytes::from(codec::encode(&"done").unwrap());
    let first = events::publish(&js, subject.clone(), body.clone(), Some("j1-0.1.result"))
        .await
        .unwrap();
    let again = events::publish(&js, subject.clone(), body, Some("j1-0.1.result"))
        .await
        .unwrap();
    assert!(!first.duplicate);
    assert!(again.duplicate);
    assert_eq!(again.sequence, first.sequence);

    let stream = js.get_stream(subjects::EVENTS_STREAM).await.unwrap();
    let stored = stream.get_raw_message(first.sequence).await.unwrap();
    assert_eq!(
        stored.headers.get(codec::CONTENT_TYPE).unwrap().as_str(),
        codec::MSGPACK
    );
    assert_eq!(
        stored.headers.get("Nats-Msg-Id").unwrap().as_str(),
        "j1-0.1.result"
    );
    assert_eq!(stream.get_info().await.unwrap().state.messages, 1);

    // A batch: every message sent before any ack is awaited.
    let mut acks = Vec::new();
    for i in 0..3u32 {
        let body = Bytes::from(codec::encode(&i).unwrap());
        acks.push(
            events::send(&js, subject.clone(), body, None)
                .await
                .unwrap(),
        );
    }
    let mut seqs = Vec::new();
    for ack in acks {
        seqs.push(ack.await.unwrap().sequence);
    }
    let f = first.sequence;
    assert_eq!(seqs, vec![f + 1, f + 2, f + 3]);
}

#[tokio::test]
async fn a_caught_up_replay_hands_out_what_was_stored_when_it_began_then_stops() {
    let server = NatsServer::start();
    let js = setup(&server).await;
    let logs = publish_n(&js, &subject("a", EventKind::Log), 4).await;
    let others = publish_n(&js, &subject("b", EventKind::Log), 2).await;
    let states = publish_n(&js, &subject("a", EventKind::State), 2).await;
    let stream = subjects::EVENTS_STREAM;

    let mut all_of_a = Replay::start(&js, stream, vec![job_events("a")], 1, Until::CaughtUp)
        .await
        .unwrap();
    // Stored after the replay began: not handed out.
    publish_n(&js, &subject("a", EventKind::Log), 2).await;
    let mut want = [logs.clone(), states.clone()].concat();
    assert_eq!(drain(&mut all_of_a).await, want);
    assert!(all_of_a.caught_up());
    assert_eq!(all_of_a.last_sequence(), states[1]);
    assert!(
        all_of_a.next().await.is_none(),
        "a finished replay stays finished"
    );

    // From a sequence, on two subjects of different jobs.
    let filters = vec![subject("a", EventKind::State), subject("b", EventKind::Log)];
    let mut two = Replay::start(&js, stream, filters, others[1], Until::CaughtUp)
        .await
        .unwrap();
    want = vec![others[1], states[0], states[1]];
    assert_eq!(drain(&mut two).await, want);

    // Nothing stored on the subject: over at once.
    let mut none = Replay::start(&js, stream, vec![job_events("c")], 1, Until::CaughtUp)
        .await
        .unwrap();
    assert!(none.caught_up());
    assert_eq!(drain(&mut none).await, Vec::<u64>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_replay_goes_on_with_a_new_consumer_after_its_consumer_is_deleted() {
    let server = NatsServer::start();
    let js = setup(&server).await;
    let subject = subject("live", EventKind::Log);
    let before = publish_n(&js, &subject, 3).await;
    let mut replay = live(&js, "live").await;
    assert_eq!(take(&mut replay, 3).await, (before, 0));
    assert!(replay.caught_up());

    // Every consumer goes: the replay's, and the short-lived one that
    // read where the stream ended when it began.
    let stream = js.get_stream(subjects::EVENTS_STREAM).await.unwrap();
    let names: Vec<String> = stream.consumer_names().map(|n| n.unwrap()).collect().await;
    assert!(!names.is_empty());
    for name in names {
        stream.delete_consumer(&name).await.unwrap();
    }
    let after = publish_n(&js, &subject, 3).await;

    // The dead consumer is noticed by its missing heartbeats; the replay
    // reports it, then a new consumer hands out exactly what came after.
    let (seqs, errors) = take(&mut replay, 3).await;
    assert_eq!(seqs, after);
    assert!(errors >= 1, "the failure was reported");
    assert!(replay.restarts() >= 1, "a new consumer was created");
    let names: Vec<String> = stream.consumer_names().map(|n| n.unwrap()).collect().await;
    assert_eq!(names.len(), 1, "one live consumer: {names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_replay_rides_out_a_server_restart_without_gaps_or_repeats() {
    let mut server = NatsServer::start();
    let js = setup(&server).await;
    let subject = subject("r", EventKind::Log);
    let before = publish_n(&js, &subject, 2).await;
    let mut replay = live(&js, "r").await;
    assert_eq!(take(&mut replay, 2).await.0, before);

    tokio::task::block_in_place(|| server.restart());
    // One message id on every try: a try whose ack was lost stores no copy.
    let mut backoff = Backoff::fixed(Duration::from_millis(50));
    let after = with_deadline(T, "publishing after the restart", async {
        loop {
            let body = Bytes::from(codec::encode(&0u32).unwrap());
            match events::publish(&js, subject.clone(), body, Some("after-restart")).await {
                Ok(ack) => return ack.sequence,
                Err(_) => backoff.wait().await,
            }
        }
    })
    .await;
    assert_eq!(take(&mut replay, 1).await.0, vec![after]);
    let more = publish_n(&js, &subject, 2).await;
    assert_eq!(take(&mut replay, 2).await.0, more);
}
