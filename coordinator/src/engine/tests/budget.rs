//! The pass budget: one pass makes at most `max_reservations_per_pass`
//! reservations, and the next pass follows at once with the rest.

use super::*;

#[test]
fn a_big_queue_is_placed_across_passes_within_the_budget() {
    let cfg = CoordinatorConfig {
        max_reservations_per_pass: 3,
        ..Default::default()
    };
    let mut e = ready_with(cfg, &[advert("w1", 64, 0)]);
    let mut jobs = Vec::new();
    for _ in 0..8 {
        let (tx, _rx) = oneshot::channel();
        let one = spec(r#"{"tasks": [{"command": ["true"]}]}"#);
        e.handle(Input::Api(
            ApiCall::Submit(Box::new(one)),
            Caller::everyone(),
            tx,
        ));
        jobs.push(e.jobs.iter().max_by_key(|(_, j)| j.seq).unwrap().0.clone());
    }
    let mut passes: Vec<Vec<JobId>> = Vec::new();
    while e.schedule_pending() {
        passes.push(pass(&mut e).into_iter().map(|(_, l)| l.job_id).collect());
    }
    let sizes: Vec<usize> = passes.iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![3, 3, 2]);
    // Queue order holds across the passes.
    assert_eq!(passes.concat(), jobs);
}
