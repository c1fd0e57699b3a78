//! Who may do what over NATS: one permission set per role, built from the
//! names in [`crate::subjects`], so that the permissions and the names they
//! guard never drift apart. `gpufleet auth` writes them into a nats-server
//! configuration; the README's "Security model" explains each line.
//!
//! Every identity gets its own reply inbox, `_INBOX.<identity>`, and may
//! subscribe to nothing else, so nobody reads another's replies. Only the
//! coordinator reads and writes the leases and job records; a worker
//! touches its own advert and lease keys, and publishes events and
//! artifacts under its own name; a user calls the API under its own name
//! and replays its own jobs' events and artifacts (through the filtered
//! consumer-create subject, which the server holds to the filter in the
//! subject); an admin replays everybody's.
//!
//! Nobody but the coordinator may use direct gets: the server publishes a
//! direct get's answer wherever the request's reply subject says, with the
//! stream's own rights, so a reply subject of `$JS.API.STREAM.PURGE.<any
//! stream>` purges that stream (pinned in `natsutil/tests/roles.rs`).
//! Workers and users read through filtered consumers instead.

use crate::ids::{UserId, WorkerId};
use crate::subjects::{self, js_api, Sender};

/// A role and the name it acts under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Coordinator,
    Worker(WorkerId),
    User(UserId),
    /// A user who sees and acts on every job (listed in the coordinator's
    /// `admins` setting as well).
    Admin(UserId),
}

/// What a NATS user may publish and subscribe to (allow lists; anything
/// else is refused by the server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    /// May answer each request it receives once (the server's
    /// `allow_responses`), whatever the reply subject: a worker answers the
    /// coordinator's deliveries, without any right to publish to the
    /// coordinator's inbox otherwise.
    pub allow_responses: bool,
}

/// The identity the coordinator's inbox is named after; `_` keeps it apart
/// from every worker and user name.
pub const COORDINATOR_IDENTITY: &str = "_coordinator";

/// Where an identity's replies come: `_INBOX.<identity>`.
pub fn inbox_prefix(identity: &str) -> String {
    format!("_INBOX.{identity}")
}

/// Whether `subject` is in `identity`'s inbox (where only it reads).
pub fn in_inbox_of(identity: &str, subject: &str) -> bool {
    subject
        .strip_prefix(inbox_prefix(identity).as_str())
        .is_some_and(|rest| rest.starts_with('.'))
}

impl Role {
    /// The name the role acts under (its inbox's).
    pub fn identity(&self) -> &str {
        match self {
            Role::Coordinator => COORDINATOR_IDENTITY,
            Role::Worker(w) => w.as_str(),
            Role::User(u) | Role::Admin(u) => u.as_str(),
        }
    }

    pub fn inbox_prefix(&self) -> String {
        inbox_prefix(self.identity())
    }

    pub fn permissions(&self) -> Permissions {
        let inbox = format!("{}.>", self.inbox_prefix());
        match self {
            Role::Coordinator => Permissions {
                publish: vec![
                    // It creates the stores, follows leases, adverts and
                    // results, and reads records: the whole JetStream API.
                    js_api::ALL.into(),
                    "$JS.FC.>".into(),
                    subjects::kv_subject(subjects::LEASES_BUCKET, ">"),
                    subjects::kv_subject(subjects::JOBS_BUCKET, ">"),
                    subjects::events_from(&Sender::Coordinator),
                    // Messages for running tasks, through their workers.
                    subjects::DELIVER_ALL.into(),
                    // Replies to every user's requests.
                    format!("{}.>", inbox_prefix("*")),
                ],
                // Not `$SRV.>`: a reply goes wherever the requester says,
                // and the coordinator may write the buckets, so it answers
                // only on its own endpoints, where it checks the reply
                // subject (the micro service's discovery replies it cannot
                // check are off under roles).
                // And every worker's alive requests (the leader answers
                // them, to the requesting worker's inbox only).
                subscribe: vec![
                    subjects::api_any_user(">"),
                    subjects::ALIVE_ALL.into(),
                    inbox,
                ],
                allow_responses: false,
            },
            Role::Worker(w) => {
                let leases = subjects::kv_subject(subjects::LEASES_BUCKET, &format!("{w}.>"));
                let advert = subjects::kv_subject(subjects::WORKERS_BUCKET, w.as_str());
                let leases_stream = subjects::kv_stream(subjects::LEASES_BUCKET);
                let workers_stream = subjects::kv_stream(subjects::WORKERS_BUCKET);
                Permissions {
                    publish: vec![
                        leases.clone(),
                        advert.clone(),
                        subjects::events_from(&Sender::Worker(w.clone())),
                        subjects::worker_artifacts(w),
                        // Heard alive while JetStream cannot take its
                        // writes: only for itself.
                        subjects::alive(w),
                        js_api::consumer_create_filtered(&leases_stream, &leases),
                        js_api::consumer_create_filtered(&workers_stream, &advert),
                        js_api::flow_control(&leases_stream),
                        js_api::flow_control(&workers_stream),
                    ],
                    // Messages for the tasks it runs, from the coordinator
                    // (the only one that may publish there).
                    subscribe: vec![inbox, subjects::deliver(w)],
                    allow_responses: true,
                }
            }
            Role::User(u) => reader(u, Some(u), inbox),
            Role::Admin(u) => reader(u, None, inbox),
        }
    }
}

/// A user's permissions: the API under its own name, and the events and
/// artifacts of `owner`'s jobs (every owner's for `None`).
fn reader(user: &UserId, owner: Option<&UserId>, inbox: String) -> Permissions {
    let (events, artifacts) = match owner {
        Some(o) => (subjects::user_events(o), subjects::user_artifacts(o)),
        None => (
            subjects::EVENTS_ALL.to_string(),
            subjects::ARTIFACTS_ALL.to_string(),
        ),
    };
    let mut publish = vec![
        subjects::api(user, ">"),
        js_api::consumer_create_filtered(subjects::EVENTS_STREAM, &events),
        js_api::consumer_create_filtered(subjects::ARTIFACTS_STREAM, &artifacts),
        js_api::flow_control(subjects::EVENTS_STREAM),
        js_api::flow_control(subjects::ARTIFACTS_STREAM),
    ];
    if owner.is_none() {
        // An admin sets the scheduling policy (that one key, nothing else
        // of the bucket).
        publish.push(subjects::kv_subject(
            subjects::JOBS_BUCKET,
            subjects::POLICY_KEY,
        ));
    }
    Permissions {
        publish,
        subscribe: vec![inbox],
        allow_responses: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_writes_under_its_own_name_only() {
        let w = WorkerId::new("gpu-1").unwrap();
        let p = Role::Worker(w).permissions();
        assert!(p
            .publish
            .contains(&"$KV.gpufleet-leases.gpu-1.>".to_string()));
        assert!(p
            .publish
            .contains(&"$KV.gpufleet-workers.gpu-1".to_string()));
        assert!(p
            .publish
            .contains(&"gpufleet.events.*.*.*.*.gpu-1".to_string()));
        assert!(p.publish.contains(
            &"$JS.API.CONSUMER.CREATE.KV_gpufleet-leases.*.$KV.gpufleet-leases.gpu-1.>".to_string()
        ));
        assert!(!p.publish.iter().any(|s| s.contains("gpufleet-jobs")));
        assert_eq!(
            p.subscribe,
            vec![
                "_INBOX.gpu-1.>".to_string(),
                "gpufleet.deliver.gpu-1".to_string()
            ]
        );
        assert!(p.allow_responses);
    }

    #[test]
    fn a_user_reads_its_own_jobs_and_an_admin_everybodys() {
        let alice = UserId::new("alice").unwrap();
        let p = Role::User(alice.clone()).permissions();
        assert!(p.publish.contains(&"gpufleet.api.alice.>".to_string()));
        assert!(p.publish.contains(
            &"$JS.API.CONSUMER.CREATE.GPUFLEET_EVENTS.*.gpufleet.events.alice.>".to_string()
        ));
        assert!(!p.publish.iter().any(|s| s.starts_with("$KV.")));
        let a = Role::Admin(alice).permissions();
        assert!(a.publish.contains(
            &"$JS.API.CONSUMER.CREATE.GPUFLEET_ARTIFACTS.*.gpufleet.artifacts.>".to_string()
        ));
        // Direct gets are the coordinator's alone (see the module's notes).
        assert!(!a.publish.iter().any(|s| s.contains("DIRECT")));
        // Of the records' bucket, an admin writes the policy alone.
        let kv: Vec<&String> = a.publish.iter().filter(|s| s.starts_with("$KV.")).collect();
        assert_eq!(kv, vec!["$KV.gpufleet-jobs.meta.policy"]);
    }

    #[test]
    fn only_the_coordinator_writes_records_and_leases() {
        let p = Role::Coordinator.permissions();
        assert!(p.publish.contains(&"$KV.gpufleet-jobs.>".to_string()));
        assert!(p
            .publish
            .contains(&"gpufleet.events.*.*.*.*._c".to_string()));
        assert!(!p.subscribe.iter().any(|s| s.starts_with("$SRV")));
        assert_eq!(Role::Coordinator.inbox_prefix(), "_INBOX._coordinator");
    }
}
