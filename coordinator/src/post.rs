//! The postman: hands messages for running tasks to the workers that run
//! them (a request on `subjects::deliver(worker)`, which the worker
//! answers once the line is in the task's inbox), and reports how many
//! arrived.
//!
//! One courier per worker carries its parcels one at a time, in the order
//! the engine decided them, so that messages from one sender reach a task
//! in the order they were sent; a slow or vanished worker holds up only
//! its own parcels (each waits at most [`DELIVERY_TIMEOUT`]). Couriers
//! idle for a minute end. Delivery is at most once: a message whose
//! worker does not answer in time counts as not delivered, though it may
//! have been.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::join_all;
use gpufleet_schema::message::{Delivery, DeliveryReply};
use gpufleet_schema::{codec, subjects, WorkerId};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::engine::{talk_sent, undeliverable, AfterPost, Post};

/// How long a worker has to answer one delivery.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// A courier with nothing to carry for this long ends.
const COURIER_IDLE: Duration = Duration::from_secs(60);
/// Parcels waiting for one worker; past it, more count as not delivered.
const COURIER_QUEUE: usize = 1024;

/// One delivery, and where to say whether it arrived.
type Parcel = (Delivery, oneshot::Sender<bool>);

/// Carries every post that comes on `posts` until the channel closes.
pub async fn run(client: async_nats::Client, mut posts: mpsc::Receiver<Post>) {
    let mut post_office = PostOffice {
        client,
        couriers: HashMap::new(),
        tasks: JoinSet::new(),
    };
    // Each post's outcome, once all its parcels arrived or did not: the
    // notices of what did not, for the sender.
    let mut settling: JoinSet<Vec<(WorkerId, Delivery)>> = JoinSet::new();
    loop {
        tokio::select! {
            post = posts.recv() => {
                let Some(post) = post else { break };
                let arrivals = post
                    .parcels
                    .into_iter()
                    .map(|(worker, d)| (d.task_id.clone(), post_office.send(worker, d)))
                    .collect();
                settling.spawn(settle(arrivals, post.then));
            }
            Some(done) = settling.join_next(), if !settling.is_empty() => match done {
                Ok(notices) => {
                    for (worker, d) in notices {
                        drop(post_office.send(worker, d));
                    }
                }
                Err(e) => tracing::error!(error = %e, "settling a post of messages failed"),
            },
            Some(done) = post_office.tasks.join_next(), if !post_office.tasks.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "a courier of messages failed");
                }
            }
        }
    }
}

/// The couriers, one per worker with parcels to carry.
struct PostOffice {
    client: async_nats::Client,
    couriers: HashMap<WorkerId, mpsc::Sender<Parcel>>,
    tasks: JoinSet<()>,
}

impl PostOffice {
    /// Gives `worker`'s courier a parcel; says whether it arrived.
    fn send(&mut self, worker: WorkerId, delivery: Delivery) -> oneshot::Receiver<bool> {
        let (tx, rx) = oneshot::channel();
        let courier = match self.couriers.get(&worker) {
            Some(c) if !c.is_closed() => c.clone(),
            _ => {
                self.couriers.retain(|_, c| !c.is_closed());
                let c = courier(&self.client, &mut self.tasks, worker.clone());
                self.couriers.insert(worker.clone(), c.clone());
                c
            }
        };
        if courier.try_send((delivery, tx)).is_err() {
            tracing::warn!(%worker, "too many messages waiting for one worker; dropping one");
        }
        rx
    }
}

/// Starts the courier of `worker`'s parcels.
fn courier(
    client: &async_nats::Client,
    tasks: &mut JoinSet<()>,
    worker: WorkerId,
) -> mpsc::Sender<Parcel> {
    let (tx, mut rx) = mpsc::channel::<Parcel>(COURIER_QUEUE);
    let client = client.clone();
    tasks.spawn(async move {
        let subject = subjects::deliver(&worker);
        while let Ok(Some((delivery, arrived))) =
            tokio::time::timeout(COURIER_IDLE, rx.recv()).await
        {
            let ok = deliver(&client, &subject, &delivery).await;
            let _ = arrived.send(ok);
        }
    });
    tx
}

/// Hands one delivery over; whether the worker says it arrived.
async fn deliver(client: &async_nats::Client, subject: &str, delivery: &Delivery) -> bool {
    let Ok(body) = codec::encode(delivery) else {
        return false;
    };
    let asked = client.request(subject.to_string(), body.into());
    let answer = match tokio::time::timeout(DELIVERY_TIMEOUT, asked).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            tracing::info!(subject, error = %e, "a message could not be delivered");
            return false;
        }
        Err(_) => {
            tracing::info!(subject, "a worker did not answer a delivery in time");
            return false;
        }
    };
    match codec::decode::<DeliveryReply>(&answer.payload) {
        Ok(r) => {
            if let Some(why) = r.why.filter(|_| !r.delivered) {
                tracing::debug!(subject, task_id = %delivery.task_id, why, "a message was not delivered");
            }
            r.delivered
        }
        Err(e) => {
            tracing::warn!(subject, error = %e, "an unreadable answer to a delivery");
            false
        }
    }
}

/// Once every parcel of a post has arrived or not, does what follows;
/// returns the notices for a sender of what did not arrive.
async fn settle(
    arrivals: Vec<(gpufleet_schema::TaskId, oneshot::Receiver<bool>)>,
    then: AfterPost,
) -> Vec<(WorkerId, Delivery)> {
    let outcomes = join_all(
        arrivals
            .into_iter()
            .map(|(task, rx)| async move { (task, rx.await.unwrap_or(false)) }),
    )
    .await;
    match then {
        AfterPost::Reply { tx, job } => {
            let got = outcomes
                .into_iter()
                .filter_map(|(task, ok)| ok.then_some(task))
                .collect();
            let _ = tx.send(talk_sent(&job, got));
            Vec::new()
        }
        AfterPost::Bounce {
            sender: (worker, back),
            to,
            refused,
        } => {
            let missed = outcomes
                .into_iter()
                .filter(|(_, ok)| !ok)
                .map(|(task, _)| (task.to_string(), "its worker did not take it".to_string()));
            refused
                .into_iter()
                .chain(missed)
                .map(|(receiver, why)| (worker.clone(), undeliverable(&back, &to, &receiver, &why)))
                .collect()
        }
    }
}
