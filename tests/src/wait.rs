//! Every await in a test has a deadline.

use std::future::Future;
use std::time::Duration;

/// Awaits `fut`, panicking with `what` if it takes longer than `deadline`.
pub async fn with_deadline<T>(deadline: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(deadline, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {deadline:?} waiting for {what}"),
    }
}

/// Re-checks `check` until it yields `Some`, for state that has no event to
/// wait on (a process table, a file); panics after `deadline`.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    with_deadline(deadline, what, async {
        loop {
            if let Some(v) = check().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await
}
