//! The permission sets of `schema::roles`, as `server_conf` writes them,
//! against a real nats-server: each role can do its part and nothing that
//! another role's part is, and the JetStream API facts they lean on hold
//! (a filtered consumer-create refuses a body with another filter or with
//! several filters), and so do the hazards the roles steer around (a
//! direct get's reply can purge a stream; a push consumer delivers to any
//! subscriber, whatever its creator may publish).

use std::time::Duration;

use async_nats::jetstream::{self, consumer::push, consumer::DeliverPolicy};
use bytes::Bytes;
use futures::StreamExt;
use gpufleet_natsutil::server_conf::{authorization_block, Credential, Member};
use gpufleet_natsutil::{connect, create_stores, events, Auth, RawKv, Setup};
use gpufleet_schema::roles::Role;
use gpufleet_schema::{subjects, EventKind, JobId, Sender, TaskId, UserId, WorkerId};
use gpufleet_testkit::NatsServer;

const PATIENCE: Duration = Duration::from_secs(5);
/// How long a request the server drops (a permissions violation) is given.
const DENIED: Duration = Duration::from_millis(400);

struct Secured {
    server: NatsServer,
    dir: tempfile::TempDir,
    seeds: Vec<(Role, String)>,
}

impl Secured {
    fn start(roles: Vec<Role>) -> Secured {
        let dir = tempfile::tempdir().unwrap();
        let mut members = Vec::new();
        let mut seeds = Vec::new();
        for role in roles {
            let key = nkeys::KeyPair::new_user();
            members.push(Member {
                role: role.clone(),
                credential: Credential::NKey(key.public_key()),
            });
            seeds.push((role, key.seed().unwrap()));
        }
        let server = NatsServer::start_with(&authorization_block(&members));
        Secured { server, dir, seeds }
    }

    async fn connect(&self, role: &Role) -> async_nats::Client {
        let (_, seed) = self.seeds.iter().find(|(r, _)| r == role).unwrap();
        let path = self.dir.path().join(format!("{}.nk", role.identity()));
        std::fs::write(&path, seed).unwrap();
        let auth = Auth {
            nkey: Some(path),
            inbox_prefix: Some(role.inbox_prefix()),
            ..Auth::default()
        };
        connect(&self.server.url(), &auth, role.identity(), PATIENCE)
            .await
            .unwrap()
    }
}

fn quick(client: async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(DENIED)
        .build(client)
}

fn user(name: &str) -> UserId {
    UserId::new(name).unwrap()
}

fn worker(name: &str) -> WorkerId {
    WorkerId::new(name).unwrap()
}

/// Publishes without waiting for the stream and makes sure the server has
/// read it: a denied publish is dropped by the server, never acknowledged.
async fn publish_core(client: &async_nats::Client, subject: String) {
    client
        .publish(subject, Bytes::from_static(b"x"))
        .await
        .unwrap();
    client.flush().await.unwrap();
}

/// Whether the last message on `subject` of `stream` exists, as the
/// coordinator sees it.
async fn stored(js: &jetstream::Context, stream: &str, subject: &str) -> bool {
    js.get_stream_no_info(stream)
        .await
        .unwrap()
        .direct_get_last_for_subject(subject)
        .await
        .is_ok()
}

fn event_subject(owner: &UserId, job: &str, kind: EventKind, sender: Sender) -> String {
    let job = JobId::new(job).unwrap();
    subjects::events(owner, &job, &TaskId::for_index(&job, 0), kind, &sender)
}

async fn ordered(
    js: &jetstream::Context,
    stream: &str,
    filter: String,
    deliver: Option<String>,
) -> Result<push::Ordered, String> {
    let stream = js.get_stream_no_info(stream).await.unwrap();
    let consumer = stream
        .create_consumer(push::OrderedConfig {
            name: Some(format!("t{}", uuid_like())),
            deliver_subject: deliver.unwrap_or_else(|| js.client().new_inbox()),
            filter_subject: filter,
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    consumer.messages().await.map_err(|e| e.to_string())
}

fn uuid_like() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

#[tokio::test]
async fn each_role_does_its_part_and_nothing_else() {
    let (alice, bob, root) = (user("alice"), user("bob"), user("root"));
    let (w1, w2) = (worker("w1"), worker("w2"));
    let fleet = Secured::start(vec![
        Role::Coordinator,
        Role::Worker(w1.clone()),
        Role::Worker(w2.clone()),
        Role::User(alice.clone()),
        Role::User(bob.clone()),
        Role::Admin(root.clone()),
    ]);
    let coordinator = jetstream::new(fleet.connect(&Role::Coordinator).await);
    create_stores(&coordinator, &Setup::default())
        .await
        .unwrap();
    let leases_stream = subjects::kv_stream(subjects::LEASES_BUCKET);
    let workers_stream = subjects::kv_stream(subjects::WORKERS_BUCKET);
    let jobs_stream = subjects::kv_stream(subjects::JOBS_BUCKET);

    // Events of a job of alice's and one of bob's, as the coordinator and
    // w1 publish them.
    let alice_state = event_subject(&alice, "ja", EventKind::State, Sender::Coordinator);
    let bob_state = event_subject(&bob, "jb", EventKind::State, Sender::Coordinator);
    for s in [&alice_state, &bob_state] {
        events::publish(&coordinator, s.clone(), Bytes::from_static(b"s"), None)
            .await
            .unwrap();
    }
    let w1_js = jetstream::new(fleet.connect(&Role::Worker(w1.clone())).await);
    let alice_log = event_subject(&alice, "ja", EventKind::Log, Sender::Worker(w1.clone()));
    events::publish(&w1_js, alice_log.clone(), Bytes::from_static(b"l"), None)
        .await
        .unwrap();

    // A worker: its own lease keys and advert, through RawKv as the worker
    // itself uses them; the watch goes through the filtered create.
    let leases = RawKv::open_scoped(&w1_js, subjects::LEASES_BUCKET)
        .await
        .unwrap();
    let adverts = RawKv::open_scoped(&w1_js, subjects::WORKERS_BUCKET)
        .await
        .unwrap();
    leases
        .put("w1.ja-0.1", Bytes::from_static(b"claim"), None)
        .await
        .unwrap();
    adverts
        .put("w1", Bytes::from_static(b"advert"), None)
        .await
        .unwrap();
    assert!(leases.last("w1.ja-0.1").await.unwrap().is_some());
    let mut watch = leases.watch("w1.>").await.unwrap();
    assert!(watch.next().await.is_some());
    let mut own_advert = adverts.watch("w1").await.unwrap();
    assert!(own_advert.next().await.is_some());
    // ...but not another worker's, nor the leader key, nor a job record.
    let w1_client = w1_js.client();
    for subject in [
        subjects::kv_subject(subjects::LEASES_BUCKET, "w2.jb-0.1"),
        subjects::kv_subject(subjects::WORKERS_BUCKET, "w2"),
        subjects::kv_subject(subjects::JOBS_BUCKET, subjects::LEADER_KEY),
        subjects::kv_subject(subjects::JOBS_BUCKET, "jb"),
        event_subject(&bob, "jx", EventKind::Result, Sender::Worker(w2.clone())),
        event_subject(&bob, "jx", EventKind::State, Sender::Coordinator),
    ] {
        publish_core(&w1_client, subject.clone()).await;
        let stream = if subject.starts_with("gpufleet.events") {
            subjects::EVENTS_STREAM.to_string()
        } else if subject.contains(subjects::LEASES_BUCKET) {
            leases_stream.clone()
        } else if subject.contains(subjects::WORKERS_BUCKET) {
            workers_stream.clone()
        } else {
            jobs_stream.clone()
        };
        assert!(
            !stored(&coordinator, &stream, &subject).await,
            "w1 wrote {subject}"
        );
    }
    let w1_quick = quick(w1_client.clone());
    assert!(
        ordered(
            &w1_quick,
            &leases_stream,
            subjects::kv_subject(subjects::LEASES_BUCKET, "w2.>"),
            None
        )
        .await
        .is_err(),
        "w1 read w2's leases"
    );

    // A user: the API under its own name, its own events.
    let alice_js = quick(fleet.connect(&Role::User(alice.clone())).await);
    let alice_client = alice_js.client();
    // Nor another user's API subjects (the coordinator would take the
    // caller for bob), nor another's inbox.
    let service = fleet.connect(&Role::Coordinator).await;
    let mut api_sub = service
        .subscribe(subjects::api_any_user(">"))
        .await
        .unwrap();
    service.flush().await.unwrap();
    // The subscription is live once one of alice's own calls gets through.
    let own_api = subjects::api(&alice, "jobs.list");
    gpufleet_testkit::with_deadline(PATIENCE, "the API subscription", async {
        loop {
            publish_core(&alice_client, own_api.clone()).await;
            if let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(100), api_sub.next()).await
            {
                break;
            }
        }
    })
    .await;
    while tokio::time::timeout(Duration::from_millis(50), api_sub.next())
        .await
        .is_ok()
    {}
    publish_core(&alice_client, subjects::api(&bob, "jobs.list")).await;
    publish_core(&alice_client, own_api.clone()).await;
    let got = tokio::time::timeout(PATIENCE, api_sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.subject.as_str(), subjects::api(&alice, "jobs.list"));
    let mut own = ordered(
        &alice_js,
        subjects::EVENTS_STREAM,
        subjects::job_events(&alice, &JobId::new("ja").unwrap()),
        None,
    )
    .await
    .unwrap();
    let first = tokio::time::timeout(PATIENCE, own.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.subject.as_str(), alice_state);
    let last = gpufleet_natsutil::events::last_on(
        &alice_js,
        &alice_js
            .get_stream_no_info(subjects::EVENTS_STREAM)
            .await
            .unwrap(),
        subjects::EVENTS_STREAM,
        &[subjects::user_events(&alice)],
    )
    .await
    .unwrap();
    assert!(last > 0);
    // Not bob's events, by any route: a filter on bob's subjects, a body
    // filter that differs from the subject's, several filters, a direct
    // get (of anything: see `schema::roles`).
    assert!(ordered(
        &alice_js,
        subjects::EVENTS_STREAM,
        subjects::user_events(&bob),
        None
    )
    .await
    .is_err());
    let forged: Result<serde_json::Value, _> = alice_js
        .request(
            subjects::js_api::consumer_create_filtered(
                subjects::EVENTS_STREAM,
                &subjects::user_events(&alice),
            )
            .replace(".*.", ".x.")
            .replace("$JS.API.", ""),
            &serde_json::json!({"stream_name": subjects::EVENTS_STREAM, "config": {
                "name": "x", "filter_subject": subjects::user_events(&bob),
                "deliver_subject": alice_client.new_inbox(), "ack_policy": "none"}}),
        )
        .await;
    let forged = forged.unwrap();
    assert!(forged.get("error").is_some(), "{forged}");
    let multi: Result<serde_json::Value, _> = alice_js
        .request(
            format!(
                "CONSUMER.CREATE.{}.y.{}",
                subjects::EVENTS_STREAM,
                subjects::user_events(&alice)
            ),
            &serde_json::json!({"stream_name": subjects::EVENTS_STREAM, "config": {
                "name": "y", "filter_subjects": [subjects::user_events(&alice), subjects::user_events(&bob)],
                "deliver_subject": alice_client.new_inbox(), "ack_policy": "none"}}),
        )
        .await;
    let multi = multi.unwrap();
    assert!(multi.get("error").is_some(), "{multi}");
    let events_stream = alice_js
        .get_stream_no_info(subjects::EVENTS_STREAM)
        .await
        .unwrap();
    assert!(events_stream
        .direct_get_last_for_subject(subjects::user_events(&alice))
        .await
        .is_err());
    assert!(events_stream.direct_get(1).await.is_err());
    // No writes at all: leases, adverts, events (even of its own jobs),
    // records, the leader key; no stream info (it would list every
    // subject).
    for (stream, subject) in [
        (
            leases_stream.clone(),
            subjects::kv_subject(subjects::LEASES_BUCKET, "w1.ja-0.2"),
        ),
        (
            workers_stream.clone(),
            subjects::kv_subject(subjects::WORKERS_BUCKET, "w9"),
        ),
        (
            subjects::EVENTS_STREAM.to_string(),
            event_subject(&alice, "ja", EventKind::Result, Sender::Worker(w1.clone())),
        ),
        (
            jobs_stream.clone(),
            subjects::kv_subject(subjects::JOBS_BUCKET, subjects::LEADER_KEY),
        ),
    ] {
        publish_core(&alice_client, subject.clone()).await;
        assert!(
            !stored(&coordinator, &stream, &subject).await,
            "alice wrote {subject}"
        );
    }
    assert!(alice_js.get_stream(subjects::EVENTS_STREAM).await.is_err());

    // An admin reads everybody's events.
    let root_js = quick(fleet.connect(&Role::Admin(root.clone())).await);
    let mut all = ordered(
        &root_js,
        subjects::EVENTS_STREAM,
        subjects::job_events(&bob, &JobId::new("jb").unwrap()),
        None,
    )
    .await
    .unwrap();
    let got = tokio::time::timeout(PATIENCE, all.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.subject.as_str(), bob_state);
    // ...but writes no more than a user.
    let leader = subjects::kv_subject(subjects::JOBS_BUCKET, subjects::LEADER_KEY);
    publish_core(&root_js.client(), leader.clone()).await;
    assert!(!stored(&coordinator, &jobs_stream, &leader).await);
}

#[tokio::test]
async fn replies_reach_only_their_own_inbox() {
    let (alice, bob) = (user("alice"), user("bob"));
    let fleet = Secured::start(vec![
        Role::Coordinator,
        Role::User(alice.clone()),
        Role::User(bob.clone()),
    ]);
    let coordinator = fleet.connect(&Role::Coordinator).await;
    let bob_client = fleet.connect(&Role::User(bob.clone())).await;
    // Bob subscribing to alice's inbox is refused; alice's replies reach
    // her and nobody else.
    let mut snoop = bob_client.subscribe("_INBOX.alice.>").await.unwrap();
    bob_client.flush().await.unwrap();
    let mut service = coordinator
        .subscribe(subjects::api(&alice, "jobs.list"))
        .await
        .unwrap();
    coordinator.flush().await.unwrap();
    let responder = tokio::spawn(async move {
        let req = service.next().await.unwrap();
        coordinator
            .publish(req.reply.unwrap(), Bytes::from_static(b"yours"))
            .await
            .unwrap();
        coordinator.flush().await.unwrap();
    });
    let alice_client = fleet.connect(&Role::User(alice.clone())).await;
    // Until the responder's subscription is live, there is none.
    let reply = gpufleet_testkit::with_deadline(PATIENCE, "a reply", async {
        loop {
            match alice_client
                .request(subjects::api(&alice, "jobs.list"), Bytes::new())
                .await
            {
                Ok(r) => break r,
                Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {}
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    assert_eq!(reply.payload.as_ref(), b"yours");
    responder.await.unwrap();
    assert!(
        tokio::time::timeout(DENIED, snoop.next()).await.is_err(),
        "bob read alice's reply"
    );
}

/// Why no role but the coordinator may use direct gets: the server sends
/// a direct get's answer to the request's reply subject with the stream's
/// own rights, so a reply subject in the JetStream API is carried out. A
/// purge of the jobs bucket, here, by anyone allowed one direct get.
#[tokio::test]
async fn a_direct_gets_reply_can_purge_a_stream() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    create_stores(&js, &Setup::default()).await.unwrap();
    let jobs = RawKv::open(&js, subjects::JOBS_BUCKET).await.unwrap();
    jobs.put("j1", Bytes::from_static(b"record"), None)
        .await
        .unwrap();
    let event = event_subject(&user("alice"), "ja", EventKind::State, Sender::Coordinator);
    events::publish(&js, event.clone(), Bytes::from_static(b"s"), None)
        .await
        .unwrap();
    let purge = format!(
        "$JS.API.STREAM.PURGE.{}",
        subjects::kv_stream(subjects::JOBS_BUCKET)
    );
    client
        .publish_with_reply(
            format!("$JS.API.DIRECT.GET.{}.{event}", subjects::EVENTS_STREAM),
            purge,
            Bytes::new(),
        )
        .await
        .unwrap();
    gpufleet_testkit::eventually(PATIENCE, "the jobs bucket to be purged", || {
        let jobs = jobs.clone();
        async move { jobs.last("j1").await.unwrap().is_none().then_some(()) }
    })
    .await;
}

/// What nats-server does not check (nats-server#8274): a push consumer's
/// deliver subject is not held to its creator's permissions, and its
/// messages reach whoever subscribes there, with their own subject and a
/// `$JS.ACK` reply. The coordinator therefore takes the caller from the
/// message's subject and answers only on the caller's inbox. What such a
/// delivery does not do is land in a stream: nothing subscribes there.
#[tokio::test]
async fn a_deliver_subject_is_not_held_to_its_creators_permissions() {
    let (alice, bob) = (user("alice"), user("bob"));
    let fleet = Secured::start(vec![Role::Coordinator, Role::User(alice.clone())]);
    let coordinator = jetstream::new(fleet.connect(&Role::Coordinator).await);
    create_stores(&coordinator, &Setup::default())
        .await
        .unwrap();
    let own = event_subject(&alice, "ja", EventKind::State, Sender::Coordinator);
    events::publish(&coordinator, own.clone(), Bytes::from_static(b"s"), None)
        .await
        .unwrap();
    let mut api = coordinator
        .client()
        .subscribe(subjects::api(&bob, "jobs.cancel"))
        .await
        .unwrap();
    coordinator.client().flush().await.unwrap();

    let alice_js = quick(fleet.connect(&Role::User(alice.clone())).await);
    let into_bucket = subjects::kv_subject(subjects::JOBS_BUCKET, "someone-elses-job");
    for deliver in [subjects::api(&bob, "jobs.cancel"), into_bucket.clone()] {
        let stream = alice_js
            .get_stream_no_info(subjects::EVENTS_STREAM)
            .await
            .unwrap();
        stream
            .create_consumer(push::OrderedConfig {
                name: Some(format!("t{}", uuid_like())),
                deliver_subject: deliver,
                filter_subject: subjects::user_events(&alice),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let got = tokio::time::timeout(PATIENCE, api.next())
        .await
        .expect("the delivery reaches the API subscription")
        .unwrap();
    assert_eq!(got.subject.as_str(), own);
    assert!(got
        .reply
        .as_ref()
        .is_some_and(|r| r.as_str().starts_with("$JS.ACK.")));
    // Both consumers were made together; the one with a subscriber has
    // delivered, the other delivered nothing into the bucket.
    assert!(
        !stored(
            &coordinator,
            &subjects::kv_stream(subjects::JOBS_BUCKET),
            &into_bucket
        )
        .await
    );
}

/// A server with a coordinator, workers w1 and w2 and user alice, and a
/// connection of each (in that order); w1's name.
async fn coordinator_two_workers_and_alice() -> (Secured, WorkerId, [async_nats::Client; 4]) {
    let (w1, w2) = (worker("w1"), worker("w2"));
    let roles = [
        Role::Coordinator,
        Role::Worker(w1.clone()),
        Role::Worker(w2),
        Role::User(user("alice")),
    ];
    let fleet = Secured::start(roles.to_vec());
    let mut clients = Vec::new();
    for role in &roles {
        clients.push(fleet.connect(role).await);
    }
    let clients = clients.try_into().unwrap_or_else(|_| unreachable!());
    (fleet, w1, clients)
}

/// Messages for running tasks: only the coordinator may ask a worker to
/// deliver one, the worker answers that request (once, `allow_responses`)
/// but cannot otherwise publish into the coordinator's inbox, and no other
/// worker can take the first one's deliveries.
#[tokio::test]
async fn only_the_coordinator_sends_deliveries_and_only_their_worker_answers() {
    let (_fleet, w1, [coordinator, w1_client, w2_client, alice_client]) =
        coordinator_two_workers_and_alice().await;

    let mut stolen = w2_client.subscribe(subjects::deliver(&w1)).await.unwrap();
    w2_client.flush().await.unwrap();
    let mut deliveries = w1_client.subscribe(subjects::deliver(&w1)).await.unwrap();
    w1_client.flush().await.unwrap();
    // Not a delivery: the worker may not publish into the coordinator's
    // inbox unasked.
    let mut coordinator_inbox = coordinator
        .subscribe("_INBOX._coordinator.x")
        .await
        .unwrap();
    coordinator.flush().await.unwrap();
    publish_core(&w1_client, "_INBOX._coordinator.x".into()).await;
    publish_core(&alice_client, subjects::deliver(&w1)).await;

    let answering = tokio::spawn(async move {
        let d = deliveries.next().await.unwrap();
        w1_client
            .publish(d.reply.unwrap(), Bytes::from_static(b"delivered"))
            .await
            .unwrap();
        w1_client.flush().await.unwrap();
        d.payload
    });
    let answer = gpufleet_testkit::with_deadline(PATIENCE, "an answer", async {
        loop {
            match coordinator
                .request(subjects::deliver(&w1), Bytes::from_static(b"msg"))
                .await
            {
                Ok(r) => break r,
                Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {}
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    assert_eq!(answer.payload.as_ref(), b"delivered");
    assert_eq!(
        answering.await.unwrap().as_ref(),
        b"msg",
        "the worker's first delivery is the coordinator's, not alice's"
    );
    assert!(
        tokio::time::timeout(DENIED, coordinator_inbox.next())
            .await
            .is_err(),
        "a worker published into the coordinator's inbox"
    );
    assert!(
        tokio::time::timeout(DENIED, stolen.next()).await.is_err(),
        "another worker took w1's deliveries"
    );
}

/// Being heard alive (a worker whose adverts cannot be stored keeps its
/// tasks on the leader's word): only the worker itself may ask on its
/// alive subject, nobody but the coordinator may listen there (an answer
/// from anyone else would keep a cut-off worker's tasks running beside
/// their retries), and the coordinator hears the worker's own asks.
#[tokio::test]
async fn only_a_worker_asks_to_be_heard_alive_and_only_the_coordinator_hears_it() {
    let (_fleet, w1, [coordinator, w1_client, w2_client, alice_client]) =
        coordinator_two_workers_and_alice().await;

    // Listening on w1's alive subject: refused to another worker and to a
    // user.
    let mut w2_listens = w2_client.subscribe(subjects::alive(&w1)).await.unwrap();
    w2_client.flush().await.unwrap();
    let mut alice_listens = alice_client
        .subscribe(subjects::ALIVE_ALL.to_string())
        .await
        .unwrap();
    alice_client.flush().await.unwrap();
    let mut heard = coordinator
        .subscribe(subjects::ALIVE_ALL.to_string())
        .await
        .unwrap();
    coordinator.flush().await.unwrap();

    // w1's own ask arrives (asked again until the coordinator's
    // subscription is live).
    let ask = |client: &async_nats::Client, who: &'static str| {
        let client = client.clone();
        let subject = subjects::alive(&w1);
        async move {
            client.publish(subject, Bytes::from(who)).await.unwrap();
            client.flush().await.unwrap();
        }
    };
    gpufleet_testkit::with_deadline(PATIENCE, "w1's ask", async {
        loop {
            ask(&w1_client, "w1").await;
            if let Ok(m) = tokio::time::timeout(DENIED, heard.next()).await {
                let m = m.unwrap();
                assert_eq!(m.subject.as_str(), subjects::alive(&w1));
                assert_eq!(m.payload.as_ref(), b"w1");
                break;
            }
        }
    })
    .await;
    // Asking for w1: refused to w2 and to alice.
    ask(&w2_client, "w2").await;
    ask(&alice_client, "alice").await;
    while let Ok(m) = tokio::time::timeout(DENIED, heard.next()).await {
        assert_eq!(
            m.unwrap().payload.as_ref(),
            b"w1",
            "someone but w1 asked for w1"
        );
    }
    assert!(
        tokio::time::timeout(DENIED, w2_listens.next())
            .await
            .is_err(),
        "another worker heard w1's ask"
    );
    assert!(
        tokio::time::timeout(DENIED, alice_listens.next())
            .await
            .is_err(),
        "a user heard a worker's ask"
    );
}
